r"""Tail outliers of each layer's pretrained weights and how the compression treats them.

A weight is a tail outlier when it lies beyond the Tukey fences of its layer,
``w < Q1 - c IQR`` or ``w > Q3 + c IQR`` (``c = iqr_factor``): the same rule that builds the
outlier-aware windows (:func:`sqs_pyro.guides.windows.plan_windows`).

Quantization error of a kept weight: ``e_j = q_j - w_j`` with ``q_j`` its greedy compressed
value and ``w_j`` its pretrained value, summarised separately for tails and bulk as
``mean |e|``, ``rms = sqrt(mean e^2)`` and ``rel_rms = rms(e) / rms(w)``.
:func:`window_ablation` measures the same for the initial k-means codebooks with and
without outlier-aware windows, without training.
"""
from __future__ import annotations

from typing import Any, Sequence

import numpy as np

from sqs_pyro.analysis.inclusion import final_masks, inclusion_probabilities, pretrained_weights
from sqs_pyro.guides.initialization import initial_codebook
from sqs_pyro.guides.windows import iqr_fences


def outlier_mask(values: np.ndarray, iqr_factor: float) -> np.ndarray:
    """``True`` for values outside ``iqr_fences(values, iqr_factor)`` (flat)."""
    x = np.asarray(values, dtype=np.float64).ravel()
    lo, hi = iqr_fences(x, iqr_factor)
    return (x < lo) | (x > hi)


def error_stats(pretrained: np.ndarray, quantized: np.ndarray) -> dict[str, Any]:
    """``count, mean_abs, rms, rel_rms`` of ``quantized - pretrained`` (``None`` where empty)."""
    w = np.asarray(pretrained, dtype=np.float64).ravel()
    e = np.asarray(quantized, dtype=np.float64).ravel() - w
    if e.size == 0:
        return {"count": 0, "mean_abs": None, "rms": None, "rel_rms": None}
    rms = float(np.sqrt(np.mean(e * e)))
    scale = float(np.sqrt(np.mean(w * w)))
    return {"count": int(e.size), "mean_abs": float(np.abs(e).mean()), "rms": rms,
            "rel_rms": rms / scale if scale > 0 else None}


def layer_outliers(pretrained: np.ndarray, quantized: np.ndarray, mask: np.ndarray, g: np.ndarray,
                   iqr_factor: float, max_listed: int = 50) -> dict[str, Any]:
    """Tails of one layer: fences, counts, how many were kept, tail and bulk errors of the kept weights.

    ``listed`` holds up to ``max_listed`` tail weights of largest ``|w|`` (flat index, value,
    ``g``, kept, compressed value).
    """
    w = np.asarray(pretrained, dtype=np.float64).ravel()
    q = np.asarray(quantized, dtype=np.float64).ravel()
    m = np.asarray(mask, dtype=bool).ravel()
    lo, hi = iqr_fences(w, iqr_factor)
    tails = (w < lo) | (w > hi)
    idx = np.flatnonzero(tails)
    idx = idx[np.argsort(-np.abs(w[idx]), kind="stable")][:max_listed]
    n_tail = int(tails.sum())
    return {
        "numel": int(w.size), "fences": [lo, hi], "n_low": int((w < lo).sum()), "n_high": int((w > hi).sum()),
        "n_tail": n_tail, "tail_kept": int((tails & m).sum()),
        "tail_kept_fraction": float((tails & m).sum() / n_tail) if n_tail else None,
        "bulk_kept_fraction": float((~tails & m).sum() / max(1, int((~tails).sum()))),
        "tail_error": error_stats(w[tails & m], q[tails & m]),
        "bulk_error": error_stats(w[~tails & m], q[~tails & m]),
        "listed": [{"index": int(j), "value": float(w[j]), "g": float(g[j]), "kept": bool(m[j]),
                    "quantized": float(q[j])} for j in idx],
    }


def quantize_initial(values: np.ndarray, components: int, windows: str, equal_windows: int = 2,
                     iqr_factor: float = 5.0, sparsity: float = 0.0) -> np.ndarray:
    """Each weight snapped to the nearest level of its window in the guide's initial codebook."""
    x = np.asarray(values, dtype=np.float64).ravel()
    return initial_codebook(x, components, windows, equal_windows, iqr_factor, sparsity).quantize(x)


def window_ablation(values: np.ndarray, components: int, iqr_factor: float = 5.0,
                    modes: Sequence[str] = ("none", "outlier"), equal_windows: int = 2) -> dict[str, Any]:
    """Tail and bulk :func:`error_stats` of :func:`quantize_initial` for each window mode (no pruning)."""
    w = np.asarray(values, dtype=np.float64).ravel()
    tails = outlier_mask(w, iqr_factor)
    report: dict[str, Any] = {"n_tail": int(tails.sum())}
    for mode in modes:
        q = quantize_initial(w, components, mode, equal_windows, iqr_factor)
        report[mode] = {"tail_error": error_stats(w[tails], q[tails]), "bulk_error": error_stats(w[~tails], q[~tails])}
    return report


def outlier_summary(result: Any, max_listed: int = 50) -> dict[str, Any]:
    """Per-layer :func:`layer_outliers` of a trained result, the pooled errors, and the window ablation."""
    cfg = result.config
    compressed = {layer.name: layer.weight().reshape(-1).double().cpu().numpy()
                  for layer in result.compressed().layers}
    w, masks, g = pretrained_weights(result), final_masks(result), inclusion_probabilities(result)
    layers, tails_all = [], []
    for name in w:
        row = layer_outliers(w[name], compressed[name], masks[name], g[name], cfg.iqr_factor, max_listed)
        row["name"] = name
        row["window_ablation"] = window_ablation(w[name], cfg.components, cfg.iqr_factor,
                                                 equal_windows=cfg.equal_windows)
        layers.append(row)
        tails_all.append(outlier_mask(w[name], cfg.iqr_factor))
    tails, kept = np.concatenate(tails_all), np.concatenate(list(masks.values()))
    w_all, q_all = np.concatenate(list(w.values())), np.concatenate(list(compressed.values()))
    overall = {"n_tail": int(tails.sum()), "tail_kept": int((tails & kept).sum()),
               "tail_error": error_stats(w_all[tails & kept], q_all[tails & kept]),
               "bulk_error": error_stats(w_all[~tails & kept], q_all[~tails & kept])}
    return {"iqr_factor": cfg.iqr_factor, "windows": cfg.windows, "layers": layers, "overall": overall}


def pooled_report(report: dict[str, Any]) -> dict[str, Any]:
    """Totals of an :func:`outlier_summary`: matrices with tails, tail weights, and the window
    ablation's tail and bulk RMS errors pooled over all matrices (per window mode)."""
    layers = report["layers"]

    def pooled(mode: str, part: str) -> float | None:
        stats = [l["window_ablation"][mode][part] for l in layers if l["window_ablation"][mode][part]["count"]]
        count = sum(s["count"] for s in stats)
        return float(np.sqrt(sum(s["rms"] ** 2 * s["count"] for s in stats) / count)) if count else None

    modes = [m for m in layers[0]["window_ablation"] if m != "n_tail"] if layers else []
    return {"matrices": len(layers), "matrices_with_tails": sum(l["n_tail"] > 0 for l in layers),
            "weights": sum(l["numel"] for l in layers), "tail_weights": sum(l["n_tail"] for l in layers),
            "window_ablation": {m: {"tail_rms": pooled(m, "tail_error"), "bulk_rms": pooled(m, "bulk_error")}
                                for m in modes},
            "overall": report["overall"]}
