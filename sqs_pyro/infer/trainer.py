"""The SVI loop of one run: :class:`Trainer` steps Adam on ``-ELBO``, applies the schedule
(gates opened, pruned along the cubic ramp, then frozen; temperatures, KL weight and learning
rates), logs the data and KL terms, checkpoints, and rolls back on divergence."""
from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping

import pyro
import torch
from torch import nn
from tqdm.auto import tqdm

from sqs_pyro.config import SQSConfig
from sqs_pyro.errors import SQSDivergenceError
from sqs_pyro.guides.spike_gmm import GateState, SpikeGMMGuide
from sqs_pyro.infer.auto_sparsity import AUTO_BATCHES, AUTO_MAX, AutoSparsity
from sqs_pyro.infer.checkpoint import load_checkpoint, rng_state, save_checkpoint, set_rng_state
from sqs_pyro.infer.data import BatchSource
from sqs_pyro.infer.distributed import DistContext
from sqs_pyro.infer.elbo import SQSMeanFieldELBO, log_record
from sqs_pyro.infer.optim import AdamWithSignGroups
from sqs_pyro.infer.result import SQSResult
from sqs_pyro.infer.schedules import FINETUNE, POSTERIOR, PRUNE, Schedule
from sqs_pyro.models.network import SQSModel


#: the Adam groups that learn at ``lr_posterior`` in the posterior phase: what only the sampled ELBO's data term
#: (and the KL) can teach, the widths and the mixing weights
POSTERIOR_GROUPS = ("slab_scales", "mixing")


def _rms(t: torch.Tensor) -> float:
    return float(t.detach().pow(2).mean().sqrt())


def param_groups(model: SQSModel, guide: SpikeGMMGuide, config: SQSConfig) -> list[dict[str, Any]]:
    """Adam groups: gate logits (``sign`` steps with ``gate_rule="sign"``), latent weights, the levels, the mixing
    logits (both at ``lr_codebook``), the levels' slab scales (at ``slab_scale_rate`` times the codebook's rate), the
    log group scales (at the codebook's rate) and the dense (uncompressed) tensors. In the posterior phase the
    slab scales and mixing logits learn at ``lr_posterior`` (:data:`POSTERIOR_GROUPS`).

    With ``lr_weights_relative > 0`` every layer's latent weights form their own group with
    ``lr = min(lr_weights, lr_weights_relative * RMS(w_l))`` (``w_l``: the weights the guide starts
    from): an Adam step (about ``lr`` per weight) is at most that fraction of the layer's scale."""
    gates = [layer.gate_logits for layer in guide.layers]
    levels = [layer.locs for layer in guide.layers]
    mixing = [layer.mix_logits for layer in guide.layers]
    slab_scales = [layer.scale_raw for layer in guide.layers]
    if config.lr_weights_relative > 0:
        latent = [{"params": [layer.latent], "name": f"latent:{layer.site_name}",
                   "lr": min(config.lr_weights, config.lr_weights_relative * _rms(layer.latent))}
                  for layer in guide.layers]
    else:
        latent = [{"params": [layer.latent for layer in guide.layers], "lr": config.lr_weights, "name": "latent"}]
    dense = [p for p in model.net.parameters() if p.requires_grad]
    groups = [{"params": gates, "lr": config.lr_gates, "name": "gates", "sign": config.gate_rule == "sign"}, *latent,
              {"params": levels, "lr": config.lr_codebook, "name": "codebook"},
              {"params": mixing, "lr": config.lr_codebook, "name": "mixing"},
              {"params": slab_scales, "lr": config.slab_scale_rate * config.lr_codebook, "name": "slab_scales"}]
    if model.log_group_scales is not None:
        groups.append({"params": list(model.log_group_scales), "lr": config.lr_codebook, "name": "group_scales"})
    if dense:
        groups.append({"params": dense, "lr": config.lr_dense, "name": "dense"})
    return groups


class Trainer:
    """One SVI run's loop and state: model and guide (inside ``result``), Adam, the step
    (which fixes the schedule and the position in the data), the learning-rate scale left by
    rollbacks, the history and the RNG states.

    :meth:`state_dict` is a cloned snapshot of plain tensors, numbers and strings (a
    checkpoint); :meth:`load_state_dict` restores one, after which the run continues exactly
    as an uninterrupted one would (bit-identical on one thread).
    """

    def __init__(self, result: SQSResult, schedule: Schedule, source: BatchSource, task: str, ctx: DistContext,
                 device: torch.device, started: float, bf16: bool = False) -> None:
        self.result = result
        self.schedule = schedule
        self.num_data = source.num_data
        self.minibatches = source
        self.task = task
        self.ctx = ctx
        self.device = device
        self.bf16 = bf16  # the loss's forward pass under bfloat16 autocast
        config = result.config
        self.loss_fn = ctx.wrap(SQSMeanFieldELBO()(result.model, result.guide))
        self.optimizer = AdamWithSignGroups(param_groups(result.model, result.guide, config))
        self.base_lrs = [g["lr"] for g in self.optimizer.param_groups]
        self.params = [p for g in self.optimizer.param_groups for p in g["params"]]
        self.auto = AutoSparsity(config.sparsity) if config.sparsity_mode == "auto" else None
        self.step = 0
        self.lr_scale = 1.0
        self.rollbacks = 0
        self._clock = started  # perf_counter() at the start of the run (moved back on resume)

    @property
    def seconds(self) -> float:
        """Wall time of the run so far, summed over resumed sessions."""
        return time.perf_counter() - self._clock

    def state_dict(self, clone: bool = True) -> dict[str, Any]:
        """A checkpoint: tensors (cloned unless ``clone=False``), numbers, strings, lists and dicts only."""
        r = self.result
        return (clone_state if clone else dict)({
            "step": self.step, "lr_scale": self.lr_scale, "rollbacks": self.rollbacks, "seconds": self.seconds,
            "config": r.config.to_dict(), "task": self.task, "num_data": self.num_data,
            "world_size": self.ctx.world_size, "sites": [(s.name, s.shape) for s in r.model.sites],
            "model": r.model.state_dict(), "guide": r.guide.state_dict(), "optimizer": self.optimizer.state_dict(),
            "rng": rng_state(self.device), "history": r.history,
            "auto_sparsity": None if self.auto is None else self.auto.state_dict(),
        })

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore a checkpoint from :meth:`state_dict` (its tensors are copied, never shared)."""
        state = clone_state(state)
        self.result.model.load_state_dict(state["model"])
        self.result.guide.load_state_dict(state["guide"])
        self.optimizer.load_state_dict(state["optimizer"])
        set_rng_state(state["rng"], self.device)
        self.step, self.lr_scale, self.rollbacks = int(state["step"]), float(state["lr_scale"]), int(state["rollbacks"])
        self._clock = time.perf_counter() - float(state["seconds"])
        self.result.history[:] = state["history"]
        if self.auto is not None:
            self.auto.load_state_dict(state["auto_sparsity"])

    def batches(self) -> Iterator[list[torch.Tensor]]:
        """This rank's share of the global batches from the current step on (drop-last epochs)."""
        return self.minibatches.from_step(self.step)

    def train(self, eval_fn: Callable[[nn.Module], dict[str, float]] | None, eval_every: int, progress: bool,
              checkpoint_path: Path | None, checkpoint_every: int, max_rollbacks: int) -> None:
        """Run the remaining steps.

        A checkpoint (kept in memory and, with ``checkpoint_path``, written atomically) is
        taken at the first step, every ``checkpoint_every`` steps, at both phase changes and
        after the last step. A non-finite loss or gradient (on any rank) restores the last
        one and halves the learning rate; a divergence after ``max_rollbacks`` rollbacks
        raises :class:`SQSDivergenceError` and leaves the checkpoint file as it was. Pyro's
        argument validation is off during the steps (the data were checked up-front), so that
        non-finite values reach this check instead of raising inside a distribution.
        """
        schedule, config, guide = self.schedule, self.result.config, self.result.guide
        good = self._checkpoint(checkpoint_path if self.step == 0 else None)
        batches = self.batches()
        bar = tqdm(total=schedule.end, initial=self.step, disable=not (progress and self.ctx.is_main),
                   desc="SQS", unit="step")
        while self.step < schedule.end:
            step = self.step
            periodic = checkpoint_every and step % checkpoint_every == 0
            if step != good["step"] and (periodic or step in (schedule.prune_start, schedule.prune_end,
                                                              schedule.total_steps)):
                good = self._checkpoint(checkpoint_path)
            phase, beta = self._apply_schedule(step, eval_fn)
            x, y = next(batches)
            self.optimizer.zero_grad(set_to_none=True)
            with pyro.validation_enabled(False), torch.autocast(self.device.type, torch.bfloat16, enabled=self.bf16):
                loss = self.loss_fn(x, y)  # validation off: a NaN must reach the divergence check, not raise
            (loss / self.num_data).backward()
            if self.ctx.any(not self._finite(loss), self.device):
                self._rollback(good, step, max_rollbacks, checkpoint_path)
                good = self._checkpoint(checkpoint_path)
                batches = self.batches()
                bar.reset(total=schedule.end)
                bar.update(self.step)
                continue
            logging = step % config.log_every == 0 or step in (schedule.total_steps - 1, schedule.end - 1)
            kl = guide.total_kl(self.result.model.priors()) if logging else 0.0  # at the loss's parameters
            self.optimizer.step()
            if phase == PRUNE:
                self._prune(step)
            if self.result.model.hyperpriors is not None and phase != POSTERIOR:  # empirical Bayes: the M-step (the
                # posterior phase keeps the prior of the point estimate it fits around)
                self.result.model.update_hyperpriors(guide.distributions())
            if logging:
                record = log_record(guide, step, phase, self.ctx.mean(loss), kl, beta, self.num_data)
                self.result.history.append(record)
                bar.set_postfix(nll=f"{record['nll']:.3f}", kl=f"{record['kl_per_datum']:.3f}",
                                sparsity=f"{record['sparsity']:.3f}", bits=config.bits)
            if eval_every and step and step % eval_every == 0:
                self.result.evaluate(eval_fn, step, "periodic")
            self.step += 1
            bar.update(1)
        bar.close()
        if self.step != good["step"]:
            self._checkpoint(checkpoint_path)

    def _apply_schedule(self, step: int, eval_fn) -> tuple[str, float]:
        schedule, model, guide = self.schedule, self.result.model, self.result.guide
        phase = schedule.phase(step)
        if step == schedule.prune_start and phase == PRUNE and not self._keeps_every_weight():
            guide.set_gate_state(GateState.LEARN)
        if step == schedule.prune_end and phase == FINETUNE:
            self._freeze_gates()
            self.result.evaluate(eval_fn, step, "prune_end")
        if step == schedule.total_steps and phase == POSTERIOR:
            if guide.layers[0].state != GateState.FROZEN:  # a schedule without fine-tuning steps
                self._freeze_gates()
            guide.fix_point_codes()
            self._fresh_posterior_moments()
            self.result.evaluate(eval_fn, step, "point_end")
        guide.mode = "sample" if phase == POSTERIOR else self.result.config.mode
        beta = self.result.config.posterior_kl_weight if phase == POSTERIOR else schedule.kl_weight(step)
        model.kl_weight = guide.kl_weight = beta
        guide.gate_temperature.fill_(schedule.gate_temperature(step))
        guide.assign_temperature.fill_(schedule.assign_temperature(step))
        posterior_lr = self.result.config.lr_posterior * schedule.posterior_lr_factor(step)
        for group, lr in zip(self.optimizer.param_groups, self.base_lrs):
            own = lr * schedule.lr_factor(step)
            if phase == POSTERIOR:  # the point estimate stays: only the widths and the mixing weights learn
                own = posterior_lr if group["name"] in POSTERIOR_GROUPS else 0.0
            group["lr"] = own * self.lr_scale
        return phase, beta

    def _keeps_every_weight(self) -> bool:
        """``sparsity=0`` with the exact mask: nothing is to go, so the gates stay open (never learn) and the
        network trains with every weight, as it is materialised; else the prior's KL would close some of them
        while they learn, and the exact mask would reopen them untrained at the end of pruning."""
        config = self.result.config
        return config.sparsity == 0 and config.sparsity_mode == "exact"

    def _fresh_posterior_moments(self) -> None:
        """Drop the Adam moments of :data:`POSTERIOR_GROUPS` where the posterior phase starts: what the widths and
        mixing logits gathered in the point phases came from the KL alone (or a surrogate), and the sampled ELBO is a
        new objective; a fresh optimiser, as a stock ``SVI`` script starts one (``examples/svi_script.py``)."""
        for group in self.optimizer.param_groups:
            if group["name"] in POSTERIOR_GROUPS:
                for p in group["params"]:
                    self.optimizer.state.pop(p, None)

    def _freeze_gates(self) -> None:
        """Freeze the mask (``sparsity_mode="auto"``: at the ladder's best rung); the gate logits never step again,
        so their Adam moments are dropped."""
        if self.auto is not None:
            self.result.history.append({"step": self.step, **self.auto.summary()})
        self.result.guide.freeze_mask(None if self.auto is None else self.auto.best)
        for layer in self.result.guide.layers:
            self.optimizer.state.pop(layer.gate_logits, None)

    def _prune(self, step: int) -> None:
        """One step of the cubic ramp: reset the gates below its target (``"auto"``: score the ladder's rungs
        the ramp reaches, stop it where the ELBO worsens; :mod:`.auto_sparsity`)."""
        config, guide, auto = self.result.config, self.result.guide, self.auto
        if auto is None:
            guide.prune_to_quantile(self.schedule.target_sparsity(step), config.pruned_logit, config.prune_scope)
            return
        target = auto.target(self.schedule.target_sparsity(step, AUTO_MAX))
        guide.prune_to_quantile(target, config.pruned_logit, config.prune_scope)
        rung = auto.due(target)
        if rung is not None and auto.record(rung, self._score_mask(rung), [l.gate_logits for l in guide.layers]):
            with torch.no_grad():  # back to the best rung's gates; the ramp holds there
                for layer, logits in zip(guide.layers, auto.best_logits):
                    layer.gate_logits.copy_(logits)

    def _score_mask(self, sparsity: float) -> float:
        """The negative ELBO (the run's ``kl_weight`` as beta) of the network with its mask at the top ``1 - sparsity``
        gates of the prune scope, on :data:`AUTO_BATCHES` training minibatches; the gates learn again afterwards."""
        model, guide = self.result.model, self.result.guide
        batches = self.minibatches.from_step(self.step)
        data = [next(batches) for _ in range(AUTO_BATCHES)]
        guide.freeze_mask(sparsity)
        beta = model.kl_weight
        model.kl_weight = guide.kl_weight = self.result.config.kl_weight
        with torch.no_grad(), pyro.validation_enabled(False):
            score = sum(self.ctx.mean(self.loss_fn(x, y)) for x, y in data) / len(data)
        model.kl_weight = guide.kl_weight = beta
        guide.set_gate_state(GateState.LEARN)
        return score

    def _finite(self, loss: torch.Tensor) -> bool:
        """Whether the loss and every gradient are finite: ``max_j |grad_j|`` (the inf-norm, NaN-propagating)
        is, taken per tensor (torch's foreach inf-norm is several times slower on CPU)."""
        worst = [p.grad.abs().amax() for p in self.params if p.grad is not None and p.grad.numel()]
        return bool(torch.isfinite(loss) & torch.isfinite(torch.stack(worst).amax() if worst else loss))

    def _checkpoint(self, path: Path | None) -> dict[str, Any]:
        """Write the checkpoint to ``path`` and return a reference to it; without a path, return
        an in-memory copy (about twice the memory of the variational and optimiser states)."""
        if path is None:
            return self.state_dict()
        save_checkpoint(self.state_dict(clone=False), path)
        return {"step": self.step, "path": path}

    def _rollback(self, good: Mapping[str, Any], step: int, max_rollbacks: int, path: Path | None) -> None:
        where = f"the checkpoint {path}" if path is not None else "the last in-memory checkpoint"
        if self.rollbacks >= max_rollbacks:
            raise SQSDivergenceError(
                f"training diverged (non-finite loss or gradient) at step {step} after {self.rollbacks} rollbacks "
                f"that halved the learning rate to {self.lr_scale:g}x; stopping. {where} (step {good['step']}) is "
                "the last good state; lower the learning rates or check the data and the network")
        lr_scale, rollbacks, seconds = self.lr_scale * 0.5, self.rollbacks + 1, self.seconds
        self.load_state_dict(load_checkpoint(good["path"]) if "path" in good else good)
        self.lr_scale, self.rollbacks = lr_scale, rollbacks
        self._clock = time.perf_counter() - seconds
        self.result.history.append({"step": step, "phase": "rollback", "to_step": int(good["step"]),
                                    "lr_scale": lr_scale, "rollbacks": rollbacks})


def clone_state(obj: Any) -> Any:
    """A deep copy of nested dicts/lists/tuples whose tensors are detached clones."""
    if isinstance(obj, torch.Tensor):
        return obj.detach().clone()
    if isinstance(obj, Mapping):
        return {k: clone_state(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(clone_state(v) for v in obj)
    return obj


