"""Bit packing, Golomb-Rice / gap coding, tree entropy coding and the per-stream choice."""
import math
import zlib

import numpy as np
import pytest

from sqs_pyro.format.codecs import (MAX_RICE_K, SAMPLE_BYTES, code_width, decode_binary, decode_codes, decode_mask,
                             encode_binary, encode_codes, encode_mask, pack_bits, pack_uints, rice_decode,
                             rice_encode, unpack_bits, unpack_uints)
from sqs_pyro.errors import CompressedFileError


def h2(p):
    return 0.0 if p in (0.0, 1.0) else -(p * math.log2(p) + (1 - p) * math.log2(1 - p))


def entropy(counts):
    p = np.asarray(counts, float)
    p = p[p > 0] / p.sum()
    return float(-(p * np.log2(p)).sum())


@pytest.mark.parametrize("width", [*range(0, 18), 24, 31, 32, 33, 40])
def test_pack_uints_round_trip_and_bit_layout(width):
    rng = np.random.default_rng(width)
    for n in (0, 1, 7, 9, 333):
        values = rng.integers(0, 1 << width, n) if width else np.zeros(n, np.int64)
        data = pack_uints(values, width)
        assert len(data) == (n * width + 7) // 8
        np.testing.assert_array_equal(unpack_uints(data, n, width), values)
        # value j occupies stream bits j*w .. j*w+w-1, least-significant bit first
        bits = ((values[:, None] >> np.arange(width)) & 1).astype(bool).ravel()
        assert data == pack_bits(bits)


def test_unpack_rejects_wrong_length_and_padding():
    assert pack_bits(np.array([1, 0, 1], bool)) == b"\x05"
    with pytest.raises(CompressedFileError, match="expected 1 for 3 bits"):
        unpack_bits(b"\x05\x00", 3)
    with pytest.raises(CompressedFileError, match="padding"):
        unpack_bits(b"\x0d", 3)
    with pytest.raises(CompressedFileError, match="padding"):
        unpack_uints(b"\xff", 3, 2)  # 3 two-bit values leave 2 padding bits
    with pytest.raises(CompressedFileError, match="expected 2"):
        unpack_uints(b"\x01\x02\x03", 1, 16)


def test_rice_round_trip_and_layout():
    values = np.array([0, 1, 2, 3, 9, 17, 0], np.int64)
    unary, rem = rice_encode(values, 2)
    # quotients 0,0,0,0,2,4,0 -> unary bits 1 1 1 1 001 00001 1 (each quotient in zeros, then a one)
    expected = np.array([1, 1, 1, 1, 0, 0, 1, 0, 0, 0, 0, 1, 1], bool)
    assert unary == pack_bits(expected)
    assert rem == pack_uints(values & 3, 2)
    np.testing.assert_array_equal(rice_decode(unary, rem, 2), values)
    with pytest.raises(CompressedFileError, match="trailing zero bytes"):
        rice_decode(unary + b"\x00", rem, 2)
    with pytest.raises(CompressedFileError, match="outside"):
        rice_decode(unary, rem, MAX_RICE_K + 1)


@pytest.mark.parametrize("density", [0.0, 0.003, 0.05, 0.25, 0.5, 0.75, 0.97, 1.0])
def test_mask_round_trip_near_entropy(density):
    rng = np.random.default_rng(1)
    n = 200_000
    mask = rng.random(n) < density
    enc = encode_mask(mask)
    np.testing.assert_array_equal(decode_mask(enc.coding, enc.params, enc.data, n, int(mask.sum())), mask)
    bound = n * h2(mask.mean()) / 8
    assert len(enc.data) <= 1.03 * bound + 64, (enc.coding, len(enc.data), bound)
    assert len(enc.data) <= n // 8  # never worse than the bitmask
    if 0.0 < density <= 0.25:
        assert enc.coding == "rice"


def test_structured_mask_chooses_a_general_compressor():
    rows = np.random.default_rng(2).random((256, 512)) < 0.5
    mask = np.repeat(rows[:, :1], 512, axis=1)  # whole rows kept or pruned
    enc = encode_mask(mask)
    assert enc.coding in ("zlib", "lzma") and len(enc.data) < 200
    np.testing.assert_array_equal(decode_mask(enc.coding, enc.params, enc.data, mask.size, int(mask.sum())),
                                  mask.ravel())


def test_long_streams_try_general_compressors_by_sample():
    n = 8 * 4 * SAMPLE_BYTES
    periodic = np.tile(np.random.default_rng(3).random(4096) < 0.3, n // 4096)
    enc = encode_mask(periodic)  # repeats every 512 bytes: a sample predicts the win
    assert enc.coding in ("zlib", "lzma") and len(enc.data) < 0.05 * n / 8
    np.testing.assert_array_equal(decode_mask(enc.coding, enc.params, enc.data, n, int(periodic.sum())), periodic)


def test_mask_decoding_checks_counts():
    mask = np.random.default_rng(4).random(1000) < 0.1
    enc = encode_mask(mask)
    with pytest.raises(CompressedFileError, match=f"keeps {mask.sum()} weights, the header says 7"):
        decode_mask(enc.coding, enc.params, enc.data, 1000, 7)
    with pytest.raises(CompressedFileError, match="beyond the sequence length"):
        decode_mask(enc.coding, enc.params, enc.data, 50, int(mask.sum()))
    with pytest.raises(CompressedFileError, match="unknown mask coding"):
        decode_mask("huffman", {}, enc.data, 1000, int(mask.sum()))


@pytest.mark.parametrize("components", [2, 3, 4, 16, 256])
def test_skewed_codes_are_entropy_coded(components):
    rng = np.random.default_rng(components)
    usage = np.exp(-np.arange(components) / 1.5)
    codes = rng.choice(components, size=50_000, p=usage / usage.sum())
    enc = encode_codes(codes, components)
    bound = codes.size * entropy(np.bincount(codes, minlength=components)) / 8
    packed = (codes.size * code_width(components) + 7) // 8
    assert len(enc.data) < packed
    assert len(enc.data) <= 1.05 * bound + 16 * components, (enc.coding, len(enc.data), bound)
    np.testing.assert_array_equal(decode_codes(enc.coding, enc.data, codes.size, components), codes)


def test_tree_coding_beats_byte_compressors_on_heavy_skew():
    codes = (np.random.default_rng(5).random(40_000) < 0.06).astype(np.int64)  # K=2, H2(0.06)=0.33 bits
    enc = encode_codes(codes, 2)
    assert enc.coding == "tree"
    assert len(enc.data) <= 1.03 * codes.size * h2(codes.mean()) / 8 + 8
    np.testing.assert_array_equal(decode_codes("tree", enc.data, codes.size, 2), codes)


def test_uniform_codes_stay_packed_size():
    codes = np.random.default_rng(6).integers(0, 16, 10_001)
    enc = encode_codes(codes, 16)
    assert len(enc.data) <= (codes.size * 4 + 7) // 8
    np.testing.assert_array_equal(decode_codes(enc.coding, enc.data, codes.size, 16), codes)


def test_code_decoding_checks_range_and_length():
    data = pack_uints(np.array([0, 5, 2]), 3)
    with pytest.raises(CompressedFileError, match="code 5 out of range for a 5-level codebook"):
        decode_codes("packed", data, 3, 5)
    tree = encode_codes(np.array([0, 1, 1, 0, 2] * 40), 3)
    with pytest.raises(CompressedFileError):
        decode_codes(tree.coding, tree.data + b"\x00", 200, 3)
    with pytest.raises(CompressedFileError, match="unknown code coding"):
        decode_codes("arith", data, 3, 8)


def test_binary_records_raw_and_rice():
    dense = np.random.default_rng(7).random(100) < 0.5
    sparse = np.zeros(1000, bool)
    sparse[[3, 500, 999]] = True
    for bits in (dense, sparse, ~sparse, np.zeros(0, bool)):
        record = encode_binary(bits)
        out, end = decode_binary(memoryview(record + b"tail"), 0, bits.size)
        assert end == len(record)
        np.testing.assert_array_equal(out, bits)
    assert encode_binary(sparse)[0] & 0x80 and encode_binary(~sparse)[0] & 0x40
    with pytest.raises(CompressedFileError, match="unknown binary record tag"):
        decode_binary(memoryview(b"\x13"), 0, 10)
    with pytest.raises(CompressedFileError, match="past the end"):
        decode_binary(memoryview(encode_binary(sparse)[:-1]), 0, 1000)


def test_decompression_bombs_and_garbage_are_rejected():
    bomb = zlib.compress(b"\x00" * 1_000_000)
    with pytest.raises(CompressedFileError, match="does not expand to exactly 125 bytes"):
        decode_mask("zlib", {}, bomb, 1000, 0)
    with pytest.raises(CompressedFileError, match="lzma stream is corrupt"):
        decode_mask("lzma", {}, b"\xfd7zXZ\x00garbage", 1000, 0)
    with pytest.raises(CompressedFileError, match="zlib stream is corrupt"):
        decode_codes("zlib", b"not zlib", 10, 4)


def test_extreme_gaps_and_remainder_widths():
    values = np.array([0, 1 << 47, 5], np.int64)  # the widest gaps a 2^48-element layer can have
    unary, rem = rice_encode(values, MAX_RICE_K)
    np.testing.assert_array_equal(rice_decode(unary, rem, MAX_RICE_K), values)
    mask = np.zeros(1 << 20, bool)
    mask[-1] = True
    enc = encode_mask(mask)
    assert enc.coding == "rice" and len(enc.data) <= 4
    np.testing.assert_array_equal(decode_mask("rice", enc.params, enc.data, mask.size, 1), mask)
