"""Adam steps inside the backward pass: the same bits as a step after it, with one gradient alive at a time."""
import pytest
import torch
from torch import nn

from sqs_pyro.infer import compress
from sqs_pyro.infer.backward_steps import BackwardSteps
from train_worker import CONFIG, snapshot, tiny_problem


def _run(mode: str, step_in_backward: bool) -> dict:
    net, x, y = tiny_problem()
    # log_every=1: the logged KL is taken at the loss's parameters at every step, before any of them moves
    result = compress(net, (x, y), CONFIG.replace(mode=mode, log_every=1), progress=False,
                      step_in_backward=step_in_backward)
    return snapshot(result)


def _same(a: dict, b: dict) -> bool:
    tensors = all(a[part].keys() == b[part].keys() and all(torch.equal(a[part][k], b[part][k]) for k in a[part])
                  for part in ("compressed", "model", "guide"))
    return tensors and a["history"] == b["history"]


@pytest.mark.parametrize("mode", ["hard", "sample"])
def test_steps_in_the_backward_pass_give_the_same_run_bit_for_bit(mode):
    assert _same(_run(mode, True), _run(mode, False))


def test_a_step_that_keeps_the_gradient_is_told_apart(monkeypatch):
    """Negative control: a hook that steps but leaves its gradient in place lets the next hook's step move
    that parameter again; the comparison above must see it."""
    def keep_grad(self, param):
        self.optimizer.step()

    reference = _run("hard", False)
    monkeypatch.setattr(BackwardSteps, "_step", keep_grad)
    assert not _same(_run("hard", True), reference)


def _alive_gradients(net: nn.Module, steps: bool) -> int:
    """The most parameters holding a gradient at once during one backward pass."""
    params = list(net.parameters())
    counts = []
    for p in params:  # registered first: runs before the step hook of the same parameter
        p.register_post_accumulate_grad_hook(lambda _: counts.append(sum(q.grad is not None for q in params)))
    optimizer = torch.optim.Adam(params, lr=1e-2)
    x = torch.randn(8, 12)
    if steps:
        with BackwardSteps(optimizer):
            net(x).square().sum().backward()
    else:
        net(x).square().sum().backward()
        optimizer.step()
    return max(counts)


def test_one_gradient_is_alive_at_a_time_and_the_hooks_leave_with_the_context():
    net = nn.Sequential(nn.Linear(12, 32), nn.ReLU(), nn.Linear(32, 16), nn.ReLU(), nn.Linear(16, 3))
    assert _alive_gradients(net, steps=True) == 1
    assert all(p.grad is None for p in net.parameters())
    # control: a step after the backward pass holds all six gradients at its end
    assert _alive_gradients(net, steps=False) == 6
    before = [p.detach().clone() for p in net.parameters()]
    net.zero_grad(set_to_none=True)
    net(torch.randn(4, 12)).sum().backward()  # outside the context: nothing steps, the gradients stay
    assert all(torch.equal(a, p) for a, p in zip(before, net.parameters()))
    assert all(p.grad is not None for p in net.parameters())


def test_a_non_finite_gradient_stops_the_steps_of_the_pass():
    net = nn.Linear(3, 1)
    optimizer = torch.optim.Adam(net.parameters(), lr=0.1)
    before = [p.detach().clone() for p in net.parameters()]
    with BackwardSteps(optimizer) as steps:
        steps.start()
        (net(torch.ones(2, 3)) * float("nan")).sum().backward()
        assert not steps.finite
    assert all(torch.equal(a, p) for a, p in zip(before, net.parameters()))


def test_with_block_checkpoints_on_a_language_model_the_run_is_the_same_bits():
    """The layers run again in the backward pass after the later layers' parameters stepped: nothing they
    recompute may read a parameter that already moved."""
    from sqs_pyro.hf import CausalLM
    from sqs_pyro.models import transformer_include
    from tiny_hf import tiny_llama

    tokens = torch.randint(0, 40, (32, 9), generator=torch.Generator().manual_seed(0))
    config = CONFIG.replace(mode="hard", group_size=8, include=transformer_include("llama"), batch_size=8, epochs=2,
                            gate_score="magnitude", log_every=1)
    runs = []
    for step_in_backward in (False, True):
        torch.manual_seed(0)
        net = CausalLM(tiny_llama(layers=2, tied=True))
        result = compress(net, (tokens[:, :-1], tokens[:, 1:]), config, task="lm", progress=False,
                          checkpoint_blocks=True, step_in_backward=step_in_backward)
        runs.append(snapshot(result))
    assert _same(*runs)
