"""The Pyro model and the guide: matching sites, ELBO equivalence, plain-Pyro SVI."""
import copy

import pyro
import pytest
import torch
from pyro import poutine
from pyro.infer import SVI, TraceMeanField_ELBO
from pyro.optim import Adam
from torch import nn

from sqs_pyro import SQSConfig
from sqs_pyro.compressed import materialize
from sqs_pyro.infer.elbo import SQSMeanFieldELBO
from sqs_pyro.guides import GateState, SpikeGMMGuide
from sqs_pyro.models import CategoricalLikelihood, SQSModel, select_layers


def small_net():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv1d(2, 4, 3, groups=2), nn.ReLU(), nn.Conv1d(4, 4, 3, groups=4), nn.Flatten(),
                         nn.Linear(4 * 4, 3))


def build(config=SQSConfig(group_size=0, components=4, windows="outlier")):
    net = small_net()
    sites = select_layers(net)
    return net, SQSModel(net, sites, config, CategoricalLikelihood(64)), SpikeGMMGuide(net, sites, config)


def data():
    torch.manual_seed(1)
    return torch.randn(8, 2, 8), torch.randint(0, 3, (8,))


def test_grouped_and_depthwise_convs_are_selected():
    names = [s.name for s in select_layers(small_net())]
    assert names == ["0.weight", "2.weight", "4.weight"]
    assert [s.name for s in select_layers(small_net(), include_types=("linear",))] == ["4.weight"]
    assert [s.name for s in select_layers(small_net(), exclude=(r"^0$",))] == ["2.weight", "4.weight"]


def test_model_and_guide_have_the_same_sample_sites_and_shapes():
    net, model, guide = build()
    x, y = data()
    g = poutine.trace(guide).get_trace(x, y)
    m = poutine.trace(poutine.replay(model, trace=g)).get_trace(x, y)
    latent = lambda tr: {n: tuple(s["value"].shape) for n, s in tr.nodes.items()  # noqa: E731
                         if s["type"] == "sample" and not s["is_observed"] and n != "data"}
    assert latent(g) == latent(m) == {n: tuple(p.shape) for n, p in net.named_parameters() if n.endswith("weight")}
    assert m.nodes["obs"]["is_observed"]
    assert m.nodes["obs"]["scale"] == pytest.approx(64 / 8)  # N/B data scaling


def test_fast_elbo_matches_trace_mean_field_elbo_in_loss_and_gradients():
    _, model, guide = build()
    guide.set_gate_state(GateState.LEARN)
    x, y = data()
    results = []
    for elbo in (TraceMeanField_ELBO(), SQSMeanFieldELBO()):
        pyro.set_rng_seed(5)
        loss = elbo(model, guide)(x, y)
        loss.backward()
        results.append((loss.detach(), [p.grad for p in guide.parameters()]))  # hard mode: mixing weights get none
        guide.zero_grad(set_to_none=True)
    torch.testing.assert_close(results[0][0], results[1][0])
    assert sum(g is not None for g in results[0][1]) >= 3
    for a, b in zip(results[0][1], results[1][1]):
        assert (a is None) == (b is None)
        if a is not None:
            torch.testing.assert_close(a, b)


@pytest.mark.parametrize("beta", [1.0, 0.3, 0.0])
def test_loss_is_data_term_minus_beta_kl(beta):
    """With the expected-weight forward the data term is deterministic: check -loss = E log p - beta KL."""
    _, model, guide = build(SQSConfig(group_size=0, components=4, mode="expected"))
    guide.set_gate_state(GateState.LEARN)
    model.kl_weight = guide.kl_weight = beta
    x, y = data()
    loss = SQSMeanFieldELBO()(model, guide)(x, y)
    weights = {n: d.mean for n, d in guide.distributions().items()}
    logits = torch.func.functional_call(model.net, weights, (x,))
    data_term = 64 / 8 * torch.distributions.Categorical(logits=logits).log_prob(y).sum()
    kl = guide.total_kl(model.priors())
    assert kl > 1.0  # the check below tells beta = 0 from beta = 1
    torch.testing.assert_close(-loss.detach(), data_term.detach() - beta * kl, rtol=1e-5, atol=1e-3)


TEACHER = torch.tensor([[1.0, -1, 0, 0, 1, 0, -1, 0, 0, 1], [0, 1, 1, -1, 0, 0, 0, 1, -1, 0],
                        [-1, 0, -1, 1, 0, 1, 0, -1, 1, 0]])


def teacher_data(n, seed):
    """Labels of a sparse ternary linear teacher: a 3-class problem a 4-level Linear(10, 3) can fit."""
    x = torch.randn(n, 10, generator=torch.Generator().manual_seed(seed))
    return x, (x @ TEACHER.T).argmax(1)


@pytest.mark.parametrize("variant", ["fit", "shuffled-labels", "lr0"])
def test_plain_pyro_svi_fits_the_data(variant):
    """Pyro's own SVI and TraceMeanField_ELBO on the model and guide, gates learning: the greedy
    network fits held-out data of the teacher (chance is about 0.39 here). Negative controls: the
    same SVI on shuffled labels, and with a learning rate of 0, must not."""
    torch.manual_seed(0)
    net = nn.Linear(10, 3)
    sites, config = select_layers(net), SQSConfig(group_size=0, components=4)
    model, guide = SQSModel(net, sites, config, CategoricalLikelihood(512)), SpikeGMMGuide(net, sites, config)
    guide.set_gate_state(GateState.LEARN)
    (x, y), (x_test, y_test) = teacher_data(512, 0), teacher_data(1000, 1)
    if variant == "shuffled-labels":
        y = y[torch.randperm(512, generator=torch.Generator().manual_seed(5))]
    pyro.set_rng_seed(0)
    svi = SVI(model, guide, Adam({"lr": 0.0 if variant == "lr0" else 5e-2}), TraceMeanField_ELBO())
    for _ in range(200):
        svi.step(x, y)
    greedy = materialize(guide, net).load_into(copy.deepcopy(net))
    with torch.no_grad():
        accuracy = float((greedy(x_test).argmax(1) == y_test).float().mean())
    assert (accuracy > 0.8) == (variant == "fit"), accuracy


def test_layer_scope_prunes_every_layer_to_the_target():

    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(40, 30), nn.ReLU(), nn.Linear(30, 10))
    with torch.no_grad():
        net[2].weight.mul_(50.0)  # a global threshold would prune the small first layer far more
    sites = select_layers(net)
    for scope, expected in (("layer", (0.6, 0.6)), ("row", (0.6, 0.6)), ("global", None)):
        config = SQSConfig(group_size=0, components=4, sparsity=0.6, prune_scope=scope)
        guide = SpikeGMMGuide(net, sites, config)
        guide.set_gate_state(GateState.LEARN)
        guide.prune_to_quantile(0.6, config.pruned_logit, scope)
        per_layer = [float((layer.gate_logits <= config.pruned_logit).float().mean()) for layer in guide.layers]
        if expected:
            assert per_layer == pytest.approx(expected, abs=1e-3)
        else:
            assert per_layer[0] > 0.7 and per_layer[1] < 0.1
        if scope == "row":  # 0.6 of every row's 40 or 30 inputs
            for layer in guide.layers:
                pruned = (layer.gate_logits <= config.pruned_logit).sum(1)
                assert torch.all(pruned == round(0.6 * layer.gate_logits.shape[1]))
        assert guide.measured_sparsity() == pytest.approx(0.6, abs=1e-3)


def test_activation_scores_weigh_weights_by_their_input_norms():
    from sqs_pyro.guides.gate_scores import activation_scores

    net = nn.Sequential(nn.Linear(3, 2))
    with torch.no_grad():
        net[0].weight.copy_(torch.tensor([[1.0, -2.0, 3.0], [0.5, 0.5, -0.5]]))
    x = torch.tensor([[1.0, 0.0, 2.0], [-1.0, 0.0, 2.0], [1.0, 0.0, -2.0], [1.0, 0.0, 2.0]])
    scores = activation_scores(net, select_layers(net), [(x[:2], None), (x[2:], None)])
    rms = torch.tensor([1.0, 0.0, 2.0])  # root mean square of each input feature over the 4 rows
    assert torch.allclose(scores["0.weight"], net[0].weight.abs() * rms)
