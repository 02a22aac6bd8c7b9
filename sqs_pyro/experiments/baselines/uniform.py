r"""Magnitude pruning + uniform round-to-nearest quantisation with a per-channel scale, fine-tuned.

1. warm-up and pruning exactly as in :mod:`.deep_compression` (global magnitude, cubic ramp);
2. fine-tuning: each output channel ``r`` (dimension 0 of the weight: the output features of
   a Linear, the output channels of a Conv) gets an absmax scale from its kept weights,
   ``s_r = max|w_r| / ((K - 1) / 2)``, and each kept weight the nearest of K evenly spaced
   levels ``(c - (K - 1)/2) s_r``, ``c = 0..K-1``; quantisation-aware training with the
   straight-through estimator updates the latent weights (scales stay fixed).

For ``K = 2^b`` the levels are the signed ``b``-bit grid without zero (``+-s/2, +-3s/2, ...``,
mid-rise): zero is carried by the mask, as in SQS, so no level is spent on it. The largest
kept weight of each row is represented exactly.

Representation and storage (:class:`ChannelScaledLayer`): mask, codes ``c`` (stored as
unsigned ``b``-bit integers; the signed value is ``c - (K-1)/2``), the K unit levels as the
layer's codebook, and one fp32 scale per row as side information. Accounting adds
``4 * rows`` bytes per layer; the saved file (:func:`file_network`) stores the scales as an
extra fp32 tensor ``<name>.row_scale`` next to the unit-grid layer, so its size is real. The
``.sqs`` reader does not apply these scales: the file measures size, it is not a loadable
model of this baseline.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Sequence

import torch
from torch import nn

from sqs_pyro.experiments.baselines.common import BaselineResult, fit
from sqs_pyro.experiments.baselines.magnitude import MagnitudePruner
from sqs_pyro.config import SQSConfig
from sqs_pyro.compressed.materialize import CompressedLayer, CompressedNetwork
from sqs_pyro.models.selection import CompressedSite
from sqs_pyro.infer.schedules import FINETUNE

METHOD = "magnitude_uniform"


@dataclass
class ChannelScaledLayer(CompressedLayer):
    """A compressed layer whose weight is ``codebook[codes] * row_scale[row]`` where kept."""

    row_scale: torch.Tensor = field(kw_only=True)  # (shape[0],) float

    def weight(self) -> torch.Tensor:
        scale = self.row_scale.reshape(-1, *([1] * (len(self.shape) - 1)))
        return torch.where(self.mask, self.codebook[self.codes] * scale, torch.zeros((), dtype=self.codebook.dtype))


def uniform_grid(levels: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The K unit levels ``c - (K - 1)/2``, ``c = 0..K-1`` (symmetric, mid-rise for even K)."""
    return torch.arange(levels, dtype=dtype) - (levels - 1) / 2


def _rows(t: torch.Tensor) -> torch.Tensor:
    return t.reshape(t.shape[0], -1)


@torch.no_grad()
def row_scales(weight: torch.Tensor, mask: torch.Tensor, levels: int) -> torch.Tensor:
    """Absmax scale per row over the kept weights, ``max|w_r| / ((K - 1)/2)`` (1 for empty rows)."""
    amax = (_rows(weight).abs() * _rows(mask)).amax(dim=1)
    return torch.where(amax > 0, amax / ((levels - 1) / 2), torch.ones_like(amax))


def quantize_codes(weight: torch.Tensor, scale: torch.Tensor, levels: int) -> torch.Tensor:
    """Round-to-nearest codes ``clamp(round(w / s_r + (K-1)/2), 0, K-1)`` (shape of ``weight``)."""
    scaled = _rows(weight) / scale.unsqueeze(1) + (levels - 1) / 2
    return scaled.round().clamp(0, levels - 1).long().reshape(weight.shape)


def dequantize(codes: torch.Tensor, scale: torch.Tensor, levels: int) -> torch.Tensor:
    """``(c - (K-1)/2) * s_r`` in the shape of ``codes``."""
    grid = uniform_grid(levels, scale.dtype).to(scale.device)
    return (grid[_rows(codes)] * scale.unsqueeze(1)).reshape(codes.shape)


class UniformCompressor(MagnitudePruner):
    """Magnitude pruning, then quantisation-aware fine-tuning on a per-channel uniform grid."""

    def __init__(self, sites: Sequence[CompressedSite], pretrained: dict[str, torch.Tensor],
                 config: SQSConfig) -> None:
        super().__init__(sites, pretrained, config)
        self.scales: dict[str, torch.Tensor] = {}

    def weights(self, phase: str, temperature: float) -> dict[str, torch.Tensor]:
        if phase != FINETUNE:
            return self.masked_weights()
        k = self.config.components
        out = {}
        for name, w in self.latent.items():
            q = dequantize(quantize_codes(w.detach(), self.scales[name], k), self.scales[name], k)
            out[name] = (w + (q - w).detach()) * self.mask[name]  # straight-through estimator
        return out

    @torch.no_grad()
    def freeze(self) -> None:
        self.scales = {n: row_scales(w, self.mask[n], self.config.components) for n, w in self.latent.items()}

    @torch.no_grad()
    def layers(self) -> list[CompressedLayer]:
        k = self.config.components
        out: list[CompressedLayer] = []
        for name, w in self.latent.items():
            mask = self.mask[name].clone()
            codes = torch.where(mask, quantize_codes(w, self.scales[name], k), 0)
            out.append(ChannelScaledLayer(name, tuple(w.shape), mask, codes, uniform_grid(k, w.dtype),
                                          torch.zeros(k, dtype=torch.long), row_scale=self.scales[name].clone()))
        return out


def file_network(network: CompressedNetwork) -> CompressedNetwork:
    """``network`` in the ``.sqs`` file's terms: each :class:`ChannelScaledLayer` becomes a plain
    layer over the unit grid plus an fp32 tensor ``<name>.row_scale`` among the other tensors."""
    layers: list[CompressedLayer] = []
    dense = dict(network.dense_state)
    for layer in network.layers:
        if isinstance(layer, ChannelScaledLayer):
            dense[f"{layer.name}.row_scale"] = layer.row_scale.float()
            layer = CompressedLayer(layer.name, layer.shape, layer.mask, layer.codes, layer.codebook,
                                    layer.component_windows)
        layers.append(layer)
    return CompressedNetwork(layers, dense, network.config)


def compress_magnitude_uniform(net: nn.Module, train_data: Any, config: SQSConfig) -> BaselineResult:
    """Magnitude pruning + per-channel uniform quantisation baseline with the SQS run's settings."""
    return fit(METHOD, net, train_data, config, UniformCompressor)
