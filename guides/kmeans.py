r"""Exact, deterministic 1-D k-means for codebook initialisation.

Sorted 1-D data makes k-means a segmentation problem solved exactly by dynamic
programming: ``D[k, j] = min_i D[k-1, i] + SSE(i, j)`` with segment costs from prefix
sums. Large inputs are first summarised by ``max_points`` equal-count bins (count, sum and
sum of squares per bin), the DP runs exactly on the bins, and a few Lloyd iterations on the
full data polish the centres. No randomness is involved. With weights ``h_i >= 0`` the
objective is ``sum_i h_i (x_i - c_{a(i)})^2`` (weighted bins and weighted means; SqueezeLLM's
sensitivity-weighted codebooks take ``h`` from the loss's curvature).
"""
from __future__ import annotations

import numpy as np
import torch


def _segment_dp(counts: np.ndarray, sums: np.ndarray, sqsums: np.ndarray, k: int) -> np.ndarray:
    """Exact optimal split of ordered weighted points into k segments; returns the centres."""
    n = len(counts)
    c = np.concatenate([[0.0], np.cumsum(counts)])
    s = np.concatenate([[0.0], np.cumsum(sums)])
    q = np.concatenate([[0.0], np.cumsum(sqsums)])
    # cost[i, j] = SSE of points i..j-1 (i < j)
    cnt = c[None, :] - c[:, None]
    tot = s[None, :] - s[:, None]
    with np.errstate(divide="ignore", invalid="ignore"):
        cost = (q[None, :] - q[:, None]) - np.where(cnt > 0, tot * tot / cnt, 0.0)
    cost = np.where(np.triu(np.ones((n + 1, n + 1), dtype=bool), 1), np.maximum(cost, 0.0), np.inf)
    best = cost[0].copy()
    splits = []
    for _ in range(1, k):
        total = best[:, None] + cost
        arg = np.argmin(total, axis=0)
        best = total[arg, np.arange(n + 1)]
        splits.append(arg)
    bounds = [n]
    j = n
    for arg in reversed(splits):
        j = int(arg[j])
        bounds.append(j)
    bounds.append(0)
    bounds = bounds[::-1]
    return np.array([tot_sum / max(cnt_, 1e-300) for tot_sum, cnt_ in
                     ((s[b] - s[a], c[b] - c[a]) for a, b in zip(bounds[:-1], bounds[1:]))])


def kmeans_1d(values: np.ndarray, k: int, max_points: int = 512, lloyd_iters: int = 5,
              weights: np.ndarray | None = None, overwrite: bool = False) -> np.ndarray:
    """Sorted k-means centres of ``values`` (1-D), optionally ``weights``-weighted (non-negative,
    with a positive sum); ``k`` is capped at the number of distinct values. The values keep their
    floating dtype, and so do the weights (no float64 copy of a large float32 input); sums are taken in
    float64 per bin. ``overwrite``: the values may be sorted in place (no sorted copy; the same centres)."""
    x = _floating(values)
    h = None if weights is None else _floating(weights)
    if x.size == 0:
        raise ValueError("kmeans_1d needs at least one value")
    if h is not None and (h.shape != x.shape or h.min() < 0 or not h.sum() > 0):
        raise ValueError("kmeans_1d: weights must be non-negative, one per value, with a positive sum")
    if _unsorted(x):
        if h is None and overwrite and x.flags.writeable:
            x.sort()  # np.sort is this sort on a copy
        elif h is None:
            x = np.sort(x)
        else:
            order = np.argsort(x, kind="stable")
            h = h[order]
            if overwrite and x.flags.writeable:
                x.sort(kind="stable")  # x[order]: the stable order is unique
            else:
                x = x[order]
            del order
    if _distinct_at_most(x, k):
        return np.unique(x).astype(np.float64)
    edges = np.linspace(0, x.size, min(x.size, max_points) + 1).astype(np.int64)
    counts, sums, sqsums = (np.array(v) for v in zip(*(_moments(x, h, a, b) for a, b in zip(edges[:-1], edges[1:]))))
    centres = np.sort(_segment_dp(counts, sums, sqsums, k))
    for _ in range(lloyd_iters):
        cut = np.concatenate([[0], _searchsorted(x, (centres[1:] + centres[:-1]) / 2), [x.size]])
        parts = [_moments(x, h, a, b) for a, b in zip(cut[:-1], cut[1:])]
        centres = np.array([s / n if n > 0 else c for (n, s, _), c in zip(parts, centres)])
    return np.sort(centres)


CHUNK = 1 << 20  # values per step of the order and distinct-value checks of a large input


def _floating(values: np.ndarray) -> np.ndarray:
    """``values`` flat, as they are if floating, else as float64."""
    x = np.asarray(values).ravel()
    return x if x.dtype.kind == "f" else x.astype(np.float64)


def _unsorted(x: np.ndarray) -> bool:
    """``np.any(x[1:] < x[:-1])``, a chunk at a time (no full-size boolean)."""
    n = x.size - 1  # the pairs (x[i], x[i + 1])
    return any(np.any(x[a + 1:min(a + CHUNK, n) + 1] < x[a:min(a + CHUNK, n)]) for a in range(0, n, CHUNK))


def _distinct_at_most(x: np.ndarray, k: int) -> bool:
    """``np.count_nonzero(np.diff(x)) + 1 <= k`` for sorted ``x``, a chunk of the difference at a time."""
    changes = 0
    for a in range(0, x.size - 1, CHUNK):
        changes += np.count_nonzero(np.diff(x[a:a + CHUNK + 1]))
        if changes + 1 > k:
            return False
    return True


def _searchsorted(x: np.ndarray, v: np.ndarray) -> np.ndarray:
    """``np.searchsorted(x, v)`` for sorted ``x`` and float64 ``v``: the count of values below each ``v``, summed
    over chunks of ``x`` (``np.searchsorted`` would compare a float64 copy of a whole float32 ``x``)."""
    return sum(np.searchsorted(x[a:a + CHUNK].astype(np.float64), v) for a in range(0, x.size, CHUNK))


def _moments(x: np.ndarray, h: np.ndarray | None, start: int, stop: int) -> tuple[float, float, float]:
    """``(sum h, sum h x, sum h x^2)`` over ``x[start:stop]`` in float64 (``h = 1`` if None: the same
    sums without the ones and their products)."""
    seg = x[start:stop].astype(np.float64)
    if h is None:
        return float(seg.size), float(seg.sum()), float(seg @ seg)
    w = h[start:stop].astype(np.float64)
    hx = w * seg
    return float(w.sum()), float(hx.sum()), float(hx @ seg)


def gmm_from_centres(values: np.ndarray, centres: np.ndarray):
    """Mixture (locs, weights, scales) from centres: nearest-centre clusters of ``values``.

    Zero or undefined cluster spreads are replaced by the smallest valid one (or a small
    fraction of the data range).
    """
    x = np.sort(np.asarray(values, dtype=np.float64).ravel())
    locs = np.array(centres, dtype=np.float64)
    cut = np.searchsorted(x, (locs[1:] + locs[:-1]) / 2)
    parts = np.split(x, cut)
    counts = np.array([p.size for p in parts], dtype=np.float64)
    weights = np.maximum(counts, 0.5) / max(counts.sum(), 1.0)
    weights = weights / weights.sum()
    scales = np.array([p.std() if p.size > 1 else 0.0 for p in parts])
    valid = scales[np.isfinite(scales) & (scales > 0)]
    floor = valid.min() if valid.size else max((x[-1] - x[0]) * 1e-3, 1e-6)
    scales = np.where(np.isfinite(scales) & (scales > 0), scales, floor)
    return locs, weights, scales


def _numpy(t: torch.Tensor) -> np.ndarray:
    """A float32/64 tensor's values as numpy (shared), anything else as a float64 copy."""
    t = t.detach().cpu()
    return t.numpy() if t.dtype in (torch.float32, torch.float64) else t.double().numpy()


def kmeans_codebook(values: torch.Tensor, components: int, weights: torch.Tensor | None = None,
                    overwrite: bool = False) -> torch.Tensor:
    """Exact 1-D k-means centres of ``values`` (``weights``-weighted if given), sorted; with fewer
    distinct values than ``components`` the largest centre is repeated (unused levels), and all
    zeros if empty. ``overwrite``: float32/64 CPU values may be sorted in place."""
    if values.numel() == 0:
        return values.new_zeros(components)
    h = None if weights is None else _numpy(weights)
    x = _numpy(values)
    centres = kmeans_1d(x, components, weights=h, overwrite=overwrite)
    centres = torch.as_tensor(centres, dtype=values.dtype, device=values.device)
    return torch.cat([centres, centres[-1:].expand(components - centres.numel())])
