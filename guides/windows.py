r"""Windows: which codebook levels each weight of a layer may use.

A layer has K levels in total (b = log2 K bits per kept weight, one code index over all
windows, so windows cost no extra bits). Windows partition the layer's pretrained weights
by value and split the K levels among them:

* ``"none"``: one window, all K levels.
* ``"equal"``: ``n`` equal-count windows over the sorted weights, K/n levels each.
* ``"outlier"``: weights below ``Q1 - c*IQR`` and above ``Q3 + c*IQR`` (c = ``iqr_factor``)
  form their own windows with ``max(1, K // 8)`` levels each (fewer if they hold fewer
  weights); the bulk keeps the rest.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class WindowPlan:
    """``window_ids``: window of each weight (flat, ascending in value); ``levels``: K per window."""

    window_ids: np.ndarray
    levels: tuple[int, ...]

    @property
    def component_windows(self) -> np.ndarray:
        return np.repeat(np.arange(len(self.levels)), self.levels)


def iqr_fences(values: np.ndarray, factor: float) -> tuple[float, float]:
    """Tukey fences ``(Q1 - c IQR, Q3 + c IQR)``."""
    q1, q3 = np.percentile(values, [25.0, 75.0])
    iqr = q3 - q1
    return float(q1 - factor * iqr), float(q3 + factor * iqr)


def _split_levels(total: int, parts: int) -> list[int]:
    base, extra = divmod(total, parts)
    return [base + (1 if i < extra else 0) for i in range(parts)]


def plan_windows(values: np.ndarray, components: int, mode: str, equal_windows: int = 2,
                 iqr_factor: float = 5.0) -> WindowPlan:
    """Assign each weight to a window and each window its number of levels."""
    x = np.asarray(values, dtype=np.float64).ravel()
    n = x.size
    if mode == "none":
        return WindowPlan(np.zeros(n, dtype=np.int64), (components,))
    if mode == "equal":
        parts = max(1, min(equal_windows, components, n))
        order = np.argsort(x, kind="stable")
        ids = np.empty(n, dtype=np.int64)
        ids[order] = np.minimum(np.arange(n) * parts // n, parts - 1)
        return WindowPlan(ids, tuple(_split_levels(components, parts)))
    if mode != "outlier":
        raise ValueError(f"unknown window mode {mode!r}")
    lo, hi = iqr_fences(x, iqr_factor)
    low, high = x < lo, x > hi
    tail_levels = max(1, components // 8)
    windows: list[tuple[np.ndarray, int]] = []
    n_low, n_high = int(low.sum()), int(high.sum())
    k_low = min(tail_levels, n_low) if n_low else 0
    k_high = min(tail_levels, n_high) if n_high else 0
    if components - k_low - k_high < 1:
        k_low = k_high = 0
    bulk = ~(low if k_low else np.zeros(n, bool)) & ~(high if k_high else np.zeros(n, bool))
    if k_low:
        windows.append((low, k_low))
    windows.append((bulk, components - k_low - k_high))
    if k_high:
        windows.append((high, k_high))
    ids = np.empty(n, dtype=np.int64)
    for w, (member, _) in enumerate(windows):
        ids[member] = w
    return WindowPlan(ids, tuple(k for _, k in windows))
