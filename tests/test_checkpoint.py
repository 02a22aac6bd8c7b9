"""Checkpoints (atomic, safe to read, exact resume after SIGKILL) and divergence rollback."""
import importlib.util
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from torch import nn

from sqs_pyro import SQSDivergenceError, SQSInputError
from sqs_pyro.infer.checkpoint import CHECKPOINT_NAME, load_checkpoint, save_checkpoint
from sqs_pyro.infer import compress

WORKER = Path(__file__).with_name("train_worker.py")
_spec = importlib.util.spec_from_file_location("train_worker", WORKER)
worker = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(worker)


def _worker(*args: str) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.Popen([sys.executable, str(WORKER), *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env=env)


def _same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_sigkill_mid_training_then_resume_is_bit_identical(tmp_path):
    ck = tmp_path / "ck"
    killed = _worker("--out", str(tmp_path / "killed"), "--checkpoint-dir", str(ck), "--stall")
    try:
        assert killed.stdout.readline().strip() == "STALLED", killed.stderr.read()
    finally:
        killed.send_signal(signal.SIGKILL)
        killed.communicate(timeout=30)
    assert killed.returncode == -signal.SIGKILL
    # the kill landed between checkpoints: steps after the last one are lost and redone
    stalled_at, last = worker.EVAL_EVERY, load_checkpoint(ck / CHECKPOINT_NAME)["step"]
    assert 0 < last < stalled_at
    assert not list(ck.glob(".*.tmp"))

    resumed = _worker("--out", str(tmp_path / "resumed"), "--checkpoint-dir", str(ck), "--resume")
    _, err = resumed.communicate(timeout=120)
    assert resumed.returncode == 0, err
    got = torch.load(tmp_path / "resumed" / "rank0.pt", weights_only=True)

    net, x, y = worker.tiny_problem()
    calls = []
    reference = compress(net, (x, y), worker.CONFIG, eval_fn=lambda m: calls.append(1) or {
        "nonzero": float(sum(int((p != 0).sum()) for p in m.parameters()))}, eval_every=worker.EVAL_EVERY,
        progress=False)
    want = worker.snapshot(reference)
    assert _same(got["compressed"], want["compressed"])
    assert _same(got["model"], want["model"]) and _same(got["guide"], want["guide"])
    assert got["history"] == want["history"]


def test_checkpoints_at_start_every_n_phase_changes_and_end(tmp_path, monkeypatch):
    import sqs_pyro.infer.trainer as trainer

    steps = []
    monkeypatch.setattr(trainer, "save_checkpoint", lambda state, path: steps.append(state["step"]))
    net, x, y = worker.tiny_problem()
    compress(net, (x, y), worker.CONFIG, progress=False, checkpoint_dir=tmp_path, checkpoint_every=20)
    # 64 point steps, pruning over [10, 39), then 4 posterior steps (posterior_epochs=0.25) from step 64
    assert steps == [0, 10, 20, 39, 40, 60, 64, 68]


def test_checkpoint_write_is_atomic_and_read_is_safe(tmp_path, monkeypatch):
    path = tmp_path / CHECKPOINT_NAME
    save_checkpoint({"step": 1, "w": torch.ones(3)}, path)
    good = path.read_bytes()

    def torn_write(obj, f):
        f.write(b"PK\x03\x04 half a checkpoint")
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", torn_write)
    with pytest.raises(OSError, match="disk full"):
        save_checkpoint({"step": 2, "w": torch.zeros(3)}, path)
    monkeypatch.undo()
    assert path.read_bytes() == good and load_checkpoint(path)["step"] == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == [CHECKPOINT_NAME]

    path.write_bytes(good[: len(good) // 2])
    with pytest.raises(SQSInputError, match="unreadable"):
        load_checkpoint(path)
    torch.save({"format": "sqs-pyro-checkpoint", "version": 1, "evil": nn.Linear(1, 1)}, path)
    with pytest.raises(SQSInputError, match="unreadable"):  # weights_only refuses arbitrary objects
        load_checkpoint(path)
    torch.save({"step": 3}, path)
    with pytest.raises(SQSInputError, match="not an sqs-pyro checkpoint"):
        load_checkpoint(path)


def test_resume_rejects_missing_or_foreign_checkpoints(tmp_path):
    net, x, y = worker.tiny_problem()
    config = worker.CONFIG.replace(epochs=1)
    with pytest.raises(SQSInputError, match="no checkpoint"):
        compress(net, (x, y), config, progress=False, checkpoint_dir=tmp_path, resume=True)
    with pytest.raises(SQSInputError, match="needs the checkpoint_dir"):
        compress(net, (x, y), config, progress=False, resume=True)
    compress(net, (x, y), config, progress=False, checkpoint_dir=tmp_path)
    with pytest.raises(SQSInputError, match=r"different config \(components, sparsity differ\)"):
        compress(net, (x, y), config.replace(components=8, sparsity=0.6), progress=False, checkpoint_dir=tmp_path,
                 resume=True)
    with pytest.raises(SQSInputError, match="on 512 examples, not of a classification run on 500"):
        compress(net, (x[:500], y[:500]), config, progress=False, checkpoint_dir=tmp_path, resume=True)
    # resuming a finished run trains no more and returns the same result
    again = compress(net, (x, y), config, progress=False, checkpoint_dir=tmp_path, resume=True)
    fresh = compress(net, (x, y), config, progress=False)
    assert _same(again.compressed().state_dict(), fresh.compressed().state_dict())


class _NaNGradient(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        return x.clone()

    @staticmethod
    def backward(ctx, grad):
        return grad * float("nan")


class Fault(nn.Module):
    """Identity that makes forward call number ``at`` (and, if ``persistent``, every later one)
    produce a NaN loss (``where="loss"``) or a finite loss with NaN gradients (``"grad"``)."""

    def __init__(self, at: int, where: str, persistent: bool = False) -> None:
        super().__init__()
        self.at, self.where, self.persistent, self.calls = at, where, persistent, 0

    def forward(self, x):
        self.calls += 1
        if self.calls == self.at or (self.persistent and self.calls > self.at):
            return x * float("nan") if self.where == "loss" else _NaNGradient.apply(x)
        return x


def faulty_problem(fault: Fault):
    net, x, y = worker.tiny_problem()
    return nn.Sequential(net[0], fault, *net[1:]), x, y


@pytest.mark.filterwarnings("ignore:Encountered NaN")
@pytest.mark.parametrize("where", ["loss", "grad"])
def test_injected_nan_rolls_back_and_halves_the_learning_rate(tmp_path, where):
    net, x, y = faulty_problem(Fault(at=25, where=where))  # call 1 is the input check: step 23
    result = compress(net, (x, y), worker.CONFIG, progress=False, checkpoint_dir=tmp_path, checkpoint_every=10)
    rollbacks = [h for h in result.history if h["phase"] == "rollback"]
    assert rollbacks == [{"step": 23, "phase": "rollback", "to_step": 20, "lr_scale": 0.5, "rollbacks": 1}]
    assert load_checkpoint(tmp_path / CHECKPOINT_NAME)["lr_scale"] == 0.5
    steps = [h["step"] for h in result.history if "objective" in h]
    assert steps == sorted(set(steps)) and steps[-1] == 67  # 64 point + 4 posterior steps; the lost steps were redone once, in order
    assert all(torch.isfinite(v).all() for v in result.compressed().state_dict().values())


@pytest.mark.filterwarnings("ignore:Encountered NaN")
def test_persistent_divergence_stops_after_three_rollbacks_with_checkpoint_intact(tmp_path):
    net, x, y = faulty_problem(Fault(at=25, where="loss", persistent=True))
    with pytest.raises(SQSDivergenceError, match=r"at step 2\d after 3 rollbacks .* to 0.125x; stopping"):
        compress(net, (x, y), worker.CONFIG, progress=False, checkpoint_dir=tmp_path, checkpoint_every=10)
    state = load_checkpoint(tmp_path / CHECKPOINT_NAME)
    assert state["step"] == 20 and state["rollbacks"] == 3
    assert all(torch.isfinite(v).all() for v in state["guide"].values() if v.is_floating_point())
    before = os.stat(tmp_path / CHECKPOINT_NAME).st_mtime_ns
    time.sleep(0.01)
    # the stopped run can be resumed from its last good checkpoint (here, to fail the same way)
    net[1].calls = 100  # NaN from the first resumed step on
    with pytest.raises(SQSDivergenceError):
        compress(net, (x, y), worker.CONFIG, progress=False, checkpoint_dir=tmp_path, checkpoint_every=10,
                 resume=True)
    assert os.stat(tmp_path / CHECKPOINT_NAME).st_mtime_ns == before


def test_the_gates_moments_are_dropped_once_the_mask_is_frozen(tmp_path, monkeypatch):
    """After the mask freezes the gate logits never step again, so Adam's moments for them (8 bytes per weight)
    go; before that they are there (the control), and the other parameters keep theirs."""
    import sqs_pyro.infer.trainer as trainer

    states = {}
    monkeypatch.setattr(trainer, "save_checkpoint", lambda state, path: states.setdefault(state["step"], state))
    net, x, y = worker.tiny_problem()
    compress(net, (x, y), worker.CONFIG, progress=False, checkpoint_dir=tmp_path, checkpoint_every=20)
    # 64 steps; pruning runs over [10, 39): the gates learn there and are frozen from step 39 on
    for step, frozen in ((20, False), (39, False), (40, True), (64, True)):
        optimizer = states[step]["optimizer"]
        gates = optimizer["param_groups"][0]
        assert gates["name"] == "gates"
        assert all((i in optimizer["state"]) != frozen for i in gates["params"])
        others = [i for group in optimizer["param_groups"][1:] for i in group["params"]]
        assert all(i in optimizer["state"] for i in others)


def test_auto_sparsity_resumes_mid_ladder_exactly(tmp_path):
    """``sparsity_mode="auto"`` keeps its ladder (scores, best rung, its gates) in the checkpoint: a run that
    crashes mid-pruning and resumes ends as the uninterrupted run does."""
    config = worker.CONFIG.replace(sparsity=0.0, sparsity_mode="auto")

    def evaluator(crash: bool):
        def eval_fn(module):
            if crash:
                raise KeyboardInterrupt
            return {"nonzero": float(sum(int((p != 0).sum()) for p in module.parameters()))}
        return eval_fn

    net, x, y = worker.tiny_problem()
    reference = compress(net, (x, y), config, eval_fn=evaluator(False), eval_every=worker.EVAL_EVERY, progress=False)
    ladder = [h for h in reference.history if h.get("phase") == "auto_sparsity"]
    assert len(ladder) == 1 and len(ladder[0]["negative_elbo"]) >= 2
    with pytest.raises(KeyboardInterrupt):  # at step 25, mid-pruning (steps 10-38), after a checkpoint at 20
        compress(net, (x, y), config, eval_fn=evaluator(True), eval_every=worker.EVAL_EVERY, progress=False,
                 checkpoint_dir=tmp_path, checkpoint_every=10)
    state = load_checkpoint(tmp_path / CHECKPOINT_NAME)
    assert state["step"] == 20 and state["auto_sparsity"]["scores"]
    resumed = compress(net, (x, y), config, eval_fn=evaluator(False), eval_every=worker.EVAL_EVERY, progress=False,
                       checkpoint_dir=tmp_path, resume=True)
    assert _same(resumed.compressed().state_dict(), reference.compressed().state_dict())
    assert resumed.history == reference.history
