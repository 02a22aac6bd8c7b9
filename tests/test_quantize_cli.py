"""``sqs-pyro quantize --hf``: one-shot group-scaled codebooks on a tiny Llama folder, end to end."""
import json
import math

import pytest
import torch

from sqs_pyro.cli import main
from sqs_pyro.format import load_compressed
from sqs_pyro.hf import load_transformers, perplexity, text_windows

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
    assert summary["error_feedback"] and summary["exact_weights"] == 14 * 2 and summary["bits"] == 2
    assert summary["calib_windows"] == 16
    network = load_compressed(out / "model.sqs")
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
                 "--exact-outliers", "0", "--sparsity", "0.5", "--data", str(folder / "train.txt"),
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
                 "--exact-outliers", "0", "--data", str(folder / "train.txt"), "--calib-windows", "8",
                 "--seq-len", "8"]) == 0
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


@pytest.mark.parametrize("quiet", [False, True])
def test_quantize_reports_its_passes_unless_no_progress(folder, tmp_path, capsys, quiet):
    rc = main(["quantize", "--hf", str(folder / "model"), "--out", str(tmp_path / "q"), "-K", "4", "--group-size", "8",
               "--data", str(folder / "train.txt"), "--calib-windows", "16", "--eval-data", str(folder / "eval.txt"),
               "--seq-len", "8", *(["--no-progress"] if quiet else [])])
    assert rc == 0
    err = capsys.readouterr().err
    stages = ("loading the model", "calibration", "quantising 14 matrices with error feedback", "perplexity of the dense")
    assert [stage in err for stage in stages] == [not quiet] * 4
