"""Empirical-Bayes prior: the M-step's closed form, its optimality for the KL bound, the KL as a
code length, and a whole run that learns it."""
import math

import pytest
import torch
from torch import nn

from sqs_pyro import SQSConfig
from sqs_pyro.guides import Codebook, SpikeGMM
from sqs_pyro.guides.kl import spike_gmm_kl
from sqs_pyro.infer import compress
from sqs_pyro.models import SpikeSlabGMM
from sqs_pyro.models.network import SQSModel
from sqs_pyro.models.priors import EmpiricalBayesPrior

LOCS = torch.tensor([-1.0, 0.0, 1.0], dtype=torch.float64)
SCALES = torch.full((3,), 0.01, dtype=torch.float64)


def planted_posterior(n=3000, density=0.2, seed=0):
    """Fixed 0/1 gates at ``density``; kept latents sitting on three well-separated levels with
    usage 0.5 / 0.3 / 0.2 (so the assignments are certain)."""
    gen = torch.Generator().manual_seed(seed)
    gate = (torch.rand(n, generator=gen) < density).double()
    level = torch.multinomial(torch.tensor([0.5, 0.3, 0.2]), n, replacement=True, generator=gen)
    latent = LOCS[level] + 1e-3 * torch.randn(n, generator=gen, dtype=torch.float64)
    q = SpikeGMM(torch.zeros(n, dtype=torch.float64), latent,
                 Codebook(LOCS, SCALES, torch.log(torch.full((3,), 1 / 3, dtype=torch.float64))), gate_fixed=gate,
                 tau=1.0)
    return q, gate, level


def fitted(q):
    hyper = EmpiricalBayesPrior(3, torch.float64)
    hyper.maximise(q.inclusion, q.most_probable_level(), q.locs, q.scales)
    return hyper


def test_m_step_is_the_closed_form():
    q, gate, level = planted_posterior()
    hyper = fitted(q)
    assert float(hyper.inclusion) == pytest.approx(float(gate.mean()))
    usage = torch.bincount(level[gate.bool()], minlength=3).double()
    torch.testing.assert_close(hyper.slab_weights, usage / usage.sum())
    torch.testing.assert_close(hyper.slab_locs, LOCS)
    torch.testing.assert_close(hyper.slab_scales, SCALES)


def total_kl(q, p):
    return float(spike_gmm_kl(q, p).sum())


def test_m_step_minimises_the_kl_bound_and_beats_the_fixed_prior():
    q, _, _ = planted_posterior()
    hyper = fitted(q)
    best = total_kl(q, hyper.distribution(q.batch_shape))
    lam, a = float(hyper.inclusion), hyper.slab_weights.clone()
    for d in (-0.02, 0.02):  # the inclusion: the KL bound rises on either side
        assert total_kl(q, SpikeSlabGMM(lam + d, a, LOCS, SCALES, q.batch_shape)) > best
    for d in (torch.tensor([0.05, -0.05, 0.0]), torch.tensor([0.0, -0.05, 0.05]), torch.tensor([-0.05, 0.0, 0.05])):
        moved = (a + d.double())
        assert total_kl(q, SpikeSlabGMM(lam, moved, LOCS, SCALES, q.batch_shape)) > best
    # negative control: the paper's fixed prior (lam = 0.01, N(0, 3^2)) is a far longer code
    fixed = SpikeSlabGMM(0.01, torch.ones(1, dtype=torch.float64), torch.zeros(1, dtype=torch.float64),
                         torch.full((1,), 3.0, dtype=torch.float64), q.batch_shape)
    assert total_kl(q, fixed) > 2 * best


def test_kl_is_the_code_length_of_mask_and_levels():
    """With 0/1 gates and certain assignments the KL bound equals n H2(density) + sum_kept -log a_k:
    the ideal entropy-coded size (nats) of the mask and the level indices."""
    q, gate, level = planted_posterior()
    hyper = fitted(q)
    lam, a = float(hyper.inclusion), hyper.slab_weights
    n, kept = gate.numel(), gate.bool()
    code = -n * (lam * math.log(lam) + (1 - lam) * math.log(1 - lam)) - float(torch.log(a[level[kept]]).sum())
    assert total_kl(q, hyper.distribution(q.batch_shape)) == pytest.approx(code, rel=1e-6)


@pytest.mark.parametrize("m_step", [True, False], ids=["em", "negative-control-no-m-step"])
def test_compress_learns_the_prior_of_the_network_it_trains(m_step, monkeypatch):
    """A whole run with ``empirical_bayes``: every layer's prior ends at the M-step's closed form
    for the trained network, read from that network's greedy read-out (not from the guide the
    M-step copies): the inclusion is the kept fraction, the slab's weights the usage of the kept
    weights' codes, its levels the codebook. Control: with the M-step switched off (the prior
    stays at its start) the same assertions fail."""
    if not m_step:
        monkeypatch.setattr(SQSModel, "update_hyperpriors", lambda self, posteriors: None)
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 3))
    x = torch.randn(256, 8)
    y = net(x).argmax(1)
    config = SQSConfig(components=4, sparsity=0.75, epochs=4.0, batch_size=32, empirical_bayes=True)
    result = compress(net, (x, y), config, progress=False)
    assert "hyperpriors.0.inclusion" in result.model.state_dict()  # part of every checkpoint
    learned = []
    for layer, hyper in zip(result.compressed().layers, result.model.hyperpriors):
        usage = torch.bincount(layer.codes[layer.mask], minlength=4).double() / layer.nnz
        learned.append(float(hyper.inclusion) == pytest.approx(layer.nnz / layer.numel, abs=1e-6)
                       and torch.allclose(hyper.slab_weights.double(), usage, atol=1e-3)
                       and torch.allclose(hyper.slab_locs, layer.codebook))
    assert learned == [m_step] * 2
