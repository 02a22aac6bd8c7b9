"""Initial codebook of one layer from its pretrained weights.

The levels are k-means centres (the SQS authors' moving each window's outermost levels onto
its extreme values is not done: outlier-aware windows give the tails their levels).

Fit values: the weights expected to survive pruning (by default the largest magnitudes of
the layer at the target sparsity; the guide passes the weights whose initial gate score is
above the global target quantile); all weights when fewer than K are expected to survive. Windows are planned on them (:func:`plan_windows`), then
each window gets an exact 1-D k-means codebook; mixing
weights are cluster fractions and scales cluster standard deviations
(:func:`gmm_from_centres`).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, NamedTuple, Sequence

import numpy as np
import torch

from sqs_pyro.guides.kmeans import gmm_from_centres, kmeans_1d
from sqs_pyro.guides.windows import plan_windows


@dataclass(frozen=True)
class InitialCodebook:
    """Window of each weight, window of each level, and the level means / weights / scales."""

    window_ids: np.ndarray
    component_windows: np.ndarray
    locs: np.ndarray
    mix: np.ndarray
    scales: np.ndarray

    def quantize(self, values: np.ndarray) -> np.ndarray:
        """Each value snapped to the nearest level of its own window."""
        x = np.asarray(values, dtype=np.float64).ravel()
        dist = np.abs(x[:, None] - self.locs[None, :])
        dist[self.window_ids[:, None] != self.component_windows[None, :]] = np.inf
        return self.locs[dist.argmin(axis=1)]


class StartCoding(NamedTuple):
    """A given coding of one layer to start the guide from (e.g. a one-shot quantised layer, see
    :func:`sqs_pyro.infer.compress`'s ``start``): the level index of every weight (``codes``,
    shape of the weight), the K ``levels``, with group scales the fp16 ``scales``
    (``(R, ceil(C / G))``; ``None`` without) and, for a pruned coding, the bool ``mask`` of the
    kept weights (``None``: all kept)."""

    codes: torch.Tensor
    levels: torch.Tensor
    scales: torch.Tensor | None = None
    mask: torch.Tensor | None = None

    def latents(self, values: torch.Tensor, levels: torch.Tensor) -> torch.Tensor:
        """The start of the latent weights: each kept one on its coded level of ``levels``, each
        pruned one at its own (normalised) value in ``values``."""
        coded = levels[self.codes.to(values.device).long()]  # uint8 codes would index as a mask
        return coded if self.mask is None else torch.where(self.mask.to(values.device), coded, values)

    def gate_scores(self, scores: torch.Tensor) -> torch.Tensor:
        """Gate scores that rank every kept weight above every pruned one and, within each set,
        follow ``scores`` (non-negative): ``1[kept] + scores / (2 max scores)``."""
        if self.mask is None:
            return scores
        return self.mask.to(scores) + scores / (2 * scores.max().clamp_min(1e-30))


def codebook_from_codes(values: np.ndarray, levels: np.ndarray, fit: np.ndarray | None = None) -> InitialCodebook:
    """The initial codebook of a given coding's (sorted) ``levels``, one window: mixing weights and
    scales of the nearest-level clusters of the values (of those ``fit`` names, bool per value, when
    given; :func:`~sqs_pyro.guides.kmeans.gmm_from_centres`), so that a latent weight on a level has
    that level as its most probable one."""
    x = np.asarray(values, dtype=np.float64).ravel()
    kept = x if fit is None else x[np.asarray(fit, dtype=bool).ravel()]
    locs, mix, scales = gmm_from_centres(kept, np.asarray(levels, dtype=np.float64))
    return InitialCodebook(np.zeros(x.size, dtype=np.int64), np.zeros(locs.size, dtype=np.int64), locs, mix, scales)


def magnitude_mask(weights: np.ndarray, keep: int) -> np.ndarray:
    """Keep the ``keep`` entries of largest ``|w|`` (ties to the lower index)."""
    w = np.abs(np.asarray(weights, dtype=np.float64).ravel())
    mask = np.zeros(w.size, dtype=bool)
    if keep > 0:
        mask[np.argsort(-w, kind="stable")[:keep]] = True
    return mask


def magnitude_keep(values: np.ndarray, sparsity: float) -> np.ndarray:
    """Bool mask of the ``1 - sparsity`` largest-magnitude values (at least one)."""
    size = np.asarray(values).size
    return magnitude_mask(values, max(1, int(round((1.0 - sparsity) * size))))


def padded_centres(values: np.ndarray, levels: int) -> np.ndarray:
    """k-means centres; with fewer distinct values than levels, spread the extra levels around them."""
    centres = kmeans_1d(values, levels)
    if len(centres) < levels:
        lo, hi = float(values.min()), float(values.max())
        span = max(hi - lo, 1e-3 * max(abs(lo), abs(hi), 1e-3))
        extra = np.linspace(lo - span, hi + span, levels - len(centres) + 2)[1:-1]
        centres = np.sort(np.concatenate([centres, extra]))
    return centres


def initial_codebook(values: np.ndarray, components: int, windows: str, equal_windows: int = 2,
                     iqr_factor: float = 5.0, sparsity: float = 0.0, fit: np.ndarray | None = None) -> InitialCodebook:
    """The guide's initial codebook for one layer (see module docstring).

    ``fit`` (bool per weight) names the weights expected to be kept; by default the
    ``1 - sparsity`` largest magnitudes of this layer.
    """
    x = np.asarray(values, dtype=np.float64).ravel()
    fit = magnitude_keep(x, sparsity) if fit is None else np.asarray(fit, dtype=bool).ravel()
    if fit.sum() < components:  # too few expected survivors to place K levels: fit all weights
        fit = np.ones(x.size, dtype=bool)
    plan = plan_windows(x, components, windows, equal_windows, iqr_factor, fit=fit)
    locs, mix, scales = [], [], []
    for win, levels in enumerate(plan.levels):
        member = plan.window_ids == win
        vals = x[member & fit] if (member & fit).any() else x[member]
        if vals.size == 0:  # an empty window (possible only for tiny layers): spread levels over the layer
            vals = x
        l, m, s = gmm_from_centres(vals, padded_centres(vals, levels))
        locs.append(l)
        mix.append(m)
        scales.append(s)
    return InitialCodebook(plan.window_ids, plan.component_windows, np.concatenate(locs), np.concatenate(mix),
                           np.concatenate(scales))


def scoped_kthvalues(tensors: Sequence[torch.Tensor], scope: str,
                     rank: Callable[[int], int]) -> list[torch.Tensor | None]:
    """The ``rank(n)``-th smallest value of each comparison group of ``n`` values, as a threshold
    broadcastable to each tensor: one group over all tensors (``scope="global"``), one per tensor
    (``"layer"``) or one per output row, dim 0 (``"row"``). A rank below 1 gives ``None``."""
    if scope == "global":
        flat = torch.cat([t.detach().reshape(-1) for t in tensors])
        k = rank(flat.numel())
        return [torch.kthvalue(flat, k).values if k >= 1 else None] * len(tensors)
    thresholds: list[torch.Tensor | None] = []
    for t in tensors:
        rows = t.detach().reshape(t.shape[0] if scope == "row" else 1, -1)
        k = rank(rows.shape[1])
        values = torch.kthvalue(rows, k, dim=1).values if k >= 1 else None
        if values is not None:
            values = values.reshape(-1, *[1] * (t.dim() - 1)) if scope == "row" else values[0]
        thresholds.append(values)
    return thresholds
