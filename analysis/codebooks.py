r"""Learned codebooks: levels, mixing weights, scales, code usage, and what could be merged or dropped.

Per layer and per window: the levels ``mu_k``, the mixing weights ``pi_k`` (normalised within
the window), the scales ``s_k``, the number of kept weights whose greedy code is ``k``
(``n_k``), and the code-usage entropy ``H = -sum_k p_k log2 p_k`` with ``p_k = n_k / sum n``:
the effective bits per kept weight that an entropy coder would need (``<= log2 K``).

* Drop candidates: levels that no kept weight uses (``n_k = 0``).
* Merge candidates: neighbouring levels of one window with
  ``|mu_k - mu_l| <= separation * sqrt((s_k^2 + s_l^2) / 2)``. With ``separation = 2`` this
  is the point below which an equal mixture of two Gaussians of that pooled scale is
  unimodal: the data cannot tell the two levels apart.

:func:`layer_distributions` gives the histograms plotted by
:func:`sqs_pyro.analysis.plots.plot_weight_histogram`: the latent and pretrained weights on
common bins, the learned mixture's expected count per bin
``N sum_w (N_w / N) sum_{k in w} pi_k [Phi((b_{i+1} - mu_k) / s_k) - Phi((b_i - mu_k) / s_k)]``
(``N_w`` weights in window ``w``), and the compressed weights' counts per level and at zero.
"""
from __future__ import annotations

from typing import Any

import numpy as np
import torch

from sqs_pyro.analysis.inclusion import pretrained_weights
from sqs_pyro.compressed.accounting import code_width, usage_entropy
from sqs_pyro.compressed.levels import merge_candidates


def codebook_stats(locs: np.ndarray, scales: np.ndarray, mix: np.ndarray, comp_window: np.ndarray,
                   codes: np.ndarray, mask: np.ndarray, window_ids: np.ndarray,
                   separation: float = 2.0) -> dict[str, Any]:
    """Codebook of one layer: per window levels/mix/scales/usage/entropy, plus layer totals.

    ``codes`` are the greedy codes (global indices into ``locs``), ``mask`` the kept weights and
    ``window_ids`` each weight's window (all flat).
    """
    mu, s, pi, win = (np.asarray(a, dtype=np.float64 if i < 3 else np.int64).ravel()
                      for i, a in enumerate((locs, scales, mix, comp_window)))
    m = np.asarray(mask, dtype=bool).ravel()
    counts = np.bincount(np.asarray(codes).ravel()[m], minlength=mu.size)
    wid = np.asarray(window_ids).ravel()
    windows = []
    for w in np.unique(win):
        comps = np.flatnonzero(win == w)
        windows.append({
            "window": int(w), "components": comps.tolist(), "weights": int((wid == w).sum()),
            "kept": int(((wid == w) & m).sum()), "locs": mu[comps].tolist(), "mix": pi[comps].tolist(),
            "scales": s[comps].tolist(), "counts": counts[comps].tolist(),
            "codes_used": int((counts[comps] > 0).sum()), "entropy_bits": usage_entropy(counts[comps]),
        })
    return {
        "components": int(mu.size), "bits": code_width(mu.size),
        "codes_used": int((counts > 0).sum()), "entropy_bits": usage_entropy(counts),
        "windows": windows, "drop": np.flatnonzero(counts == 0).tolist(),
        "merge": merge_candidates(mu, s, win, separation),
    }


def _layer_arrays(result: Any) -> list[dict[str, Any]]:
    """Per compressed tensor: guide parameters and greedy codes as flat numpy arrays."""
    out = []
    compressed = {c.name: c for c in result.compressed().layers}
    with torch.no_grad():
        for layer in result.guide.layers:
            c = compressed[layer.site_name]
            n = layer.latent.numel()
            out.append({
                "name": layer.site_name,
                "latent": layer.latent.detach().reshape(-1).double().cpu().numpy(),
                "locs": layer.locs.detach().double().cpu().numpy(),
                "scales": layer.scales.detach().double().cpu().numpy(),
                "mix": layer.log_mix().detach().exp().double().cpu().numpy(),
                "comp_window": layer.comp_window.cpu().numpy(),
                "window_ids": (np.zeros(n, dtype=np.int64) if layer.window_ids is None
                               else layer.window_ids.reshape(-1).cpu().numpy()),
                "codes": c.codes.reshape(-1).cpu().numpy(), "mask": c.mask.reshape(-1).cpu().numpy(),
                "compressed": c.weight().reshape(-1).double().cpu().numpy(),
            })
    return out


def codebook_summary(result: Any, separation: float = 2.0) -> dict[str, Any]:
    """:func:`codebook_stats` for every compressed tensor of a trained result."""
    layers = [{"name": a["name"], **codebook_stats(a["locs"], a["scales"], a["mix"], a["comp_window"], a["codes"],
                                                   a["mask"], a["window_ids"], separation)}
              for a in _layer_arrays(result)]
    return {"separation": separation, "layers": layers}


def mixture_bin_counts(edges: np.ndarray, locs: np.ndarray, scales: np.ndarray, mix: np.ndarray,
                       comp_window: np.ndarray, window_sizes: np.ndarray) -> np.ndarray:
    """Expected count per bin of ``sum(window_sizes)`` draws from the windowed mixture."""
    b = np.asarray(edges, dtype=np.float64)
    z = (b[:, None] - np.asarray(locs, dtype=np.float64)[None, :]) / np.asarray(scales, dtype=np.float64)[None, :]
    cdf = torch.special.ndtr(torch.from_numpy(z)).numpy()  # (B+1, K)
    weight = np.asarray(mix) * np.asarray(window_sizes, dtype=np.float64)[np.asarray(comp_window)]
    return (np.diff(cdf, axis=0) * weight[None, :]).sum(axis=1)


def layer_distributions(result: Any, max_bins: int = 200) -> dict[str, Any]:
    """Histogram data of every compressed tensor (see the module docstring).

    A layer of ``N`` weights gets ``clip(2 sqrt(N), 20, max_bins)`` equal bins spanning the
    weights and every level's ``mu_k +- 3 s_k``.
    """
    pre = pretrained_weights(result)
    layers = []
    for a in _layer_arrays(result):
        w, x = pre[a["name"]], a["latent"]
        lo = float(min(w.min(), x.min(), (a["locs"] - 3 * a["scales"]).min()))
        hi = float(max(w.max(), x.max(), (a["locs"] + 3 * a["scales"]).max()))
        bins = int(np.clip(2 * np.sqrt(w.size), 20, max_bins))
        edges = np.linspace(lo, hi, bins + 1)
        sizes = np.bincount(a["window_ids"], minlength=int(a["comp_window"].max()) + 1)
        kept_codes = np.bincount(a["codes"][a["mask"]], minlength=a["locs"].size)
        layers.append({
            "name": a["name"], "edges": edges.tolist(),
            "latent_counts": np.histogram(x, edges)[0].tolist(),
            "pretrained_counts": np.histogram(w, edges)[0].tolist(),
            "mixture_counts": mixture_bin_counts(edges, a["locs"], a["scales"], a["mix"], a["comp_window"],
                                                 sizes).tolist(),
            "levels": a["locs"].tolist(), "level_windows": a["comp_window"].tolist(),
            "level_counts": kept_codes.tolist(), "pruned": int((~a["mask"]).sum()),
        })
    return {"layers": layers}
