"""The ``.sqs`` writer and reader without int64 code arrays (issue 41): the chunked, small-dtype paths
write the bytes the plain int64 writer wrote (their SHA-256, planted from it) and decode the plain
weights, whatever the chunk size; and they allocate a few bytes per weight, not the int64 copies."""
import hashlib
import importlib
import tracemalloc

import numpy as np
import pytest
import torch
from torch import nn

import sqs_pyro.format.codecs as codecs
from sqs_pyro.compressed.materialize import CompressedLayer, CompressedNetwork
from sqs_pyro.format.codecs import decode_codes, encode_codes
from sqs_pyro.format.container import encode_file, load_compressed, save_compressed

accounting = importlib.import_module("sqs_pyro.compressed.accounting")  # the package's `accounting` is the function

# written by the plain int64 writer (main ab8bdaa): the sha256 of encode_file(network(), tensor_dtype="float16"),
# and per layer those of its kept codes' tree-coded and packed streams
PLAIN_FILE = "91b69604dda8ec31f4d37602e23cb16606760a3aea35a4563a05130c847af87c"
PLAIN_STREAMS = {
    "table": ("a62eee0f7c45643ed64b36e4b91211ea0bd4ab136d30acb26dd702e12c21ef35",
              "6d36cf098372c8988dc21254da0042098f34208941baad010c807ee1466db94b"),
    "wide": ("ba28ed84acb738175af4efd26fe24ac165c758f1ee650267f830a8eee04b2b38",
             "f8e5a829808271249c871c4ed87c0f2d1825d6c5faaf0527e7bbd89fbd1f0d46"),
    "three": ("9088bfc926e5c8b26a850d007a63ccf7de6194306b08799484b1ded4addca925",
              "5890dcbe29a56ee2070619a85d06efe6e36e0d1456e045a46f6abe4d79a541a0"),
}


def _hash(n: int, salt: int) -> np.ndarray:
    """Pseudo-random 32-bit integers from SplitMix64's finaliser (no RNG, so the planted file never drifts)."""
    z = (np.arange(n, dtype=np.uint64) + np.uint64(salt)) * np.uint64(0x9E3779B97F4A7C15)
    z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return (z ^ (z >> np.uint64(31))) >> np.uint64(32)


def _layer(name: str, shape: tuple[int, int], components: int, keep_one_in: int, group_size: int, exact: int,
           codes_dtype: torch.dtype) -> CompressedLayer:
    n = shape[0] * shape[1]
    h = _hash(n, components)
    codes = np.minimum(h % components, (h >> np.uint64(9)) % components).astype(np.int64)  # skewed: tree coded
    mask = (h >> np.uint64(20)) % np.uint64(keep_one_in) != 0
    codes[~mask] = 0
    index = np.flatnonzero(~mask)[:exact]
    scales = None
    if group_size:
        groups = (shape[0], -(-shape[1] // group_size))
        scales = torch.from_numpy(0.01 + (_hash(groups[0] * groups[1], 7) % 97).astype(np.float32) / 1000)
        scales = scales.reshape(groups).half()
    return CompressedLayer(name, shape, torch.from_numpy(mask).reshape(shape),
                           torch.from_numpy(codes).reshape(shape).to(codes_dtype),
                           torch.linspace(-1.0, 1.0, components), torch.zeros(components, dtype=torch.int64),
                           group_size, scales, torch.from_numpy(index) if exact else None,
                           torch.linspace(-3.0, 3.0, len(index)).half() if exact else None)


def network() -> CompressedNetwork:
    """K=16 (uint8 codes, 4 bits, a nearly full mask, group scales, exact weights), K=300 (uint16
    codes, 9 bits: the general packing path; a third pruned) and K=8 (3 bits), int64 codes in one."""
    return CompressedNetwork([_layer("table", (128, 250), 16, 9973, 64, 3, torch.uint8),
                              _layer("wide", (60, 250), 300, 3, 32, 2, torch.int32),
                              _layer("three", (50, 90), 8, 50, 0, 0, torch.int64)],
                             {"norm": torch.linspace(0.5, 1.5, 90)}, {"seed": 0}, {})


class Skeleton(nn.Module):
    def __init__(self, net: CompressedNetwork):
        super().__init__()
        for layer in net.layers:
            self.register_parameter(layer.name, nn.Parameter(torch.full(layer.shape, 7.0)))
        self.register_buffer("norm", torch.zeros(90))


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def kept_codes(layer: CompressedLayer) -> np.ndarray:
    return layer.codes.reshape(-1)[layer.mask.reshape(-1)].long().numpy()


@pytest.mark.parametrize("chunk", [16, 1 << 22])
def test_lean_writer_writes_the_plain_bytes(monkeypatch, chunk):
    monkeypatch.setattr(codecs, "CHUNK", chunk)
    net = network()
    assert sha(encode_file(net, tensor_dtype="float16", compact=False)) == PLAIN_FILE
    for layer in net.layers:
        width = codecs.code_width(layer.components)
        small = kept_codes(layer).astype(codecs.uint_dtype(width))
        assert small.dtype == (np.uint16 if layer.components > 256 else np.uint8)
        assert (sha(codecs._tree_encode(small, width)), sha(codecs.pack_uints(small, width))) == PLAIN_STREAMS[layer.name]
    # negative control: one code more or less is seen
    table = net.layers[0]
    table.codes.reshape(-1)[int(np.flatnonzero(table.mask.reshape(-1).numpy())[0])] += 1
    assert sha(encode_file(net, tensor_dtype="float16", compact=False)) != PLAIN_FILE


@pytest.mark.parametrize("chunk", [16, 1 << 22])
def test_lean_reader_decodes_the_plain_weights(monkeypatch, tmp_path, chunk):
    monkeypatch.setattr(codecs, "CHUNK", chunk)
    net = network()
    path = tmp_path / "n.sqs"
    save_compressed(net, path, tensor_dtype="float16", compact=False)
    assert sha(path.read_bytes()) == PLAIN_FILE
    model = load_compressed(path, Skeleton(net))  # filled a chunk of rows at a time
    for layer in net.layers:
        assert torch.equal(getattr(model, layer.name).data, layer.weight())  # the plain form, bit for bit
        width = codecs.code_width(layer.components)
        kept = kept_codes(layer)
        for coded in (codecs._tree_encode(kept.astype(codecs.uint_dtype(width)), width), codecs.pack_uints(kept, width)):
            coding = "tree" if coded == codecs._tree_encode(kept.astype(codecs.uint_dtype(width)), width) else "packed"
            codes = decode_codes(coding, coded, kept.size, layer.components)
            assert codes.dtype == codecs.uint_dtype(width) and np.array_equal(codes, kept)
    torch.testing.assert_close(model.norm, net.dense_state["norm"].half().float(), rtol=0, atol=0)
    back = load_compressed(path)
    for a, b in zip(net.layers, back.layers):
        assert torch.equal(a.mask, b.mask) and torch.equal(a.codes.long(), b.codes)
    # negative control: the comparison sees one code changed
    table = net.layers[0]
    table.codes.reshape(-1)[int(np.flatnonzero(table.mask.reshape(-1).numpy())[0])] += 1
    assert not torch.equal(model.table.data, table.weight())


def numpy_peak(fn) -> int:
    """The most bytes Python and numpy held at once while ``fn`` ran, above what they held before."""
    tracemalloc.start()
    try:
        fn()
        return tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


def test_a_large_layer_is_written_and_read_in_a_few_bytes_per_weight(monkeypatch, tmp_path):
    monkeypatch.setattr(codecs, "CHUNK", 1 << 15)
    layer = _layer("table", (1024, 512), 16, 9973, 64, 16, torch.uint8)
    n, path = layer.numel, tmp_path / "t.sqs"
    net = CompressedNetwork([layer], {"norm": torch.ones(90)}, {}, {})
    write = numpy_peak(lambda: save_compressed(net, path)) / n
    read = numpy_peak(lambda: load_compressed(path, Skeleton(net))) / n
    assert write < 7 and read < 5, (write, read)  # the int64 writer and reader of ab8bdaa: 20.8 and 13.5
    # negative control: the measure sees a weight-sized int64 copy of the codes
    assert numpy_peak(lambda: layer.codes.numpy().astype(np.int64)) / n >= 8


def test_chunked_code_usage_is_bincount_and_unique(monkeypatch):
    layer = _layer("w", (40, 70), 16, 5, 0, 0, torch.uint8)
    layer.codes[layer.codes == 3] = 4  # a level no kept weight uses
    monkeypatch.setattr(accounting, "COUNT_CHUNK", 96)
    kept = layer.codes[layer.mask]
    row = accounting.layer_accounting(layer)
    assert row["codes_used"] == torch.unique(kept).numel() == 15
    assert row["code_entropy_bits"] == accounting.usage_entropy(torch.bincount(kept.long(), minlength=16))
    assert torch.equal(accounting.code_usage(layer), torch.bincount(kept.long(), minlength=16))
