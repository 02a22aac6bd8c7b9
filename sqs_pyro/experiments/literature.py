r"""The compression rate as the Bayesian-compression literature counts it, and its published rows.

Two countings of the compressed layers' weights only (biases and other dense tensors are left out
of both sides, as the papers leave them out), each against ``32 N`` bits of the ``N`` fp32 weights:

* **Deep Compression's** (Han et al., 2016, Sec. 2 and 4; Soft weight-sharing, Ullrich et al.,
  2017, uses the same format): each layer flattened and stored as a sparse list of entries
  (relative index, code). A gap ``g`` between kept weights larger than the ``2^r`` an ``r``-bit
  relative index spans is bridged by ``ceil(g / 2^r) - 1`` filler entries holding a zero, so
  a layer of ``n`` kept weights stores ``E = n + sum_gaps (ceil(g / 2^r) - 1)`` entries. The
  fixed-width count is ``E (r + ceil(log2(K + 1)))`` bits (the code also names the filler's
  zero); the Huffman count codes the entries' index symbols and codes each with its own
  Huffman code, ``sum_s n_s l_s`` (the code tables left out, as the papers leave them out).
  Both add the fp32 codebook, ``32 K`` bits, and any side information (group scales, exact
  weights). ``r`` is chosen per layer (1 to 8) to minimise the layer's bits (Deep Compression
  fixes 5 bits for the LeNets' fc layers and 8 for conv).
* **Bayesian Compression's code release** (``compression.py`` of
  KarenUllrich/Tutorial_BayesianCompressionForDL, "after precision reduction"): each weight
  matrix (a conv kernel ``(A, B, C, D)`` as ``(A B, C D)``) loses its all-zero rows and columns
  and the rest is stored densely, every remaining entry at the layer's bits; here
  ``ceil(log2(K + 1))`` bits (the K levels and zero), plus the codebook and side information.
"""
from __future__ import annotations

import heapq
import math
from collections import Counter
from typing import Any, Iterable, Mapping

import torch

from sqs_pyro.compressed.accounting import code_width, side_bytes
from sqs_pyro.compressed.materialize import CompressedLayer, CompressedNetwork

INDEX_BITS = tuple(range(1, 9))

# The published rows (error on the 10k MNIST test images, CR of the weights), each with how it counts.
PUBLISHED: tuple[dict[str, Any], ...] = (
    {"network": "lenet300", "method": "Deep Compression (Han et al., 2016)", "error": 1.58, "cr": 40,
     "counting": "DC: sparse entries with relative indices + codes, Huffman-coded, + codebooks"},
    {"network": "lenet5", "method": "Deep Compression (Han et al., 2016)", "error": 0.74, "cr": 39,
     "counting": "DC: sparse entries with relative indices + codes, Huffman-coded, + codebooks"},
    {"network": "lenet300", "method": "Soft weight-sharing (Ullrich et al., 2017)", "error": 1.94, "cr": 64,
     "counting": "DC's format (its appendix)"},
    {"network": "lenet5", "method": "Soft weight-sharing (Ullrich et al., 2017)", "error": 0.97, "cr": 162,
     "counting": "DC's format (its appendix)"},
    {"network": "lenet5", "method": "Sparse VD (Molchanov et al., 2017), precision reduced", "error": 1.0,
     "cr": 228, "counting": "BC code release: dense pruned rows/columns x reduced-precision floats"},
    {"network": "lenet5", "method": "BC-GNJ (Louizos et al., 2017)", "error": 1.0, "cr": 361,
     "counting": "BC code release: dense pruned rows/columns x reduced-precision floats"},
    {"network": "lenet5", "method": "BC-GHS (Louizos et al., 2017)", "error": 1.0, "cr": 419,
     "counting": "BC code release: dense pruned rows/columns x reduced-precision floats"},
)


def huffman_lengths(counts: Mapping[Any, int]) -> dict[Any, int]:
    """Code length of every symbol of a Huffman code for ``counts`` (one symbol: length 1)."""
    symbols = [s for s, c in counts.items() if c > 0]
    if len(symbols) == 1:
        return {symbols[0]: 1}
    lengths = dict.fromkeys(symbols, 0)
    heap = [(counts[s], i, [s]) for i, s in enumerate(symbols)]
    heapq.heapify(heap)
    tie = len(heap)
    while len(heap) > 1:
        c1, _, a = heapq.heappop(heap)
        c2, _, b = heapq.heappop(heap)
        for s in a + b:
            lengths[s] += 1
        heapq.heappush(heap, (c1 + c2, tie, a + b))
        tie += 1
    return lengths


def huffman_bits(symbols: Iterable[Any]) -> int:
    """Bits of ``symbols`` under their own Huffman code: ``sum_s n_s l_s``."""
    counts = Counter(symbols)
    if not counts:
        return 0
    lengths = huffman_lengths(counts)
    return sum(n * lengths[s] for s, n in counts.items())


def relative_entries(mask: torch.Tensor, index_bits: int) -> tuple[list[int], list[int]]:
    """The (index symbol, code) entries' index symbols and a flag per entry (1: a kept weight,
    0: a filler) of ``mask`` flattened, with ``index_bits``-bit relative indices."""
    positions = torch.nonzero(mask.reshape(-1)).reshape(-1)
    gaps = torch.diff(positions, prepend=positions.new_tensor([-1])).tolist()
    span = 1 << index_bits
    index, kept = [], []
    for g in gaps:
        fillers = (g - 1) // span  # = ceil(g / span) - 1
        index += [span] * fillers + [g - fillers * span]
        kept += [0] * fillers + [1]
    return index, kept


def dc_layer_bits(layer: CompressedLayer, huffman: bool) -> int:
    """Deep Compression's bits for one layer, at the index width that minimises them."""
    codebook_side = 32 * layer.components + 8 * side_bytes(layer)
    codes = layer.codes[layer.mask].reshape(-1).tolist()
    width = code_width(layer.components + 1)
    best = None
    for r in INDEX_BITS:
        index, kept = relative_entries(layer.mask, r)
        if huffman:
            filler = layer.components  # the zero's own symbol
            it = iter(codes)
            entry_codes = [next(it) if k else filler for k in kept]
            bits = huffman_bits(index) + huffman_bits(entry_codes)
        else:
            bits = len(index) * (r + width)
        best = bits if best is None else min(best, bits)
    return (best or 0) + codebook_side


def bc_layer_bits(layer: CompressedLayer) -> int:
    """The BC code release's bits for one layer: the matrix without its all-zero rows and
    columns, stored densely at ``ceil(log2(K + 1))`` bits, plus codebook and side information."""
    mask = layer.mask
    matrix = mask.reshape(mask.shape[0] * mask.shape[1], -1) if mask.dim() == 4 else mask.reshape(mask.shape[0], -1)
    rows = int(matrix.any(dim=1).sum())
    cols = int(matrix.any(dim=0).sum())
    return rows * cols * code_width(layer.components + 1) + 32 * layer.components + 8 * side_bytes(layer)


def paper_counts(network: CompressedNetwork) -> dict[str, Any]:
    """Weights-only compression rates of ``network``'s compressed layers, ``32 N / bits``:
    ``cr_dc`` (DC's format, fixed-width), ``cr_dc_huffman`` (DC's format, Huffman-coded; the
    counting of DC's and SWS's published rows) and ``cr_bc`` (the BC code release's)."""
    n = sum(layer.numel for layer in network.layers)
    dc = sum(dc_layer_bits(layer, huffman=False) for layer in network.layers)
    dc_h = sum(dc_layer_bits(layer, huffman=True) for layer in network.layers)
    bc = sum(bc_layer_bits(layer) for layer in network.layers)
    return {"weights": n, "bits_dc": dc, "bits_dc_huffman": dc_h, "bits_bc": bc,
            "cr_dc": 32 * n / dc, "cr_dc_huffman": 32 * n / dc_h, "cr_bc": 32 * n / bc}


def error_points(accuracy: float) -> float:
    """Test error in percent."""
    return 100.0 * (1.0 - accuracy)


def mean(values: Iterable[float]) -> float:
    items = list(values)
    return math.fsum(items) / len(items)
