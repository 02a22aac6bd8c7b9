r"""Coding of the optional posterior section of a ``.sqs`` file: what the posterior predictive
needs beyond the greedy network (:mod:`sqs_pyro.compressed.posterior`).

Per compressed layer, with ``nnz`` kept weights, K levels and greedy codes ``c_j``:

* the K slab scales ``s_k``, float16 (finite, positive);
* ``uncertain`` = n, the number of kept weights whose runner-up probability ``p_j`` (the largest
  ``phi_jk`` over the levels ``k != c_j``) exceeds the section's ``threshold`` eps. After a posterior
  phase ``c_j`` (the point phases' mode) need not be the most probable level, so ``p_j < 1``, not ``<= 1/2``;
* ``positions``: the ``nnz`` bits saying which kept weights (in row-major order) are uncertain,
  as a mask coding of :mod:`sqs_pyro.format.codecs` (bitmask, Golomb-Rice, zlib, lzma) keeping n;
* ``runner``: the runner-up levels ``r_j`` of the uncertain weights, in order. ``runner_kind``
  ``"neighbour"``, used when every runner-up is a neighbour of ``c_j`` in its window (levels
  ordered by their stored value, then index): one bit for each uncertain weight whose greedy
  level has a neighbour on both sides, 1 for the next higher level and 0 for the next lower
  (a level at the end of its window has one neighbour, which needs no bit); ``"code"``: the
  level of each uncertain weight. Either is a code coding (packed, tree, zlib, lzma) over 2
  or K symbols;
* ``probs``: ``p_j`` quantised to ``b = prob_bits`` bits, uniformly in ``t = arcsin sqrt(p)``
  (the variance-stabilising angle: a bin costs about the same KL wherever it lies) on
  ``(t_0, pi/2]``, ``t_0 = arcsin sqrt(eps)``: ``q_j = min(floor((t_j - t_0) / (pi/2 - t_0) 2^b),
  2^b - 1)``, read back as ``sin^2`` of the bin's midpoint ``t_0 + (q_j + 1/2) (pi/2 - t_0) / 2^b``;
  a code coding over ``2^b`` symbols.

Segments, in this order: the scales (2K bytes), positions, runner, probs. ``crc32`` is the
zlib CRC-32 of ``scale bytes || packbits_le(positions) || r_j as <u2 || q_j as <u2``.
"""
from __future__ import annotations

import math
import zlib
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from sqs_pyro.compressed.posterior import RunnerUps
from sqs_pyro.errors import CompressedFileError, SQSInputError
from sqs_pyro.format import codecs as coding

RUNNER_KINDS = ("neighbour", "code")
MAX_PROB_BITS = 16


@dataclass(frozen=True)
class PosteriorCoding:
    """What the posterior section keeps: runner-ups above ``threshold``, probabilities in ``prob_bits`` bits.

    The defaults are the coding, of those measured on the ccexam CNN at 95% / K=4 whose section
    fits in 15% of the point file, whose predictive's test NLL lies closest to the guide-based
    one (docs/file_format.md, benchmarks/posterior_file.py).
    """

    threshold: float = 0.7
    prob_bits: int = 1

    def __post_init__(self) -> None:
        if not (isinstance(self.threshold, (int, float)) and 0.0 <= self.threshold < 1.0):
            raise SQSInputError(f"the posterior threshold must lie in [0, 1), got {self.threshold!r}")
        if not (isinstance(self.prob_bits, int) and 1 <= self.prob_bits <= MAX_PROB_BITS):
            raise SQSInputError(f"prob_bits must be an integer in [1, {MAX_PROB_BITS}], got {self.prob_bits!r}")

    def _angles(self) -> tuple[float, float]:
        """``(t_0, bin width)`` of the quantiser in ``t = arcsin sqrt(p)``."""
        low = math.asin(math.sqrt(self.threshold))
        return low, (math.pi / 2 - low) / (1 << self.prob_bits)

    def quantise(self, prob: np.ndarray) -> np.ndarray:
        """``q_j`` of probabilities in ``(threshold, 1]``."""
        low, width = self._angles()
        angle = np.arcsin(np.sqrt(np.clip(np.asarray(prob, dtype=np.float64), 0.0, 1.0)))
        return np.clip(np.floor((angle - low) / width), 0, (1 << self.prob_bits) - 1).astype(np.int64)

    def dequantise(self, q: np.ndarray) -> np.ndarray:
        """``sin^2`` of the midpoints of the bins ``q_j``."""
        low, width = self._angles()
        return np.sin(low + (np.asarray(q, dtype=np.float64) + 0.5) * width) ** 2


def neighbours(codebook: np.ndarray, windows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``(down, up)``: each level's next lower and next higher level in its window (by value, then
    index), -1 where there is none."""
    components = len(codebook)
    order = np.lexsort((np.arange(components), codebook, windows))
    down, up = np.full(components, -1), np.full(components, -1)
    same = windows[order[:-1]] == windows[order[1:]]
    up[order[:-1][same]] = order[1:][same]
    down[order[1:][same]] = order[:-1][same]
    return down, up


def _crc(scales: bytes, positions: np.ndarray, levels: np.ndarray, q: np.ndarray) -> int:
    crc = zlib.crc32(scales)
    crc = zlib.crc32(coding.pack_bits(positions), crc)
    crc = zlib.crc32(np.ascontiguousarray(levels, dtype="<u2").tobytes(), crc)
    return zlib.crc32(np.ascontiguousarray(q, dtype="<u2").tobytes(), crc)


def _stream_keys(stream: coding.Encoded) -> dict[str, Any]:
    return {"coding": stream.coding, "bytes": len(stream.data), **stream.params}


def encode_layer(summary: RunnerUps, kept_codes: np.ndarray, codebook: np.ndarray, windows: np.ndarray,
                 spec: PosteriorCoding) -> tuple[dict[str, Any], list[bytes]]:
    """A layer's header entry and segments. ``codebook``: the level values as the reader decodes them."""
    components = len(codebook)
    scales = summary.scales.detach().cpu()
    if scales.numel() != components or not bool((scales > 0).all()):
        raise SQSInputError(f"need {components} positive slab scales, got {scales.tolist()}")
    scales = scales.to(torch.float16).clamp_min(2.0 ** -24)  # the smallest positive float16
    if not bool(torch.isfinite(scales).all()):
        raise SQSInputError(f"slab scales must be below 65504 (float16), got {summary.scales.tolist()}")
    index, level = summary.index.cpu().numpy(), summary.level.cpu().numpy()
    if index.size and (np.any(np.diff(index) <= 0) or index[0] < 0 or index[-1] >= kept_codes.size):
        raise SQSInputError("the uncertain weights' positions must be increasing indices of kept weights")
    top = kept_codes[index]
    if level.shape != index.shape or np.any((level < 0) | (level >= components) | (level == top)):
        raise SQSInputError(f"each runner-up must be another of the {components} levels than the greedy one")
    positions = np.zeros(kept_codes.size, dtype=bool)
    positions[index] = True
    down, up = neighbours(codebook, windows)
    neighbour = bool(np.all((level == down[top]) | (level == up[top])))
    both = (down[top] >= 0) & (up[top] >= 0)
    runner = coding.encode_codes((level == up[top])[both].astype(np.int64), 2) if neighbour else \
        coding.encode_codes(level, components)
    q = spec.quantise(summary.prob.cpu().numpy())
    position_stream, prob_stream = coding.encode_mask(positions), coding.encode_codes(q, 1 << spec.prob_bits)
    scale_bytes = scales.numpy().astype("<f2").tobytes()
    entry = {"uncertain": int(index.size), "positions": _stream_keys(position_stream),
             "runner_kind": "neighbour" if neighbour else "code", "runner": _stream_keys(runner),
             "probs": _stream_keys(prob_stream), "crc32": _crc(scale_bytes, positions, level, q)}
    return entry, [scale_bytes, position_stream.data, runner.data, prob_stream.data]


def segment_lengths(entry: dict[str, Any], components: int) -> tuple[int, ...]:
    """Byte lengths of a (schema-checked) layer entry's segments: scales, positions, runner, probs."""
    return 2 * components, entry["positions"]["bytes"], entry["runner"]["bytes"], entry["probs"]["bytes"]


def decode_layer(entry: dict[str, Any], parts: list[memoryview], kept_codes: np.ndarray, codebook: np.ndarray,
                 windows: np.ndarray, spec: PosteriorCoding) -> RunnerUps:
    """Inverse of :func:`encode_layer`, checking every stream and value range and the CRC."""
    scale_raw, position_raw, runner_raw, prob_raw = parts
    components, count = len(codebook), entry["uncertain"]
    scales = np.frombuffer(scale_raw, dtype="<f2").astype(np.float64)
    if not np.all(np.isfinite(scales) & (scales > 0)):
        raise CompressedFileError("posterior slab scales must be finite and positive")
    positions = coding.decode_mask(entry["positions"]["coding"], entry["positions"], position_raw,
                                   kept_codes.size, count)
    index = np.flatnonzero(positions)
    top = kept_codes[index]
    if entry["runner_kind"] == "neighbour":
        down, up = neighbours(codebook, windows)
        both = (down[top] >= 0) & (up[top] >= 0)
        above = up[top] >= 0  # the only neighbour, where there is one
        above[both] = coding.decode_codes(entry["runner"]["coding"], runner_raw, int(both.sum()), 2).astype(bool)
        level = np.where(above, up[top], down[top])
        if np.any(level < 0):
            raise CompressedFileError("an uncertain weight's greedy level is alone in its window")
    else:
        level = coding.decode_codes(entry["runner"]["coding"], runner_raw, count, components)
    if np.any(level == top):
        raise CompressedFileError("a runner-up level equals its greedy level")
    q = coding.decode_codes(entry["probs"]["coding"], prob_raw, count, 1 << spec.prob_bits)
    if _crc(bytes(scale_raw), positions, level, q) != entry["crc32"]:
        raise CompressedFileError("CRC mismatch of the decoded posterior")
    return RunnerUps(torch.from_numpy(scales.astype(np.float32)).to(torch.float16), torch.from_numpy(index),
                     torch.from_numpy(level.astype(np.int64)), torch.from_numpy(spec.dequantise(q)))


def section_bytes(header: dict[str, Any]) -> int:
    """The posterior section's bytes in the payload of a (checked) header; 0 without one."""
    layers = header.get("posterior", {}).get("layers", [])
    return sum(sum(segment_lengths(e, len(layer["windows"]))) for e, layer in zip(layers, header["layers"]))

