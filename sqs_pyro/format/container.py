r"""The ``.sqs`` file: one self-describing, checksummed file holding a materialised SQS network.

Layout (integers little-endian, offsets in bytes)::

    offset   size  field
    0        8     magic 89 53 51 53 0D 0A 1A 0A  (b"\x89SQS\r\n\x1a\n")
    8        4     u32 format version (this reader: 1 to 4)
    12       4     u32 header length H (at most 16 MiB)
    16       32    SHA-256 of the H header bytes
    48       H     header: a UTF-8 JSON object (below); version 4: its zlib stream (RFC 1950)
    48+H     P     payload, P = header["payload_bytes"], its SHA-256 = header["payload_sha256"] (hex)
    48+H+P         end of file: nothing may follow

The version written is 4 (compact, the default): the header deflated, and a layer with group scales may
store only the scales of the groups that hold a kept weight (``scaled_groups``). ``compact=False`` writes
the oldest version that holds the network: 3 with a posterior section, a narrower or tied tensor, else 2 with
group scales or exact weights, else 1.

Header keys: ``format`` (``"sqs-pyro"``), ``format_version`` (equal to the preamble's),
``payload_bytes``, ``payload_sha256``, ``architecture`` (hints only, never executed:
``class`` = ``"module.QualName"`` of the network; for a network that is or wraps a transformers
model also ``transformers_class``, ``transformers_prefix`` and ``transformers_config``, see
:func:`architecture_hints`), ``config`` (the compression config), ``accounting``
(totals of :func:`sqs_pyro.compressed.accounting.accounting`), ``layers`` and ``tensors``;
optionally ``posterior`` (format version 3).

The payload is the concatenation, in header order, of every entry's segments: the layers', the
tensors', then the posterior section's.

``layers`` (compressed weights), each an object with ``name``; ``shape`` (list of ints,
row-major); ``dtype`` of the weight (``float32``, ``float64``, ``float16`` or ``bfloat16``);
``nnz`` (kept weights); ``codebook_dtype`` (``float32``, ``float64``, ``float16`` or ``bfloat16``); ``windows`` (for each
of the K codebook levels, the window it belongs to; K = its length, ``1 <= K <= 65536``);
``mask`` and ``codes``, each ``{"coding": ..., "bytes": ...}`` plus the coding's parameters
(see :mod:`sqs_pyro.format.codecs`); optionally ``group_size`` G (fp16 scales, one per G weights of a
row, after the code stream), ``scaled_groups`` (version 4: only the scales of the groups holding a kept
weight are stored, row-major; the others read as the smallest normal fp16, 2^-14) and ``exact`` (that
many fp16 weights at u32 positions outside the mask, after the scales); ``crc32``; ``bound_bits`` (the
entropy lower bound ``N H2(nnz/N) + nnz H(code usage)``). Segments: the codebook (K values of
``codebook_dtype``), the mask stream, the code stream. The weight is
``where(mask, codebook[codes], 0)`` in ``dtype``, reshaped to ``shape``. ``crc32`` is the
zlib CRC-32 of ``packbits_le(mask) || codes of the kept weights as <u2 || codebook bytes``: it
checks what the decoders produced, not just what was read.

``tensors`` (every other entry of the state dict), each with ``name``, ``shape``, ``dtype``
(float32/64/16, bfloat16, int8/16/32/64, uint8, bool) and ``bytes`` (= numel x item size of
the stored dtype). Segment: the raw little-endian values, row-major. A floating-point tensor
may be stored in a narrower floating dtype, named by ``stored_dtype`` (format version 3; e.g.
fp32 norms as ``float16``), and is read back as ``dtype``. A tensor tied to an earlier one (the
same tensor in the state dict, e.g. an LM head tied to the embeddings) has ``same_as`` = that
tensor's name, or the name of a compressed layer (format version 3), ``bytes`` = 0 and no segment.

``posterior`` (what the posterior predictive needs, :mod:`sqs_pyro.format.posterior`):
``threshold`` (eps in [0, 1)), ``prob_bits`` (1 to 16) and ``layers``, one entry per compressed
layer in the same order, each with ``uncertain``, ``positions``, ``runner_kind``, ``runner``,
``probs`` and ``crc32``.

Reading never unpickles and checks, in order: magic, version, lengths against the file
size, both checksums, the header's schema, that the segments tile the payload exactly, the
shapes against a given skeleton (or a cap on the decoded size), every stream's length,
padding and value range, and the CRC of each decoded layer. Any failure raises
:class:`~sqs_pyro.errors.CompressedFileError` naming the problem. Writes are atomic: a
temporary file in the target folder, fsync, rename, fsync of the folder.
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import struct
import zlib
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np
import torch
from torch import nn

from sqs_pyro.format import codecs as coding
from sqs_pyro.format import posterior as post
from sqs_pyro.compressed.accounting import binary_entropy, dense_params, usage_entropy
from sqs_pyro.format.atomic import atomic_path
from sqs_pyro.errors import CompressedFileError, SQSInputError
from sqs_pyro.compressed.materialize import AveragedPredictor, CompressedLayer, CompressedNetwork
from sqs_pyro.compressed.posterior import MixturePosterior, RunnerUps, guide_runner_ups
from sqs_pyro.models.group_scales import apply_group_scales, occupied_groups

MAGIC = b"\x89SQS\r\n\x1a\n"
FORMAT_VERSION = 4  # 4: compact (a deflated header, scales of occupied groups only); 3: a posterior section, a tensor
# stored narrower or tied to a layer; 2: group scales or exact weights; else 1
PREAMBLE = struct.Struct("<8sII32s")
MAX_HEADER_BYTES = 1 << 24
MAX_COMPONENTS = 1 << coding.MAX_WIDTH
MAX_DIMS = 16
ELEMENTS_PER_FILE_BYTE = 1 << 16

# name -> (torch dtype, little-endian numpy dtype of the stored bits)
DTYPES: dict[str, tuple[torch.dtype, str]] = {
    "float32": (torch.float32, "<f4"), "float64": (torch.float64, "<f8"), "float16": (torch.float16, "<f2"),
    "bfloat16": (torch.bfloat16, "<i2"), "int64": (torch.int64, "<i8"), "int32": (torch.int32, "<i4"),
    "int16": (torch.int16, "<i2"), "int8": (torch.int8, "|i1"), "uint8": (torch.uint8, "|u1"),
    "bool": (torch.bool, "|u1"),
}
FLOAT_DTYPES = ("float32", "float64", "float16", "bfloat16")


def dtype_name(dtype: torch.dtype) -> str:
    """The file's name of a torch dtype (``torch.float32`` -> ``"float32"``)."""
    for name, (torch_dtype, _) in DTYPES.items():
        if torch_dtype == dtype:
            return name
    raise SQSInputError(f"tensors of dtype {dtype} cannot be stored; supported: {tuple(DTYPES)}")


def tensor_bytes(tensor: torch.Tensor) -> bytes:
    """The raw little-endian row-major bytes of a tensor."""
    flat = tensor.detach().cpu().contiguous().reshape(-1)
    name = dtype_name(flat.dtype)
    if flat.dtype == torch.bfloat16:
        flat = flat.view(torch.int16)
    return flat.numpy().astype(DTYPES[name][1], copy=False).tobytes()


def tensor_from_bytes(data: bytes | memoryview, name: str, shape: tuple[int, ...]) -> torch.Tensor:
    """Inverse of :func:`tensor_bytes` (a fresh, writable tensor)."""
    torch_dtype, np_dtype = DTYPES[name]
    values = np.frombuffer(data, dtype=np_dtype)
    if name == "bool" and values.size and int(values.max()) > 1:
        raise CompressedFileError("a bool tensor holds bytes other than 0 and 1")
    tensor = torch.from_numpy(values.astype(values.dtype.newbyteorder("="))).reshape(shape)
    return tensor.view(torch.bfloat16) if name == "bfloat16" else tensor.to(torch_dtype)


def _numel(shape: tuple[int, ...]) -> int:
    return math.prod(shape)


def _content_crc(mask_bits: bytes, kept_codes: np.ndarray, codebook: bytes, *side: bytes) -> int:
    """CRC-32 of the packed mask, the kept codes as ``<u2`` (converted a chunk at a time), the codebook and side data."""
    crc = zlib.crc32(mask_bits)
    for start in range(0, kept_codes.size, coding.CHUNK):
        crc = zlib.crc32(np.ascontiguousarray(kept_codes[start:start + coding.CHUNK], dtype="<u2").tobytes(), crc)
    crc = zlib.crc32(codebook, crc)
    for part in side:
        crc = zlib.crc32(part, crc)
    return crc


def _groups(shape: tuple[int, ...], group_size: int) -> tuple[int, int]:
    """``(R, ceil(C / G))``: the shape of a layer's group scales (rows of ``C = numel / R`` values)."""
    rows = shape[0] if shape else 1
    cols = _numel(shape) // rows if rows else 0
    return rows, -(-cols // group_size)


def _side_segments(layer: CompressedLayer, mask: np.ndarray, compact: bool) -> tuple[dict[str, Any], list[bytes]]:
    """Header keys and segments of a layer's group scales (fp16; ``compact``: only those of the groups that
    hold a kept weight, counted by ``scaled_groups``) and exact weights (u32 positions, fp16 values)."""
    keys, parts = {}, []
    if layer.group_size:
        expected = _groups(tuple(layer.shape), layer.group_size)
        if layer.scales is None or tuple(layer.scales.shape) != expected or layer.scales.dtype != torch.float16:
            raise SQSInputError(f"layer {layer.name}: group size {layer.group_size} needs float16 scales of shape "
                                f"{expected}")
        keys["group_size"] = int(layer.group_size)
        occupied = occupied_groups(mask, expected[0], layer.group_size) if compact else None
        if occupied is not None and not occupied.all():
            keys["scaled_groups"] = int(np.count_nonzero(occupied))
            parts.append(tensor_bytes(layer.scales[torch.from_numpy(occupied)]))
        else:
            parts.append(tensor_bytes(layer.scales))
    if layer.num_exact:
        index = layer.exact_index.detach().cpu().numpy().astype(np.int64)
        if (layer.exact_values is None or layer.exact_values.dtype != torch.float16
                or layer.exact_values.shape != layer.exact_index.shape):
            raise SQSInputError(f"layer {layer.name}: exact weights need one float16 value per position")
        if (np.any(np.diff(index) <= 0) or index[0] < 0 or index[-1] >= min(mask.size, 1 << 32)
                or mask[index].any()):
            raise SQSInputError(f"layer {layer.name}: exact positions must be increasing, below 2^32 and the "
                                "numel, and outside the mask")
        keys["exact"] = int(index.size)
        parts += [index.astype("<u4").tobytes(), tensor_bytes(layer.exact_values)]
    return keys, parts


def _entropy_bound_bits(numel: int, kept_codes: np.ndarray, components: int) -> float:
    """``N H2(nnz / N) + nnz H(code usage)``."""
    density = kept_codes.size / numel if numel else 0.0
    return numel * binary_entropy(density) + kept_codes.size * usage_entropy(coding.code_counts(kept_codes, components))


def _kept_codes(codes: np.ndarray, mask: np.ndarray, components: int, name: str) -> np.ndarray:
    """The codes of the kept weights (flat ``codes`` where ``mask``), checked to lie in ``[0, K)``, as the
    smallest unsigned dtype of their width; gathered a chunk at a time, so a wide input is never copied whole."""
    kept = np.empty(int(np.count_nonzero(mask)), dtype=coding.uint_dtype(coding.code_width(components)))
    at = 0
    for start in range(0, mask.size, coding.CHUNK):
        part = codes[start:start + coding.CHUNK][mask[start:start + coding.CHUNK]]
        if part.size and (part.min() < 0 or part.max() >= components):
            raise SQSInputError(f"layer {name}: codes of kept weights must lie in [0, {components})")
        kept[at:at + part.size] = part
        at += part.size
    return kept


def _encode_layer(layer: CompressedLayer, codebook_dtype: str | None, compact: bool
                  ) -> tuple[dict[str, Any], list[bytes]]:
    shape = tuple(int(d) for d in layer.shape)
    if tuple(layer.mask.shape) != shape or tuple(layer.codes.shape) != shape:
        raise SQSInputError(f"layer {layer.name}: mask {tuple(layer.mask.shape)} and codes "
                            f"{tuple(layer.codes.shape)} must both have the layer's shape {shape}")
    components = layer.codebook.numel()
    if not 1 <= components <= MAX_COMPONENTS or layer.component_windows.numel() != components:
        raise SQSInputError(f"layer {layer.name}: need 1 <= K <= {MAX_COMPONENTS} levels and one window per level")
    weight_dtype = dtype_name(layer.codebook.dtype)
    stored_dtype = codebook_dtype or weight_dtype
    if weight_dtype not in FLOAT_DTYPES or stored_dtype not in FLOAT_DTYPES:
        raise SQSInputError(f"layer {layer.name}: codebooks must be floating point ({FLOAT_DTYPES})")
    mask = np.asarray(layer.mask.detach().cpu().numpy(), dtype=bool).ravel()
    kept = _kept_codes(layer.codes.detach().cpu().numpy().ravel(), mask, components, layer.name)
    windows = [int(w) for w in layer.component_windows.tolist()]
    if any(not 0 <= w < components for w in windows):
        raise SQSInputError(f"layer {layer.name}: window ids must lie in [0, {components})")
    codebook = tensor_bytes(layer.codebook.detach().to(DTYPES[stored_dtype][0]))
    mask_stream = coding.encode_mask(mask)
    code_stream = coding.encode_codes(kept, components)
    side_keys, side = _side_segments(layer, mask, compact)
    mask_bits = coding.pack_bits(mask)
    entry = {
        "name": layer.name, "shape": list(shape), "dtype": weight_dtype, "nnz": int(kept.size),
        "codebook_dtype": stored_dtype, "windows": windows,
        "mask": {"coding": mask_stream.coding, "bytes": len(mask_stream.data), **mask_stream.params},
        "codes": {"coding": code_stream.coding, "bytes": len(code_stream.data)}, **side_keys,
        "crc32": _content_crc(mask_bits, kept, codebook, *side),
        "bound_bits": round(_entropy_bound_bits(mask.size, kept, components) + 8 * sum(map(len, side)), 1),
    }
    return entry, [codebook, mask_stream.data, code_stream.data, *side]


def _json_safe(value: Any) -> Any:
    """``value`` as plain JSON (tuples become lists, non-finite floats and other objects strings)."""
    return json.loads(json.dumps(value, default=str), parse_constant=str)


def _totals(layers: list[dict[str, Any]], dense: dict[str, torch.Tensor]) -> dict[str, Any]:
    """The accounting totals (as :func:`sqs_pyro.compressed.accounting.accounting`) from the layer entries."""
    numel = sum(_numel(e["shape"]) for e in layers)
    nnz = sum(e["nnz"] for e in layers)
    other = dense_params(dense)
    widths = [coding.code_width(len(e["windows"])) for e in layers]
    coded_bits = sum(e["nnz"] * b for e, b in zip(layers, widths))
    return {"compressed_params": numel, "nnz": nnz, "other_params": other,
            "sparsity": 1.0 - nnz / numel if numel else 0.0, "bits": max(widths, default=0),
            "cr_formula": 32.0 * numel / coded_bits if coded_bits else None, "bytes_fp32": 4 * (numel + other),
            "entropy_bound_bytes": sum(e["bound_bits"] for e in layers) / 8}


def architecture_hints(model: nn.Module | None) -> dict[str, Any]:
    """``{"class": "module.QualName"}`` of ``model``; for a model that is or wraps a
    transformers model (the first submodule with a ``config.to_dict()``) also
    ``transformers_class``, ``transformers_prefix`` (its path in ``model``, ``""`` for itself)
    and ``transformers_config``, so the file can be loaded back into that class."""
    if model is None:
        return {}
    hints: dict[str, Any] = {"class": f"{type(model).__module__}.{type(model).__qualname__}"}
    for path, module in model.named_modules():
        config = getattr(module, "config", None)
        if callable(getattr(config, "to_dict", None)):
            hints.update(transformers_class=type(module).__name__, transformers_prefix=path,
                         transformers_config=_json_safe(config.to_dict()))
            break
    return hints


def _posterior_layer(layer: CompressedLayer, summary: RunnerUps, codebook_dtype: str | None,
                     spec: post.PosteriorCoding) -> tuple[dict[str, Any], list[bytes]]:
    """A layer's posterior entry and segments, coded against the codebook the reader will decode."""
    if summary.prob.numel() and float(summary.prob.min()) <= spec.threshold:
        raise SQSInputError(f"layer {layer.name}: runner-up probabilities must exceed the threshold {spec.threshold}")
    stored = layer.codebook.detach().to(DTYPES[codebook_dtype or dtype_name(layer.codebook.dtype)][0])
    decoded = stored.to(layer.codebook.dtype)  # as the reader sees the levels
    mask = layer.mask.detach().cpu().numpy().astype(bool).ravel()
    kept = layer.codes.detach().cpu().numpy().ravel()[mask].astype(np.int64)
    try:
        return post.encode_layer(summary, kept, decoded.double().cpu().numpy(),
                                 layer.component_windows.cpu().numpy(), spec)
    except SQSInputError as exc:
        raise SQSInputError(f"layer {layer.name}: {exc}") from None


def encode_file(network: CompressedNetwork, codebook_dtype: str | None = None,
                architecture: dict[str, Any] | None = None, tensor_dtype: str | None = None,
                posterior: dict[str, RunnerUps] | None = None,
                posterior_coding: post.PosteriorCoding = post.PosteriorCoding(), *, compact: bool = True) -> bytes:
    """The bytes of the ``.sqs`` file of ``network`` (see the module docstring for the layout); the
    arguments are those of :func:`file_parts`."""
    return b"".join(file_parts(network, codebook_dtype, architecture, tensor_dtype, posterior, posterior_coding,
                               compact=compact))


def file_parts(network: CompressedNetwork, codebook_dtype: str | None = None,
               architecture: dict[str, Any] | None = None, tensor_dtype: str | None = None,
               posterior: dict[str, RunnerUps] | None = None,
               posterior_coding: post.PosteriorCoding = post.PosteriorCoding(), *, compact: bool = True
               ) -> list[bytes]:
    """The ``.sqs`` file of ``network`` as consecutive parts: preamble and header, then the payload's
    segments (written one after another, the file is never held twice).

    ``compact`` (default) writes format version 4: the header deflated and no scales for the groups that
    hold no kept weight. ``compact=False`` writes the oldest version that holds the network (1 to 3),
    byte for byte as before version 4.

    ``codebook_dtype``: ``None`` stores each codebook in its own dtype (exact round trip);
    ``"float16"`` halves the codebooks' bytes and rounds their values. ``tensor_dtype``: likewise
    for the other floating-point tensors wider than it (norms, biases; ``stored_dtype``).
    ``posterior``: the posterior summary of every layer, by name, stored with ``posterior_coding``.
    """
    for key, value in (("codebook_dtype", codebook_dtype), ("tensor_dtype", tensor_dtype)):
        if value is not None and value not in FLOAT_DTYPES:
            raise SQSInputError(f"{key} must be None or one of {FLOAT_DTYPES}, got {value!r}")
    names = [layer.name for layer in network.layers] + list(network.dense_state) + list(network.tied)
    if len(set(names)) != len(names):
        raise SQSInputError("tensor names must be unique across compressed layers and other tensors")
    shapes = {layer.name: (list(layer.shape), dtype_name(layer.codebook.dtype)) for layer in network.layers}
    if any(name not in shapes for name in network.tied.values()):
        raise SQSInputError("every tied name must name a compressed layer")
    layers, segments = [], []
    for layer in network.layers:
        entry, parts = _encode_layer(layer, codebook_dtype, compact)
        layers.append(entry)
        segments += parts
    tensors, stored = [], {}  # stored: id of each tensor written -> its name
    for name, tensor in network.dense_state.items():
        entry = {"name": name, "shape": list(tensor.shape), "dtype": dtype_name(tensor.dtype)}
        if id(tensor) in stored:  # a tied tensor is stored once
            tensors.append({**entry, "bytes": 0, "same_as": stored[id(tensor)]})
            continue
        if _narrower(entry["dtype"], tensor_dtype):
            entry["stored_dtype"] = tensor_dtype
            tensor = tensor.to(DTYPES[tensor_dtype][0])
        data = tensor_bytes(tensor)
        tensors.append({**entry, "bytes": len(data)})
        segments.append(data)
        stored[id(network.dense_state[name])] = name
    for alias, name in network.tied.items():
        shape, dtype = shapes[name]
        tensors.append({"name": alias, "shape": shape, "dtype": dtype, "bytes": 0, "same_as": name})
    section = None
    if posterior is not None:
        missing = [layer.name for layer in network.layers if layer.name not in posterior]
        if missing:
            raise SQSInputError(f"the posterior lacks the layers {missing[:3]}")
        section = {"threshold": posterior_coding.threshold, "prob_bits": posterior_coding.prob_bits, "layers": []}
        for layer in network.layers:
            entry, parts = _posterior_layer(layer, posterior[layer.name], codebook_dtype, posterior_coding)
            section["layers"].append(entry)
            segments += parts
    digest = hashlib.sha256()
    for part in segments:
        digest.update(part)
    version = (FORMAT_VERSION if compact else 3 if section or network.tied or any("stored_dtype" in t for t in tensors)
               else 2 if any("group_size" in e or "exact" in e for e in layers) else 1)
    header = {
        "format": "sqs-pyro", "format_version": version,
        "payload_bytes": sum(map(len, segments)), "payload_sha256": digest.hexdigest(),
        "architecture": _json_safe(architecture or {}), "config": _json_safe(network.config),
        "accounting": _totals(layers, network.dense_state), "layers": layers, "tensors": tensors,
        **({"posterior": section} if section else {}),
    }
    text = json.dumps(header, separators=(",", ":"), allow_nan=False).encode()
    if len(text) > MAX_HEADER_BYTES:
        raise SQSInputError(f"the header would take {len(text)} bytes, more than {MAX_HEADER_BYTES}")
    stored = zlib.compress(text, 9) if compact else text
    return [PREAMBLE.pack(MAGIC, version, len(stored), hashlib.sha256(stored).digest()) + stored, *segments]


def _narrower(dtype: str, target: str | None) -> bool:
    """Whether a tensor of ``dtype`` is stored as the floating dtype ``target`` (a narrower one)."""
    size = lambda name: np.dtype(DTYPES[name][1]).itemsize  # noqa: E731
    return target is not None and dtype in FLOAT_DTYPES and size(target) < size(dtype)


def save_compressed(obj: Any, path: str | os.PathLike, *, codebook_dtype: str | None = None,
                    model: nn.Module | None = None, tensor_dtype: str | None = None,
                    posterior: bool | post.PosteriorCoding = False, compact: bool = True) -> int:
    """Save an :class:`~sqs_pyro.infer.result.SQSResult` or a :class:`CompressedNetwork` to ``path``
    (atomically) and return the file's size in bytes.

    ``model`` supplies the architecture hints (default: the result's skeleton).
    ``codebook_dtype="float16"`` stores fp16 codebooks (smaller, no longer bit-exact);
    ``tensor_dtype="float16"`` stores the other floating-point tensors (norms, biases) in fp16.
    ``posterior`` (a result's only): also store the posterior section, so that
    ``load_compressed(..., predictive=True)`` serves the posterior predictive; ``True`` codes it
    with the default :class:`~sqs_pyro.format.posterior.PosteriorCoding`. ``compact=False``: the file as
    before format version 4 (a plain JSON header, every group's scale), for readers of versions 1 to 3.
    """
    spec = posterior if isinstance(posterior, post.PosteriorCoding) else post.PosteriorCoding() if posterior else None
    summaries = None
    if isinstance(obj, CompressedNetwork):
        network = obj
        if spec is not None:
            raise SQSInputError("the posterior section needs the trained guide: pass the SQSResult, not its network")
    elif callable(getattr(obj, "compressed", None)) and isinstance(getattr(obj, "skeleton", None), nn.Module):
        network, model = obj.compressed(), obj.skeleton if model is None else model
        if spec is not None:
            summaries = guide_runner_ups(obj.guide, network, spec.threshold)
    else:
        raise SQSInputError(f"save_compressed takes an SQSResult or a CompressedNetwork, got {type(obj).__name__}")
    parts = file_parts(network, codebook_dtype, architecture_hints(model), tensor_dtype, summaries,
                       spec or post.PosteriorCoding(), compact=compact)
    with atomic_path(path) as tmp, open(tmp, "wb") as f:  # a crash or a full disk leaves any previous file untouched
        for part in parts:
            f.write(part)
    return sum(map(len, parts))


# ---------------------------------------------------------------- reading


@dataclass(frozen=True)
class _Tensor:
    name: str
    shape: tuple[int, ...]
    dtype: str
    nbytes: int
    same_as: str | None = None
    stored_dtype: str | None = None

    @property
    def stored(self) -> str:
        """The dtype of the stored bytes."""
        return self.stored_dtype or self.dtype


@dataclass(frozen=True)
class _Layer:
    name: str
    shape: tuple[int, ...]
    dtype: str
    nnz: int
    codebook_dtype: str
    windows: tuple[int, ...]
    mask: dict[str, Any]
    codes: dict[str, Any]
    crc32: int
    group_size: int = 0
    exact: int = 0
    scaled_groups: int | None = None  # None: every group's scale is stored

    @property
    def scales_stored(self) -> int:
        """How many fp16 group scales the file holds (0 without group scales)."""
        return _scales_stored(self.shape, self.group_size, self.scaled_groups)

    @property
    def segments(self) -> tuple[int, ...]:
        """Byte lengths: codebook, mask, codes, then the scales and the exact positions and values if present."""
        itemsize = np.dtype(DTYPES[self.codebook_dtype][1]).itemsize
        parts = (len(self.windows) * itemsize, self.mask["bytes"], self.codes["bytes"])
        if self.group_size:
            parts += (2 * self.scales_stored,)
        if self.exact:
            parts += (4 * self.exact, 2 * self.exact)
        return parts


def _scales_stored(shape: tuple[int, ...], group_size: int, scaled_groups: int | None) -> int:
    """The fp16 group scales a layer entry stores: ``scaled_groups`` if given, else one per group (0 without
    ``group_size``)."""
    if not group_size:
        return 0
    return math.prod(_groups(shape, group_size)) if scaled_groups is None else scaled_groups


def _fail(where: str, message: str) -> CompressedFileError:
    return CompressedFileError(f"header: {where} {message}" if where else f"header: {message}")


def _at(where: str, key: str) -> str:
    return f"{where}.{key}" if where else key


def _obj(value: Any, where: str) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise _fail(where, "must be a JSON object")
    return value


def _key(obj: dict[str, Any], key: str, where: str) -> Any:
    if key not in obj:
        raise _fail(where, f"lacks the key {key!r}")
    return obj[key]


def _int(obj: dict[str, Any], key: str, where: str, high: int = 1 << 62) -> int:
    value = _key(obj, key, where)
    if not isinstance(value, int) or isinstance(value, bool) or not 0 <= value <= high:
        raise _fail(_at(where, key), f"must be an integer in [0, {high}], got {value!r}")
    return value


def _str(obj: dict[str, Any], key: str, where: str, choices: tuple[str, ...] | None = None) -> str:
    value = _key(obj, key, where)
    if not isinstance(value, str) or (choices is not None and value not in choices):
        raise _fail(_at(where, key), f"must be {'one of ' + str(choices) if choices else 'a string'}, got {value!r}")
    return value


def _shape(obj: dict[str, Any], where: str) -> tuple[int, ...]:
    value = _key(obj, "shape", where)
    if (not isinstance(value, list) or len(value) > MAX_DIMS
            or not all(isinstance(d, int) and not isinstance(d, bool) and 0 <= d < 1 << 40 for d in value)
            or math.prod(value) >= 1 << 48):
        raise _fail(f"{where}.shape", f"must be a list of at most {MAX_DIMS} integers in [0, 2^40) with fewer "
                                      f"than 2^48 elements, got {value!r}")
    return tuple(value)


def _stream(obj: dict[str, Any], key: str, where: str, codings: tuple[str, ...]) -> dict[str, Any]:
    where = f"{where}.{key}"
    spec = _obj(_key(obj, key, where), where)
    out = {"coding": _str(spec, "coding", where, codings), "bytes": _int(spec, "bytes", where)}
    if out["coding"] == "rice":
        out["k"] = _int(spec, "k", where, coding.MAX_RICE_K)
        out["unary_bytes"] = _int(spec, "unary_bytes", where, out["bytes"])
        out["invert"] = _key(spec, "invert", where)
        if not isinstance(out["invert"], bool):
            raise _fail(f"{where}.invert", "must be true or false")
    return out


def _parse_layer(value: Any, where: str, version: int) -> _Layer:
    obj = _obj(value, where)
    shape = _shape(obj, where)
    windows = _key(obj, "windows", where)
    if (not isinstance(windows, list) or not 1 <= len(windows) <= MAX_COMPONENTS
            or not all(isinstance(w, int) and not isinstance(w, bool) and 0 <= w < len(windows) for w in windows)):
        raise _fail(f"{where}.windows", f"must list 1 to {MAX_COMPONENTS} window ids, each in [0, K)")
    layer = _Layer(
        name=_str(obj, "name", where), shape=shape, dtype=_str(obj, "dtype", where, FLOAT_DTYPES),
        nnz=_int(obj, "nnz", where, _numel(shape)), codebook_dtype=_str(obj, "codebook_dtype", where, FLOAT_DTYPES),
        windows=tuple(windows), mask=_stream(obj, "mask", where, coding.MASK_CODINGS),
        codes=_stream(obj, "codes", where, coding.CODE_CODINGS), crc32=_int(obj, "crc32", where, 0xFFFFFFFF),
        group_size=_int(obj, "group_size", where, 1 << 40) if "group_size" in obj else 0,
        exact=_int(obj, "exact", where, _numel(shape)) if "exact" in obj else 0,
        scaled_groups=_int(obj, "scaled_groups", where, _numel(shape)) if "scaled_groups" in obj else None)
    if "group_size" in obj and (layer.group_size < 1 or not shape):
        raise _fail(f"{where}.group_size", "must be >= 1, on a tensor with at least one dimension")
    if layer.scaled_groups is not None and (version < 4 or not layer.group_size or layer.scaled_groups
                                            > math.prod(_groups(shape, layer.group_size))):
        raise _fail(f"{where}.scaled_groups", "needs format version 4, group_size, and at most one scale per group")
    if layer.nnz + layer.exact > _numel(shape):
        raise _fail(f"{where}.exact", "and nnz exceed the layer's size")
    return layer


def _parse_tensor(value: Any, where: str, version: int) -> _Tensor:
    obj = _obj(value, where)
    tensor = _Tensor(_str(obj, "name", where), _shape(obj, where), _str(obj, "dtype", where, tuple(DTYPES)),
                     _int(obj, "bytes", where), _str(obj, "same_as", where) if "same_as" in obj else None,
                     _str(obj, "stored_dtype", where, FLOAT_DTYPES) if "stored_dtype" in obj else None)
    if tensor.stored_dtype is not None and (version < 3 or not _narrower(tensor.dtype, tensor.stored_dtype)
                                            or tensor.same_as is not None):
        raise _fail(f"{where}.stored_dtype", "needs format version 3, a floating dtype narrower than dtype and no "
                                             "same_as")
    expected = 0 if tensor.same_as is not None else _numel(tensor.shape) * np.dtype(DTYPES[tensor.stored][1]).itemsize
    if tensor.nbytes != expected:
        raise _fail(f"{where}.bytes", f"is {tensor.nbytes}, but shape {list(tensor.shape)} of {tensor.dtype} "
                                      f"takes {expected}")
    return tensor


def _parse_posterior(value: Any, layers: list[_Layer]) -> tuple[post.PosteriorCoding, list[dict[str, Any]]]:
    where = "posterior"
    obj = _obj(value, where)
    threshold = _key(obj, "threshold", where)
    if not isinstance(threshold, (int, float)) or isinstance(threshold, bool) or not 0 <= threshold < 1:
        raise _fail(f"{where}.threshold", f"must be a number in [0, 1), got {threshold!r}")
    bits = _int(obj, "prob_bits", where, post.MAX_PROB_BITS)
    entries = _key(obj, "layers", where)
    if bits < 1 or not isinstance(entries, list) or len(entries) != len(layers):
        raise _fail(where, "must have prob_bits >= 1 and one entry in layers per compressed layer")
    parsed = []
    for i, (value, layer) in enumerate(zip(entries, layers)):
        at = f"{where}.layers[{i}]"
        entry = _obj(value, at)
        parsed.append({"uncertain": _int(entry, "uncertain", at, layer.nnz),
                       "positions": _stream(entry, "positions", at, coding.MASK_CODINGS),
                       "runner_kind": _str(entry, "runner_kind", at, post.RUNNER_KINDS),
                       "runner": _stream(entry, "runner", at, coding.CODE_CODINGS),
                       "probs": _stream(entry, "probs", at, coding.CODE_CODINGS),
                       "crc32": _int(entry, "crc32", at, 0xFFFFFFFF)})
    return post.PosteriorCoding(float(threshold), bits), parsed


@dataclass(frozen=True)
class _Parsed:
    header: dict[str, Any]
    payload: memoryview
    layers: list[_Layer]
    tensors: list[_Tensor]
    file_bytes: int
    posterior: tuple[post.PosteriorCoding, list[dict[str, Any]]] | None = None


def _read_exact(f, size: int, what: str, file_bytes: int) -> bytes:
    data = f.read(size)
    if len(data) != size:
        raise CompressedFileError(f"truncated: the file has {file_bytes} bytes, too few for the {what}")
    return data


def _inflate(stored: bytes) -> bytes:
    """The JSON text of a version-4 header (a zlib stream), at most ``MAX_HEADER_BYTES`` of it."""
    inflater = zlib.decompressobj()
    try:
        text = inflater.decompress(stored, MAX_HEADER_BYTES)
    except zlib.error as exc:
        raise CompressedFileError(f"header is not a valid zlib stream: {exc}") from None
    if inflater.unconsumed_tail:
        raise CompressedFileError(f"header inflates to more than {MAX_HEADER_BYTES} bytes")
    if not inflater.eof or inflater.unused_data:
        raise CompressedFileError("header: the zlib stream is truncated or followed by other bytes")
    return text


def _parse(path: str | os.PathLike) -> _Parsed:
    with open(path, "rb") as f:
        file_bytes = os.fstat(f.fileno()).st_size
        preamble = f.read(PREAMBLE.size)
        if not preamble:
            raise CompressedFileError("the file is empty")
        if preamble[:len(MAGIC)] != MAGIC[:len(preamble)]:
            raise CompressedFileError(f"not an sqs-pyro compressed file (it starts with "
                                      f"{preamble[:8]!r}, expected {MAGIC!r})")
        if len(preamble) < PREAMBLE.size:
            raise CompressedFileError(f"truncated: the file has {file_bytes} bytes, "
                                      f"shorter than the {PREAMBLE.size}-byte preamble")
        _, version, header_len, header_sha = PREAMBLE.unpack(preamble)
        if version > FORMAT_VERSION:
            raise CompressedFileError(f"format version {version} is newer than this reader supports "
                                      f"({FORMAT_VERSION}); upgrade sqs-pyro")
        if version < 1:
            raise CompressedFileError(f"unknown format version {version}")
        if header_len > min(MAX_HEADER_BYTES, file_bytes - PREAMBLE.size):
            raise CompressedFileError(f"truncated or corrupt: the header length {header_len} exceeds the "
                                      f"{file_bytes - PREAMBLE.size} bytes after the preamble")
        text = _read_exact(f, header_len, "header", file_bytes)
        if hashlib.sha256(text).digest() != header_sha:
            raise CompressedFileError("header checksum mismatch: the header is corrupted or was edited")
        if version >= 4:
            text = _inflate(text)
        try:
            header = _obj(json.loads(text.decode("utf-8")), "the header")
        except (UnicodeDecodeError, ValueError, RecursionError) as exc:
            raise CompressedFileError(f"header is not valid JSON: {exc}") from None
        if _key(header, "format", "") != "sqs-pyro" or _key(header, "format_version", "") != version:
            raise CompressedFileError("header: format must be 'sqs-pyro' with the preamble's format_version")
        payload_bytes = _int(header, "payload_bytes", "")
        expected_size = PREAMBLE.size + header_len + payload_bytes
        if expected_size != file_bytes:
            problem = "truncated" if file_bytes < expected_size else "trailing bytes"
            raise CompressedFileError(f"{problem}: the header describes {expected_size} bytes, the file has {file_bytes}")
        payload = _read_exact(f, payload_bytes, "payload", file_bytes)
    if hashlib.sha256(payload).hexdigest() != _key(header, "payload_sha256", ""):
        raise CompressedFileError("payload checksum mismatch: the payload is corrupted or was edited")
    layers_raw, tensors_raw = _key(header, "layers", ""), _key(header, "tensors", "")
    if not isinstance(layers_raw, list) or not isinstance(tensors_raw, list):
        raise CompressedFileError("header: layers and tensors must be lists")
    layers = [_parse_layer(v, f"layers[{i}]", version) for i, v in enumerate(layers_raw)]
    tensors = [_parse_tensor(v, f"tensors[{i}]", version) for i, v in enumerate(tensors_raw)]
    names = [e.name for e in layers] + [e.name for e in tensors]
    if len(set(names)) != len(names):
        raise CompressedFileError("header: tensor names are not unique")
    earlier: dict[str, tuple[tuple[int, ...], str, str | None]] = {}  # name -> (shape, dtype, same_as)
    if version >= 3:  # a tensor may be tied to a compressed layer
        earlier.update((e.name, (e.shape, e.dtype, None)) for e in layers)
    for i, t in enumerate(tensors):
        first = earlier.get(t.same_as) if t.same_as is not None else (t.shape, t.dtype, None)
        if first is None or first[2] is not None or first[:2] != (t.shape, t.dtype):
            raise CompressedFileError(f"header: tensors[{i}].same_as must name an earlier stored tensor "
                                      f"{'or a layer ' if version >= 3 else ''}of the same shape and dtype")
        earlier[t.name] = (t.shape, t.dtype, t.same_as)
    posterior = None
    if "posterior" in header:
        if version < 3:
            raise CompressedFileError(f"header: a posterior section needs format version 3, the file says {version}")
        posterior = _parse_posterior(header["posterior"], layers)
    total = (sum(sum(layer.segments) for layer in layers) + sum(t.nbytes for t in tensors)
             + (sum(sum(post.segment_lengths(e, len(layer.windows))) for e, layer in zip(posterior[1], layers))
                if posterior else 0))
    if total != payload_bytes:
        raise CompressedFileError(f"header: the segments add up to {total} bytes, the payload has {payload_bytes}")
    return _Parsed(header, memoryview(payload), layers, tensors, file_bytes, posterior)


def read_header(path: str | os.PathLike) -> dict[str, Any]:
    """The header of a ``.sqs`` file, after checking its magic, version, lengths, checksums and schema.

    The header's ``file_bytes`` key is added (the file's size).
    """
    parsed = _wrap(path, _parse)
    return {**parsed.header, "file_bytes": parsed.file_bytes}


def _wrap(path: str | os.PathLike, fn: Callable[..., Any], *args: Any) -> Any:
    """``fn(path, *args)`` with the path prefixed to any :class:`CompressedFileError`."""
    try:
        return fn(path, *args)
    except CompressedFileError as exc:
        raise CompressedFileError(f"{os.fspath(path)}: {exc}") from None


def _check_skeleton(parsed: _Parsed, model: nn.Module, prefix: str) -> None:
    """Same names (those under ``prefix``, without it), shapes and dtypes as the model's state dict,
    checked before anything is decoded."""
    state = model.state_dict()
    entries = {e.name[len(prefix):]: (e.shape, e.dtype) for e in [*parsed.layers, *parsed.tensors]
               if e.name.startswith(prefix)}
    missing = sorted(set(state) - set(entries))
    unexpected = sorted(set(entries) - set(state))
    if missing or unexpected:
        raise CompressedFileError(f"the file does not match the model {type(model).__name__}: missing "
                                  f"{missing[:5]}{'...' if len(missing) > 5 else ''}, unexpected "
                                  f"{unexpected[:5]}{'...' if len(unexpected) > 5 else ''}")
    for name, (shape, dtype) in entries.items():
        tensor = state[name]
        if tuple(tensor.shape) != shape or tensor.dtype != DTYPES[dtype][0]:
            raise CompressedFileError(f"the file does not match the model: {name} is {list(shape)} {dtype} in the "
                                      f"file, {list(tensor.shape)} {str(tensor.dtype).removeprefix('torch.')} in the model")


@dataclass(frozen=True)
class _Decoded:
    """One decoded compressed layer: its mask packed (``pack_bits``), the codes of its kept weights (the
    smallest unsigned dtype), its codebook in the weight's dtype, and its group scales and exact weights."""

    entry: _Layer
    mask_bits: np.ndarray
    kept: np.ndarray
    codebook: torch.Tensor
    scales: torch.Tensor | None = None
    exact_index: torch.Tensor | None = None
    exact_values: torch.Tensor | None = None

    def mask(self, start: int = 0, end: int | None = None) -> np.ndarray:
        """The flat mask's bits ``start .. end - 1`` (all by default) as booleans."""
        end = _numel(self.entry.shape) if end is None else end
        bits = np.unpackbits(self.mask_bits[start // 8:-(-end // 8)], bitorder="little")
        return bits[start % 8:start % 8 + end - start].view(bool)

    def layer(self) -> CompressedLayer:
        mask = torch.from_numpy(self.mask()).reshape(self.entry.shape)
        codes = torch.zeros(self.entry.shape, dtype=torch.int64)  # int64, as the network's consumers index with it
        codes[mask] = torch.from_numpy(self.kept).to(codes.dtype)
        return CompressedLayer(self.entry.name, self.entry.shape, mask, codes, self.codebook,
                               torch.tensor(self.entry.windows, dtype=torch.int64), self.entry.group_size,
                               self.scales, self.exact_index, self.exact_values)

    def fill(self, out: torch.Tensor) -> None:
        """Write the layer's weight (:meth:`CompressedLayer.weight`, the same values) into the contiguous
        ``out``, whole rows of about ``CHUNK`` weights at a time: no weight-sized mask, codes or levels."""
        shape = self.entry.shape
        rows = shape[0] if shape else 1
        cols = _numel(shape) // rows if rows else 0
        flat, step, at = out.view(-1), max(1, coding.CHUNK // max(cols, 1)), 0
        for r0 in range(0, rows, step):
            r1 = min(rows, r0 + step)
            mask = torch.from_numpy(self.mask(r0 * cols, r1 * cols))
            n = int(torch.count_nonzero(mask))
            chunk = torch.zeros(mask.numel(), dtype=self.codebook.dtype)  # masked_scatter_: no int64 positions
            chunk.masked_scatter_(mask, self.codebook[torch.from_numpy(self.kept[at:at + n].astype(np.int32))])
            at += n
            if self.scales is not None:
                chunk = apply_group_scales(chunk.view(r1 - r0, cols), self.scales[r0:r1], self.entry.group_size)
            flat[r0 * cols:r1 * cols] = chunk.reshape(-1)
        if self.exact_index is not None:
            flat[self.exact_index] = self.exact_values.to(flat.dtype)


def _group_scales(entry: _Layer, raw: bytes | memoryview, mask: np.ndarray) -> torch.Tensor:
    """A layer's full ``(R, ceil(C / G))`` fp16 scales: as stored, or (``scaled_groups``) the stored ones
    at the groups that hold a kept weight, in row-major order, and elsewhere the smallest normal fp16 value
    (what :func:`~sqs_pyro.models.group_scales.group_absmax` gives an all-zero group)."""
    shape = _groups(entry.shape, entry.group_size)
    if entry.scaled_groups is None:
        return tensor_from_bytes(raw, "float16", shape)
    occupied = occupied_groups(mask, shape[0], entry.group_size)
    if int(np.count_nonzero(occupied)) != entry.scaled_groups:
        raise CompressedFileError(f"layer {entry.name}: {entry.scaled_groups} scales stored, but the mask occupies "
                                  f"{int(np.count_nonzero(occupied))} groups")
    scales = torch.full(shape, torch.finfo(torch.float16).tiny, dtype=torch.float16)
    scales[torch.from_numpy(occupied)] = tensor_from_bytes(raw, "float16", (entry.scaled_groups,))
    return scales


def _decode_layer(entry: _Layer, payload: memoryview, offset: int) -> _Decoded:
    parts, start = [], offset
    for length in entry.segments:
        parts.append(payload[start:start + length])
        start += length
    codebook_raw, mask_raw, codes_raw, *side = parts
    components = len(entry.windows)
    try:
        mask = coding.decode_mask(entry.mask["coding"], entry.mask, mask_raw, _numel(entry.shape), entry.nnz)
        kept = coding.decode_codes(entry.codes["coding"], codes_raw, entry.nnz, components)
    except CompressedFileError as exc:
        raise CompressedFileError(f"layer {entry.name}: {exc}") from None
    mask_bits = np.packbits(mask, bitorder="little")
    if _content_crc(mask_bits.tobytes(), kept, codebook_raw, *side) != entry.crc32:
        raise CompressedFileError(f"layer {entry.name}: CRC mismatch of the decoded mask, codes, codebook and side data")
    codebook = tensor_from_bytes(codebook_raw, entry.codebook_dtype, (components,)).to(DTYPES[entry.dtype][0])
    scales = exact_index = exact_values = None
    if entry.group_size:
        scales = _group_scales(entry, side.pop(0), mask)
    if entry.exact:
        index = np.frombuffer(side[0], dtype="<u4").astype(np.int64)
        if np.any(np.diff(index) <= 0) or index[-1] >= mask.size or mask[index].any():
            raise CompressedFileError(f"layer {entry.name}: exact positions must be increasing, inside the layer "
                                      "and outside the mask")
        exact_index, exact_values = torch.from_numpy(index), tensor_from_bytes(side[1], "float16", (entry.exact,))
    return _Decoded(entry, mask_bits, kept, codebook, scales, exact_index, exact_values)


def _decode_posterior(parsed: _Parsed, layers: list[_Decoded]) -> dict[str, RunnerUps]:
    """The posterior summary of every decoded layer of a checked file with a posterior section (its segments
    follow the layers' and the other tensors')."""
    spec, entries = parsed.posterior
    offset = sum(sum(e.segments) for e in parsed.layers) + sum(t.nbytes for t in parsed.tensors)
    summaries = {}
    for entry, decoded in zip(entries, layers):
        parts = []
        for length in post.segment_lengths(entry, decoded.codebook.numel()):
            parts.append(parsed.payload[offset:offset + length])
            offset += length
        try:
            summaries[decoded.entry.name] = post.decode_layer(
                entry, parts, decoded.kept.astype(np.int64), decoded.codebook.double().numpy(),
                np.array(decoded.entry.windows), spec)
        except CompressedFileError as exc:
            raise CompressedFileError(f"layer {decoded.entry.name}: {exc}") from None
    return summaries


def _dense_tensors(parsed: _Parsed, layer_names: set[str]) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """The other tensors of a checked file (tied ones as the same tensor) and ``alias -> layer`` of
    the tensors tied to a compressed layer."""
    dense, tied = {}, {}
    offset = sum(sum(e.segments) for e in parsed.layers)
    for entry in parsed.tensors:
        if entry.same_as in layer_names:
            tied[entry.name] = entry.same_as
        elif entry.same_as is not None:
            dense[entry.name] = dense[entry.same_as]
        else:
            raw = tensor_from_bytes(parsed.payload[offset:offset + entry.nbytes], entry.stored, entry.shape)
            dense[entry.name] = raw.to(DTYPES[entry.dtype][0])
            offset += entry.nbytes
    return dense, tied


def _decoded_layers(parsed: _Parsed):
    """Each compressed layer of a checked file, decoded one at a time."""
    offset = 0
    for entry in parsed.layers:
        yield _decode_layer(entry, parsed.payload, offset)
        offset += sum(entry.segments)


def _decode(path: str | os.PathLike, max_elements: int | None) -> CompressedNetwork:
    """The :class:`CompressedNetwork` of a checked file, its decoded size capped by ``max_elements``."""
    parsed = _parse(path)
    limit = max_elements if max_elements is not None else ELEMENTS_PER_FILE_BYTE * parsed.file_bytes
    declared = sum(_numel(e.shape) for e in parsed.layers)
    if declared > limit:
        raise CompressedFileError(f"the compressed layers declare {declared} weights, more than the limit "
                                  f"{limit} (pass max_elements or a model to allow it)")
    layers = [decoded.layer() for decoded in _decoded_layers(parsed)]
    dense, tied = _dense_tensors(parsed, {layer.name for layer in layers})
    config = parsed.header.get("config")
    return CompressedNetwork(layers, dense, config if isinstance(config, dict) else {}, tied)


@torch.no_grad()
def _fill(path: str | os.PathLike, model: nn.Module, prefix: str) -> nn.Module:
    """``model`` (checked against the file's entries under ``prefix`` before decoding) filled in
    place, one layer at a time, so that at most one decoded weight is held beside the model."""
    parsed = _parse(path)
    _check_skeleton(parsed, model, prefix)
    state = {prefix + k: v for k, v in model.state_dict().items()}
    decoded = list(_decoded_layers(parsed))  # every layer decodes (and is CRC-checked) before anything is filled
    dense, tied = _dense_tensors(parsed, {d.entry.name for d in decoded})
    aliases: dict[str, list[str]] = {}
    for alias, name in tied.items():
        aliases.setdefault(name, []).append(alias)
    while decoded:  # one layer at a time, written into its tensor
        layer = decoded.pop(0)
        targets = [state[name] for name in (layer.entry.name, *aliases.get(layer.entry.name, ())) if name in state]
        if not targets:
            continue
        out = targets[0] if targets[0].is_contiguous() else torch.empty_like(targets[0],
                                                                             memory_format=torch.contiguous_format)
        layer.fill(out)
        for target in targets:
            if target.data_ptr() != out.data_ptr():
                target.copy_(out)
    for name, tensor in dense.items():
        if name in state:
            state[name].copy_(tensor)
    return model


def _predictive(path: str | os.PathLike, model: nn.Module, members: int | None, seed: int | None
                ) -> AveragedPredictor:
    """The posterior predictive of a checked file with a posterior section, ``model`` filled with its greedy
    network."""
    parsed = _parse(path)
    if parsed.posterior is None:
        raise CompressedFileError("the file has no posterior section, so it cannot serve the posterior predictive "
                                  "(write it with save_compressed(result, path, posterior=True))")
    _check_skeleton(parsed, model, "")
    decoded = list(_decoded_layers(parsed))
    dense, tied = _dense_tensors(parsed, {d.entry.name for d in decoded})
    summaries = _decode_posterior(parsed, decoded)
    config = parsed.header.get("config")
    config = config if isinstance(config, dict) else {}
    network = CompressedNetwork([d.layer() for d in decoded], dense, config, tied)
    network.load_into(model)
    members = members if members is not None else _setting(config, "num_averaged", 10)
    seed = seed if seed is not None else _setting(config, "seed", 0)
    return AveragedPredictor(MixturePosterior(network, summaries), model, network, members, seed).eval()


def load_compressed(path: str | os.PathLike, model: nn.Module | None = None, *, max_elements: int | None = None,
                    prefix: str = "", predictive: bool = False, members: int | None = None, seed: int | None = None
                    ) -> nn.Module | CompressedNetwork | AveragedPredictor:
    """Load a ``.sqs`` file.

    With ``model`` (a skeleton of the original architecture, e.g. ``MNISTNet(28)`` or a
    transformers model built from the header's ``architecture.transformers_config``): its
    state dict must have exactly the file's names, shapes and dtypes (checked before
    decoding); it is filled in place, one decoded layer at a time, and returned (every layer
    is decoded and checked, in a compact form, before anything is filled). With ``prefix`` (e.g.
    ``"lm."``), only the file's entries whose names start with it are matched to ``model``, without
    it (a transformers model stored inside a wrapper); the others are ignored. Without: the decoded
    :class:`CompressedNetwork` (masks, codes, codebooks, windows, other tensors, config);
    its ``state_dict()`` gives plain tensors and ``load_into(skeleton)`` fills a module.
    ``max_elements`` caps the compressed weights decoded without a model (default
    ``2^16`` per byte of the file), so a hostile header cannot demand a huge allocation.

    ``predictive=True`` (needs ``model`` and a file with a posterior section): the posterior
    predictive from the file alone, an :class:`~sqs_pyro.compressed.materialize.AveragedPredictor`
    (in eval mode) averaging the probabilities of ``members`` networks drawn from the stored
    posterior (:class:`~sqs_pyro.compressed.posterior.MixturePosterior`) with ``seed``; both
    default to the stored config's ``num_averaged`` and ``seed``. ``model`` is filled with the
    greedy network as above.

    Raises :class:`~sqs_pyro.errors.CompressedFileError` for any corrupted, truncated,
    tampered, unknown-version or mismatching file, or a predictive asked of a file without a
    posterior section (``OSError`` if it cannot be opened).
    """
    if predictive:
        if model is None or prefix:
            raise SQSInputError("predictive=True needs the model (a skeleton of the original architecture), "
                                "without a prefix")
        return _wrap(path, _predictive, model, members, seed)
    return _wrap(path, _decode, max_elements) if model is None else _wrap(path, _fill, model, prefix)


def _setting(config: dict[str, Any], key: str, default: int) -> int:
    """``config[key]`` if it is a non-negative integer, else ``default``."""
    value = config.get(key)
    return value if isinstance(value, int) and not isinstance(value, bool) and value >= 0 else default


def layer_table(header: dict[str, Any]) -> list[dict[str, Any]]:
    """Per compressed layer of a (checked) header: shape, density (codebook and exact weights),
    bits, codebook, codings, group size, exact weights, side bytes (fp16 scales, exact weights),
    bytes in the file (codebook + mask + codes + side), fp32 bytes and the entropy lower bound in bytes."""
    rows = []
    for entry in header["layers"]:
        numel = _numel(entry["shape"])
        components = len(entry["windows"])
        itemsize = np.dtype(DTYPES[entry["codebook_dtype"]][1]).itemsize
        group_size, exact = entry.get("group_size", 0), entry.get("exact", 0)
        side = 2 * _scales_stored(tuple(entry["shape"]), group_size, entry.get("scaled_groups")) + 6 * exact
        rows.append({
            "name": entry["name"], "shape": entry["shape"], "numel": numel, "nnz": entry["nnz"],
            "density": (entry["nnz"] + exact) / numel if numel else 0.0, "bits": coding.code_width(components),
            "components": components, "windows": len(set(entry["windows"])), "codebook_dtype": entry["codebook_dtype"],
            "mask_coding": entry["mask"]["coding"], "codes_coding": entry["codes"]["coding"],
            "group_size": group_size, "exact": exact, "side_bytes": side,
            "bytes": components * itemsize + entry["mask"]["bytes"] + entry["codes"]["bytes"] + side,
            "bytes_fp32": 4 * numel, "bound_bytes": entry["bound_bits"] / 8,
        })
    return rows


def tensor_table(header: dict[str, Any]) -> list[dict[str, Any]]:
    """Per other tensor of a (checked) header: shape, dtype, stored dtype, bytes in the file (0 when
    tied), the tensor or layer it is tied to, and fp32 bytes (of a floating-point tensor)."""
    return [{"name": t["name"], "shape": t["shape"], "dtype": t["dtype"], "stored_dtype": t.get("stored_dtype", t["dtype"]),
             "bytes": t["bytes"], "same_as": t.get("same_as"),
             "bytes_fp32": 4 * _numel(t["shape"]) if t["dtype"] in FLOAT_DTYPES and "same_as" not in t else 0}
            for t in header["tensors"]]
