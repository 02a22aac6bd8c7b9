"""``--sparsity S`` is honoured (``sparsity_mode="exact"``); ``auto`` lets the posterior choose."""
import json

import pytest
import torch

from sqs_pyro import SQSConfig
from sqs_pyro.cli import main
from sqs_pyro.infer import compress
from trained_mlp import X, Y, trained_mlp



def achieved(sparsity: float, mode: str = "exact", **overrides) -> float:
    config = SQSConfig(components=4, sparsity=sparsity, sparsity_mode=mode, epochs=3, batch_size=64,
                       posterior_epochs=0.0, **overrides)
    return compress(trained_mlp(), (X[:768], Y[:768]), config, progress=False).accounting()["sparsity"]


@pytest.mark.parametrize("scope", ["lamp", "global", "layer"])
@pytest.mark.parametrize("target", [0.75, 0.9])
def test_exact_mode_gives_the_asked_sparsity_within_half_a_point(target, scope):
    assert abs(achieved(target, prune_scope=scope) - target) <= 0.005


def test_auto_departs_from_the_asked_fraction_only_when_asked():
    """Asked for no pruning, the exact mode prunes nothing. ``auto`` climbs the ladder while the negative ELBO
    falls: the prior prices each kept weight (here it prunes nearly all: 512 examples cannot pay for the
    weights; the departure the half-point check must catch); without the prior (``kl_weight=0``) only the
    data's fit counts, and the trained network keeps most of its weights."""
    assert achieved(0.0) == 0.0
    assert achieved(0.0, mode="auto") >= 0.9
    assert achieved(0.0, mode="auto", kl_weight=0.0) < 0.5
    assert achieved(0.75, prior_inclusion=1e-4) == achieved(0.75)  # exact: the prior does not move the mask


def test_cli_sparsity_auto_runs_in_auto_mode_and_says_so(tmp_path, capsys, monkeypatch):
    x, y = X.reshape(-1, 1, 4, 4), Y
    torch.save({"x": x, "y": y}, tmp_path / "data.pt")
    (tmp_path / "tiny_net.py").write_text(
        "from torch import nn\n\ndef build():\n"
        "    return nn.Sequential(nn.Flatten(), nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 4))\n")
    common = ["compress", "--model", "tiny_net:build", "--data", str(tmp_path / "data.pt"), "--epochs", "1",
              "-K", "4", "--batch-size", "64", "--no-progress"]
    monkeypatch.syspath_prepend(str(tmp_path))
    assert main([*common, "--sparsity", "auto", "--out", str(tmp_path / "auto")]) == 0
    assert "sparsity (auto: the posterior chose)" in capsys.readouterr().out
    assert main([*common, "--sparsity", "0.8", "--out", str(tmp_path / "exact")]) == 0
    assert "sparsity (exact: asked 0.8)" in capsys.readouterr().out
    auto = json.loads((tmp_path / "auto" / "summary.json").read_text())
    exact = json.loads((tmp_path / "exact" / "summary.json").read_text())
    assert auto["sparsity_mode"] == "auto" and auto["config"]["sparsity"] == 0.0
    assert exact["sparsity_mode"] == "exact" and abs(exact["sparsity"] - 0.8) <= 0.005


def training_sparsity(mode: str) -> float:
    """The largest fraction of weights the forward pass pruned while the network trained (the history's
    ``sparsity``), asked for no pruning."""
    config = SQSConfig(components=4, sparsity=0.0, sparsity_mode=mode, epochs=3, batch_size=64,
                       posterior_epochs=0.0, log_every=1)
    result = compress(trained_mlp(), (X[:768], Y[:768]), config, progress=False)
    return max(r["sparsity"] for r in result.history if "sparsity" in r)


def test_sparsity_zero_trains_with_every_weight():
    """Exact mode at S = 0: the gates stay open, so the network trains with the weights it keeps (all). The
    negative control is the median rule, whose gates learn and which the prior's KL prunes while they do
    (before the fix, the exact mode did the same and reopened those weights untrained at the end)."""
    assert training_sparsity("exact") == 0.0
    assert training_sparsity("median") > 0.05
