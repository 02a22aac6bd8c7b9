r"""The spike-and-slab GMM prior over one weight tensor.

.. math::

    p(w) = (1 - \lambda)\,\delta_0(w) + \lambda \sum_m a_m\,\mathcal N(w; m_m, s_m^2)

Densities are taken with respect to the mixed base measure :math:`\delta_0 + \text{Lebesgue}`,
so ``log_prob(0) = log(1 - lam)`` and ``log_prob(w != 0) = log(lam) + log slab(w)``.
"""
from __future__ import annotations

import math

import torch
from pyro import poutine
from pyro.distributions import TorchDistribution
from torch import nn
from torch.distributions import constraints


def log_inclusion(lam: float | torch.Tensor) -> tuple[float | torch.Tensor, float | torch.Tensor]:
    """``(log lam, log(1 - lam))`` of an inclusion probability (a number or a tensor)."""
    if isinstance(lam, torch.Tensor):
        return torch.log(lam), torch.log1p(-lam)
    return math.log(lam), math.log1p(-lam)


class SpikeSlabGMM(TorchDistribution):
    """Elementwise spike-and-slab prior whose slab is a Gaussian mixture.

    ``inclusion`` is the prior inclusion probability :math:`\\lambda` (a number, or a 0-d
    tensor when it is learned); ``slab_weights``, ``slab_locs`` and ``slab_scales`` (1-D,
    length M) define the slab mixture. The distribution is scalar-valued with the given
    ``batch_shape`` (one element per weight).
    """

    arg_constraints: dict = {}
    support = constraints.real
    has_rsample = False

    def __init__(
        self,
        inclusion: float | torch.Tensor,
        slab_weights: torch.Tensor,
        slab_locs: torch.Tensor,
        slab_scales: torch.Tensor,
        batch_shape: torch.Size | tuple[int, ...] = torch.Size(),
        validate_args: bool | None = None,
    ) -> None:
        self.inclusion = inclusion if isinstance(inclusion, torch.Tensor) else float(inclusion)
        self.slab_weights = slab_weights
        self.slab_locs = slab_locs
        self.slab_scales = slab_scales
        super().__init__(torch.Size(batch_shape), torch.Size(), validate_args=False)

    @classmethod
    def from_config(cls, config, batch_shape=(), dtype=torch.float32, device=None) -> "SpikeSlabGMM":
        """The prior of an :class:`~sqs_pyro.config.SQSConfig`: inclusion ``prior_inclusion``, slab ``N(0, slab_scale^2)``."""
        as_t = lambda v: torch.tensor(v, dtype=dtype, device=device)  # noqa: E731
        return cls(config.prior_inclusion, as_t((1.0,)), as_t((0.0,)), as_t((config.slab_scale,)), batch_shape)

    def expand(self, batch_shape, _instance=None) -> "SpikeSlabGMM":
        return SpikeSlabGMM(self.inclusion, self.slab_weights, self.slab_locs, self.slab_scales, batch_shape)

    def log_inclusion(self) -> tuple[float | torch.Tensor, float | torch.Tensor]:
        """``(log lam, log(1 - lam))``, differentiable when ``lam`` is a tensor."""
        return log_inclusion(self.inclusion)

    def slab_log_prob(self, value: torch.Tensor) -> torch.Tensor:
        """log of the slab mixture density at ``value``."""
        v = value.unsqueeze(-1)
        comp = (-0.5 * ((v - self.slab_locs) / self.slab_scales) ** 2 - torch.log(self.slab_scales)
                - 0.5 * math.log(2 * math.pi))
        return torch.logsumexp(comp + torch.log(self.slab_weights), dim=-1)

    def log_prob(self, value: torch.Tensor) -> torch.Tensor:
        log_lam, log_not_lam = self.log_inclusion()
        slab = log_lam + self.slab_log_prob(value)
        return torch.where(value == 0, torch.zeros_like(slab) + log_not_lam, slab)

    def sample(self, sample_shape=torch.Size()) -> torch.Tensor:
        shape = self._extended_shape(sample_shape)
        with torch.no_grad():
            comp = torch.multinomial(self.slab_weights, math.prod(shape) or 1, replacement=True)[: math.prod(shape)]
            comp = comp.reshape(shape)
            slab = self.slab_locs[comp] + self.slab_scales[comp] * torch.randn(shape, dtype=self.slab_locs.dtype,
                                                                                 device=self.slab_locs.device)
            keep = torch.rand(shape, device=self.slab_locs.device) < self.inclusion
            return torch.where(keep, slab, torch.zeros_like(slab))

    @property
    def mean(self) -> torch.Tensor:
        m = self.inclusion * (self.slab_weights * self.slab_locs).sum()
        return m.expand(self.batch_shape)

    @property
    def variance(self) -> torch.Tensor:
        second = (self.slab_weights * (self.slab_scales ** 2 + self.slab_locs ** 2)).sum()
        m = self.inclusion * (self.slab_weights * self.slab_locs).sum()
        return (self.inclusion * second - m ** 2).expand(self.batch_shape)


class EmpiricalBayesPrior(nn.Module):
    r"""The hyper-parameters of one site's :class:`SpikeSlabGMM`, set by empirical Bayes.

    Buffers ``inclusion`` (lam) and a K-component slab (``slab_weights`` a, ``slab_locs`` m,
    ``slab_scales`` s). :meth:`maximise` is the M-step of variational EM: given the guide's
    gates ``g_j``, level assignments ``k_j`` and codebook ``N(mu_k, s_k^2)``, it sets

        lam = mean_j g_j,    a_k = sum_j g_j [k_j = k] / sum_j g_j,    N(m_k, s_k^2) = N(mu_k, s_k^2),

    which maximises the ELBO's ``-KL`` bound in ``lam`` exactly and in the slab up to the
    overlap of the levels. The KL per weight is then the code length of the compressed
    network: ``KL_Bern(g_j || lam)`` for the mask plus ``-log a_k`` per kept weight for its level
    (soft weight sharing, Ullrich et al., 2017, with the slab tied to the codebook).
    """

    def __init__(self, components: int, dtype: torch.dtype = torch.float32, device=None) -> None:
        super().__init__()
        full = lambda value, *shape: torch.full(shape, value, dtype=dtype, device=device)  # noqa: E731
        self.register_buffer("inclusion", full(0.5))
        self.register_buffer("slab_weights", full(1.0 / components, components))
        self.register_buffer("slab_locs", full(0.0, components))
        self.register_buffer("slab_scales", full(1.0, components))

    @torch.no_grad()
    def maximise(self, gates: torch.Tensor, levels: torch.Tensor, locs: torch.Tensor, scales: torch.Tensor,
                 floor: float = 1e-4) -> None:
        """The M-step above; ``gates`` and ``levels`` per weight, ``locs``/``scales`` per level.
        Probabilities are kept in ``[floor, 1 - floor]`` so every code length stays finite."""
        g = gates.detach().reshape(-1).to(self.inclusion.dtype)
        self.inclusion.fill_(float(g.mean().clamp(floor, 1.0 - floor)))
        usage = torch.zeros_like(self.slab_weights).index_add_(0, levels.reshape(-1), g)
        usage = usage / usage.sum() if float(usage.sum()) > 0 else torch.ones_like(usage)
        usage = usage.clamp_min(floor)
        self.slab_weights.copy_(usage / usage.sum())
        self.slab_locs.copy_(locs.detach())
        self.slab_scales.copy_(scales.detach())

    def distribution(self, batch_shape: torch.Size | tuple[int, ...] = ()) -> SpikeSlabGMM:
        """The prior with the current hyper-parameters."""
        return SpikeSlabGMM(self.inclusion, self.slab_weights, self.slab_locs, self.slab_scales, batch_shape)


def kl_weighting(beta: float):
    """Effect handler that weighs the weight sites' KL by ``beta`` (``beta = 0`` masks it out).

    Used identically by the model and the guide; Pyro's ``TraceMeanField_ELBO`` multiplies
    each site's analytic KL by the guide site's scale (or zeroes it under a mask).
    """
    if beta == 0:
        return poutine.mask(mask=False)
    return poutine.scale(scale=float(beta))
