r"""What a Bayesian-deep-learning user reaches for instead of a posterior over all weights.

* Temperature scaling (Guo et al., 2017): ``p = softmax(z / T)`` with
  ``T* = argmin_T -sum_i log softmax(z_i / T)_{y_i}`` on a validation split. The NLL is
  convex in ``beta = 1 / T`` (a log-sum-exp of linear functions minus a linear one), so it is
  unimodal in ``log T``: a golden-section search over ``log T`` finds it.
* Out-of-distribution detection by predictive entropy ``H(p) = -sum_c p_c log p_c``: the
  AUROC of telling out- from in-distribution inputs, ``P(H_out > H_in) + P(H_out = H_in) / 2``,
  by the Mann-Whitney rank formula with mid-ranks for ties.
* A last-layer Laplace approximation (MacKay, 1992; Kristiadi et al., 2020), implemented here the
  way ``laplace-torch``'s ``Laplace(model, "classification", subset_of_weights="last_layer",
  hessian_structure="full")`` does it: ``laplace-torch`` 0.3 installs beside torch 2.13 only
  without torchvision (its torchvision wheel does not load with torch 2.13), so it is not a
  dependency; ``make venv-laplace`` puts it in its own venv for ``benchmarks/laplace_reference.py``,
  which checks this class against it. See :class:`LastLayerLaplace`.
"""
from __future__ import annotations

import math

import torch
from torch import nn

from sqs_pyro.errors import SQSInputError

_GOLDEN = (math.sqrt(5.0) - 1.0) / 2.0
PRIOR_PRECISIONS = tuple(float(v) for v in torch.logspace(-4, 4, 100, dtype=torch.float64))


def _temperature_nll(logits: torch.Tensor, y: torch.Tensor, temperature: float) -> float:
    return float(nn.functional.cross_entropy(logits / temperature, y))


def fit_temperature(logits: torch.Tensor, y: torch.Tensor, bounds: tuple[float, float] = (0.05, 20.0),
                    tol: float = 1e-6) -> float:
    """The temperature ``T`` in ``bounds`` minimising the mean NLL of ``softmax(logits / T)`` on labels
    ``y`` (golden-section search over ``log T`` to ``tol``)."""
    if logits.dim() != 2 or len(logits) != len(y) or len(y) == 0:
        raise SQSInputError(f"need logits (N, C) and N labels, got {tuple(logits.shape)} and {tuple(y.shape)}")
    if not 0 < bounds[0] < bounds[1]:
        raise SQSInputError(f"temperature bounds must satisfy 0 < low < high, got {bounds}")
    logits, y = logits.double(), y.long()
    lo, hi = math.log(bounds[0]), math.log(bounds[1])
    a, b = hi - _GOLDEN * (hi - lo), lo + _GOLDEN * (hi - lo)
    fa, fb = (_temperature_nll(logits, y, math.exp(v)) for v in (a, b))
    while hi - lo > tol:
        if fa <= fb:
            hi, b, fb = b, a, fa
            a = hi - _GOLDEN * (hi - lo)
            fa = _temperature_nll(logits, y, math.exp(a))
        else:
            lo, a, fa = a, b, fb
            b = lo + _GOLDEN * (hi - lo)
            fb = _temperature_nll(logits, y, math.exp(b))
    return math.exp((lo + hi) / 2)


def temperature_scaled(logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """``softmax(logits / T)`` in float64."""
    return torch.softmax(logits.double() / temperature, dim=-1)


def predictive_entropy(probs: torch.Tensor) -> torch.Tensor:
    """``H(p_i) = -sum_c p_ic log p_ic`` per row (nats; ``0 log 0 = 0``)."""
    probs = probs.double()
    return -torch.special.xlogy(probs, probs).sum(-1)


def auroc(negatives: torch.Tensor, positives: torch.Tensor) -> float:
    """``P(s_pos > s_neg) + P(s_pos = s_neg) / 2`` over all pairs, by mid-ranks:
    ``(sum of the positives' ranks - n_pos (n_pos + 1) / 2) / (n_pos n_neg)``."""
    if len(negatives) == 0 or len(positives) == 0:
        raise SQSInputError("auroc needs at least one negative and one positive score")
    scores = torch.cat([negatives.double().flatten(), positives.double().flatten()])
    _, inverse, counts = torch.unique(scores, return_inverse=True, return_counts=True)
    below = torch.cumsum(counts, 0) - counts  # scores strictly below each distinct value
    ranks = (below + (counts + 1) / 2.0)[inverse]  # 1-based mid-ranks
    n_neg, n_pos = len(negatives), len(positives)
    u = float(ranks[n_neg:].sum()) - n_pos * (n_pos + 1) / 2.0
    return u / (n_pos * n_neg)


def ood_auroc(probs_in: torch.Tensor, probs_out: torch.Tensor) -> float:
    """AUROC of detecting out-of-distribution inputs by a higher predictive entropy."""
    return auroc(predictive_entropy(probs_in), predictive_entropy(probs_out))


def last_linear(model: nn.Module) -> nn.Linear:
    """The last ``nn.Linear`` of ``model`` in module order (its output layer)."""
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    if not linears:
        raise SQSInputError(f"{type(model).__name__} has no nn.Linear layer for a last-layer Laplace")
    return linears[-1]


class LastLayerLaplace(nn.Module):
    r"""A Gaussian posterior over the output layer ``f = W phi(x) + b`` of a trained classifier.

    Parameters ``theta`` are the rows of ``[W b]`` (``C x (D + 1)``, row-major); with
    ``phi~ = [phi; 1]``, ``p_i = softmax(f_i)`` and ``Lambda_i = diag(p_i) - p_i p_i^T``:

    * :meth:`fit` sums the generalised Gauss-Newton matrix ``H = sum_i Lambda_i (x) phi~_i phi~_i^T``
      over the training data at the trained weights (the MAP). The logits are linear in ``theta``,
      so ``H`` is the exact Hessian of the summed cross-entropy;
    * the posterior is ``N(theta_MAP, (H + delta I)^{-1})`` with an isotropic prior precision
      ``delta``, chosen by :meth:`tune_prior_precision` on validation NLL over a log grid
      (``laplace-torch``'s ``method="gridsearch"``, not its default ``marglik``: 10^-4 .. 10^4, 100 points;
      ``laplace-torch`` 0.3 never resets its running NLL metric between grid points, so it takes the
      argmin of the running mean, here the argmin of the NLL itself: ``benchmarks/laplace_reference.py``);
    * the predictive is the probit approximation (``laplace-torch``'s default ``glm`` / ``probit``):
      ``p(y | x) = softmax(f / sqrt(1 + pi/8 var_c))`` with ``var_c = phi~^T Sigma_cc phi~`` the
      variance of logit ``c`` under the posterior.

    ``forward(x)`` returns these probabilities. ``H = U diag(lambda) U^T`` is diagonalised once, so
    ``Sigma(delta) = U diag(1 / (lambda + delta)) U^T`` costs nothing per ``delta``.
    """

    def __init__(self, model: nn.Module, prior_precision: float = 1.0) -> None:
        super().__init__()
        self.model = model
        self.head = last_linear(model)
        self.prior_precision = prior_precision
        self.eigenvalues: torch.Tensor | None = None
        self.eigenvectors: torch.Tensor | None = None

    @torch.no_grad()
    def _features(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(phi~, logits)`` of a batch; the logits must be the head's output."""
        seen = []
        handle = self.head.register_forward_hook(lambda mod, args, out: seen.append(args[0]))
        try:
            logits = self.model(x)
        finally:
            handle.remove()
        phi = seen[-1].double().flatten(1)
        if not torch.allclose(self.head(seen[-1]).double(), logits.double(), atol=1e-5, rtol=1e-5):
            raise SQSInputError("the model's output is not its last nn.Linear's output (a last-layer Laplace "
                                "needs logits = W phi + b)")
        if self.head.bias is not None:
            phi = torch.cat([phi, torch.ones(len(phi), 1, dtype=phi.dtype)], 1)
        return phi, logits.double()

    @torch.no_grad()
    def fit(self, x: torch.Tensor, y: torch.Tensor, batch_size: int = 1000) -> "LastLayerLaplace":
        """Sum the GGN over ``(x, y)`` (the labels do not enter it) and diagonalise it."""
        if len(x) == 0 or len(x) != len(y):
            raise SQSInputError(f"need as many inputs as labels (> 0), got {len(x)} and {len(y)}")
        self.model.eval()
        out, width = self.head.out_features, self.head.in_features + (self.head.bias is not None)
        ggn = torch.zeros(out * width, out * width, dtype=torch.float64)
        for i in range(0, len(x), batch_size):
            phi, logits = self._features(x[i:i + batch_size])
            p = torch.softmax(logits, -1)
            for c in range(out):  # diag(p): block c is Phi^T diag(p_c) Phi
                ggn[c * width:(c + 1) * width, c * width:(c + 1) * width] += phi.T @ (p[:, c:c + 1] * phi)
            g = (p[:, :, None] * phi[:, None, :]).reshape(len(phi), -1)  # -p p^T (x) phi phi^T
            ggn -= g.T @ g
        eigenvalues, self.eigenvectors = torch.linalg.eigh(ggn)
        self.eigenvalues = eigenvalues.clamp_min(0.0)  # H is PSD; drop round-off below zero
        return self

    def _check_fitted(self) -> None:
        if self.eigenvalues is None:
            raise SQSInputError("call LastLayerLaplace.fit before using the posterior")

    def posterior_covariance(self) -> torch.Tensor:
        """``(H + delta I)^{-1}`` over the rows of ``[W b]``."""
        self._check_fitted()
        return (self.eigenvectors / (self.eigenvalues + self.prior_precision)) @ self.eigenvectors.T

    @torch.no_grad()
    def _logit_moments(self, x: torch.Tensor, precisions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Logit means ``(N, C)`` and variances ``(N, C, G)`` for each prior precision of ``precisions``."""
        self._check_fitted()
        phi, logits = self._features(x)
        u = self.eigenvectors.view(self.head.out_features, phi.shape[1], -1)
        z = torch.einsum("nd,cdk->nck", phi, u)  # phi~ projected on the eigenvectors, block c
        weights = 1.0 / (self.eigenvalues[:, None] + precisions[None, :])
        return logits, (z ** 2) @ weights

    @staticmethod
    def _probit(logits: torch.Tensor, variances: torch.Tensor) -> torch.Tensor:
        """``softmax_c(f_c / sqrt(1 + pi/8 var_c))`` over dimension 1 (the classes)."""
        return torch.softmax(logits / torch.sqrt(1.0 + math.pi / 8.0 * variances), dim=1)

    def validation_nll(self, x: torch.Tensor, y: torch.Tensor, grid: tuple[float, ...] = PRIOR_PRECISIONS,
                       batch_size: int = 500) -> torch.Tensor:
        """Mean NLL of the probit predictive on ``(x, y)`` at each prior precision of ``grid``."""
        precisions = torch.tensor(grid, dtype=torch.float64)
        nll = torch.zeros(len(grid), dtype=torch.float64)
        for i in range(0, len(x), batch_size):
            logits, variances = self._logit_moments(x[i:i + batch_size], precisions)
            probs = self._probit(logits[:, :, None], variances)  # (n, C, G)
            picked = probs.gather(1, y[i:i + batch_size, None, None].expand(-1, 1, len(grid))).squeeze(1)
            nll -= torch.log(picked.clamp_min(1e-300)).sum(0)
        return nll / len(x)

    def tune_prior_precision(self, x: torch.Tensor, y: torch.Tensor, grid: tuple[float, ...] = PRIOR_PRECISIONS,
                             batch_size: int = 500) -> float:
        """Set ``delta`` to the grid value with the smallest NLL of the probit predictive on ``(x, y)``."""
        self.prior_precision = grid[int(torch.argmin(self.validation_nll(x, y, grid, batch_size)))]
        return self.prior_precision

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """The probit predictive probabilities ``(N, C)`` at the current prior precision."""
        logits, variances = self._logit_moments(x, torch.tensor([self.prior_precision], dtype=torch.float64))
        return self._probit(logits, variances[..., 0])
