"""Global magnitude pruning along SQS's cubic ramp (Zhu & Gupta, 2017), shared by the
Deep-Compression-style and the uniform-quantisation baselines.

After every pruning step the weights with the smallest ``|w|`` over all selected layers are
masked and set to zero until the ramp's target sparsity ``s_t`` is reached. Pruned weights
score 0, so a weight once pruned stays pruned (the ramp only increases).
"""
from __future__ import annotations

from typing import Any, Sequence

import torch
from torch import nn

from sqs_pyro.experiments.baselines.common import global_threshold
from sqs_pyro.config import SQSConfig
from sqs_pyro.models.selection import CompressedSite


@torch.no_grad()
def magnitude_masks(weights: dict[str, torch.Tensor], sparsity: float) -> dict[str, torch.Tensor]:
    """Masks keeping the largest ``|w|`` over all tensors; exactly ``N - ceil(s N)`` kept without ties."""
    threshold = global_threshold([w.abs() for w in weights.values()], sparsity)
    if threshold is None:
        return {name: torch.ones_like(w, dtype=torch.bool) for name, w in weights.items()}
    return {name: w.abs() > threshold for name, w in weights.items()}


class MagnitudePruner:
    """Latent full-precision weights, trained through their masks, pruned by global magnitude."""

    def __init__(self, sites: Sequence[CompressedSite], pretrained: dict[str, torch.Tensor],
                 config: SQSConfig) -> None:
        self.sites = list(sites)
        self.config = config
        self.latent = {n: nn.Parameter(w.clone()) for n, w in pretrained.items()}
        self.mask = {n: torch.ones_like(w, dtype=torch.bool) for n, w in pretrained.items()}

    def param_groups(self, config: SQSConfig) -> list[dict[str, Any]]:
        return [{"params": list(self.latent.values()), "lr": config.lr_weights, "name": "latent"}]

    def prior_loss(self) -> None:
        """No prior: the plain cross-entropy."""

    def masked_weights(self) -> dict[str, torch.Tensor]:
        return {n: w * self.mask[n] for n, w in self.latent.items()}

    @torch.no_grad()
    def prune(self, sparsity: float) -> None:
        self.mask = magnitude_masks(self.masked_weights(), sparsity)
        for name, w in self.latent.items():
            w.mul_(self.mask[name])
