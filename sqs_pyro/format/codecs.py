r"""Lossless coding of a compressed layer's index streams: the sparsity mask and the codes.

All bit streams are packed least-significant bit first (numpy ``bitorder="little"``): bit
``i`` of a stream is bit ``i % 8`` of byte ``i // 8``. Padding bits of the last byte are zero,
and decoders reject anything else, so every stream has exactly one valid encoding.

**Unsigned integers of width w** (``pack_uints``): value ``j`` occupies stream bits
``j*w .. j*w + w - 1``, least-significant bit first.

**Golomb-Rice code with parameter k** (``rice_encode``) of non-negative integers ``v_i``,
stored as two streams: the *unary* stream holds, for each value in order, ``q_i = v_i >> k``
zero bits followed by a one bit (so the number of one bits is the number of values and the
unary stream ends with the byte holding the last one bit); the *remainder* stream holds
``v_i & (2^k - 1)`` as k-bit unsigned integers.

**Gap coding of a bit sequence** ``x`` of length ``n``: the positions ``p_1 < p_2 < ...`` of
the minority value (ones if ``invert`` is false, zeros if true) become gaps
``g_i = p_i - p_{i-1} - 1`` (``p_0 = -1``), Rice-coded with the cheapest ``k``. For i.i.d.
bits of density ``d`` the gaps are geometric and the cost is within a few percent of
``n H2(d)`` bits. A *binary record* stores one bit sequence whose length the reader knows:

* ``0x00`` then the ``ceil(n/8)`` packed bits (raw), or
* one byte ``0x80 | invert << 6 | k`` (``k <= 40``), the unary stream's byte length as an
  unsigned LEB128 varint, the unary stream, then the remainder stream
  (``ceil(m k / 8)`` bytes for ``m`` = number of one bits in the unary stream).

**Mask codings** (the layer's ``N`` keep-bits in row-major order): ``bitmask`` (packed
bits), ``rice`` (gap coding; header parameters ``k``, ``invert``, ``unary_bytes``; the stream
is the unary stream then the remainder stream), ``zlib`` (an RFC 1950 stream of the bitmask)
and ``lzma`` (an xz stream of the bitmask; written with LZMA2 preset 6, a dictionary no
larger than the data and no integrity check; read with a 64 MiB memory limit).

**Code codings** (the codes of the ``nnz`` kept weights in row-major order, ``w = ceil(log2
K)`` bits each): ``packed`` (w-bit integers), ``tree`` (entropy coding by binary
decomposition, below; tried when ``nnz H(code usage)`` is below the packed size), and
``zlib`` / ``lzma`` of the packed stream.

The writer keeps the smallest candidate. zlib and lzma are always tried on streams of at most
``SAMPLE_BYTES``; on longer ones only the one that compresses their first ``SAMPLE_BYTES``
best, and only if that sample's ratio predicts a win (they are slow on long runs of zeros and
seldom beat the dedicated codings on unstructured streams, but win on structured masks, such
as whole rows or columns pruned).

**Tree coding** writes the codes bit plane by bit plane, most significant first. At depth
``t`` the codes sharing the top-``t``-bit prefix ``p`` form node ``(t, p)``; its sequence is
bit ``w-1-t`` of those codes, in their original order. Nodes are written as binary records for
``t = 0 .. w-1`` and ``p = 0 .. 2^t - 1``, skipping empty nodes (their lengths follow from
the depth above). By the chain rule the node entropies add up to ``nnz H(code usage)``, so
skewed usage costs fewer than ``w`` bits per code.

Memory: codes travel as the smallest unsigned dtype of their width (uint8 up to 8 bits, uint16
up to 16), masks as bool, and the int64 positions, gaps and quotients of the Rice coder exist
only ``CHUNK`` values at a time, so coding a layer of N weights holds a few bytes per weight.
"""
from __future__ import annotations

import lzma
import zlib
from dataclasses import dataclass, field
from typing import Callable, Iterable, Iterator

import numpy as np

from sqs_pyro.compressed.accounting import code_width, usage_entropy
from sqs_pyro.errors import CompressedFileError

MAX_RICE_K = 40
MAX_WIDTH = 16
MASK_CODINGS = ("bitmask", "rice", "zlib", "lzma")
CODE_CODINGS = ("packed", "tree", "zlib", "lzma")
GENERAL = ("zlib", "lzma")
SAMPLE_BYTES = 1 << 14
LZMA_DICT_MIN, LZMA_DICT_MAX = 1 << 12, 1 << 23
LZMA_MEMLIMIT = 1 << 26
_RICE_TAG = 0x80
_INVERT_TAG = 0x40
CHUNK = 1 << 22  # values per step of the chunked loops (a multiple of 8, so packed chunks end on a byte)
_POPCOUNT = np.array([bin(i).count("1") for i in range(256)], dtype=np.uint8)


@dataclass(frozen=True)
class Encoded:
    """One coded stream: its coding name, the parameters a reader needs, and its bytes."""

    coding: str
    data: bytes
    params: dict[str, int | bool] = field(default_factory=dict)


def pack_bits(bits: np.ndarray) -> bytes:
    """Pack booleans, least-significant bit first."""
    return np.packbits(np.asarray(bits, dtype=bool).ravel(), bitorder="little").tobytes()


def unpack_bits(data: bytes | memoryview, count: int) -> np.ndarray:
    """The ``count`` booleans of a packed stream of exactly ``ceil(count / 8)`` bytes with zero padding."""
    if len(data) != (count + 7) // 8:
        raise CompressedFileError(f"bit stream holds {len(data)} bytes, expected {(count + 7) // 8} for {count} bits")
    bits = np.unpackbits(np.frombuffer(data, dtype=np.uint8), bitorder="little")
    if bits[count:].any():
        raise CompressedFileError("bit stream has non-zero padding bits")
    return bits[:count].view(bool)


def _container(width: int) -> int:
    return 1 if width <= 8 else 2 if width <= 16 else 4 if width <= 32 else 8


def uint_dtype(width: int) -> np.dtype:
    """The smallest unsigned dtype that holds ``width``-bit values (uint8 up to 8 bits, then 16, 32, 64)."""
    return np.dtype(f"u{_container(width)}")


def _chunks(values: np.ndarray) -> Iterator[np.ndarray]:
    """``values`` (flat) in consecutive slices of ``CHUNK``."""
    for start in range(0, values.size, CHUNK):
        yield values[start:start + CHUNK]


def _pack_chunk(values: np.ndarray, width: int) -> bytes:
    if 8 % width == 0:
        per = 8 // width
        fields = np.zeros((-(-values.size // per), per), dtype=np.uint8)
        fields.reshape(-1)[:values.size] = values
        out = fields[:, 0].copy()
        for j in range(1, per):
            out |= fields[:, j] << (j * width)
        return out.tobytes()
    c = _container(width)
    le = np.ascontiguousarray(values, dtype=f"<u{c}").view(np.uint8).reshape(-1, c)
    if width == 8 * c:
        return le.tobytes()
    return pack_bits(np.unpackbits(le, axis=1, bitorder="little")[:, :width])


def pack_uints(values: np.ndarray, width: int) -> bytes:
    """Pack non-negative integers below ``2^width`` (``width <= 63``) as ``width``-bit fields
    (``CHUNK`` values at a time: each chunk fills whole bytes)."""
    if width == 0 or values.size == 0:
        return b""
    return b"".join(_pack_chunk(part, width) for part in _chunks(np.asarray(values).ravel()))


def unpack_uints(data: bytes | memoryview, count: int, width: int) -> np.ndarray:
    """Inverse of :func:`pack_uints` (as :func:`uint_dtype`), validating the stream length and padding."""
    dtype = uint_dtype(width)
    if width == 0:
        if len(data):
            raise CompressedFileError(f"a 0-bit integer stream must be empty, got {len(data)} bytes")
        return np.zeros(count, dtype=dtype)
    raw = np.frombuffer(data, dtype=np.uint8)
    if 8 % width == 0 and width < 8:
        per = 8 // width
        if raw.size != -(-count // per):
            raise CompressedFileError(f"integer stream holds {raw.size} bytes, expected {-(-count // per)}")
        fields = (raw[:, None] >> np.arange(0, 8, width, dtype=np.uint8)) & np.uint8((1 << width) - 1)
        values = fields.ravel()
        if values[count:].any():
            raise CompressedFileError("integer stream has non-zero padding bits")
        return values[:count]
    c = _container(width)
    if width == 8 * c:
        if raw.size != count * c:
            raise CompressedFileError(f"integer stream holds {raw.size} bytes, expected {count * c}")
        return raw.view(f"<u{c}").astype(dtype)
    if raw.size != (count * width + 7) // 8:
        raise CompressedFileError(f"bit stream holds {raw.size} bytes, expected {(count * width + 7) // 8} for "
                                  f"{count * width} bits")
    if (count * width) % 8 and raw[-1] >> ((count * width) % 8):
        raise CompressedFileError("bit stream has non-zero padding bits")
    values = np.empty(count, dtype=dtype)
    for start in range(0, count, CHUNK):
        n = min(CHUNK, count - start)
        bits = np.unpackbits(raw[start * width // 8:-(-(start + n) * width // 8)], bitorder="little")
        packed = np.packbits(bits[:n * width].reshape(n, width), axis=1, bitorder="little")
        if packed.shape[1] < c:
            packed = np.concatenate([packed, np.zeros((n, c - packed.shape[1]), np.uint8)], axis=1)
        values[start:start + n] = np.ascontiguousarray(packed).view(f"<u{c}").ravel()
    return values


def _rice_streams(chunks: Callable[[], Iterable[np.ndarray]], k: int) -> tuple[bytes, bytes]:
    """The two Rice streams of the values ``chunks()`` yields (int64 slices), built a slice at a time."""
    length = count = 0
    for v in chunks():
        length, count = length + int((v >> k).sum()) + v.size, count + v.size
    unary = np.zeros(length, dtype=bool)
    remainders = np.empty(count, dtype=uint_dtype(k))
    end, at = -1, 0
    for v in chunks():
        ends = end + np.cumsum((v >> k) + 1)
        unary[ends] = True
        remainders[at:at + v.size] = v & ((1 << k) - 1)
        end, at = int(ends[-1]), at + v.size
    return pack_bits(unary), pack_uints(remainders, k)


def rice_encode(values: np.ndarray, k: int) -> tuple[bytes, bytes]:
    """Golomb-Rice code of non-negative integers: ``(unary stream, remainder stream)``."""
    v = np.asarray(values, dtype=np.int64).ravel()
    return _rice_streams(lambda: _chunks(v), k)


def _popcount(data: bytes | memoryview) -> int:
    """The number of one bits in ``data``."""
    return int(_POPCOUNT[np.frombuffer(data, dtype=np.uint8)].sum(dtype=np.int64))


def _rice_chunks(unary: bytes | memoryview, remainders: bytes | memoryview, k: int) -> Iterator[np.ndarray]:
    """The values of two Rice streams (checked first), as int64 slices of at most ``CHUNK``."""
    if not 0 <= k <= MAX_RICE_K:
        raise CompressedFileError(f"Rice parameter k={k} outside [0, {MAX_RICE_K}]")
    raw = np.frombuffer(unary, dtype=np.uint8)
    if raw.size and raw[-1] == 0:
        raise CompressedFileError("Rice unary stream has trailing zero bytes")
    rest = unpack_uints(remainders, _popcount(unary), k)
    end, at = -1, 0
    for start in range(0, raw.size, CHUNK // 8):
        ends = np.flatnonzero(np.unpackbits(raw[start:start + CHUNK // 8], bitorder="little")) + 8 * start
        if not ends.size:
            continue
        q = np.diff(ends, prepend=end) - 1
        if int(q.max()) >= 1 << (62 - k):
            raise CompressedFileError("Rice quotient overflows 64 bits")
        yield (q << k) | rest[at:at + q.size].astype(np.int64)
        end, at = int(ends[-1]), at + q.size


def rice_decode(unary: bytes | memoryview, remainders: bytes | memoryview, k: int) -> np.ndarray:
    """Inverse of :func:`rice_encode`; the number of values is the number of one bits in ``unary``."""
    return np.concatenate([np.zeros(0, dtype=np.int64), *_rice_chunks(unary, remainders, k)])


def _rice_cost(chunks: Callable[[], Iterable[np.ndarray]]) -> tuple[int, int]:
    """The cheapest Rice parameter for the values ``chunks()`` yields and its total bytes (both streams)."""
    m = total = 0
    for v in chunks():
        m, total = m + v.size, total + int(v.sum())
    if m == 0:
        return 0, 0
    guess = int(np.log2(total / m + 1.0))  # the optimum for geometric gaps is guess - 1 or guess
    high = min(MAX_RICE_K, guess + 1)
    ks = range(max(0, min(guess - 1, high)), high + 1)
    quotients = dict.fromkeys(ks, 0)
    for v in chunks():
        for k in ks:
            quotients[k] += int((v >> k).sum())
    best = None
    for k in ks:
        size = (quotients[k] + m + 7) // 8 + (m * k + 7) // 8
        if best is None or size < best[1]:
            best = (k, size)
    return best


def _gap_chunks(bits: np.ndarray, invert: bool) -> Iterator[np.ndarray]:
    """Gaps ``p_i - p_{i-1} - 1`` between the minority value's positions (``p_0 = -1``), as int64
    slices, ``CHUNK`` bits of the sequence at a time."""
    last = -1
    for start in range(0, bits.size, CHUNK):
        part = bits[start:start + CHUNK]
        positions = np.flatnonzero(~part if invert else part) + start
        if positions.size:
            yield np.diff(positions, prepend=last) - 1
            last = int(positions[-1])


def _gap_coding(bits: np.ndarray) -> tuple[Callable[[], Iterator[np.ndarray]], bool]:
    """The gaps of the minority value (as a re-startable source of slices), and whether it is zero."""
    invert = 2 * int(np.count_nonzero(bits)) > bits.size
    return (lambda: _gap_chunks(bits, invert)), invert


def _gaps_to_bits(gaps: Iterable[np.ndarray], invert: bool, count: int) -> np.ndarray:
    bits = np.zeros(count, dtype=bool)
    last = -1
    for part in gaps:
        positions = last + np.cumsum(part + 1)
        if positions[-1] >= count:
            raise CompressedFileError(f"gap-coded position {int(positions[-1])} beyond the sequence length {count}")
        bits[positions] = True
        last = int(positions[-1])
    return np.logical_not(bits, out=bits) if invert else bits


def _varint(value: int) -> bytes:
    out = bytearray()
    while True:
        byte, value = value & 0x7F, value >> 7
        out.append(byte | (0x80 if value else 0))
        if not value:
            return bytes(out)


def _read_varint(buf: memoryview, offset: int) -> tuple[int, int]:
    value = 0
    for shift in range(0, 64, 7):
        if offset >= len(buf):
            raise CompressedFileError("varint runs past the end of the stream")
        byte = buf[offset]
        offset += 1
        value |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return value, offset
    raise CompressedFileError("varint longer than 64 bits")


def encode_binary(bits: np.ndarray) -> bytes:
    """A binary record of a bit sequence: raw or gap coded, whichever is smaller."""
    gaps, invert = _gap_coding(bits)
    k, size = _rice_cost(gaps)
    raw = (bits.size + 7) // 8
    if size + len(_varint(size)) >= raw:
        return b"\x00" + pack_bits(bits)
    unary, rem = _rice_streams(gaps, k)
    return bytes([_RICE_TAG | (_INVERT_TAG if invert else 0) | k]) + _varint(len(unary)) + unary + rem


def decode_binary(buf: memoryview, offset: int, count: int) -> tuple[np.ndarray, int]:
    """Read the binary record of a ``count``-bit sequence at ``offset``: ``(bits, next offset)``."""
    if offset >= len(buf):
        raise CompressedFileError("binary record runs past the end of the stream")
    tag = buf[offset]
    offset += 1
    if tag == 0:
        end = offset + (count + 7) // 8
        if end > len(buf):
            raise CompressedFileError("raw binary record runs past the end of the stream")
        return unpack_bits(buf[offset:end], count), end
    if not tag & _RICE_TAG:
        raise CompressedFileError(f"unknown binary record tag 0x{tag:02x}")
    k = tag & 0x3F
    unary_len, offset = _read_varint(buf, offset)
    if offset + unary_len > len(buf):
        raise CompressedFileError("Rice unary stream runs past the end of the stream")
    unary = buf[offset:offset + unary_len]
    end = offset + unary_len + (_popcount(unary) * k + 7) // 8
    if end > len(buf):
        raise CompressedFileError("Rice remainder stream runs past the end of the stream")
    gaps = _rice_chunks(unary, buf[offset + unary_len:end], k)
    return _gaps_to_bits(gaps, bool(tag & _INVERT_TAG), count), end


def _general(coding: str, raw: bytes) -> bytes:
    if coding == "zlib":
        return zlib.compress(raw, 9)
    dict_size = min(LZMA_DICT_MAX, max(LZMA_DICT_MIN, 1 << (len(raw) - 1).bit_length()))
    filters = [{"id": lzma.FILTER_LZMA2, "preset": 6, "dict_size": dict_size}]
    return lzma.compress(raw, format=lzma.FORMAT_XZ, check=lzma.CHECK_NONE, filters=filters)


def _smallest(candidates: list[Encoded], raw: bytes) -> Encoded:
    """The smallest of ``candidates`` and of zlib / lzma of the packed stream ``raw`` (with
    the sampling rule of the module docstring for streams over ``SAMPLE_BYTES``)."""
    best = min(candidates, key=lambda e: len(e.data))
    if len(raw) <= SAMPLE_BYTES:
        tries = list(GENERAL)
    else:
        ratios = {c: len(_general(c, raw[:SAMPLE_BYTES])) / SAMPLE_BYTES for c in GENERAL}
        coding = min(ratios, key=ratios.get)
        tries = [coding] if ratios[coding] * len(raw) < len(best.data) else []
    return min([best, *(Encoded(c, _general(c, raw)) for c in tries)], key=lambda e: len(e.data))


def _decompress(coding: str, data: bytes | memoryview, size: int) -> bytes:
    """Decompress a zlib / xz stream that must expand to exactly ``size`` bytes (no bombs)."""
    try:
        if coding == "zlib":
            dec = zlib.decompressobj()
            out = dec.decompress(data, size + 1)
            done = dec.eof and not dec.unused_data and not dec.unconsumed_tail
        else:
            dec = lzma.LZMADecompressor(format=lzma.FORMAT_XZ, memlimit=LZMA_MEMLIMIT)
            out = dec.decompress(data, max_length=size + 1)
            done = dec.eof and not dec.unused_data
    except (zlib.error, lzma.LZMAError) as exc:
        raise CompressedFileError(f"{coding} stream is corrupt: {exc}") from exc
    if len(out) != size or not done:
        raise CompressedFileError(f"{coding} stream does not expand to exactly {size} bytes")
    return out


def encode_mask(mask: np.ndarray) -> Encoded:
    """The smallest of the mask codings for a boolean mask (flattened in row-major order)."""
    bits = np.asarray(mask, dtype=bool).ravel()
    bitmask = pack_bits(bits)
    gaps, invert = _gap_coding(bits)
    k, _ = _rice_cost(gaps)
    unary, rem = _rice_streams(gaps, k)
    rice = Encoded("rice", unary + rem, {"k": k, "invert": invert, "unary_bytes": len(unary)})
    return _smallest([Encoded("bitmask", bitmask), rice], bitmask)


def decode_mask(coding: str, params: dict, data: bytes | memoryview, numel: int, nnz: int) -> np.ndarray:
    """The flat boolean mask of ``numel`` weights, checked to keep exactly ``nnz``."""
    if coding == "bitmask":
        bits = unpack_bits(data, numel)
    elif coding == "rice":
        k, invert, unary_bytes = params["k"], params["invert"], params["unary_bytes"]
        if unary_bytes > len(data):
            raise CompressedFileError(f"Rice unary stream of {unary_bytes} bytes exceeds the {len(data)}-byte mask")
        bits = _gaps_to_bits(_rice_chunks(data[:unary_bytes], data[unary_bytes:], k), invert, numel)
    elif coding in ("zlib", "lzma"):
        bits = unpack_bits(_decompress(coding, data, (numel + 7) // 8), numel)
    else:
        raise CompressedFileError(f"unknown mask coding {coding!r}; known: {MASK_CODINGS}")
    kept = int(np.count_nonzero(bits))
    if kept != nnz:
        raise CompressedFileError(f"mask keeps {kept} weights, the header says {nnz}")
    return bits


def _partition(values: np.ndarray, bits: np.ndarray) -> list[np.ndarray]:
    """``[values where not bits, values where bits]``, each in its original order."""
    return [values[~bits], values[bits]]  # boolean masks: no int64 index arrays (memory on large layers)


def _tree_encode(codes: np.ndarray, width: int) -> bytes:
    out = bytearray()
    nodes = [codes]
    for t in range(width):
        children = []
        for p, block in enumerate(nodes):
            nodes[p] = None  # freed once partitioned
            bits = np.empty(block.size, dtype=bool)
            np.bitwise_and(block >> (width - 1 - t), 1, out=bits.view(np.uint8))
            if block.size:
                out += encode_binary(bits)
            children += _partition(block, bits)
        nodes = children
    return bytes(out)


def _tree_decode(data: bytes | memoryview, count: int, width: int) -> np.ndarray:
    """Read the nodes top down (each node's bits kept packed; its children's lengths follow), then
    build the codes bottom up: a node's codes are its children's, interleaved as its bits say."""
    buf = memoryview(data)
    sizes, planes, offset = [count], [], 0
    for t in range(width):
        level, below = [], []
        for size in sizes:
            bits = np.zeros(0, dtype=bool)
            if size:
                bits, offset = decode_binary(buf, offset, size)
            ones = int(np.count_nonzero(bits))
            level.append(np.packbits(bits))
            below += [size - ones, ones]
        planes.append(level)
        sizes = below
    if offset != len(buf):
        raise CompressedFileError(f"tree-coded codes end at byte {offset} of {len(buf)}")
    dtype = uint_dtype(width)
    nodes = [np.full(size, code, dtype=dtype) for code, size in enumerate(sizes)]
    for level in reversed(planes):
        children, nodes = nodes, []
        for p, packed in enumerate(level):
            low, high = children[2 * p], children[2 * p + 1]
            children[2 * p] = children[2 * p + 1] = None  # freed as the level is built
            bits = np.unpackbits(packed, count=low.size + high.size).view(bool)
            node = np.empty(bits.size, dtype=dtype)
            node[bits] = high
            node[np.logical_not(bits, out=bits)] = low
            nodes.append(node)
    return nodes[0]


def code_counts(codes: np.ndarray, components: int) -> np.ndarray:
    """How often each of the ``components`` codes occurs (int64), counted ``CHUNK`` codes at a time
    (``np.bincount`` copies its input to int64)."""
    counts = np.zeros(components, dtype=np.int64)
    for part in _chunks(np.asarray(codes).ravel()):
        counts += np.bincount(part, minlength=components)
    return counts


def encode_codes(codes: np.ndarray, components: int) -> Encoded:
    """The smallest of the code codings for the codes (in ``[0, K)``) of the kept weights."""
    width = code_width(components)
    values = np.asarray(codes).ravel().astype(uint_dtype(width), copy=False)
    packed = pack_uints(values, width)
    candidates = [Encoded("packed", packed)]
    if values.size and values.size * usage_entropy(code_counts(values, components)) / 8 < len(packed):
        candidates.append(Encoded("tree", _tree_encode(values, width)))
    return _smallest(candidates, packed)


def decode_codes(coding: str, data: bytes | memoryview, count: int, components: int) -> np.ndarray:
    """The ``count`` codes of the kept weights (as :func:`uint_dtype` of their width), each checked to lie
    in ``[0, K)``."""
    width = code_width(components)
    if width > MAX_WIDTH:
        raise CompressedFileError(f"{components} codebook levels exceed the supported 2^{MAX_WIDTH}")
    if coding == "packed":
        codes = unpack_uints(data, count, width)
    elif coding == "tree":
        codes = _tree_decode(data, count, width)
    elif coding in ("zlib", "lzma"):
        codes = unpack_uints(_decompress(coding, data, (count * width + 7) // 8), count, width)
    else:
        raise CompressedFileError(f"unknown code coding {coding!r}; known: {CODE_CODINGS}")
    if codes.size and int(codes.max()) >= components:
        raise CompressedFileError(f"code {int(codes.max())} out of range for a {components}-level codebook")
    return codes
