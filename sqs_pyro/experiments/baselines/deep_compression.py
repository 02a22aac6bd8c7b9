"""Deep-Compression-style baseline (Han et al., 2016): magnitude pruning, then a per-layer
k-means codebook with fine-tuned centroids.

1. warm-up: fine-tune the dense weights;
2. pruning: global magnitude pruning along the cubic ramp (:mod:`.magnitude`);
3. fine-tuning: each layer's kept weights are clustered into K levels by exact 1-D k-means
   (:func:`sqs_pyro.guides.kmeans.kmeans_1d`; Han et al. use linear initialisation and
   Lloyd iterations), every kept weight is assigned to its nearest centre for good, and
   only the centres (gradients summed over each cluster) and the uncompressed tensors train.

The result is exactly SQS's representation: mask, one code per kept weight, one K-level
codebook per layer.
"""
from __future__ import annotations

from typing import Any, Sequence

import torch
from torch import nn

from sqs_pyro.experiments.baselines.common import BaselineResult, fit
from sqs_pyro.experiments.baselines.magnitude import MagnitudePruner
from sqs_pyro.config import SQSConfig
from sqs_pyro.guides.kmeans import kmeans_codebook
from sqs_pyro.compressed.materialize import CompressedLayer
from sqs_pyro.models.selection import CompressedSite
from sqs_pyro.infer.schedules import FINETUNE

METHOD = "magnitude_kmeans"


def nearest_codes(values: torch.Tensor, codebook: torch.Tensor) -> torch.Tensor:
    """Index of the nearest codebook entry for every value (same shape as ``values``)."""
    return (values.unsqueeze(-1) - codebook).abs().argmin(-1)


class KMeansCompressor(MagnitudePruner):
    """Magnitude pruning, then weight sharing through a trained per-layer k-means codebook."""

    def __init__(self, sites: Sequence[CompressedSite], pretrained: dict[str, torch.Tensor],
                 config: SQSConfig) -> None:
        super().__init__(sites, pretrained, config)
        self.codebooks = {n: nn.Parameter(w.new_zeros(config.components)) for n, w in pretrained.items()}
        self.codes: dict[str, torch.Tensor] = {}

    def param_groups(self, config: SQSConfig) -> list[dict[str, Any]]:
        return super().param_groups(config) + [
            {"params": list(self.codebooks.values()), "lr": config.lr_codebook, "name": "codebook"}]

    def weights(self, phase: str, temperature: float) -> dict[str, torch.Tensor]:
        if phase != FINETUNE:
            return self.masked_weights()
        return {n: torch.where(self.mask[n], cb[self.codes[n]], cb.new_zeros(())) for n, cb in self.codebooks.items()}

    @torch.no_grad()
    def freeze(self) -> None:
        for name, w in self.latent.items():
            kept = w[self.mask[name]]
            centres = kmeans_codebook(kept, self.config.components)
            self.codebooks[name].copy_(centres)
            self.codes[name] = torch.where(self.mask[name], nearest_codes(w, centres), 0)

    def layers(self) -> list[CompressedLayer]:
        out = []
        for name, cb in self.codebooks.items():
            book = cb.detach().clone()
            out.append(CompressedLayer(name, tuple(self.mask[name].shape),
                                       self.mask[name].clone(), self.codes[name].clone(), book,
                                       torch.zeros(book.numel(), dtype=torch.long)))
        return out


def compress_magnitude_kmeans(net: nn.Module, train_data: Any, config: SQSConfig) -> BaselineResult:
    """Deep-Compression-style baseline on ``(inputs, labels)`` with the SQS run's settings in ``config``."""
    return fit(METHOD, net, train_data, config, KMeansCompressor)
