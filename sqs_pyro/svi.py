"""The SVI driver: ``compress(net, data, config)`` learns the SQS posterior of a network.

It builds the Pyro model (:class:`~sqs_pyro.models.SQSModel`) and the mean-field guide
(:class:`~sqs_pyro.guides.SpikeGMMGuide`), wraps them in Pyro's ``TraceMeanField_ELBO`` (as
:class:`~sqs_pyro.elbo.SQSMeanFieldELBO`, which skips unused log-densities) as a torch module (so the registered KL bound is used analytically), and optimises
``-ELBO = -E_q[log p(D|W)] + beta KL(q||p)`` with Adam through three phases:

1. warm-up: gates fixed open, codebooks and latent weights learn;
2. pruning: gates learn; after every step the inclusion logits below the global quantile
   ``s_t`` (cubic ramp) are reset to ``pruned_logit`` (they may recover);
3. fine-tuning: the mask ``g_j > 0.5`` is frozen; codebooks and assignments keep learning.
"""
from __future__ import annotations

import copy
import math
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator

import pyro
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset, TensorDataset
from tqdm.auto import tqdm

import sqs_pyro.guides  # noqa: F401  (registers the KL bound)
from sqs_pyro.accounting import accounting
from sqs_pyro.config import SQSConfig
from sqs_pyro.elbo import SQSMeanFieldELBO
from sqs_pyro.errors import SQSInputError
from sqs_pyro.guides.kl import spike_gmm_kl
from sqs_pyro.guides.spike_gmm import GATE_FROZEN, GATE_LEARN, SpikeGMMGuide
from sqs_pyro.materialize import AveragedPredictor, CompressedNetwork, final_mask, materialize
from sqs_pyro.models.likelihoods import CategoricalLikelihood, GaussianLikelihood
from sqs_pyro.models.network import SQSModel
from sqs_pyro.models.selection import select_layers
from sqs_pyro.schedules import FINETUNE, PRUNE, Schedule

TASKS = ("classification", "regression")


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
    """Fail fast on empty data, non-finite values, wrong target types or labels out of range."""
    if len(dataset) == 0:
        raise SQSInputError("train data is empty")
    tensors = getattr(dataset, "tensors", None)
    x, y = tensors if tensors is not None else dataset[0]
    if x.is_floating_point() and not torch.isfinite(x).all():
        raise SQSInputError("train inputs contain NaN or Inf")
    probe = x[:2] if tensors is not None else x.unsqueeze(0)
    try:
        with torch.no_grad():
            out = net(probe)
    except Exception as exc:  # noqa: BLE001 - re-raised with context
        raise SQSInputError(f"the network cannot process the train inputs of shape {tuple(probe.shape)}: {exc}") from exc
    if task == "classification":
        if y.is_floating_point():
            raise SQSInputError(f"classification targets must be integer labels, got dtype {y.dtype}")
        num_classes = out.shape[-1]
        if int(y.min()) < 0 or int(y.max()) >= num_classes:
            raise SQSInputError(f"labels out of range: found [{int(y.min())}, {int(y.max())}], "
                                f"the network has {num_classes} outputs")
    elif not torch.isfinite(y.float()).all():
        raise SQSInputError("regression targets contain NaN or Inf")


def _batches(loader: DataLoader) -> Iterator:
    while True:
        yield from loader


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
def prune_to_quantile(guide: SpikeGMMGuide, sparsity: float, pruned_logit: float) -> None:
    """Reset the inclusion logits below the global ``sparsity`` quantile to at most ``pruned_logit``."""
    if sparsity <= 0:
        return
    logits = torch.cat([layer.gate_logits.detach().reshape(-1) for layer in guide.layers])
    k = min(logits.numel(), math.ceil(sparsity * logits.numel() - 1e-9))
    if k < 1:
        return
    threshold = torch.kthvalue(logits, k).values
    for layer in guide.layers:
        below = layer.gate_logits <= threshold
        layer.gate_logits.masked_fill_(below & (layer.gate_logits > pruned_logit), pruned_logit)


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


def compress(
    net: nn.Module,
    train_data: Any,
    config: SQSConfig | None = None,
    task: str = "classification",
    noise_scale: float = 1.0,
    eval_fn: Callable[[nn.Module], dict[str, float]] | None = None,
    eval_every: int = 0,
    progress: bool = True,
) -> SQSResult:
    """Learn the SQS posterior of ``net`` on ``train_data`` and return an :class:`SQSResult`.

    Args:
        net: a trained network; it is copied, never modified.
        train_data: ``(inputs, targets)`` tensors or a torch ``Dataset`` of such pairs.
        config: an :class:`SQSConfig` (defaults if ``None``).
        task: ``"classification"`` (categorical likelihood on logits) or ``"regression"``
            (Gaussian likelihood with standard deviation ``noise_scale``).
        eval_fn: called with the current greedy module at each phase end, every
            ``eval_every`` steps (if > 0) and at the end; its numbers join the history.
        progress: show a progress bar with the NLL, KL, sparsity and bits.
    """
    config = config or SQSConfig()
    if task not in TASKS:
        raise SQSInputError(f"task must be one of {TASKS}, got {task!r}")
    dataset = _as_dataset(train_data)
    sites = select_layers(net, config.include_types, config.include, config.exclude)
    _check_data(net, dataset, task)
    num_data = len(dataset)
    if config.batch_size > num_data:
        raise SQSInputError(f"batch_size {config.batch_size} exceeds the {num_data} training examples")

    pyro.set_rng_seed(config.seed)
    start_time = time.perf_counter()
    with pyro.settings.context(module_local_params=True):
        likelihood = (CategoricalLikelihood(num_data) if task == "classification"
                      else GaussianLikelihood(num_data, noise_scale))
        model = SQSModel(net, sites, config, likelihood)
        guide = SpikeGMMGuide(net, sites, config)
        result = SQSResult(config, copy.deepcopy(net), model, guide)
        loss_fn = SQSMeanFieldELBO()(model, guide)
        optimizer = torch.optim.Adam(_param_groups(model, guide, config), weight_decay=config.weight_decay)
        loader = DataLoader(dataset, batch_size=config.batch_size, shuffle=True, drop_last=True,
                            generator=torch.Generator().manual_seed(config.seed))
        schedule = Schedule.from_config(config, len(loader))
        if config.sparsity > 0 and schedule.prune_end == schedule.prune_start:
            raise SQSInputError("the schedule has no pruning steps; increase epochs or prune_fraction")
        base_lrs = [g["lr"] for g in optimizer.param_groups]
        batches = _batches(loader)
        bar = tqdm(range(schedule.total_steps), disable=not progress, desc="SQS", unit="step")
        for step in bar:
            phase = schedule.phase(step)
            if step == schedule.prune_start and phase == PRUNE:
                guide.set_gate_state(GATE_LEARN)
            if step == schedule.prune_end and phase == FINETUNE:
                freeze_mask(guide)
                _evaluate(result, eval_fn, step, "prune_end")
            beta = schedule.kl_weight(step)
            model.kl_weight = guide.kl_weight = beta
            guide.gate_temperature.fill_(schedule.gate_temperature(step))
            guide.assign_temperature.fill_(schedule.assign_temperature(step))
            for group, lr in zip(optimizer.param_groups, base_lrs):
                group["lr"] = lr * schedule.lr_factor(step)

            x, y = next(batches)
            optimizer.zero_grad(set_to_none=True)
            loss = loss_fn(x, y)
            if not torch.isfinite(loss):
                raise FloatingPointError(f"non-finite loss {float(loss)} at step {step} ({phase})")
            (loss / num_data).backward()
            optimizer.step()
            if phase == PRUNE:
                prune_to_quantile(guide, schedule.target_sparsity(step), config.pruned_logit)

            if step % config.log_every == 0 or step == schedule.total_steps - 1:
                record = _log_record(model, guide, step, phase, loss.item(), beta, num_data, config)
                result.history.append(record)
                bar.set_postfix(nll=f"{record['nll']:.3f}", kl=f"{record['kl_per_datum']:.3f}",
                                sparsity=f"{record['sparsity']:.3f}", bits=config.bits)
            if eval_every and step and step % eval_every == 0:
                _evaluate(result, eval_fn, step, "periodic")
        bar.close()
        if int(guide.layers[0].gate_state) != GATE_FROZEN:
            freeze_mask(guide)
    result.seconds = time.perf_counter() - start_time
    _evaluate(result, eval_fn, schedule.total_steps, "final")
    return result


def _log_record(model, guide, step, phase, loss, beta, num_data, config) -> dict[str, float]:
    """Data term and KL term of the ELBO, separately, per training example."""
    kl = total_kl(model, guide)
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
