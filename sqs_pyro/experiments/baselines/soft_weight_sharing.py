r"""Soft weight-sharing (Ullrich, Meeds & Welling, 2017): retrain the pretrained network under a learned
Gaussian-mixture prior, then set every weight to the mean of its most responsible component.

Per layer, a mixture of ``J = K + 1`` components (``K = config.components``): component 0 has the fixed
mean ``mu_0 = 0`` and the fixed mixing weight ``pi_0``, its precision is learned; components ``1..K``
learn their means (initialised evenly over ``[min w, max w]`` of the pretrained layer), their
precisions ``lambda_k = exp(gamma_k)`` (initial standard deviation 0.25) and their mixing weights
``pi_k = (1 - pi_0) softmax(rho)_k``. The loss of a minibatch is

.. math::

    \mathrm{CE} + \frac{\tau}{N} \Big[ -\sum_j \log \sum_k \pi_k\, \mathcal{N}(w_j; \mu_k, \lambda_k^{-1})
    + \sum_k \big((1 - \alpha_k)\gamma_k + \beta_k e^{\gamma_k}\big) \Big]

over the selected layers' weights ``w_j`` and ``N`` training examples; the last sum is the negative log
Gamma(alpha, beta) hyperprior on each precision in ``gamma = log lambda`` (the tutorial's values:
``(5000, 2)`` for the zero component, ``(250, 0.1)`` for the others, both with the mode ``std ~ 0.02``).

Post-processing: components ``a, b`` are merged when both ``KL(a || b)`` and ``KL(b || a)`` are below
:data:`MERGE_KL` (connected groups; merged ``log pi`` by log-sum-exp, mean and precision as
``pi``-weighted averages; a group holding component 0 keeps mean 0). Every weight takes the mean of
``argmax_k pi_k N(w_j; mu_k, lambda_k^{-1})``; component 0 means pruned. The paper's tutorial merges
at ``KL < 1e-10`` only (coincident components).

How the method reads this project's config (the baselines' contract):

* ``tau = config.kl_weight``: the prior term's weight, as SQS's ``beta`` (``tau = 1``: MAP); the paper
  uses ``tau = 0.003`` (``kl_weight`` of the preset ``soft_weight_sharing``, chosen on validation);
* ``pi_0 = config.sparsity``: the prior's fixed mass on zero (paper: 0.99). No mask is imposed: the
  achieved sparsity is whatever the retrained weights and the prior give;
* rates: weights ``lr_weights``; means ``lr_codebook``; log-precisions and mixing logits
  ``PRECISION_RATE_FACTOR * lr_codebook`` (the tutorial's 5e-4 / 1e-4 / 3e-3 / 3e-3); cosine decay
  as every method. The schedule's phases play no role: the prior acts from the first step to the last;
* the codebook: one mixture per layer (the paper shares one across all layers) so that each layer's
  file codebook holds at most ``K`` levels, as for the other methods; the codebook stores the
  non-zero merged means that some weight uses, in increasing order.
"""
from __future__ import annotations

import math
from typing import Any, Sequence

import torch
from torch import nn

from sqs_pyro.compressed.materialize import CompressedLayer
from sqs_pyro.config import SQSConfig
from sqs_pyro.errors import SQSInputError
from sqs_pyro.experiments.baselines.common import BaselineResult, fit
from sqs_pyro.models.selection import CompressedSite

METHOD = "soft_weight_sharing"
INIT_STD = 0.25
ZERO_HYPERPRIOR = (5e3, 2.0)  # Gamma(alpha, beta) on the zero component's precision
LEVEL_HYPERPRIOR = (2.5e2, 0.1)  # on the other components' precisions
PRECISION_RATE_FACTOR = 30.0  # log-precision and mixing-logit rate over the means' rate (3e-3 / 1e-4)
MERGE_KL = 0.1


def gaussian_kl(mean_a: torch.Tensor, gamma_a: torch.Tensor, mean_b: torch.Tensor,
                gamma_b: torch.Tensor) -> torch.Tensor:
    r"""``KL(N(mu_a, 1/lambda_a) || N(mu_b, 1/lambda_b)) = (gamma_a - gamma_b)/2
    + lambda_b/2 (1/lambda_a + (mu_a - mu_b)^2) - 1/2`` with ``gamma = log lambda`` (broadcasts)."""
    return 0.5 * (gamma_a - gamma_b) + 0.5 * gamma_b.exp() * ((-gamma_a).exp() + (mean_a - mean_b) ** 2) - 0.5


class MixturePrior(nn.Module):
    """The ``K + 1``-component mixture of one layer: zero component fixed at ``(0, pi_0)``."""

    def __init__(self, weight: torch.Tensor, components: int, pi_zero: float) -> None:
        super().__init__()
        lo, hi = float(weight.min()), float(weight.max())
        self.pi_zero = pi_zero
        self.means = nn.Parameter(torch.linspace(lo, hi, components, dtype=weight.dtype))
        self.gammas = nn.Parameter(torch.full((components + 1,), -2 * math.log(INIT_STD), dtype=weight.dtype))
        self.rhos = nn.Parameter(torch.zeros(components, dtype=weight.dtype))

    def all_means(self) -> torch.Tensor:
        return torch.cat([self.means.new_zeros(1), self.means])

    def log_pis(self) -> torch.Tensor:
        rest = math.log1p(-self.pi_zero) + torch.log_softmax(self.rhos, 0)
        return torch.cat([rest.new_full((1,), math.log(self.pi_zero)), rest])

    def log_joint(self, w: torch.Tensor) -> torch.Tensor:
        """``log pi_k + log N(w_j; mu_k, 1/lambda_k)``, shape ``(w.numel(), K + 1)``."""
        diff = w.reshape(-1, 1) - self.all_means()
        return self.log_pis() + 0.5 * self.gammas - 0.5 * math.log(2 * math.pi) - 0.5 * self.gammas.exp() * diff ** 2

    def neg_log_prior(self, w: torch.Tensor) -> torch.Tensor:
        """``-sum_j log p(w_j)`` plus the Gamma hyperpriors' ``sum_k (1 - alpha_k) gamma_k + beta_k lambda_k``."""
        alpha = self.gammas.new_tensor([ZERO_HYPERPRIOR[0]] + [LEVEL_HYPERPRIOR[0]] * self.means.numel())
        beta = self.gammas.new_tensor([ZERO_HYPERPRIOR[1]] + [LEVEL_HYPERPRIOR[1]] * self.means.numel())
        hyper = ((1 - alpha) * self.gammas + beta * self.gammas.exp()).sum()
        return -torch.logsumexp(self.log_joint(w), -1).sum() + hyper

    @torch.no_grad()
    def merged(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(means, gammas, log_pis)`` after merging nearly identical components; the group of
        component 0 comes first, with mean exactly 0."""
        means, gammas, log_pis = self.all_means(), self.gammas.detach(), self.log_pis()
        kl = gaussian_kl(means[:, None], gammas[:, None], means[None], gammas[None])
        close = (kl < MERGE_KL) & (kl.T < MERGE_KL)
        group = list(range(means.numel()))
        for a, b in close.nonzero().tolist():  # union of connected components (smallest index as the root)
            ra, rb = self._root(group, a), self._root(group, b)
            group[max(ra, rb)] = min(ra, rb)
        roots = sorted({self._root(group, k) for k in range(means.numel())})
        out = []
        for r in roots:
            members = [k for k in range(means.numel()) if self._root(group, k) == r]
            w = torch.softmax(log_pis[members], 0)
            mean = 0.0 if r == 0 else float((w * means[members]).sum())
            out.append((mean, float((w * gammas[members].exp()).sum().log()), float(torch.logsumexp(log_pis[members], 0))))
        return tuple(torch.tensor(col, dtype=means.dtype) for col in zip(*out))

    @staticmethod
    def _root(group: list[int], k: int) -> int:
        while group[k] != k:
            k = group[k]
        return k


def quantize(w: torch.Tensor, means: torch.Tensor, gammas: torch.Tensor,
             log_pis: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(mask, codes, codebook)`` of ``w`` under the mixture: each weight to its most responsible
    component (index 0: the zero component, pruned); the codebook is the used non-zero means, sorted."""
    diff = w.reshape(-1, 1) - means
    best = (log_pis + 0.5 * gammas - 0.5 * gammas.exp() * diff ** 2).argmax(-1).reshape(w.shape)
    mask = best != 0
    used = best[mask].unique()
    codebook, order = means[used].sort()
    lookup = torch.zeros(means.numel(), dtype=torch.long)
    lookup[used[order]] = torch.arange(used.numel())
    codes = torch.where(mask, lookup[best], 0)
    if codebook.numel() == 0:  # everything pruned: a one-level codebook that no weight uses
        codebook = means.new_zeros(1)
    return mask, codes, codebook


class SoftWeightSharingCompressor:
    """Latent weights retrained under a per-layer learned mixture prior; quantised at the end."""

    def __init__(self, sites: Sequence[CompressedSite], pretrained: dict[str, torch.Tensor],
                 config: SQSConfig) -> None:
        self.latent = {n: nn.Parameter(w.clone()) for n, w in pretrained.items()}
        self.prior = {n: MixturePrior(w, config.components, config.sparsity) for n, w in pretrained.items()}

    def param_groups(self, config: SQSConfig) -> list[dict[str, Any]]:
        rest = [p for m in self.prior.values() for p in (m.gammas, m.rhos)]
        return [{"params": list(self.latent.values()), "lr": config.lr_weights, "name": "latent"},
                {"params": [m.means for m in self.prior.values()], "lr": config.lr_codebook, "name": "codebook"},
                {"params": rest, "lr": PRECISION_RATE_FACTOR * config.lr_codebook, "name": "mixture"}]

    def weights(self, phase: str, temperature: float) -> dict[str, torch.Tensor]:
        return dict(self.latent)

    def prior_loss(self) -> torch.Tensor:
        return sum(self.prior[n].neg_log_prior(w) for n, w in self.latent.items())

    def prune(self, sparsity: float) -> None:
        """Nothing to do: the prior's zero component prunes, at the end."""

    def freeze(self) -> None:
        """Nothing to do: the prior acts until the last step."""

    @torch.no_grad()
    def layers(self) -> list[CompressedLayer]:
        out = []
        for name, w in self.latent.items():
            mask, codes, book = quantize(w.detach(), *self.prior[name].merged())
            out.append(CompressedLayer(name, tuple(w.shape), mask, codes, book,
                                       torch.zeros(book.numel(), dtype=torch.long)))
        return out


def compress_soft_weight_sharing(net: nn.Module, train_data: Any, config: SQSConfig) -> BaselineResult:
    """Soft weight-sharing with the SQS run's settings: ``tau = config.kl_weight``, ``pi_0 = config.sparsity``."""
    if not 0.0 < config.sparsity < 1.0:
        raise SQSInputError(f"soft weight-sharing reads sparsity as the zero component's weight pi_0, which must "
                            f"lie in (0, 1); got {config.sparsity!r}")
    return fit(METHOD, net, train_data, config, SoftWeightSharingCompressor)
