"""LAMP layer budgets: closed-form scores, budgets that meet the target, no starved layer."""
import math

import pytest
import torch
from torch import nn

from sqs_pyro import SQSConfig
from sqs_pyro.guides import GateState, SpikeGMMGuide
from sqs_pyro.guides.allocation import lamp_scores, lamp_sparsities
from sqs_pyro.models import select_layers


def test_lamp_scores_match_the_closed_form():
    w = torch.tensor([[3.0, -1.0], [0.0, 2.0]])
    # energies 9, 1, 0, 4; ordered 0 < 1 < 4 < 9; tails 14, 14, 13, 9
    expected = torch.tensor([[9 / 9, 1 / 14], [0 / 14, 4 / 13]], dtype=torch.float64)
    assert torch.allclose(lamp_scores(w), expected)
    assert lamp_scores(w * 7.0).allclose(expected)  # scale-free within a layer


def starved_net():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(200, 50), nn.ReLU(), nn.Linear(50, 10))
    with torch.no_grad():
        net[2].weight.mul_(0.01)  # a global magnitude threshold prunes the whole output layer
    return net


@pytest.mark.parametrize("sparsity", [0.5, 0.9, 0.98])
def test_lamp_budgets_meet_the_target_and_keep_every_layer(sparsity):
    net = starved_net()
    weights = [net[0].weight, net[2].weight]
    shares = lamp_sparsities(weights, sparsity)
    sizes = [w.numel() for w in weights]
    mean = sum(s * n for s, n in zip(shares, sizes)) / sum(sizes)
    assert mean == pytest.approx(math.ceil(sparsity * sum(sizes)) / sum(sizes), abs=1e-12)
    assert all(s < 1.0 for s in shares)  # every layer keeps its largest weight at least
    # negative control: the global magnitude quantile empties the small-scaled output layer
    flat = torch.cat([w.detach().abs().reshape(-1) for w in weights])
    threshold = flat.kthvalue(math.ceil(sparsity * flat.numel())).values
    assert bool((net[2].weight.abs() <= threshold).all())


def test_lamp_scope_prunes_each_layer_to_its_budget_along_the_ramp():
    net = starved_net()
    sites = select_layers(net)
    config = SQSConfig(components=4, sparsity=0.9, prune_scope="lamp")
    guide = SpikeGMMGuide(net, sites, config)
    budgets = guide.layer_sparsity
    assert budgets == lamp_sparsities([net[0].weight, net[2].weight], 0.9)
    guide.set_gate_state(GateState.LEARN)
    for step_sparsity in (0.45, 0.9):  # half-way through the ramp, then at the target
        guide.prune_to_quantile(step_sparsity, config.pruned_logit, "lamp")
        for layer, budget in zip(guide.layers, budgets):
            pruned = float((layer.gate_logits <= config.pruned_logit).double().mean())
            n = layer.gate_logits.numel()
            assert pruned == pytest.approx(math.ceil(budget * step_sparsity / 0.9 * n - 1e-9) / n)
    assert guide.measured_sparsity() == pytest.approx(0.9, abs=2e-3)
    assert guide.layers[1].kept_mask().any()
    # the initial gates already sit at each layer's own budget: the logits above gate_init are the kept ones
    fresh = SpikeGMMGuide(net, sites, config)
    for layer, budget in zip(fresh.layers, budgets):
        assert float((layer.gate_logits < config.gate_init).double().mean()) == pytest.approx(budget, abs=0.02)
