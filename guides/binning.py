r"""Quantile-binned assignments: the authors' memory saving for LLM-scale layers.

Instead of a responsibility vector per weight, the weights of each window are cut into
``B`` equal-count quantile bins and every weight of a bin takes the assignment of the bin's
mean, so only ``B x K`` responsibilities per window are needed. :func:`quantile_bin_means`
replaces each value by its bin's mean; evaluating the most probable level on those values
gives the binned codes, to be compared with per-weight codes (``benchmarks/smollm.py``).
"""
from __future__ import annotations

import torch


def quantile_bin_means(values: torch.Tensor, window_ids: torch.Tensor | None, bins: int) -> torch.Tensor:
    """``values`` with each entry replaced by the mean of its equal-count quantile bin
    (``bins`` bins per window; windows from ``window_ids``, one window if ``None``)."""
    if bins < 1:
        raise ValueError(f"bins must be >= 1, got {bins}")
    flat = values.detach().reshape(-1)
    windows = torch.zeros_like(flat, dtype=torch.long) if window_ids is None else window_ids.reshape(-1)
    out = torch.empty_like(flat)
    for w in torch.unique(windows):
        idx = torch.nonzero(windows == w).squeeze(1)
        order = idx[torch.argsort(flat[idx])]
        n = order.numel()
        bin_of = torch.arange(n, device=flat.device) * min(bins, n) // n
        sums = torch.zeros(min(bins, n), dtype=flat.dtype, device=flat.device).index_add_(0, bin_of, flat[order])
        counts = torch.bincount(bin_of, minlength=min(bins, n)).to(flat.dtype)
        out[order] = (sums / counts)[bin_of]
    return out.reshape(values.shape)
