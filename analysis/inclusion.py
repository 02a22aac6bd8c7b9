r"""Inclusion probabilities ``g_j = sigmoid(theta_j)`` of a trained guide and the final mask.

For a layer of ``N`` weights with inclusion probabilities ``g`` and final mask ``m``
(``m_j = 1`` if weight j is kept):

* expected sparsity ``sum_j (1 - g_j) / N`` (the posterior mean fraction of pruned weights)
  against the thresholded sparsity ``1 - sum_j m_j / N``;
* uncertain fraction ``#{j : 0.1 < g_j < 0.9} / N``;
* overlap with magnitude pruning: ``M`` keeps the ``sum_j m_j`` pretrained weights of largest
  ``|w_j|``; ``overlap = |m & M| / |m|`` and ``jaccard = |m & M| / |m | M|``.

``g`` are the learned probabilities; once the mask is frozen for fine-tuning the gate
logits no longer move, so ``g`` is the posterior at the freeze and the mask is ``g > 0.5``.
"""
from __future__ import annotations

from typing import Any

import numpy as np
import torch

from sqs_pyro.guides.initialization import magnitude_mask

UNCERTAIN_BAND = (0.1, 0.9)


def inclusion_probabilities(result: Any) -> dict[str, np.ndarray]:
    """``g_j = sigmoid(theta_j)`` per compressed tensor (flat float64), by site name."""
    return {layer.site_name: torch.sigmoid(layer.gate_logits.detach()).reshape(-1).double().cpu().numpy()
            for layer in result.guide.layers}


def final_masks(result: Any) -> dict[str, np.ndarray]:
    """The kept weights of the compressed network (flat bool), by site name."""
    return {layer.site_name: layer.kept_mask().reshape(-1).cpu().numpy() for layer in result.guide.layers}


def pretrained_weights(result: Any) -> dict[str, np.ndarray]:
    """The input network's weights (flat float64) of every compressed tensor, by site name."""
    return {layer.site_name: result.skeleton.get_parameter(layer.site_name).detach().reshape(-1).double()
            .cpu().numpy() for layer in result.guide.layers}


def inclusion_stats(g: np.ndarray, mask: np.ndarray, pretrained: np.ndarray, bins: int = 20) -> dict[str, Any]:
    """Summary of one set of inclusion probabilities (see the module docstring).

    Returns ``numel, kept, expected_sparsity, thresholded_sparsity, uncertain_fraction,
    mean_g, quantiles`` (of g at 5/25/50/75/95 %), ``magnitude_overlap, magnitude_jaccard``
    (``None`` when undefined) and ``histogram`` (``bins`` equal bins on [0, 1]).
    """
    g = np.asarray(g, dtype=np.float64).ravel()
    m = np.asarray(mask, dtype=bool).ravel()
    n, kept = g.size, int(m.sum())
    lo, hi = UNCERTAIN_BAND
    mag = magnitude_mask(pretrained, kept)
    both, either = int((m & mag).sum()), int((m | mag).sum())
    counts, edges = np.histogram(g, bins=bins, range=(0.0, 1.0))
    return {
        "numel": n, "kept": kept,
        "expected_sparsity": float((1.0 - g).sum() / n),
        "thresholded_sparsity": 1.0 - kept / n,
        "uncertain_fraction": float(((g > lo) & (g < hi)).sum() / n),
        "mean_g": float(g.mean()),
        "quantiles": dict(zip(("q05", "q25", "q50", "q75", "q95"),
                              (float(q) for q in np.quantile(g, [0.05, 0.25, 0.5, 0.75, 0.95])))),
        "magnitude_overlap": both / kept if kept else None,
        "magnitude_jaccard": both / either if either else None,
        "histogram": {"edges": edges.tolist(), "counts": counts.tolist()},
    }


def inclusion_summary(result: Any, bins: int = 20) -> dict[str, Any]:
    """Per-layer and overall :func:`inclusion_stats` of a trained :class:`~sqs_pyro.infer.result.SQSResult`.

    The overall magnitude mask is global (one threshold over all compressed layers, as the
    pruning schedule uses); the per-layer ones keep each layer's own number of weights.
    """
    g, masks, w = inclusion_probabilities(result), final_masks(result), pretrained_weights(result)
    layers = [{"name": name, **inclusion_stats(g[name], masks[name], w[name], bins)} for name in g]
    overall = inclusion_stats(np.concatenate(list(g.values())), np.concatenate(list(masks.values())),
                              np.concatenate(list(w.values())), bins)
    return {"uncertain_band": list(UNCERTAIN_BAND), "layers": layers, "overall": overall}
