r"""Gaussian KL terms of the spike-and-GMM bound, on plain tensors (no distribution classes).

* ``KL(N(m_q, s_q^2) || N(m_p, s_p^2)) = log(s_p/s_q) + (s_q^2 + (m_q - m_p)^2) / (2 s_p^2) - 1/2``;
* against a mixture slab ``sum_m a_m N_m``, the Jensen bound of Hershey & Olsen (2007):
  ``KL(N || sum_m a_m N_m) <= -log sum_m a_m exp(-KL(N || N_m))`` (exact for one component).
"""
from __future__ import annotations

import torch


def gaussian_kl(loc_q, scale_q, loc_p, scale_p) -> torch.Tensor:
    """Closed-form ``KL(N(loc_q, scale_q^2) || N(loc_p, scale_p^2))`` (broadcasting)."""
    ratio = scale_q / scale_p
    return -torch.log(ratio) + 0.5 * (ratio ** 2 + ((loc_q - loc_p) / scale_p) ** 2) - 0.5


def gaussian_vs_mixture_kl_bound(loc, scale, mix_weights, mix_locs, mix_scales) -> torch.Tensor:
    """Upper bound ``-log sum_m a_m exp(-KL(N(loc, scale^2) || N_m))``; shape of ``loc``."""
    kl_m = gaussian_kl(loc.unsqueeze(-1), scale.unsqueeze(-1), mix_locs, mix_scales)
    return -torch.logsumexp(torch.log(mix_weights) - kl_m, dim=-1)


def component_kl(q, p) -> torch.Tensor:
    """``B_k``: the bound on ``KL(N(mu_k, s_k^2) || Slab)`` per codebook component, shape (K,).

    ``q`` has the codebook (``locs``, ``scales``), ``p`` the slab mixture (``slab_weights``,
    ``slab_locs``, ``slab_scales``)."""
    return gaussian_vs_mixture_kl_bound(q.locs, q.scales, p.slab_weights, p.slab_locs, p.slab_scales)
