"""``sqs-pyro quantize --hf``: one-shot group-scaled codebooks on a tiny Llama folder, end to end."""
import json
import math

import pytest
import torch

from sqs_pyro.cli import main
from sqs_pyro.format import load_compressed
from sqs_pyro.hf import CausalLM, load_transformers, perplexity, text_windows

transformers = pytest.importorskip("transformers", reason="transformers not installed")
from tiny_hf import WORDS, tiny_llama, word_tokenizer  # noqa: E402 (after the skip)


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    path = tmp_path_factory.mktemp("llama")
    tiny_llama(tied=False).save_pretrained(path / "model")
    word_tokenizer().save_pretrained(path / "model")
    gen = torch.Generator().manual_seed(0)
    for name, lines in (("train.txt", 60), ("eval.txt", 20)):
        starts = torch.randint(0, 30, (lines,), generator=gen).tolist()
        (path / name).write_text("\n".join(" ".join(WORDS[(s + i) % 30] for i in range(12)) for s in starts))
    return path


def test_quantize_with_calibration_writes_a_loadable_file_with_its_perplexity(folder, tmp_path, capsys):
    out = tmp_path / "q"
    rc = main(["quantize", "--hf", str(folder / "model"), "--out", str(out), "-K", "4", "--group-size", "8",
               "--exact-outliers", "2", "--data", str(folder / "train.txt"), "--calib-windows", "16",
               "--eval-data", str(folder / "eval.txt"), "--seq-len", "8"])
    assert rc == 0
    summary = json.loads((out / "summary.json").read_text())
    # 14 matrices, the token table and the untied head
    assert summary["error_feedback"] and summary["exact_weights"] == 16 * 2
    assert summary["embedding_components"] == 8 and summary["bits"] == 3  # the tables get twice -K levels
    assert summary["calib_windows"] == 16
    network = load_compressed(out / "model.sqs")
    assert [layer.name for layer in network.layers[:2]] == ["lm.model.embed_tokens.weight", "lm.lm_head.weight"]
    q = next(layer for layer in network.layers if layer.name.endswith("layers.0.self_attn.q_proj.weight"))
    assert q.group_size == 8 and q.scales.shape == (16, 2) and q.num_exact == 2 and q.components == 4
    loaded = load_transformers(out / "model.sqs")
    torch.testing.assert_close(loaded.model.layers[0].self_attn.q_proj.weight, q.weight())

    class Wrapped(torch.nn.Module):
        def forward(self, ids):
            return loaded(input_ids=ids).logits

    held = text_windows(word_tokenizer(), [folder / "eval.txt"], 8)
    assert math.isclose(perplexity(Wrapped(), held), summary["perplexity"], rel_tol=1e-5)
    assert "perplexity" in capsys.readouterr().out


def test_exact_fraction_and_no_calibration(folder, tmp_path):
    out = tmp_path / "q"
    assert main(["quantize", "--hf", str(folder / "model"), "--out", str(out), "-K", "4", "--group-size", "0",
                 "--exact-outliers", "0.01"]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert not summary["error_feedback"] and "perplexity" not in summary
    sizes = [layer.numel for layer in load_compressed(out / "model.sqs").layers]
    assert summary["exact_weights"] == sum(round(0.01 * n) for n in sizes)


def test_sparse_quantize_starts_a_sparse_compress(folder, tmp_path):
    """`quantize --sparsity 0.5` with calibration prunes half of every matrix; `compress --start` at 50%
    with every rate at 0 writes that file's network exactly."""
    q = tmp_path / "q"
    assert main(["quantize", "--hf", str(folder / "model"), "--out", str(q), "-K", "4", "--group-size", "8",
                 "--exact-outliers", "0", "--embedding-components", "0", "--sparsity", "0.5",
                 "--data", str(folder / "train.txt"),
                 "--calib-windows", "8", "--seq-len", "8"]) == 0
    assert json.loads((q / "summary.json").read_text())["sparsity"] == pytest.approx(0.5, abs=1e-3)
    frozen = {"group_size": 8, "sparsity": 0.5, "lr_weights": 0.0, "lr_codebook": 0.0, "lr_dense": 0.0,
              "lr_gates": 0.0, "responsibility_scale": "pooled", "mode": "hard"}
    (tmp_path / "frozen.json").write_text(json.dumps(frozen))
    assert main(["compress", "--hf", str(folder / "model"), "--task", "lm", "--data", str(folder / "train.txt"),
                 "--seq-len", "8", "--batch-size", "8", "--epochs", "1", "-K", "4", "--config",
                 str(tmp_path / "frozen.json"), "--no-progress", "--start", str(q / "model.sqs"),
                 "--out", str(tmp_path / "s")]) == 0
    given, started = (load_compressed(p / "model.sqs") for p in (q, tmp_path / "s"))
    for a, b in zip(given.layers, started.layers):
        assert torch.equal(a.mask, b.mask) and torch.equal(a.weight(), b.weight())


@pytest.mark.parametrize("options, message", [
    (["--exact-outliers", "2.5"], "exact-outliers"),
    (["--natural-order"], "need --data"),
    (["-K", "1"], "components"),
    (["--sparsity", "1.0"], "sparsity"),
    (["--entropy-lambda", "-0.01"], "--entropy-lambda and --embedding-entropy-lambda must be >= 0"),
    (["--embedding-entropy-lambda", "nan"], "--entropy-lambda and --embedding-entropy-lambda must be >= 0"),
    (["--rate-importance"], "give --entropy-lambda > 0"),
    (["--entropy-lambda", "0.01", "--rate-importance"], "need --data"),
    (["--lambda-sensitivity", "0.5"], "--lambda-sensitivity is an exponent in [0, 1] and needs --entropy-lambda"),
    (["--entropy-lambda", "0.01", "--lambda-sensitivity", "2"], "--lambda-sensitivity is an exponent in [0, 1]"),
])
def test_bad_input_exits_2_before_any_work(folder, tmp_path, capsys, options, message):
    out = tmp_path / "q"
    assert main(["quantize", "--hf", str(folder / "model"), "--out", str(out), *options]) == 2
    assert message in capsys.readouterr().err and not out.exists()


@pytest.mark.parametrize("option", ["--data", "--eval-data"])
def test_a_missing_text_file_is_reported_before_the_model_loads(folder, tmp_path, capsys, monkeypatch, option):
    def refuse(*args, **kwargs):
        raise AssertionError("the model was loaded before the input files were checked")

    monkeypatch.setattr("sqs_pyro.hf.load_model", refuse)
    assert main(["quantize", "--hf", str(folder / "model"), "--out", str(tmp_path / "q"),
                 option, str(tmp_path / "MISSING.txt")]) == 2
    assert f"{option}: no such file: {tmp_path / 'MISSING.txt'}" in capsys.readouterr().err


def test_compress_starts_from_a_quantized_file(folder, tmp_path, capsys):
    """`quantize` then `compress --start`: with every rate at 0 the trained file is the one-shot
    file exactly (the guide starts on its codes, levels and scales); without --start it is not."""
    q = tmp_path / "q"
    assert main(["quantize", "--hf", str(folder / "model"), "--out", str(q), "-K", "4", "--group-size", "8",
                 "--exact-outliers", "0", "--embedding-components", "0", "--data", str(folder / "train.txt"),
                 "--calib-windows", "8", "--seq-len", "8"]) == 0
    frozen = {"group_size": 8, "sparsity": 0.0, "initial_sparsity": 0.0, "prune_fraction": 0.0, "lr_weights": 0.0,
              "lr_codebook": 0.0, "lr_dense": 0.0, "lr_gates": 0.0, "responsibility_scale": "pooled", "mode": "hard"}
    (tmp_path / "frozen.json").write_text(json.dumps(frozen))
    common = ["compress", "--hf", str(folder / "model"), "--task", "lm", "--data", str(folder / "train.txt"),
              "--seq-len", "8", "--batch-size", "8", "--epochs", "1", "-K", "4", "--config", str(tmp_path / "frozen.json"),
              "--no-progress"]
    assert main([*common, "--start", str(q / "model.sqs"), "--out", str(tmp_path / "s")]) == 0
    assert main([*common, "--out", str(tmp_path / "k")]) == 0
    given, started, kmeans = (load_compressed(p / "model.sqs") for p in (q, tmp_path / "s", tmp_path / "k"))
    for a, b, c in zip(given.layers, started.layers, kmeans.layers):
        assert torch.equal(a.weight(), b.weight()) and torch.equal(a.scales, b.scales)
    assert any(not torch.equal(a.weight(), c.weight()) for a, c in zip(given.layers, kmeans.layers))
    capsys.readouterr()
    eight = [("8" if a == "4" else a) for a in common]  # -K 8 against a 4-level file
    assert main([*eight, "--start", str(q / "model.sqs"), "--out", str(tmp_path / "bad")]) == 2
    assert "4 levels" in capsys.readouterr().err


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(
    not torch.cuda.is_available(), reason="no CUDA device"))])
def test_device_option_runs_the_forward_passes_there(folder, tmp_path, device):
    common = ["quantize", "--hf", str(folder / "model"), "-K", "4", "--group-size", "8", "--data",
              str(folder / "train.txt"), "--calib-windows", "16", "--eval-data", str(folder / "eval.txt"),
              "--seq-len", "8", "--no-progress"]
    assert main([*common, "--out", str(tmp_path / "there"), "--device", device]) == 0
    assert main([*common, "--out", str(tmp_path / "cpu"), "--device", "cpu"]) == 0
    there, cpu = (json.loads((tmp_path / d / "summary.json").read_text()) for d in ("there", "cpu"))
    assert there["device"].startswith(device) and cpu["device"] == "cpu"
    if device == "cpu":  # the same run, the same file
        assert (tmp_path / "there" / "model.sqs").read_bytes() == (tmp_path / "cpu" / "model.sqs").read_bytes()
    # the reported perplexity is the written file's, on the CPU too
    held = text_windows(word_tokenizer(), [folder / "eval.txt"], 8)
    ppl = perplexity(CausalLM(load_transformers(tmp_path / "there" / "model.sqs")), held)
    assert math.isclose(there["perplexity"], ppl, rel_tol=1e-4)
    assert math.isclose(there["perplexity"], cpu["perplexity"], rel_tol=1e-2)


@pytest.mark.parametrize("device, message", [("tpu", "device must be auto, cpu, cuda or cuda:N"),
                                             ("cuda:99", "device 'cuda:99'")])
def test_a_bad_device_is_one_clear_error_before_the_model_loads(folder, tmp_path, capsys, monkeypatch, device, message):
    def refuse(*args, **kwargs):
        raise AssertionError("the model was loaded before the device was checked")

    monkeypatch.setattr("sqs_pyro.hf.load_model", refuse)
    assert main(["quantize", "--hf", str(folder / "model"), "--out", str(tmp_path / "q"), "--device", device]) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1 and not (tmp_path / "q").exists()


@pytest.mark.parametrize("quiet", [False, True])
def test_quantize_reports_its_passes_unless_no_progress(folder, tmp_path, capsys, quiet):
    rc = main(["quantize", "--hf", str(folder / "model"), "--out", str(tmp_path / "q"), "-K", "4", "--group-size", "8",
               "--data", str(folder / "train.txt"), "--calib-windows", "16", "--eval-data", str(folder / "eval.txt"),
               "--seq-len", "8", *(["--no-progress"] if quiet else [])])
    assert rc == 0
    err = capsys.readouterr().err
    stages = ("loading the model", "calibration on 16 windows", "quantising the matrices with error feedback",
              "perplexity of the dense", "perplexity of the quantised")
    assert [stage in err for stage in stages] == [not quiet] * 5


@pytest.fixture(scope="module")
def tied_folder(tmp_path_factory, folder):
    path = tmp_path_factory.mktemp("tied")
    tiny_llama(tied=True).save_pretrained(path)
    word_tokenizer().save_pretrained(path)
    return path


def test_every_tensor_is_compressed_and_the_tied_head_follows_the_table(tied_folder, folder, tmp_path, capsys):
    out = tmp_path / "q"
    assert main(["quantize", "--hf", str(tied_folder), "--out", str(out), "-K", "4", "--embedding-components", "8",
                 "--group-size", "8", "--exact-outliers", "1", "--data", str(folder / "train.txt"),
                 "--calib-windows", "16", "--eval-data", str(folder / "eval.txt"), "--seq-len", "8"]) == 0
    summary = json.loads((out / "summary.json").read_text())
    network = load_compressed(out / "model.sqs")
    table = network.layers[0]
    assert table.name == "lm.model.embed_tokens.weight" and table.components == 8 and table.scales.shape == (40, 2)
    assert network.tied == {"lm.lm_head.weight": "lm.model.embed_tokens.weight"}
    assert all(v.dtype == torch.float32 and torch.equal(v, v.half().float()) for v in network.dense_state.values())
    assert summary["params"] == sum(p.numel() for p in tiny_llama(tied=True).parameters())
    assert summary["bits_per_param"] == pytest.approx(8 * summary["file_bytes"] / summary["params"])
    assert summary["peak_rss_bytes"] > 0 and summary["peak_over_fp32"] == pytest.approx(
        summary["peak_rss_bytes"] / (4 * summary["params"]))
    loaded = load_transformers(out / "model.sqs")
    assert loaded.lm_head.weight is loaded.model.embed_tokens.weight
    torch.testing.assert_close(loaded.model.embed_tokens.weight, table.weight())

    class Wrapped(torch.nn.Module):
        def forward(self, ids):
            return loaded(input_ids=ids).logits

    held = text_windows(word_tokenizer(), [folder / "eval.txt"], 8)
    assert math.isclose(perplexity(Wrapped(), held), summary["perplexity"], rel_tol=1e-5)
    two = tmp_path / "two"
    assert main(["quantize", "--hf", str(tied_folder), "--out", str(two), "-K", "4", "--group-size", "8",
                 "--eval-data", str(folder / "eval.txt"), str(folder / "train.txt"), "--seq-len", "8",
                 "--max-eval-windows", "5"]) == 0
    summary = json.loads((two / "summary.json").read_text())
    for key in ("perplexity", "perplexity_dense"):
        by_file = summary[f"{key}_by_file"]
        assert sorted(by_file) == sorted(str(folder / f) for f in ("eval.txt", "train.txt"))
        assert min(by_file.values()) < summary[key] < max(by_file.values())
    kept = tmp_path / "kept"
    assert main(["quantize", "--hf", str(tied_folder), "--out", str(kept), "-K", "4", "--embedding-components", "0",
                 "--group-size", "8", "--tensor-dtype", "float32"]) == 0
    network = load_compressed(kept / "model.sqs")
    assert not network.tied and "lm.model.embed_tokens.weight" in network.dense_state
    assert torch.equal(network.dense_state["lm.model.embed_tokens.weight"], tiny_llama(tied=True).model.embed_tokens.weight)


def test_blockwise_moments_equal_the_full_forward_pass():
    from sqs_pyro.compressed.error_feedback import input_hessians
    from sqs_pyro.hf import CausalLM
    from sqs_pyro.hf.oneshot import blockwise_hessians
    from sqs_pyro.models import select_layers, transformer_include

    net = CausalLM(tiny_llama(layers=3)).eval()
    sites = select_layers(net, include=transformer_include("llama"))
    batches = torch.randint(0, 40, (12, 9), generator=torch.Generator().manual_seed(0)).split(4)
    full = input_hessians(net, sites, batches)
    seen = []
    for block, hessians in blockwise_hessians(net, sites, batches):
        seen += [s.name for s in block]
        assert sorted(hessians) == sorted(s.name for s in block)
        for name, h in hessians.items():
            torch.testing.assert_close(h, full[name], rtol=1e-5, atol=1e-6)
    assert seen == [s.name for s in sites]
    net.lm.model.layers[1].mlp.down_proj.weight.data.mul_(3.0)  # negative control: block 2's inputs change
    late = dict(next(h for b, h in blockwise_hessians(net, sites, batches) if "layers.2." in b[0].name))
    name = "lm.model.layers.2.self_attn.q_proj.weight"
    assert not torch.allclose(late[name], full[name], rtol=1e-3)


def test_tied_head_moments_and_head_feedback(tied_folder, folder, tmp_path):
    """The tied table's moments are those of the head's input (the final normed hidden states);
    with --head-feedback (the default with --data) the table is coded under them, unlike by nearest level."""
    from sqs_pyro.hf import CausalLM
    from sqs_pyro.hf.oneshot import embedding_sites, tied_head_hessian

    net = CausalLM(tiny_llama(tied=True)).eval()
    batches = torch.randint(0, 40, (8, 9), generator=torch.Generator().manual_seed(1)).split(4)
    table, = embedding_sites(net)
    hidden = torch.cat([net.lm.model(input_ids=x).last_hidden_state.reshape(-1, 16) for x in batches]).detach()
    torch.testing.assert_close(tied_head_hessian(net, table, batches), hidden.T @ hidden / len(hidden),
                               rtol=1e-5, atol=1e-6)
    common = ["quantize", "--hf", str(tied_folder), "-K", "4", "--group-size", "8", "--data", str(folder / "train.txt"),
              "--calib-windows", "16", "--seq-len", "8"]
    assert main([*common, "--no-head-feedback", "--out", str(tmp_path / "near")]) == 0
    assert main([*common, "--out", str(tmp_path / "fed")]) == 0  # the default with --data
    near, fed = (load_compressed(tmp_path / d / "model.sqs") for d in ("near", "fed"))
    assert not torch.equal(near.layers[0].weight(), fed.layers[0].weight())
    assert all(torch.equal(a.weight(), b.weight()) for a, b in zip(near.layers[1:], fed.layers[1:]))


def test_entropy_constrained_levels_end_to_end(folder, tmp_path):
    """--entropy-lambda codes every matrix and table with more levels than it pays for: the file records the
    options, its codes' entropy falls below that of the plain -K 8 file, and --embedding-entropy-lambda 0 leaves
    the tables as in the plain run (negative control: the same tables, other matrices)."""
    from sqs_pyro.compressed.accounting import code_entropy

    common = ["quantize", "--hf", str(folder / "model"), "-K", "8", "--group-size", "8", "--data",
              str(folder / "train.txt"), "--calib-windows", "16", "--seq-len", "8", "--no-progress"]
    assert main([*common, "--out", str(tmp_path / "plain")]) == 0
    assert main([*common, "--entropy-lambda", "0.05", "--embedding-entropy-lambda", "0", "--rate-importance",
                 "--out", str(tmp_path / "ec")]) == 0
    summary = json.loads((tmp_path / "ec" / "summary.json").read_text())
    assert summary["entropy_lambda"] == 0.05 and summary["rate_importance"]
    assert "entropy_lambda" not in json.loads((tmp_path / "plain" / "summary.json").read_text())
    plain, ec = (load_compressed(tmp_path / d / "model.sqs") for d in ("plain", "ec"))
    assert all(torch.equal(a.weight(), b.weight()) for a, b in zip(plain.layers[:2], ec.layers[:2]))  # the tables
    rate = [sum(code_entropy(layer) * layer.nnz for layer in net.layers[2:]) for net in (plain, ec)]
    assert rate[1] < 0.9 * rate[0]


def test_lambda_by_sensitivity_moves_bits_to_the_sensitive_matrices(folder, tmp_path):
    """--lambda-sensitivity 1: each matrix's LAMBDA is LAMBDA (G / s_m), s_m = mean H_cc w^2 from the dense
    model's calibration moments (recomputed here): against one LAMBDA for all, the most sensitive matrix's codes
    take more bits and the least sensitive one's fewer; --lambda-sensitivity 0 is the plain file (negative
    control: identical weights)."""
    from sqs_pyro import hf
    from sqs_pyro.compressed.accounting import code_entropy
    from sqs_pyro.compressed.entropy_levels import matrix_sensitivity
    from sqs_pyro.hf.oneshot import blockwise_hessians
    from sqs_pyro.models import select_layers, transformer_include

    common = ["quantize", "--hf", str(folder / "model"), "-K", "8", "--group-size", "8", "--data",
              str(folder / "train.txt"), "--calib-windows", "16", "--seq-len", "8", "--no-progress",
              "--entropy-lambda", "0.03", "--embedding-entropy-lambda", "0", "--rate-importance"]
    for name, more in (("one", []), ("zero", ["--lambda-sensitivity", "0"]), ("by", ["--lambda-sensitivity", "1"])):
        assert main([*common, *more, "--out", str(tmp_path / name)]) == 0
    assert json.loads((tmp_path / "by" / "summary.json").read_text())["lambda_sensitivity"] == 1.0
    one, zero, by = (load_compressed(tmp_path / d / "model.sqs") for d in ("one", "zero", "by"))
    assert all(torch.equal(a.weight(), b.weight()) for a, b in zip(one.layers, zero.layers))
    tokenizer, model = hf.load_model(str(folder / "model"), causal=True)
    net = CausalLM(model)
    windows = text_windows(tokenizer, [folder / "train.txt"], 8)
    calib = windows[torch.randperm(len(windows), generator=torch.Generator().manual_seed(0))[:16], :-1]
    sites = select_layers(net, include=transformer_include(model.config.model_type))
    s = {name: matrix_sensitivity(net.get_parameter(name), h)
         for _, hessians in blockwise_hessians(net, sites, calib.split(8)) for name, h in hessians.items()}
    rate = {net_name: {layer.name: code_entropy(layer) for layer in network.layers}
            for net_name, network in (("one", one), ("by", by))}
    most, least = max(s, key=s.get), min(s, key=s.get)
    assert s[most] > 4 * s[least]
    assert rate["by"][most] > rate["one"][most] and rate["by"][least] < rate["one"][least]
