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
from torch.distributions import constraints


class SpikeSlabGMM(TorchDistribution):
    """Elementwise spike-and-slab prior whose slab is a Gaussian mixture.

    ``inclusion`` is the prior inclusion probability :math:`\\lambda`; ``slab_weights``,
    ``slab_locs`` and ``slab_scales`` (1-D, length M) define the slab mixture. The
    distribution is scalar-valued with the given ``batch_shape`` (one element per weight).
    """

    arg_constraints: dict = {}
    support = constraints.real
    has_rsample = False

    def __init__(
        self,
        inclusion: float,
        slab_weights: torch.Tensor,
        slab_locs: torch.Tensor,
        slab_scales: torch.Tensor,
        batch_shape: torch.Size | tuple[int, ...] = torch.Size(),
        validate_args: bool | None = None,
    ) -> None:
        self.inclusion = float(inclusion)
        self.slab_weights = slab_weights
        self.slab_locs = slab_locs
        self.slab_scales = slab_scales
        super().__init__(torch.Size(batch_shape), torch.Size(), validate_args=False)

    @classmethod
    def from_config(cls, config, batch_shape=(), dtype=torch.float32, device=None) -> "SpikeSlabGMM":
        """The prior described by an :class:`~sqs_pyro.config.SQSConfig`."""
        as_t = lambda v: torch.tensor(v, dtype=dtype, device=device)  # noqa: E731
        return cls(config.prior_inclusion, as_t(config.slab_weights), as_t(config.slab_locs),
                   as_t(config.slab_scales), batch_shape)

    def expand(self, batch_shape, _instance=None) -> "SpikeSlabGMM":
        return SpikeSlabGMM(self.inclusion, self.slab_weights, self.slab_locs, self.slab_scales, batch_shape)

    def slab_log_prob(self, value: torch.Tensor) -> torch.Tensor:
        """log of the slab mixture density at ``value``."""
        v = value.unsqueeze(-1)
        comp = (-0.5 * ((v - self.slab_locs) / self.slab_scales) ** 2 - torch.log(self.slab_scales)
                - 0.5 * math.log(2 * math.pi))
        return torch.logsumexp(comp + torch.log(self.slab_weights), dim=-1)

    def log_prob(self, value: torch.Tensor) -> torch.Tensor:
        slab = math.log(self.inclusion) + self.slab_log_prob(value)
        spike = torch.full_like(slab, math.log1p(-self.inclusion))
        return torch.where(value == 0, spike, slab)

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


def kl_weighting(beta: float):
    """Effect handler that weighs the weight sites' KL by ``beta`` (``beta = 0`` masks it out).

    Used identically by the model and the guide; Pyro's ``TraceMeanField_ELBO`` multiplies
    each site's analytic KL by the guide site's scale (or zeroes it under a mask).
    """
    if beta == 0:
        return poutine.mask(mask=False)
    return poutine.scale(scale=float(beta))
