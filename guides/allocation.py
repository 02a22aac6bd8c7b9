r"""How many weights each layer keeps: layer-adaptive budgets from LAMP scores (Lee et al., 2021).

The LAMP score of weight ``u`` in a layer, with its weights ordered by magnitude, is

    lamp_u = w_u^2 / sum_{v : |w_v| >= |w_u|} w_v^2,

the share of the layer's remaining energy that removing ``u`` (and every smaller weight) takes
away. Pruning the globally smallest LAMP scores bounds the worst layer's output distortion,
so no layer is starved: each layer's largest weight scores 1. The budgets (per-layer
sparsities) are fixed once, from the pretrained weights; which weights a layer keeps is
then left to the gates.
"""
from __future__ import annotations

import math
from typing import Sequence

import torch


def lamp_scores(weight: torch.Tensor) -> torch.Tensor:
    """``w_u^2 / sum_{|w_v| >= |w_u|} w_v^2`` for every entry of one tensor (same shape)."""
    energy = weight.detach().double().reshape(-1) ** 2
    ordered, order = energy.sort()
    tail = ordered.flip(0).cumsum(0).flip(0)  # sum of the entries at or above each one
    scores = torch.empty_like(energy)
    scores[order] = ordered / tail.clamp_min(1e-300)
    return scores.reshape(weight.shape)


def lamp_sparsities(weights: Sequence[torch.Tensor], sparsity: float) -> list[float]:
    """Per-layer sparsities whose kept weights are the ``1 - sparsity`` largest LAMP scores over
    all layers (their weighted mean is ``sparsity`` up to one weight)."""
    scores = [lamp_scores(w).reshape(-1) for w in weights]
    flat = torch.cat(scores)
    prune = min(flat.numel(), math.ceil(sparsity * flat.numel() - 1e-9))
    if prune < 1:
        return [0.0] * len(scores)
    threshold = torch.kthvalue(flat, prune).values
    return [float((s <= threshold).double().mean()) for s in scores]
