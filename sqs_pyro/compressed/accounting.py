r"""Honest size accounting of a compressed network, from its materialised weights.

Reported side by side:

* the paper's formula over the compressed layers, ``CR = 32 / ((1 - s) b)``, with ``b`` the
  kept weights' mean code width ``sum_l nnz_l b_l / sum_l nnz_l`` (every layer at its own
  ``b_l = ceil(log2 K_l)``: one width for all unless ``adaptive_bits``);
* ``bytes_packed``: a plain packed layout (1-bit mask per weight, ``b`` bits per kept
  weight, fp32 codebooks, fp32 for every uncompressed tensor);
* the entropy lower bound per compressed layer,
  ``N H2(density) + nnz H(code usage)`` bits;
* ``bytes_fp32``: the original network at 4 bytes per value.
"""
from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch

from sqs_pyro.compressed.materialize import CompressedLayer, CompressedNetwork
from sqs_pyro.models.group_scales import occupied_groups


def binary_entropy(p: float) -> float:
    """``H2(p)`` in bits."""
    if p <= 0.0 or p >= 1.0:
        return 0.0
    return -(p * math.log2(p) + (1 - p) * math.log2(1 - p))


def usage_entropy(counts: torch.Tensor | np.ndarray) -> float:
    """Entropy in bits ``H = -sum_k p_k log2 p_k`` of the empirical distribution ``p_k = n_k / sum n``
    of the usage ``counts`` (0 when there is none): the bits per code an entropy coder needs."""
    c = torch.as_tensor(counts, dtype=torch.float64).reshape(-1)
    total = c.sum()
    if total <= 0:
        return 0.0
    p = c[c > 0] / total
    return float(-(p * p.log2()).sum())


COUNT_CHUNK = 1 << 20  # weights per step of code_usage


def code_usage(layer: CompressedLayer) -> torch.Tensor:
    """How often each code occurs among the kept weights (int64, at least K entries), counted
    ``COUNT_CHUNK`` weights at a time (``bincount`` and ``unique`` of a whole table copy it to int64)."""
    codes, mask = layer.codes.reshape(-1), layer.mask.reshape(-1)
    counts = torch.zeros(layer.components, dtype=torch.int64)
    for start in range(0, codes.numel(), COUNT_CHUNK):
        part = codes[start:start + COUNT_CHUNK][mask[start:start + COUNT_CHUNK]].long().cpu()
        found = torch.bincount(part, minlength=layer.components)
        if found.numel() > counts.numel():
            counts = torch.cat([counts, counts.new_zeros(found.numel() - counts.numel())])
        counts[:found.numel()] += found
    return counts


def code_entropy(layer: CompressedLayer) -> float:
    """Entropy in bits of the empirical code usage among kept weights."""
    return usage_entropy(code_usage(layer))


def code_width(components: int) -> int:
    """Bits per stored code, ``ceil(log2 K)``: 0 for a one-level layer, whose codes carry no information."""
    return (components - 1).bit_length()


SCALE_BYTES = 2  # group scales are stored as float16
EXACT_BYTES = 6  # an exact weight: a u32 position and a float16 value


def side_bytes(layer: CompressedLayer) -> int:
    """Bytes beyond mask, codes and codebook: the fp16 scales of the groups that hold a kept weight (all
    a compact ``.sqs`` file stores) and the exact weights."""
    scales = 0
    if layer.scales is not None:
        mask = layer.mask.detach().cpu().reshape(-1).numpy()
        scales = SCALE_BYTES * int(np.count_nonzero(occupied_groups(mask, layer.scales.shape[0], layer.group_size)))
    return scales + EXACT_BYTES * layer.num_exact


def layer_accounting(layer: CompressedLayer) -> dict[str, Any]:
    """Sizes of one layer: ``nnz`` codebook weights plus ``exact`` exact ones are kept; side
    information (group scales, exact weights) is counted in bytes and bits per weight."""
    n, nnz = layer.numel, layer.nnz
    density = (nnz + layer.num_exact) / n
    b = code_width(layer.components)
    side = side_bytes(layer)
    packed = math.ceil(n / 8) + math.ceil(nnz * b / 8) + 4 * layer.components + side
    usage = code_usage(layer)
    entropy = usage_entropy(usage)
    bound_bits = n * binary_entropy(nnz / n) + nnz * entropy + 8 * side
    return {
        "name": layer.name, "shape": list(layer.shape), "numel": n, "nnz": nnz, "exact": layer.num_exact,
        "density": density, "bits": b, "group_size": layer.group_size,
        "codes_used": int((usage > 0).sum()), "code_entropy_bits": entropy, "bytes_fp32": 4 * n, "bytes_packed": packed,
        "side_bytes": side, "side_bits_per_weight": 8 * side / n, "entropy_bound_bytes": bound_bits / 8,
    }


def dense_params(dense_state: dict[str, torch.Tensor]) -> int:
    """Floating-point parameters of the uncompressed tensors, a tied tensor (the same object
    under two names, e.g. embeddings and LM head) counted once."""
    unique = {id(v): v for v in dense_state.values() if v.is_floating_point()}
    return sum(v.numel() for v in unique.values())


def accounting(compressed: CompressedNetwork) -> dict[str, Any]:
    """Measured sparsity, bits, CR formula and byte counts of a materialised network."""
    layers = [layer_accounting(layer) for layer in compressed.layers]
    n = sum(l["numel"] for l in layers)
    nnz = sum(l["nnz"] + l["exact"] for l in layers)
    sparsity = 1.0 - nnz / n
    coded_bits = sum((l["nnz"] + l["exact"]) * l["bits"] for l in layers)
    mean_bits = coded_bits / nnz if nnz else 0.0  # per kept weight, each layer at its own width
    other = dense_params(compressed.dense_state)
    return {
        "layers": layers,
        "compressed_params": n,
        "other_params": other,
        "sparsity": sparsity,
        "bits": max(l["bits"] for l in layers),
        "mean_bits": mean_bits,
        "cr_formula": (32.0 / ((1.0 - sparsity) * mean_bits)) if coded_bits else float("inf"),
        "bytes_fp32": 4 * (n + other),
        "bytes_packed": sum(l["bytes_packed"] for l in layers) + 4 * other,
        "side_bytes": sum(l["side_bytes"] for l in layers),
        "entropy_bound_bytes": sum(l["entropy_bound_bytes"] for l in layers),
    }
