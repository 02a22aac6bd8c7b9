"""Latent-weight rates relative to each layer's weight scale (``lr_weights_relative``), capped by ``lr_weights``."""
import torch
from torch import nn

from sqs_pyro import SQSConfig
from sqs_pyro.guides import SpikeGMMGuide
from sqs_pyro.infer import compress
from sqs_pyro.infer.trainer import param_groups
from sqs_pyro.models import CategoricalLikelihood, SQSModel, select_layers


def scaled_net() -> nn.Module:
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 3))
    with torch.no_grad():
        net[0].weight.mul_(10.0)  # layer scales 10x apart
    return net


def latent_rates(config: SQSConfig) -> dict[str, float]:
    net = scaled_net()
    sites = select_layers(net)
    groups = param_groups(SQSModel(net, sites, config, CategoricalLikelihood(10)), SpikeGMMGuide(net, sites, config),
                          config)
    return {g["name"]: g["lr"] for g in groups if g["name"].startswith("latent")}


def test_relative_rates_are_the_layer_rms_times_the_factor_capped_by_lr_weights():
    net = scaled_net()
    rms = [float(net[i].weight.detach().pow(2).mean().sqrt()) for i in (0, 2)]
    rates = latent_rates(SQSConfig(group_size=0, components=4, lr_weights=1.0, lr_weights_relative=0.05))
    assert list(rates) == ["latent:0.weight", "latent:2.weight"]
    assert [round(v, 9) for v in rates.values()] == [round(0.05 * r, 9) for r in rms]
    cap = 0.05 * (rms[0] + rms[1]) / 2  # between the two: caps the large-scale layer only
    rates = latent_rates(SQSConfig(group_size=0, components=4, lr_weights=cap, lr_weights_relative=0.05))
    assert [round(v, 9) for v in rates.values()] == [round(cap, 9), round(0.05 * rms[1], 9)]
    assert latent_rates(SQSConfig(group_size=0, components=4, lr_weights_relative=0.0)) == {"latent": 1e-2}


def test_slab_scales_learn_at_their_fraction_of_the_codebook_rate():
    net = scaled_net()
    sites = select_layers(net)
    config = SQSConfig(group_size=0, components=4, lr_codebook=3e-3, slab_scale_rate=0.25)
    guide = SpikeGMMGuide(net, sites, config)
    groups = {g["name"]: g for g in param_groups(SQSModel(net, sites, config, CategoricalLikelihood(10)), guide,
                                                  config)}
    scales = {id(layer.scale_raw) for layer in guide.layers}
    assert {id(p) for p in groups["slab_scales"]["params"]} == scales
    assert groups["slab_scales"]["lr"] == 0.25 * 3e-3 and groups["codebook"]["lr"] == 3e-3
    assert not scales & {id(p) for p in groups["codebook"]["params"]}


X = torch.randn(64, 6, generator=torch.Generator().manual_seed(1))
Y = torch.randint(0, 3, (64,), generator=torch.Generator().manual_seed(2))
ONE_STEP = dict(components=4, sparsity=0.0, epochs=1.0, batch_size=64, warmup_fraction=1.0, prune_fraction=0.0)


def test_a_training_step_moves_each_layer_by_the_same_fraction_of_its_scale():
    """Adam's first step is lr * sign(grad) per weight: relative rates make it a fixed fraction of the
    layer's RMS, absolute rates a fixed size (10x the fraction on the 10x smaller layer; negative control)."""

    def moved_fraction(config: SQSConfig) -> list[float]:
        net = scaled_net()
        before = [net[i].weight.detach().clone() for i in (0, 2)]
        result = compress(net, (X, Y), config)
        return [float((layer.latent.detach() - w).abs().max() / w.pow(2).mean().sqrt())
                for layer, w in zip(result.guide.layers, before)]

    relative = moved_fraction(SQSConfig(group_size=0, **ONE_STEP, lr_weights=1.0, lr_weights_relative=0.05))
    absolute = moved_fraction(SQSConfig(group_size=0, **ONE_STEP, lr_weights_relative=0.0))
    assert abs(relative[0] / relative[1] - 1) < 0.2
    assert absolute[1] / absolute[0] > 5


def test_when_every_layer_is_capped_the_run_is_the_absolute_rate_run_bit_for_bit():
    config = dict(ONE_STEP, epochs=3.0, batch_size=16, warmup_fraction=0.3, prune_fraction=0.3, sparsity=0.5)
    capped = compress(scaled_net(), (X, Y), SQSConfig(group_size=0, **config, lr_weights=1e-4, lr_weights_relative=0.5))
    plain = compress(scaled_net(), (X, Y), SQSConfig(group_size=0, **config, lr_weights=1e-4, lr_weights_relative=0.0))
    for a, b in zip(capped.guide.layers, plain.guide.layers):
        assert torch.equal(a.latent, b.latent) and torch.equal(a.gate_logits, b.gate_logits)


def test_without_the_prior_kl_the_slab_scale_rate_cannot_change_a_hard_run():
    """Hard mode's forward uses the levels only, so the slab scales learn from the KL alone: at
    ``kl_weight=0`` (the ``sqs_noprior`` ablation) their rate leaves the run bit for bit the same;
    with the KL on, it changes them (negative control)."""
    config = dict(ONE_STEP, epochs=3.0, batch_size=16, warmup_fraction=0.0, prune_fraction=0.3, sparsity=0.5,
                  mode="hard", group_size=0)

    def run(kl_weight: float, rate: float):
        result = compress(scaled_net(), (X, Y), SQSConfig(**config, kl_weight=kl_weight, slab_scale_rate=rate))
        return [(layer.latent.detach(), layer.gate_logits.detach(), layer.scale_raw.detach())
                for layer in result.guide.layers]

    for a, b in zip(run(0.0, 1.0), run(0.0, 0.1)):
        assert all(torch.equal(x, y) for x, y in zip(a, b))
    assert not all(torch.equal(a[2], b[2]) for a, b in zip(run(1.0, 1.0), run(1.0, 0.1)))
