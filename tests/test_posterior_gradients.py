"""The data term teaches every variational parameter: gates while they learn (point phases), the
responsibilities' latent weights, the levels, their scales and the mixing weights (posterior phase)."""
import torch
from torch import nn

from sqs_pyro import SQSConfig, compress
from sqs_pyro.guides import GateState, SpikeGMMGuide
from sqs_pyro.infer.gradients import data_term_gradients, untaught
from sqs_pyro.models import CategoricalLikelihood, SQSModel, select_layers

CONFIG = SQSConfig(components=4, sparsity=0.5, windows="none")


def build(config=CONFIG):
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv1d(2, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 6, 3))
    sites = select_layers(net)
    return SQSModel(net, sites, config, CategoricalLikelihood(64)), SpikeGMMGuide(net, sites, config)


def batch():
    torch.manual_seed(1)
    return torch.randn(16, 2, 8), torch.randint(0, 3, (16,))


def phase_gradients(model, guide):
    """Data-term gradients as the trainer's phases set the guide: gates learning in the point mode, then the
    posterior phase's sampled forward with the mask frozen."""
    torch.manual_seed(2)
    guide.set_gate_state(GateState.LEARN)
    guide.mode = CONFIG.mode
    point = data_term_gradients(model, guide, *batch())
    guide.prune_to_quantile(0.5, CONFIG.pruned_logit)
    guide.freeze_mask()
    guide.mode = "sample"
    return point, data_term_gradients(model, guide, *batch())


def test_every_variational_tensor_gets_a_data_gradient_over_the_default_phases():
    model, guide = build()
    point, posterior = phase_gradients(model, guide)
    names = [n for n, _ in guide.named_parameters()]
    assert {n.rsplit(".", 1)[-1] for n in names} == {"gate_logits", "latent", "locs", "scale_raw", "mix_logits"}
    assert [n for n in untaught(point) if n.endswith("gate_logits")] == []  # the gates, while they learn
    assert untaught(posterior) == [n for n in names if n.endswith("gate_logits")]  # frozen gates: by design
    # what the point (hard) forward cannot teach: the widths and the mixing weights -- why the phase exists
    assert all(point[n] == 0.0 for n in names if n.endswith(("scale_raw", "mix_logits")))


def test_a_parameter_outside_the_forward_pass_is_caught():
    model, guide = build()
    guide.layers[0].orphan = nn.Parameter(torch.ones(3))  # negative control: detached from the forward
    point, posterior = phase_gradients(model, guide)
    assert "layers.0.orphan" in untaught(point) and "layers.0.orphan" in untaught(posterior)


def test_the_default_run_ends_with_a_sampled_elbo_phase_that_moves_the_widths_not_the_greedy_network():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Flatten(), nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 3))
    x, y = torch.randn(256, 8), torch.randint(0, 3, (256,))
    config = CONFIG.replace(epochs=2.0, batch_size=32, posterior_epochs=1.0, log_every=1, kl_warmup_fraction=0.0)
    seen = []

    def snapshot(module):
        seen.append({k: v.clone() for k, v in module.state_dict().items()})
        return {}

    result = compress(net, (x, y), config, eval_fn=snapshot, progress=False)
    phases = [r["phase"] for r in result.history]
    assert phases.count("posterior") == 8 and result.objective_kind == "surrogate+elbo"
    assert {r["objective_kind"] for r in result.history if r.get("phase") == "posterior"} == {"elbo"}
    evaluations = [p for p in phases if p in ("prune_end", "point_end", "final")]  # one snapshot each, in order
    assert evaluations == ["prune_end", "point_end", "final"]
    point_end, final = seen[1], seen[2]
    assert all(torch.equal(point_end[k], final[k]) for k in final)  # the greedy network is the point estimate
    start = compress(net, (x, y), config.replace(posterior_epochs=0.0), progress=False)
    assert start.objective_kind == "surrogate" and "posterior" not in [r.get("phase") for r in start.history]
    for b, a in zip(start.guide.layers, result.guide.layers):
        assert torch.equal(b.mask, a.mask)  # the phase keeps the mask the point phases froze
        assert not torch.allclose(b.scales, a.scales, rtol=1e-2)  # and the data moved the widths
        assert not torch.allclose(b.log_mix(), a.log_mix(), rtol=1e-2)  # and the mixing weights


def test_the_posterior_phase_starts_a_fresh_adam_for_the_widths_and_mixing_weights(tmp_path):
    """Adam's step count of the widths and mixing logits is the posterior phase's alone (their point-phase moments,
    taught by the KL only, are dropped where it starts); the other groups keep counting from the run's start."""
    from sqs_pyro.infer.checkpoint import CHECKPOINT_NAME, load_checkpoint
    from sqs_pyro.infer.trainer import POSTERIOR_GROUPS

    torch.manual_seed(0)
    net = nn.Sequential(nn.Flatten(), nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 3))
    x, y = torch.randn(256, 8), torch.randint(0, 3, (256,))
    config = CONFIG.replace(epochs=2.0, batch_size=32, posterior_epochs=1.0)
    compress(net, (x, y), config, checkpoint_dir=tmp_path, progress=False)
    optimizer = load_checkpoint(tmp_path / CHECKPOINT_NAME)["optimizer"]
    steps = {group["name"]: {int(optimizer["state"][i]["step"]) for i in group["params"] if i in optimizer["state"]}
             for group in optimizer["param_groups"]}
    for name in POSTERIOR_GROUPS:
        assert steps[name] == {8}  # 256 / 32 steps of the posterior phase
    assert steps["codebook"] == {24}  # control: 16 point steps and 8 posterior steps (at rate 0)
