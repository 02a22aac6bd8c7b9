"""`sqs-pyro compress --model MODULE:FACTORY --data SPEC`: one clear error before training for each bad
input, and a tiny end-to-end run that `evaluate`, `inspect` and `report` read back."""
import json
import sys
import textwrap

import numpy as np
import pytest
import torch

from sqs_pyro.cli import main

MODULE = textwrap.dedent('''
    import torch
    from torch import nn
    from torch.utils.data import DataLoader, TensorDataset

    def build():
        torch.manual_seed(0)
        return nn.Sequential(nn.Conv2d(1, 6, 3, padding=1), nn.BatchNorm2d(6), nn.ReLU(),
                             nn.Conv2d(6, 6, 3, padding=1, groups=6), nn.Flatten(), nn.Linear(6 * 6 * 6, 3))

    def data():
        g = torch.Generator().manual_seed(1)
        x = torch.randn(192, 1, 6, 6, generator=g)
        return x, (x.mean((1, 2, 3)) > 0).long() + (x[:, 0, 0, 0] > 0).long()

    def loader():
        return DataLoader(TensorDataset(*data()), batch_size=32, shuffle=True)

    def nan_data():
        x, y = data()
        x[5, 0, 2, 2] = float("nan")
        return x, y

    def wide_labels():
        x, y = data()
        return x, y + 1

    def wrong_shape():
        return torch.randn(64, 1, 5, 7), torch.zeros(64, dtype=torch.long)

    def empty():
        return torch.zeros(0, 1, 6, 6), torch.zeros(0, dtype=torch.long)

    def unlabelled():
        return {"x": data()[0]}

    def broken():
        raise RuntimeError("no data today")
''')

TINY = ["--epochs", "1", "--batch-size", "32", "-K", "4", "--sparsity", "0.5", "--no-progress", "--device", "cpu"]


@pytest.fixture
def workdir(tmp_path, monkeypatch):
    (tmp_path / "usermod.py").write_text(MODULE)
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    yield tmp_path
    sys.modules.pop("usermod", None)


def _compress(out, *options):
    return main(["compress", "--model", "usermod:build", *TINY, *options, "--out", str(out)])


@pytest.mark.parametrize("options, message", [
    (["--data", "nomodule:data"], "module 'nomodule' not found"),
    (["--data", "usermod:missing"], "has no callable 'missing'"),
    (["--data", "usermod:broken"], "broken() failed: RuntimeError: no data today"),
    (["--data", "usermod:wrong_shape"], "cannot process the train inputs of shape (2, 1, 5, 7)"),
    (["--data", "usermod:wide_labels"], "labels out of range: found [1, 3], the network has 3 outputs"),
    (["--data", "usermod:nan_data"], "train inputs contain NaN or Inf"),
    (["--data", "usermod:empty"], "train data is empty"),
    (["--data", "missing.pt"], "no such file: missing.pt"),
    (["--data", "usermod:data", "--weights", "w.pt"], "do not fit --model usermod:build"),
    (["--data", "usermod:data", "--device", "tpu"], "device must be auto, cpu, cuda or cuda:N"),
    (["--data", "usermod"], "must be MODULE:FACTORY"),
    (["--data", "usermod:unlabelled"], "without targets 'y' (only --task distill needs none)"),
    (["--data", "usermod:data", "--val-data", "usermod:nan_data"], "--val-data inputs contain NaN or Inf"),
])
def test_each_bad_input_fails_before_training(workdir, capsys, options, message):
    torch.save({"0.weight": torch.zeros(1)}, workdir / "w.pt")
    out = workdir / "run"
    assert _compress(out, *options) == 2
    err = capsys.readouterr().err
    assert err.startswith("sqs-pyro: error:") and message in err, err
    assert not (out / "checkpoint.pt").exists()  # nothing trained


def test_model_factory_must_build_a_module(workdir, capsys):
    assert main(["compress", "--model", "usermod:data", "--data", "usermod:data", "--out", "run", *TINY]) == 2
    assert "returned a tuple, not a torch nn.Module" in capsys.readouterr().err


@pytest.mark.parametrize("fmt", ["pt", "npz", "safetensors"])
def test_tensor_files_train(workdir, fmt):
    import usermod

    x, y = usermod.data()
    path = workdir / f"train.{fmt}"
    if fmt == "pt":
        torch.save({"x": x, "y": y}, path)
    elif fmt == "npz":
        np.savez(path, x=x.numpy(), y=y.numpy())
    else:
        from safetensors.torch import save_file
        save_file({"x": x, "y": y}, str(path))
    assert _compress(workdir / "run", "--data", str(path)) == 0
    summary = json.loads((workdir / "run" / "summary.json").read_text())
    assert summary["sparsity"] == pytest.approx(0.5, abs=0.01) and summary["data"] == str(path)


def test_end_to_end_compress_evaluate_inspect_report(workdir, capsys):
    import usermod

    torch.save(usermod.build().state_dict(), workdir / "dense.pt")
    out = workdir / "run"
    assert _compress(out, "--weights", "dense.pt", "--data", "usermod:loader", "--val-data", "usermod:data") == 0
    summary = json.loads((out / "summary.json").read_text())
    assert set(summary["greedy"]) == {"accuracy", "nll", "kl_to_dense", "agreement"}
    x, y = usermod.data()
    with torch.no_grad():
        dense_accuracy = float((usermod.build().eval()(x).argmax(-1) == y).float().mean())
    assert summary["dense"]["accuracy"] == pytest.approx(dense_accuracy)
    capsys.readouterr()
    assert main(["evaluate", str(out / "model.sqs"), "--model", "usermod:build", "--weights", "dense.pt",
                 "--data", "usermod:data", "--device", "cpu"]) == 0
    line = capsys.readouterr().out
    for name in ("accuracy", "kl_to_dense", "agreement"):  # the same numbers as the run's summary
        assert f"{name} {summary['greedy'][name]:.4f}" in line
    assert main(["inspect", str(out / "model.sqs")]) == 0
    assert "checksums OK" in capsys.readouterr().out
    assert main(["report", str(out)]) == 0
    assert "dense / greedy" in (out / "report.html").read_text()


def test_distill_needs_no_labels(workdir):
    import usermod

    torch.save({"x": usermod.data()[0]}, workdir / "inputs.pt")
    out = workdir / "run"
    assert _compress(out, "--task", "distill", "--data", "inputs.pt", "--val-data", "inputs.pt") == 0
    summary = json.loads((out / "summary.json").read_text())
    assert set(summary["greedy"]) == {"kl_to_dense", "agreement"} and summary["greedy"]["kl_to_dense"] >= 0
    assert summary["dense"]["kl_to_dense"] == pytest.approx(0, abs=1e-6) and summary["dense"]["agreement"] == 1
    assert "held-out kl_to_dense: dense / greedy" in (out / "report.html").read_text()
    # the label-free defaults (chosen on validation across two families), below any --config file and option
    assert (summary["config"]["kl_weight"], summary["config"]["lr_weights"]) == (0.1, 3e-3)
    (workdir / "cfg.json").write_text(json.dumps({"kl_weight": 1.0}))
    assert _compress(out, "--task", "distill", "--data", "inputs.pt", "--config", "cfg.json", "--epochs", "0.5") == 0
    config = json.loads((out / "summary.json").read_text())["config"]
    assert (config["kl_weight"], config["lr_weights"], config["epochs"]) == (1.0, 3e-3, 0.5)



@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(
    not torch.cuda.is_available(), reason="no CUDA device"))])
def test_device_option_trains_and_evaluates_there(workdir, capsys, device):
    out = workdir / "run"
    assert main(["compress", "--model", "usermod:build", *TINY, "--device", device, "--data", "usermod:data",
                 "--out", str(out)]) == 0
    assert f'"device": "{device}' in (out / "summary.json").read_text()
    assert main(["evaluate", str(out / "model.sqs"), "--model", "usermod:build", "--data", "usermod:data",
                 "--device", device]) == 0
    assert "accuracy" in capsys.readouterr().out


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message of a machine without CUDA")
def test_cuda_without_a_device_is_one_clear_error(workdir, capsys):
    assert _compress(workdir / "run", "--data", "usermod:data", "--device", "cuda:0") == 2
    assert "CUDA is not available on this machine" in capsys.readouterr().err
