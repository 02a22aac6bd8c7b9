"""The gate logits' stateless sign step (``gate_rule="sign"``) beside Adam on every other group."""
import pytest
import torch

from sqs_pyro import SQSConfig, SQSInputError
from sqs_pyro.infer import compress
from sqs_pyro.infer.optim import AdamWithSignGroups
from train_worker import CONFIG, tiny_problem


def _grads(step: int) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(step)
    return [torch.randn(5, generator=gen), torch.randn(3, generator=gen)]


def test_sign_groups_step_by_lr_times_the_sign_and_adam_groups_are_adams():
    a, b = torch.zeros(5, requires_grad=True), torch.zeros(3, requires_grad=True)
    reference_b = torch.zeros(3, requires_grad=True)
    opt = AdamWithSignGroups([{"params": [a], "lr": 0.1, "sign": True}, {"params": [b], "lr": 0.01}])
    adam = torch.optim.Adam([reference_b], lr=0.01)
    expected_a = torch.zeros(5)
    for step in range(4):
        ga, gb = _grads(step)
        a.grad, b.grad, reference_b.grad = ga.clone(), gb.clone(), gb.clone()
        opt.step()
        adam.step()
        expected_a -= 0.1 * ga.sign()
        assert a.grad is None  # freed by the sign step
    assert torch.equal(a.detach(), expected_a)
    assert torch.equal(b.detach(), reference_b.detach())
    assert a not in opt.state and b in opt.state  # no moments for the sign group
    # control: Adam on the same gradients does not move by lr * sign after the first step
    control = torch.zeros(5, requires_grad=True)
    plain = torch.optim.Adam([control], lr=0.1)
    for step in range(4):
        control.grad = _grads(step)[0].clone()
        plain.step()
    assert not torch.allclose(control.detach(), expected_a)


@pytest.mark.parametrize("mode", ["hard", "sample"])
def test_a_run_with_sign_gates_prunes_to_the_target_without_gate_moments(mode, monkeypatch):
    net, x, y = tiny_problem()
    seen = []
    step = AdamWithSignGroups.step

    def spy(self, closure=None):
        out = step(self, closure)
        seen.append(any(p in self.state for g in self.param_groups if g["name"] == "gates" for p in g["params"]))
        return out

    with monkeypatch.context() as patched:
        patched.setattr(AdamWithSignGroups, "step", spy)
        result = compress(net, (x, y), CONFIG.replace(mode=mode, gate_rule="sign"), progress=False)
    assert seen and not any(seen)
    assert abs(result.accounting()["sparsity"] - 0.5) < 0.02
    adam = compress(net, (x, y), CONFIG.replace(mode=mode), progress=False)
    gates = [layer.gate_logits for layer in result.guide.layers]
    assert not all(torch.equal(g, h) for g, h in zip(gates, (l.gate_logits for l in adam.guide.layers)))


def test_an_unknown_gate_rule_is_refused():
    with pytest.raises(SQSInputError, match="gate_rule must be one of"):
        SQSConfig(gate_rule="sgd")
