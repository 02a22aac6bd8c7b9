"""Latent-weight rates relative to each layer's weight scale (``lr_weights_relative``)."""
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


def test_relative_rates_are_the_layer_rms_times_the_factor_and_absolute_stays_one_group():
    net = scaled_net()
    rms = [float(net[i].weight.detach().pow(2).mean().sqrt()) for i in (0, 2)]
    config = SQSConfig(components=4, lr_weights_relative=0.05)
    sites = select_layers(net)
    groups = param_groups(SQSModel(net, sites, config, CategoricalLikelihood(10)), SpikeGMMGuide(net, sites, config),
                          config)
    latent = {g["name"]: g["lr"] for g in groups if g["name"].startswith("latent")}
    assert list(latent) == ["latent:0.weight", "latent:2.weight"]
    assert [round(v, 9) for v in latent.values()] == [round(0.05 * r, 9) for r in rms]
    absolute = SQSConfig(components=4)
    groups = param_groups(SQSModel(net, sites, absolute, CategoricalLikelihood(10)),
                          SpikeGMMGuide(net, sites, absolute), absolute)
    assert [(g["name"], g["lr"]) for g in groups if g["name"].startswith("latent")] == [("latent", 1e-2)]


def test_a_training_step_moves_each_layer_by_the_same_fraction_of_its_scale():
    """Adam's first step is lr * sign(grad) per weight: relative rates make it a fixed fraction of the
    layer's RMS, absolute rates a fixed size (10x the fraction on the 10x smaller layer; negative control)."""
    x = torch.randn(64, 6, generator=torch.Generator().manual_seed(1))
    y = torch.randint(0, 3, (64,), generator=torch.Generator().manual_seed(2))

    def moved_fraction(config: SQSConfig) -> list[float]:
        net = scaled_net()
        before = [net[i].weight.detach().clone() for i in (0, 2)]
        result = compress(net, (x, y), config)
        return [float((layer.latent.detach() - w).abs().max() / w.pow(2).mean().sqrt())
                for layer, w in zip(result.guide.layers, before)]

    base = dict(components=4, sparsity=0.0, epochs=1.0, batch_size=64, warmup_fraction=1.0, prune_fraction=0.0)
    relative = moved_fraction(SQSConfig(**base, lr_weights_relative=0.05))
    absolute = moved_fraction(SQSConfig(**base))
    assert abs(relative[0] / relative[1] - 1) < 0.2
    assert absolute[1] / absolute[0] > 5
