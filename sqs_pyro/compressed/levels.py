r"""Which codebook levels a layer's posterior tells apart.

Neighbouring levels ``k, l`` of one window with
``|mu_k - mu_l| <= separation * sqrt((s_k^2 + s_l^2) / 2)`` are merge candidates: with
``separation = 2`` this is the point below which an equal mixture of two Gaussians of that
pooled scale is unimodal, so the data cannot tell the two levels apart.
"""
from __future__ import annotations

from typing import Any

import numpy as np


def merge_candidates(locs: np.ndarray, scales: np.ndarray, comp_window: np.ndarray,
                     separation: float = 2.0) -> list[dict[str, Any]]:
    """Neighbouring levels of one window closer than ``separation`` pooled scales (see module docstring)."""
    mu, s, win = (np.asarray(a).ravel() for a in (locs, scales, comp_window))
    pairs = []
    for w in np.unique(win):
        comps = np.flatnonzero(win == w)
        comps = comps[np.argsort(mu[comps], kind="stable")]
        for k, l in zip(comps[:-1], comps[1:]):
            pooled = float(np.sqrt((s[k] ** 2 + s[l] ** 2) / 2))
            gap = float(abs(mu[l] - mu[k]))
            if gap <= separation * pooled:
                pairs.append({"components": [int(k), int(l)], "window": int(w), "gap": gap,
                              "gap_in_scales": gap / pooled})
    return pairs
