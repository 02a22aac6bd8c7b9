"""Soft weight-sharing (Ullrich et al., 2017): the mixture's closed forms, a planted truth (three levels and
zeros) that retraining under the prior recovers, its negative control (tau = 0: no clustering), and the
result's round trip through the ``.sqs`` file."""
import math

import pytest
import torch
from torch import nn

from sqs_pyro.config import SQSConfig
from sqs_pyro.errors import SQSInputError
from sqs_pyro.experiments.ablation import BASELINE_RECIPE, PRESETS
from sqs_pyro.experiments.baselines import BASELINES, compress_soft_weight_sharing, file_network
from sqs_pyro.experiments.baselines.soft_weight_sharing import MixturePrior, gaussian_kl, quantize
from sqs_pyro.format.container import load_compressed, save_compressed

LEVELS = (-0.9, 0.5, 1.3)


def planted(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """A 4 x 24 weight: 40% zeros, the rest on the three ``LEVELS`` (each level in every row)."""
    g = torch.Generator().manual_seed(seed)
    values = torch.tensor((0.0,) * 4 + LEVELS * 2)  # 10 entries: 4 zeros, each level twice
    w = torch.stack([torch.cat([values[torch.randperm(10, generator=g)] for _ in range(3)])[:24] for _ in range(4)])
    x = torch.randn(3000, 24, generator=g)
    y = torch.multinomial(torch.softmax(x @ w.T, -1), 1, generator=g).reshape(-1)  # labels drawn from the truth
    return w, (x, y)


def sws_run(tau: float, seed: int = 0):
    truth, data = planted(seed)
    net = nn.Linear(24, 4, bias=False)
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():  # the "pretrained" network: the truth plus noise
        net.weight.copy_(truth + 0.08 * torch.randn(truth.shape, generator=g))
    config = SQSConfig.from_dict({**BASELINE_RECIPE, "sparsity": 0.4, "components": 3, "epochs": 6.0,
                                  "batch_size": 100, "seed": seed, "kl_weight": tau, "lr_weights": 3e-3,
                                  "lr_codebook": 1e-2})
    return truth, net, compress_soft_weight_sharing(net, data, config)


def test_gaussian_kl_closed_form():
    zero = torch.tensor(0.0)
    assert float(gaussian_kl(zero, zero, zero, zero)) == pytest.approx(0.0, abs=1e-7)
    # equal precisions lambda: KL = lambda/2 (mu_a - mu_b)^2
    lam = torch.tensor(math.log(4.0))
    assert float(gaussian_kl(torch.tensor(1.0), lam, torch.tensor(0.5), lam)) == pytest.approx(4 / 2 * 0.25)
    # N(0, 1) against N(0, 1/4): 0.5 log(1/4) + 4/2 - 1/2
    assert float(gaussian_kl(zero, zero, zero, lam)) == pytest.approx(0.5 * math.log(0.25) + 1.5)


def test_prior_density_is_the_mixture_with_fixed_zero_component():
    w = torch.tensor([0.0, 0.3, -1.0])
    prior = MixturePrior(w, 2, pi_zero=0.9)
    assert prior.all_means().tolist() == pytest.approx([0.0, -1.0, 0.3])  # evenly over [min, max]
    assert prior.log_pis().exp().tolist() == pytest.approx([0.9, 0.05, 0.05])
    std = 0.25
    dens = [sum(p * math.exp(-0.5 * ((x - m) / std) ** 2) / (std * math.sqrt(2 * math.pi))
                for p, m in zip((0.9, 0.05, 0.05), (0.0, -1.0, 0.3))) for x in w.tolist()]
    hyper = sum((1 - a) * math.log(std ** -2) + b * std ** -2 for a, b in ((5e3, 2.0), (250, 0.1), (250, 0.1)))
    assert float(prior.neg_log_prior(w).detach()) == pytest.approx(-sum(math.log(d) for d in dens) + hyper, rel=1e-5)


def test_merge_joins_coincident_components_and_zero_keeps_mean_zero():
    prior = MixturePrior(torch.tensor([-1.0, 1.0]), 4, pi_zero=0.9)
    with torch.no_grad():
        prior.means.copy_(torch.tensor([0.001, 0.5, 0.5005, 1.0]))
        prior.gammas.fill_(math.log(100.0))
    means, gammas, log_pis = prior.merged()
    assert means.tolist() == pytest.approx([0.0, 0.50025, 1.0])  # {0, 1} and {2, 3} merged
    assert log_pis.exp().tolist() == pytest.approx([0.925, 0.05, 0.025])
    mask, codes, book = quantize(torch.tensor([0.01, 0.49, 0.52, 0.95, -0.02]), means, gammas, log_pis)
    assert mask.tolist() == [False, True, True, True, False]
    assert book.tolist() == pytest.approx([0.50025, 1.0]) and codes.tolist() == [0, 0, 0, 1, 0]


def test_planted_levels_are_recovered_and_zeros_pruned():
    truth, _, result = sws_run(tau=1.0)
    (layer,) = result.compressed().layers
    assert layer.codebook.tolist() == pytest.approx(list(LEVELS), abs=0.07)
    assert torch.equal(layer.mask, truth != 0)  # exactly the planted zeros pruned
    assert torch.allclose(layer.weight(), truth, atol=0.07)
    assert result.accounting()["sparsity"] == pytest.approx(float((truth == 0).float().mean()))


def test_negative_control_without_the_prior_nothing_clusters():
    truth, net, result = sws_run(tau=0.0)
    (layer,) = result.compressed().layers
    # the mixture never moves: its means stay evenly spread, and the weights keep their noise
    assert layer.codebook.tolist() != pytest.approx(list(LEVELS), abs=0.07)
    assert not torch.allclose(layer.weight(), truth, atol=0.07)


def test_result_round_trips_through_the_file(tmp_path):
    _, net, result = sws_run(tau=1.0)
    path = tmp_path / "sws.sqs"
    assert save_compressed(file_network(result.compressed()), path, model=net) == path.stat().st_size
    back = load_compressed(path)
    for layer, loaded in zip(result.compressed().layers, back.layers):
        assert torch.equal(loaded.mask, layer.mask) and torch.equal(loaded.weight(), layer.weight())


def test_registered_as_a_preset_with_the_papers_weight_rate():
    assert BASELINES["soft_weight_sharing"] is compress_soft_weight_sharing
    kind, overrides = PRESETS["soft_weight_sharing"]
    assert kind == "soft_weight_sharing" and overrides["lr_weights"] == 5e-4 and overrides["kl_weight"] > 0


def test_pi_zero_outside_the_open_interval_is_refused():
    with pytest.raises(SQSInputError, match="pi_0"):
        compress_soft_weight_sharing(nn.Linear(2, 2), (torch.zeros(4, 2), torch.zeros(4, dtype=torch.long)),
                                     SQSConfig(sparsity=0.0, components=2))
