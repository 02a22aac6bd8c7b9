r"""Windows: which codebook levels each weight of a layer may use.

A layer has K levels in total (b = log2 K bits per kept weight, one code index over all
windows, so windows cost no extra bits). Windows partition the layer's weights by value
(thresholds, so every weight has a window) and split the K levels among them. Levels are
fitted to the *fit* values: by default the weights a magnitude criterion would keep at the
target sparsity, so that no level is spent on weights that will be pruned.

* ``"none"``: one window, all K levels.
* ``"equal"``: ``n`` equal-count windows over all the layer's sorted values, K/n levels each
  (the ablation baseline; the SQS authors' windows). Not over the fit values: when the fit
  values are the two tails of a magnitude cut, their quantiles fall inside whichever tail is
  larger, and a window then spans both signs while another has levels of one sign only.
* ``"outlier"``: weights below ``Q1 - c*IQR`` and above ``Q3 + c*IQR`` (c = ``iqr_factor``,
  fences from all weights) form their own windows; each window gets one level, and the
  remaining levels go, one at a time, to the window whose k-means error (sum of squared
  errors of its fit values) drops the most, so tails get as many levels as they need. When
  the windows' total error is above that of one window with all K levels (small K,
  small tails), the layer keeps one window.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from sqs_pyro.guides.kmeans import kmeans_1d


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


def kmeans_sse(values: np.ndarray, k: int) -> float:
    """Sum of squared errors of ``values`` around their k-means centres (nearest-centre cells,
    summed from prefix sums of the sorted values: no N x k table)."""
    if values.size == 0:
        return 0.0
    x = np.sort(np.asarray(values, dtype=np.float64).ravel())
    centres = kmeans_1d(x, k)
    bounds = np.concatenate([[0], np.searchsorted(x, (centres[1:] + centres[:-1]) / 2), [x.size]])
    s = np.concatenate([[0.0], np.cumsum(x)])[bounds]
    q = np.concatenate([[0.0], np.cumsum(x * x)])[bounds]
    n, s, q = np.diff(bounds), np.diff(s), np.diff(q)
    return float(np.maximum(q - 2 * centres * s + centres * centres * n, 0.0).sum())


def allocate_levels(groups: list[np.ndarray], total: int) -> list[int]:
    """Greedy split of ``total`` levels over groups (>= 1 each) maximising the k-means SSE drop."""
    levels = [1] * len(groups)
    distinct = [len(np.unique(g)) for g in groups]
    # next_sse[i]: the SSE of group i with one more level; each k-means is computed once (the
    # exact k-means of a large group is the cost of the whole plan)
    next_sse = [kmeans_sse(g, 2) if d > 1 else 0.0 for g, d in zip(groups, distinct)]
    gains = [kmeans_sse(g, 1) - n if d > 1 else -1.0 for g, d, n in zip(groups, distinct, next_sse)]
    for _ in range(total - len(groups)):
        best = int(np.argmax(gains))
        if gains[best] < 0:  # every group already has a level per distinct value
            best = int(np.argmax([g.size for g in groups]))
        levels[best] += 1
        if levels[best] < distinct[best]:  # chosen by its gain: next_sse was its SSE at this count
            sse = next_sse[best]
            next_sse[best] = kmeans_sse(groups[best], levels[best] + 1)
            gains[best] = sse - next_sse[best]
        else:
            gains[best] = -1.0
    return levels


def plan_windows(values: np.ndarray, components: int, mode: str, equal_windows: int = 2,
                 iqr_factor: float = 5.0, fit: np.ndarray | None = None) -> WindowPlan:
    """Assign each weight to a window and each window its number of levels (see module docstring)."""
    x = np.asarray(values, dtype=np.float64).ravel()
    fit = np.ones(x.size, dtype=bool) if fit is None else np.asarray(fit, dtype=bool).ravel()
    fitted = np.sort(x[fit]) if fit.any() else np.sort(x)
    if mode == "none":
        return WindowPlan(np.zeros(x.size, dtype=np.int64), (components,))
    if mode == "equal":
        every = np.sort(x)
        parts = max(1, min(equal_windows, components, fitted.size))
        cuts = every[(np.arange(1, parts) * every.size) // parts]
        return WindowPlan(np.searchsorted(cuts, x, side="right").astype(np.int64),
                          tuple(_split_levels(components, parts)))
    if mode != "outlier":
        raise ValueError(f"unknown window mode {mode!r}")
    lo, hi = iqr_fences(x, iqr_factor)
    cuts = [c for c, present in ((lo, (x < lo).any()), (np.nextafter(hi, np.inf), (x > hi).any())) if present]
    ids = np.searchsorted(np.array(cuts), x, side="right").astype(np.int64)
    groups = [fitted[np.searchsorted(np.array(cuts), fitted, side="right") == w] for w in range(len(cuts) + 1)]
    groups = [g if g.size else x[ids == w] for w, g in enumerate(groups)]
    single = WindowPlan(np.zeros(x.size, dtype=np.int64), (components,))
    if len(groups) > components:  # not enough levels for separate tails
        return single
    levels = allocate_levels(groups, components)
    windowed_sse = sum(kmeans_sse(g, k) for g, k in zip(groups, levels))
    if windowed_sse > kmeans_sse(fitted, components) * (1 + 1e-9):  # tail windows would increase the error
        return single  # (ties, up to round-off, keep the tail windows)
    return WindowPlan(ids, tuple(levels))
