"""Checks of a posterior against a known truth: interval coverage and ranking by inclusion.

* Coverage of central intervals: for draws ``w^(s) ~ q(w_j)`` and true values ``w*_j``, the fraction of
  ``j`` with ``Q_{(1-l)/2}(w_j) <= w*_j <= Q_{(1+l)/2}(w_j)`` (``l`` the level, e.g. 0.9). A calibrated
  posterior covers about ``l``; a mean-field one over correlated weights covers less.
* Ranking: the AUROC of a score (e.g. the inclusion probability ``g_j``) for telling the true non-zero
  weights from the null ones, ``P(score_true > score_null)`` with ties counted one half.
"""
from __future__ import annotations

import torch


def interval_coverage(draws: torch.Tensor, truth: torch.Tensor, level: float = 0.9) -> tuple[float, float]:
    """``(coverage, mean width)`` of the central ``level`` intervals of ``draws`` (S draws, then any shape of
    weights) over the true values ``truth`` (that shape)."""
    if not 0.0 < level < 1.0:
        raise ValueError(f"level must lie in (0, 1), got {level!r}")
    flat = draws.reshape(draws.shape[0], -1).double()
    lo = torch.quantile(flat, (1.0 - level) / 2, dim=0)
    hi = torch.quantile(flat, (1.0 + level) / 2, dim=0)
    w = truth.reshape(-1).double()
    return float(((w >= lo) & (w <= hi)).double().mean()), float((hi - lo).mean())


def ranking_auroc(score: torch.Tensor, positive: torch.Tensor) -> float:
    """``P(score_i > score_k)`` over positive ``i`` and negative ``k`` (ties: 1/2), by the rank-sum formula
    with mid-ranks."""
    s, pos = score.reshape(-1).double(), positive.reshape(-1).bool()
    n_pos, n_neg = int(pos.sum()), int((~pos).sum())
    if n_pos == 0 or n_neg == 0:
        raise ValueError("the AUROC needs at least one positive and one negative")
    order = torch.argsort(s)
    ranks = torch.empty_like(s)
    ranks[order] = torch.arange(1, len(s) + 1, dtype=s.dtype)
    values, inverse = torch.unique(s, return_inverse=True)  # mid-ranks for ties
    mid = torch.zeros_like(values).index_add_(0, inverse, ranks) / torch.bincount(inverse, minlength=len(values))
    return float((mid[inverse][pos].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))
