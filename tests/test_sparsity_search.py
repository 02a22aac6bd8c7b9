"""``--max-error``: the bisection over the sparsity ladder picks the sparsest run that meets the bound."""
import json

import pytest
import torch

from sqs_pyro import SQSConfig
from sqs_pyro.cli import main
from sqs_pyro.data import accuracy
from sqs_pyro.errors import SQSInputError
from sqs_pyro.infer import compress
from sqs_pyro.infer.sparsity_search import SPARSITY_LADDER, search_sparsity
from trained_mlp import X, Y, trained_mlp

CONFIG = SQSConfig(components=4, epochs=4, batch_size=64, posterior_epochs=0.0)


def run(config: SQSConfig):
    return compress(trained_mlp(), (X[:768], Y[:768]), config, progress=False)


def val_error(result) -> float:
    return 1.0 - accuracy(result.greedy_module(), X[768:], Y[768:])


def test_bisection_picks_the_sparsest_rung_that_meets_the_bound():
    errors = [val_error(run(CONFIG.replace(sparsity=s))) for s in SPARSITY_LADDER]
    assert errors == sorted(errors) and errors[0] < errors[-1]  # the ladder's errors grow here (the premise)
    bound = (errors[2] + errors[3]) / 2 if errors[2] < errors[3] else errors[2]
    result, trials, met = search_sparsity(run, val_error, CONFIG, bound)
    expected = max(s for s, e in zip(SPARSITY_LADDER, errors) if e <= bound)
    assert met and abs(result.accounting()["sparsity"] - expected) <= 0.005
    assert len(trials) <= 3 and {t.sparsity for t in trials} <= set(SPARSITY_LADDER)
    result, trials, met = search_sparsity(run, val_error, CONFIG, min(errors) / 2 or 1e-6)  # no rung meets it
    assert not met and result.config.sparsity == min(t.sparsity for t in trials)


def test_search_rejects_what_it_cannot_do():
    with pytest.raises(SQSInputError, match="max-error"):
        search_sparsity(run, val_error, CONFIG, 1.5)
    with pytest.raises(SQSInputError, match="exact"):
        search_sparsity(run, val_error, CONFIG.replace(sparsity_mode="auto"), 0.1)


def test_cli_max_error_with_a_user_model(tmp_path, capsys, monkeypatch):
    torch.save({"x": X[:768], "y": Y[:768]}, tmp_path / "train.pt")
    torch.save({"x": X[768:], "y": Y[768:]}, tmp_path / "val.pt")
    (tmp_path / "search_net.py").write_text(
        "from torch import nn\n\ndef build():\n    return nn.Sequential(nn.Linear(16, 64), nn.ReLU(), nn.Linear(64, 4))\n")
    common = ["compress", "--model", "search_net:build", "--data", str(tmp_path / "train.pt"), "--epochs", "1",
              "-K", "4", "--no-progress", "--out", str(tmp_path / "out")]
    assert main([*common, "--max-error", "0.5", "--sparsity", "0.9"]) == 2
    assert "not with --sparsity" in capsys.readouterr().err
    assert main([*common, "--max-error", "0.5"]) == 2  # no --val-data
    assert "needs --val-data" in capsys.readouterr().err
    monkeypatch.syspath_prepend(str(tmp_path))
    assert main([*common, "--max-error", "0.99", "--val-data", str(tmp_path / "val.pt")]) == 0
    assert "sparsity (searched: validation error <= 0.99, met" in capsys.readouterr().out
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert summary["sparsity_search"]["met"] and abs(summary["sparsity"] - SPARSITY_LADDER[-1]) <= 0.005
