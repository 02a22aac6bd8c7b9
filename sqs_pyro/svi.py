"""The SVI driver: ``compress(net, data, config)`` learns the SQS posterior of a network.

It builds the Pyro model (:class:`~sqs_pyro.models.SQSModel`) and the mean-field guide
(:class:`~sqs_pyro.guides.SpikeGMMGuide`), wraps them in Pyro's ``TraceMeanField_ELBO`` (as
:class:`~sqs_pyro.elbo.SQSMeanFieldELBO`, which skips unused log-densities) as a torch module
(so the registered KL bound is used analytically), and optimises
``-ELBO = -E_q[log p(D|W)] + beta KL(q||p)`` with Adam through three phases:

1. warm-up: gates fixed open, codebooks and latent weights learn;
2. pruning: gates learn; after every step the inclusion logits below the global quantile
   ``s_t`` (cubic ramp) are reset to ``pruned_logit`` (they may recover);
3. fine-tuning: the mask ``g_j > 0.5`` is frozen; codebooks and assignments keep learning.

The loop lives in :class:`Trainer`, whose ``state_dict()`` is a checkpoint (model, guide,
optimiser, step, learning-rate scale, history, RNG states; the data order is a function of
the seed and the epoch, so the step fixes the position in the data). Checkpoints are taken
every ``checkpoint_every`` steps and at phase changes (see :mod:`sqs_pyro.checkpoint`); a
non-finite loss or gradient rolls back to the last one with half the learning rate; and
``distributed=True`` runs data-parallel over ``torchrun`` processes (see
:mod:`sqs_pyro.distributed`).
"""
from __future__ import annotations

import copy
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping

import numpy as np
import pyro
import torch
from torch import nn
from torch.utils.data import Dataset, TensorDataset, default_collate
from tqdm.auto import tqdm

from sqs_pyro.accounting import accounting
from sqs_pyro.checkpoint import CHECKPOINT_NAME, load_checkpoint, rng_state, save_checkpoint, set_rng_state
from sqs_pyro.config import SQSConfig
from sqs_pyro.distributed import DistContext, distributed_context
from sqs_pyro.elbo import SQSMeanFieldELBO
from sqs_pyro.errors import SQSDivergenceError, SQSInputError
from sqs_pyro.guides.initialization import activation_scores, first_order_saliency, scoped_kthvalues
from sqs_pyro.guides.kl import spike_gmm_kl
from sqs_pyro.guides.spike_gmm import GATE_FROZEN, GATE_LEARN, SpikeGMMGuide
from sqs_pyro.materialize import AveragedPredictor, CompressedNetwork, final_mask, materialize
from sqs_pyro.models.likelihoods import CategoricalLikelihood, GaussianLikelihood, TokenCategoricalLikelihood
from sqs_pyro.models.network import SQSModel
from sqs_pyro.models.selection import CompressedSite, select_layers
from sqs_pyro.schedules import FINETUNE, PRUNE, Schedule

TASKS = ("classification", "regression", "lm")


@dataclass
class SQSResult:
    """A trained SQS posterior and everything needed to materialise it."""

    config: SQSConfig
    skeleton: nn.Module
    model: SQSModel
    guide: SpikeGMMGuide
    history: list[dict[str, float]] = field(default_factory=list)
    seconds: float = 0.0

    def compressed(self) -> CompressedNetwork:
        """The greedy compressed network (mask, codes, codebooks, other tensors)."""
        return materialize(self.guide, self.model.net, self.config.to_dict())

    def greedy_module(self) -> nn.Module:
        """A plain module of the original architecture with the greedy compressed weights."""
        return self.compressed().load_into(copy.deepcopy(self.skeleton)).eval()

    def averaged_module(self, num_members: int | None = None, temperature: float = 1.0,
                        output: str = "probs") -> AveragedPredictor:
        """The Bayesian-averaged predictor over ``num_members`` (default ``config.num_averaged``) samples."""
        members = num_members or self.config.num_averaged
        return AveragedPredictor(self.guide, self.skeleton, self.compressed(), members, temperature,
                                 seed=self.config.seed, output=output).eval()

    def accounting(self) -> dict[str, Any]:
        return accounting(self.compressed())


def _as_dataset(data: Any) -> Dataset:
    if isinstance(data, Dataset):
        return data
    if isinstance(data, (tuple, list)) and len(data) == 2 and all(isinstance(t, torch.Tensor) for t in data):
        x, y = data
        if x.shape[0] != y.shape[0]:
            raise SQSInputError(f"inputs and targets differ in length: {x.shape[0]} vs {y.shape[0]}")
        return TensorDataset(x, y)
    raise SQSInputError("train data must be an (inputs, targets) pair of tensors or a torch Dataset")


def _check_data(net: nn.Module, dataset: Dataset, task: str) -> None:
    """Fail fast on empty data, non-finite values, wrong target types or shapes, labels out of range.

    A ``TensorDataset`` is checked whole; another ``Dataset`` through its first example.
    """
    if len(dataset) == 0:
        raise SQSInputError("train data is empty")
    tensors = getattr(dataset, "tensors", None)
    example = tensors if tensors is not None else dataset[0]
    if not (isinstance(example, (tuple, list)) and len(example) == 2
            and all(isinstance(t, torch.Tensor) for t in example)):
        raise SQSInputError("each training example must be an (input, target) pair of tensors")
    x, y = example
    if x.is_floating_point() and not torch.isfinite(x).all():
        raise SQSInputError("train inputs contain NaN or Inf")
    probe, probe_y = (x[:2], y[:2]) if tensors is not None else (x.unsqueeze(0), y.unsqueeze(0))
    training = net.training
    try:
        with torch.no_grad():
            out = net.eval()(probe)  # eval: the probe must not touch running statistics
    except Exception as exc:  # noqa: BLE001 - re-raised with context
        raise SQSInputError(f"the network cannot process the train inputs of shape {tuple(probe.shape)}: {exc}") from exc
    finally:
        net.train(training)
    if task in ("classification", "lm"):
        if y.is_floating_point():
            raise SQSInputError(f"{task} targets must be integer labels, got dtype {y.dtype}")
        if probe_y.shape != out.shape[:-1]:
            raise SQSInputError(f"classification targets of shape {tuple(probe_y.shape)} do not match the network's "
                                f"logits of shape {tuple(out.shape)}: give one class index per example")
        num_classes = out.shape[-1]
        if int(y.min()) < 0 or int(y.max()) >= num_classes:
            raise SQSInputError(f"labels out of range: found [{int(y.min())}, {int(y.max())}], "
                                f"the network has {num_classes} outputs")
        return
    if probe_y.shape != out.shape:
        raise SQSInputError(f"regression targets of shape {tuple(probe_y.shape)} do not match the network's "
                            f"outputs of shape {tuple(out.shape)}")
    if not torch.isfinite(y.float()).all():
        raise SQSInputError("regression targets contain NaN or Inf")


def epoch_permutation(num_data: int, seed: int, epoch: int) -> torch.Tensor:
    """The order of the training examples in ``epoch``: a function of ``(seed, epoch)`` alone,
    so a resumed run rebuilds its position in the data without replaying it."""
    epoch_seed = int(np.random.SeedSequence([seed, epoch]).generate_state(1, dtype=np.uint64)[0])
    return torch.randperm(num_data, generator=torch.Generator().manual_seed(epoch_seed))


def _fetch(dataset: Dataset, indices: torch.Tensor) -> list[torch.Tensor]:
    tensors = getattr(dataset, "tensors", None)
    if tensors is not None:
        return [t[indices] for t in tensors]
    return default_collate([dataset[i] for i in indices.tolist()])


def _param_groups(model: SQSModel, guide: SpikeGMMGuide, config: SQSConfig) -> list[dict[str, Any]]:
    gates, latent, codebook = [], [], []
    for layer in guide.layers:
        gates.append(layer.gate_logits)
        latent.append(layer.latent)
        codebook += [layer.locs, layer.scale_raw, layer.mix_logits]
    dense = [p for p in model.net.parameters() if p.requires_grad]
    groups = [{"params": gates, "lr": config.lr_gates, "name": "gates"},
              {"params": latent, "lr": config.lr_weights, "name": "latent"},
              {"params": codebook, "lr": config.lr_codebook, "name": "codebook"}]
    if dense:
        groups.append({"params": dense, "lr": config.lr_dense, "name": "dense"})
    return groups


@torch.no_grad()
def total_kl(model: SQSModel, guide: SpikeGMMGuide) -> float:
    """The (unweighted) KL bound summed over all compressed weights, in nats."""
    dists = guide.distributions()
    return float(sum(spike_gmm_kl(dists[s.name], model.prior(s)).sum() for s in model.sites))


@torch.no_grad()
def prune_to_quantile(guide: SpikeGMMGuide, sparsity: float, pruned_logit: float, scope: str = "global") -> None:
    """Reset the inclusion logits below the ``sparsity`` quantile to at most ``pruned_logit``;
    the quantile is taken over all compressed weights (``scope="global"``), within each layer
    (``"layer"``) or within each output row (``"row"``)."""
    if sparsity <= 0:
        return
    logits = [layer.gate_logits for layer in guide.layers]
    thresholds = scoped_kthvalues(logits, scope, lambda n: min(n, math.ceil(sparsity * n - 1e-9)))
    for gate_logits, threshold in zip(logits, thresholds):
        if threshold is not None:
            below = gate_logits <= threshold
            gate_logits.masked_fill_(below & (gate_logits > pruned_logit), pruned_logit)


@torch.no_grad()
def freeze_mask(guide: SpikeGMMGuide) -> None:
    """Fix the mask at ``g_j > 0.5`` and stop the gates from learning."""
    for layer in guide.layers:
        layer.mask.copy_(final_mask(layer))
        layer.gate_state.fill_(GATE_FROZEN)


def measured_sparsity(guide: SpikeGMMGuide) -> float:
    kept = sum(int(final_mask(layer).sum()) for layer in guide.layers)
    total = sum(layer.latent.numel() for layer in guide.layers)
    return 1.0 - kept / total


class Trainer:
    """One SVI run's loop and state: model and guide (inside ``result``), Adam, the step
    (which fixes the schedule and the position in the data), the learning-rate scale left by
    rollbacks, the history and the RNG states.

    :meth:`state_dict` is a cloned snapshot of plain tensors, numbers and strings (a
    checkpoint); :meth:`load_state_dict` restores one, after which the run continues exactly
    as an uninterrupted one would (bit-identical on one thread).
    """

    def __init__(self, result: SQSResult, schedule: Schedule, dataset: Dataset, task: str, ctx: DistContext,
                 device: torch.device, started: float) -> None:
        self.result = result
        self.schedule = schedule
        self.dataset = dataset
        self.num_data = len(dataset)
        self.task = task
        self.ctx = ctx
        self.device = device
        config = result.config
        self.loss_fn = ctx.wrap(SQSMeanFieldELBO()(result.model, result.guide))
        self.optimizer = torch.optim.Adam(_param_groups(result.model, result.guide, config),
                                          weight_decay=config.weight_decay)
        self.base_lrs = [g["lr"] for g in self.optimizer.param_groups]
        self.params = [p for g in self.optimizer.param_groups for p in g["params"]]
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
        return (_clone if clone else dict)({
            "step": self.step, "lr_scale": self.lr_scale, "rollbacks": self.rollbacks, "seconds": self.seconds,
            "config": r.config.to_dict(), "task": self.task, "num_data": self.num_data,
            "world_size": self.ctx.world_size, "sites": [(s.name, s.shape) for s in r.model.sites],
            "model": r.model.state_dict(), "guide": r.guide.state_dict(), "optimizer": self.optimizer.state_dict(),
            "rng": rng_state(self.device), "history": r.history,
        })

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore a checkpoint from :meth:`state_dict` (its tensors are copied, never shared)."""
        state = _clone(state)
        self.result.model.load_state_dict(state["model"])
        self.result.guide.load_state_dict(state["guide"])
        self.optimizer.load_state_dict(state["optimizer"])
        set_rng_state(state["rng"], self.device)
        self.step, self.lr_scale, self.rollbacks = int(state["step"]), float(state["lr_scale"]), int(state["rollbacks"])
        self._clock = time.perf_counter() - float(state["seconds"])
        self.result.history[:] = state["history"]

    def batches(self) -> Iterator[list[torch.Tensor]]:
        """This rank's share of the global batches from the current step on (drop-last epochs)."""
        size = self.result.config.batch_size
        per_epoch = self.num_data // size
        epoch, first = divmod(self.step, per_epoch)
        while True:
            order = epoch_permutation(self.num_data, self.result.config.seed, epoch)
            for b in range(first, per_epoch):
                yield [t.to(self.device) for t in _fetch(self.dataset, self.ctx.shard(order[b * size:(b + 1) * size]))]
            epoch, first = epoch + 1, 0

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
        bar = tqdm(total=schedule.total_steps, initial=self.step, disable=not (progress and self.ctx.is_main),
                   desc="SQS", unit="step")
        while self.step < schedule.total_steps:
            step = self.step
            periodic = checkpoint_every and step % checkpoint_every == 0
            if step != good["step"] and (periodic or step in (schedule.prune_start, schedule.prune_end)):
                good = self._checkpoint(checkpoint_path)
            phase, beta = self._apply_schedule(step, eval_fn)
            x, y = next(batches)
            self.optimizer.zero_grad(set_to_none=True)
            with pyro.validation_enabled(False):  # a NaN must reach the divergence check, not raise
                loss = self.loss_fn(x, y)
            (loss / self.num_data).backward()
            if self.ctx.any(not self._finite(loss), self.device):
                self._rollback(good, step, max_rollbacks, checkpoint_path)
                good = self._checkpoint(checkpoint_path)
                batches = self.batches()
                bar.reset(total=schedule.total_steps)
                bar.update(self.step)
                continue
            logging = step % config.log_every == 0 or step == schedule.total_steps - 1
            kl = total_kl(self.result.model, guide) if logging else 0.0  # at the loss's parameters
            self.optimizer.step()
            if phase == PRUNE:
                prune_to_quantile(guide, schedule.target_sparsity(step), config.pruned_logit, config.prune_scope)
            if logging:
                record = _log_record(guide, step, phase, self.ctx.mean(loss), kl, beta, self.num_data)
                self.result.history.append(record)
                bar.set_postfix(nll=f"{record['nll']:.3f}", kl=f"{record['kl_per_datum']:.3f}",
                                sparsity=f"{record['sparsity']:.3f}", bits=config.bits)
            if eval_every and step and step % eval_every == 0:
                _evaluate(self.result, eval_fn, step, "periodic")
            self.step += 1
            bar.update(1)
        bar.close()
        if self.step != good["step"]:
            self._checkpoint(checkpoint_path)

    def _apply_schedule(self, step: int, eval_fn) -> tuple[str, float]:
        schedule, model, guide = self.schedule, self.result.model, self.result.guide
        phase = schedule.phase(step)
        if step == schedule.prune_start and phase == PRUNE:
            guide.set_gate_state(GATE_LEARN)
        if step == schedule.prune_end and phase == FINETUNE:
            freeze_mask(guide)
            _evaluate(self.result, eval_fn, step, "prune_end")
        beta = schedule.kl_weight(step)
        model.kl_weight = guide.kl_weight = beta
        guide.gate_temperature.fill_(schedule.gate_temperature(step))
        guide.assign_temperature.fill_(schedule.assign_temperature(step))
        for group, lr in zip(self.optimizer.param_groups, self.base_lrs):
            group["lr"] = lr * schedule.lr_factor(step) * self.lr_scale
        return phase, beta

    def _finite(self, loss: torch.Tensor) -> bool:
        grads = [p.grad for p in self.params if p.grad is not None]
        worst = torch.nn.utils.get_total_norm(grads, norm_type=math.inf) if grads else loss.new_zeros(())
        return bool(torch.isfinite(loss) & torch.isfinite(worst))

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


def _clone(obj: Any) -> Any:
    """A deep copy of nested dicts/lists/tuples whose tensors are detached clones."""
    if isinstance(obj, torch.Tensor):
        return obj.detach().clone()
    if isinstance(obj, Mapping):
        return {k: _clone(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_clone(v) for v in obj)
    return obj


def check_resumable(state: Mapping[str, Any], config: SQSConfig, task: str, num_data: int,
                    sites: list[CompressedSite]) -> None:
    """Raise :class:`SQSInputError` unless ``state`` is a checkpoint of this very run."""
    saved = state["config"]
    current = config.to_dict()
    differ = sorted(k for k in set(saved) | set(current) if saved.get(k) != current.get(k))
    if differ:
        raise SQSInputError(f"the checkpoint was written with a different config ({', '.join(differ)} differ); "
                            "resume with the same settings")
    if state["task"] != task or state["num_data"] != num_data:
        raise SQSInputError(f"the checkpoint is of a {state['task']} run on {state['num_data']} examples, not of a "
                            f"{task} run on {num_data}")
    if [(n, tuple(shape)) for n, shape in state["sites"]] != [(s.name, s.shape) for s in sites]:
        raise SQSInputError("the checkpoint's compressed layers differ from this network's")


def _check_checkpoint_options(checkpoint_dir: str | os.PathLike | None, checkpoint_every: int, resume: bool,
                              max_rollbacks: int) -> Path | None:
    """The checkpoint file's path (``None`` without a folder), after checking the options."""
    if not (isinstance(checkpoint_every, int) and checkpoint_every >= 0):
        raise SQSInputError(f"checkpoint_every must be an integer >= 0, got {checkpoint_every!r}")
    if not (isinstance(max_rollbacks, int) and max_rollbacks >= 0):
        raise SQSInputError(f"max_rollbacks must be an integer >= 0, got {max_rollbacks!r}")
    if checkpoint_dir is None:
        if resume:
            raise SQSInputError("resume needs the checkpoint_dir to resume from")
        return None
    folder = Path(checkpoint_dir)
    if folder.exists() and not folder.is_dir():
        raise SQSInputError(f"checkpoint folder {folder} exists and is not a folder")
    return folder / CHECKPOINT_NAME


def compress(
    net: nn.Module,
    train_data: Any,
    config: SQSConfig | None = None,
    task: str = "classification",
    noise_scale: float = 1.0,
    eval_fn: Callable[[nn.Module], dict[str, float]] | None = None,
    eval_every: int = 0,
    progress: bool = True,
    *,
    checkpoint_dir: str | os.PathLike | None = None,
    checkpoint_every: int = 100,
    resume: bool = False,
    distributed: bool = False,
    max_rollbacks: int = 3,
) -> SQSResult:
    """Learn the SQS posterior of ``net`` on ``train_data`` and return an :class:`SQSResult`.

    Args:
        net: a trained network; it is copied, never modified.
        train_data: ``(inputs, targets)`` tensors or a torch ``Dataset`` of such pairs.
        config: an :class:`SQSConfig` (defaults if ``None``).
        task: ``"classification"`` (categorical likelihood on logits), ``"regression"``
            (Gaussian likelihood with standard deviation ``noise_scale``) or ``"lm"`` (token
            ids ``(N, L)`` in, next-token targets ``(N, L)``, logits ``(N, L, V)``; N counts sequences).
        eval_fn: called with the current greedy module at each phase end, every
            ``eval_every`` steps (if > 0) and at the end; its numbers join the history.
        progress: show a progress bar with the NLL, KL, sparsity and bits.
        checkpoint_dir: folder of ``checkpoint.pt``, written atomically at the start, every
            ``checkpoint_every`` steps (0: only at the start, phase changes and the end), at
            both phase changes and at the end. Checkpoints are kept in memory either way.
        resume: continue from ``checkpoint_dir/checkpoint.pt`` (same config, data and network).
        distributed: data-parallel training over the ``torch.distributed`` processes of a
            ``torchrun`` launch (see :mod:`sqs_pyro.distributed`); ``config.batch_size`` is
            the global batch, split evenly over the ranks.
        max_rollbacks: a non-finite loss or gradient restores the last checkpoint and halves
            the learning rate up to this many times; the next divergence raises
            :class:`~sqs_pyro.errors.SQSDivergenceError`.

    Everything a user passes is checked (raising :class:`SQSInputError`) before the guide is
    built or any step runs.
    """
    config = config or SQSConfig()
    if not isinstance(config, SQSConfig):
        raise SQSInputError(f"config must be an SQSConfig, got {type(config).__name__}")
    if task not in TASKS:
        raise SQSInputError(f"task must be one of {TASKS}, got {task!r}")
    path = _check_checkpoint_options(checkpoint_dir, checkpoint_every, resume, max_rollbacks)
    dataset = _as_dataset(train_data)
    sites = select_layers(net, config.include_types, config.include, config.exclude)
    _check_data(net, dataset, task)
    num_data = len(dataset)
    if config.batch_size > num_data:
        raise SQSInputError(f"batch_size {config.batch_size} exceeds the {num_data} training examples")

    started = time.perf_counter()
    with distributed_context(distributed) as ctx:
        if config.batch_size % ctx.world_size:
            raise SQSInputError(f"batch_size {config.batch_size} (the global batch) must be divisible by the "
                                f"{ctx.world_size} processes")
        schedule = Schedule.from_config(config, num_data // config.batch_size)
        if config.sparsity > 0 and schedule.prune_end == schedule.prune_start:
            raise SQSInputError("the schedule has no pruning steps; increase epochs or prune_fraction")
        saved = load_checkpoint(path) if resume else None
        if saved is not None:
            check_resumable(saved, config, task, num_data, sites)
        if ctx.device is not None:
            net = copy.deepcopy(net).to(ctx.device)
        device = next(net.parameters()).device
        pyro.set_rng_seed(config.seed)
        with pyro.settings.context(module_local_params=True):
            likelihood = {"classification": lambda: CategoricalLikelihood(num_data),
                          "lm": lambda: TokenCategoricalLikelihood(num_data),
                          "regression": lambda: GaussianLikelihood(num_data, noise_scale)}[task]()
            model = SQSModel(net, sites, config, likelihood)
            guide = SpikeGMMGuide(net, sites, config, gate_scores(net, sites, dataset, task, config))
            result = SQSResult(config, copy.deepcopy(net), model, guide)
            trainer = Trainer(result, schedule, dataset, task, ctx, device, started)
            if saved is not None:
                trainer.load_state_dict(saved)
            trainer.train(eval_fn, eval_every, progress, path if ctx.is_main else None, checkpoint_every,
                          max_rollbacks)
            if int(guide.layers[0].gate_state) != GATE_FROZEN:
                freeze_mask(guide)
    result.seconds = trainer.seconds
    _evaluate(result, eval_fn, schedule.total_steps, "final")
    return result


def task_loss(task: str) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """The mean negative log-likelihood of a task (up to constants), for saliency scores."""
    if task == "classification":
        return torch.nn.functional.cross_entropy
    if task == "lm":
        return lambda logits, y: torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1))
    return torch.nn.functional.mse_loss


def gate_scores(net: nn.Module, sites, dataset, task: str, config: SQSConfig) -> dict[str, torch.Tensor] | None:
    """First-order saliencies or activation-aware scores on the first ``saliency_batches`` seeded
    minibatches (or ``None``: magnitudes)."""
    if config.gate_score == "magnitude":
        return None
    order = torch.randperm(len(dataset), generator=torch.Generator().manual_seed(config.seed))
    size, device = config.batch_size, next(net.parameters()).device
    batches = [[t.to(device) for t in _fetch(dataset, order[i * size:(i + 1) * size])]
               for i in range(min(config.saliency_batches, max(1, len(dataset) // size)))]
    if config.gate_score == "activation":
        return activation_scores(net, sites, batches)
    return first_order_saliency(net, [s.name for s in sites], batches, task_loss(task))


def _log_record(guide, step, phase, loss, kl, beta, num_data) -> dict[str, float]:
    """Data term and KL term of the ELBO (both at the parameters the loss was computed at), per example."""
    data_term = -loss + beta * kl  # loss = -(data_term - beta * KL)
    return {"step": step, "phase": phase, "elbo": -loss / num_data, "nll": -data_term / num_data,
            "kl_per_datum": kl / num_data, "kl": kl, "beta": beta, "sparsity": measured_sparsity(guide),
            "gate_temperature": float(guide.gate_temperature),
            "assign_temperature": float(guide.assign_temperature)}


def _evaluate(result: SQSResult, eval_fn, step: int, when: str) -> None:
    if eval_fn is None:
        return
    metrics = eval_fn(result.greedy_module())
    result.history.append({"step": step, "phase": when, **{f"eval_{k}": v for k, v in metrics.items()}})
