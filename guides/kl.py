r"""The KL bound between the spike-and-GMM guide and the spike-and-slab(GMM) prior.

Because the point mass and the continuous parts are mutually singular, the KL splits
exactly into a Bernoulli part and ``g`` times the KL of the continuous parts:

.. math::

    KL(q_j || p) = KL_{Bern}(g_j || \lambda) + g_j\, KL\big(\textstyle\sum_k \phi_{jk} N_k \,||\, Slab\big)

Two upper bounds make the second term tractable:

1. joint convexity of KL: ``KL(sum_k phi_k N_k || Slab) <= sum_k phi_k KL(N_k || Slab)``;
2. for a mixture slab ``Slab = sum_m a_m N_m`` (Jensen on ``log sum_m``, the bound of
   Hershey & Olsen, 2007): ``KL(N_k || Slab) <= -log sum_m a_m exp(-KL(N_k || N_m))``,
   which is exact for a single-component slab.

So :func:`spike_gmm_kl` returns, per weight,
``KL_Bern(g_j || lam) + g_j sum_k phi_jk B_k`` with ``B_k`` the bound of (2); in ``"hard"`` mode,
whose guide assigns each weight its mode ``k_j`` (``phi`` at zero temperature),
``KL_Bern(g_j || lam) + g_j B_{k_j}`` (:meth:`~sqs_pyro.guides.distributions.SpikeGMM.mode_kl`). It is
registered with ``torch.distributions.kl_divergence`` so that Pyro's
``TraceMeanField_ELBO`` uses it analytically.
"""
from __future__ import annotations

import torch
from torch.distributions import register_kl

from sqs_pyro.guides.distributions import SpikeGMM, fixed_bernoulli_kl
from sqs_pyro.guides.gaussian_kl import component_kl, gaussian_kl, gaussian_vs_mixture_kl_bound
from sqs_pyro.models.priors import SpikeSlabGMM, log_inclusion

__all__ = ["bernoulli_kl", "component_kl", "gaussian_kl", "gaussian_vs_mixture_kl_bound", "spike_gmm_kl"]


def bernoulli_kl(q: SpikeGMM, inclusion: float | torch.Tensor) -> torch.Tensor:
    """``KL(Bern(g) || Bern(lam))`` per weight, stable for ``g`` near 0 or 1 (``lam`` a number, or a
    tensor when the prior is learned)."""
    g = q.inclusion
    log_lam, log_not_lam = log_inclusion(inclusion)
    if q.gate_fixed is not None:
        fixed = q.gate_fixed if q.gate_fixed.dtype == torch.bool else g
        return fixed_bernoulli_kl(fixed, log_lam, log_not_lam, g.dtype)
    log_g, log_not_g = q.log_inclusion()
    return g * (log_g - log_lam) + (1 - g) * (log_not_g - log_not_lam)


@register_kl(SpikeGMM, SpikeSlabGMM)
def spike_gmm_kl(q: SpikeGMM, p: SpikeSlabGMM) -> torch.Tensor:
    """Per-weight upper bound on ``KL(q || p)`` (see module docstring); shape ``q.batch_shape``.

    Reuses the bound that the fused kernels computed with ``q``'s draw when ``p`` equals ``q.kl_prior``.
    """
    if q.sampling == "hard":
        return q.mode_kl(p.inclusion, component_kl(q, p))
    fused = q.kl_for(p)
    if fused is not None:
        return fused
    return bernoulli_kl(q, p.inclusion) + q.inclusion * q.responsibility_dot(component_kl(q, p))
