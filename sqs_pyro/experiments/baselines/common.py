"""What every baseline shares with SQS: layer selection, data, schedule, optimiser and output type.

A baseline is a :class:`Compressor`: it owns the compressed weights of the selected layers
and says how they enter the forward pass, how to prune at a target sparsity, how to fix the
mask (and quantise) when fine-tuning starts, and how to materialise the result as the same
:class:`~sqs_pyro.compressed.materialize.CompressedNetwork` that SQS produces. :func:`fit` trains a
compressor with SQS's :class:`~sqs_pyro.infer.schedules.Schedule` (same epochs, warm-up / cubic
pruning / fine-tuning fractions, cosine learning-rate decay), the same Adam learning rates
(``lr_weights`` for weights, ``lr_codebook`` for codebooks and scales, ``lr_dense`` for the
uncompressed tensors), the same minibatches (:class:`~sqs_pyro.infer.data.Minibatches`: the
same indices for the same seed and step as SQS's trainer) and seed, with the plain
cross-entropy loss (plus a weighted prior term for the methods that have one, :meth:`Compressor.prior_loss`).
"""
from __future__ import annotations

import copy
import math
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Protocol, Sequence

import torch
from torch import nn
from torch.func import functional_call

from sqs_pyro.compressed.accounting import accounting
from sqs_pyro.config import SQSConfig
from sqs_pyro.infer.data import Minibatches, as_dataset
from sqs_pyro.compressed.materialize import CompressedLayer, CompressedNetwork
from sqs_pyro.models.selection import CompressedSite, select_layers
from sqs_pyro.infer.schedules import FINETUNE, PRUNE, Schedule


class Compressor(Protocol):
    """The parts of a baseline that differ from method to method."""

    def param_groups(self, config: SQSConfig) -> list[dict[str, Any]]:
        """Trainable tensors with their learning rates (the compressed layers' only)."""

    def weights(self, phase: str, temperature: float) -> dict[str, torch.Tensor]:
        """The effective compressed weights for the forward pass, by parameter path
        (``temperature``: the schedule's annealed assignment temperature, for soft methods)."""

    def prior_loss(self) -> torch.Tensor | None:
        """``-log p(w)`` of a prior on the compressed weights, added to the loss at ``config.kl_weight / N``
        per example (``N`` training examples); ``None``: the plain cross-entropy."""

    def prune(self, sparsity: float) -> None:
        """Apply the global target ``sparsity`` (called after every pruning step)."""

    def freeze(self) -> None:
        """Fix the mask for fine-tuning (and quantise, for methods that quantise late)."""

    def layers(self) -> list[CompressedLayer]:
        """The materialised compressed layers."""


@dataclass
class BaselineResult:
    """A trained baseline, with the same read-out methods as :class:`~sqs_pyro.infer.result.SQSResult`."""

    method: str
    config: SQSConfig
    skeleton: nn.Module
    network: CompressedNetwork
    history: list[dict[str, float]] = field(default_factory=list)
    seconds: float = 0.0

    def compressed(self) -> CompressedNetwork:
        return self.network

    def greedy_module(self) -> nn.Module:
        """A plain module of the original architecture holding the compressed weights."""
        return self.network.load_into(copy.deepcopy(self.skeleton)).eval()

    def accounting(self) -> dict[str, Any]:
        return baseline_accounting(self.network)


def row_scale_bytes(layer: CompressedLayer) -> int:
    """Bytes of a uniform-quantisation layer's fp32 per-channel scales (0 for other layers)."""
    scale = getattr(layer, "row_scale", None)
    return 4 * scale.numel() if scale is not None else 0


def baseline_accounting(network: CompressedNetwork) -> dict[str, Any]:
    """:func:`sqs_pyro.compressed.accounting.accounting` plus the per-channel scales of the
    uniform baseline's layers, in bytes."""
    acc = accounting(network)
    extra = 0
    for entry, layer in zip(acc["layers"], network.layers):
        scales = row_scale_bytes(layer)
        entry["side_bytes"] += scales
        entry["bytes_packed"] += scales
        extra += scales
    acc["bytes_packed"] += extra
    acc["side_bytes"] += extra
    return acc


def select_weights(net: nn.Module, config: SQSConfig) -> tuple[list[CompressedSite], dict[str, torch.Tensor]]:
    """The layers SQS would compress (same selection rules) and copies of their pretrained weights."""
    sites = select_layers(net, config.include_types, config.include, config.exclude)
    return sites, {s.name: net.get_parameter(s.name).detach().clone() for s in sites}


@torch.no_grad()
def global_threshold(scores: Sequence[torch.Tensor], sparsity: float) -> float | None:
    """The value at the global ``sparsity`` quantile of ``scores`` (``None`` when nothing is pruned).

    Entries ``<=`` the returned value make up ``ceil(sparsity * N)`` entries (more on ties).
    """
    flat = torch.cat([s.reshape(-1) for s in scores])
    k = min(flat.numel(), math.ceil(sparsity * flat.numel() - 1e-9))
    if sparsity <= 0 or k < 1:
        return None
    return float(torch.kthvalue(flat, k).values)


def fit(method: str, net: nn.Module, train_data: Any, config: SQSConfig,
        make_compressor: Callable[[list[CompressedSite], dict[str, torch.Tensor], SQSConfig], Compressor],
        log_every: int | None = None) -> BaselineResult:
    """Train a baseline compressor on ``(inputs, labels)`` (tensors or a ``Dataset``) with SQS's schedule and
    minibatches; ``net`` is not modified."""
    start = time.perf_counter()
    dataset = as_dataset(train_data)
    torch.manual_seed(config.seed)
    sites, pretrained = select_weights(net, config)
    compressor = make_compressor(sites, pretrained, config)
    work = copy.deepcopy(net)
    names = set(pretrained)
    dense = [p for n, p in work.named_parameters() if n not in names and p.requires_grad]
    for n, p in work.named_parameters():
        if n in names:
            p.requires_grad_(False)
    groups = compressor.param_groups(config)
    if dense:
        groups.append({"params": dense, "lr": config.lr_dense, "name": "dense"})
    optimizer = torch.optim.Adam(groups)
    base_lrs = [g["lr"] for g in optimizer.param_groups]
    minibatches = Minibatches(dataset, config.batch_size, config.seed)
    schedule = Schedule.from_config(config, minibatches.per_epoch)
    history: list[dict[str, float]] = []
    every = log_every or config.log_every
    frozen = False
    for step, (x, y) in zip(range(schedule.total_steps), minibatches.from_step(0)):
        phase = schedule.phase(step)
        if phase == FINETUNE and not frozen:
            compressor.freeze()
            frozen = True
        for group, lr in zip(optimizer.param_groups, base_lrs):
            group["lr"] = lr * schedule.lr_factor(step)
        optimizer.zero_grad(set_to_none=True)
        weights = compressor.weights(phase, schedule.assign_temperature(step))
        loss = nn.functional.cross_entropy(functional_call(work, weights, (x,)), y)
        prior = compressor.prior_loss()
        if prior is not None:
            loss = loss + config.kl_weight * prior / len(dataset)
        if not torch.isfinite(loss):
            raise FloatingPointError(f"non-finite loss {float(loss)} at step {step} ({phase})")
        loss.backward()
        optimizer.step()
        if phase == PRUNE:
            compressor.prune(schedule.target_sparsity(step))
        if step % every == 0 or step == schedule.total_steps - 1:
            history.append({"step": step, "phase": phase, "loss": loss.item()})
    if not frozen:
        compressor.freeze()
    layers = compressor.layers()
    state = {k: v.detach().clone() for k, v in work.state_dict().items() if k not in names}
    network = CompressedNetwork(layers, state, {"method": method, **config.to_dict()})
    return BaselineResult(method, config, copy.deepcopy(net), network, history, time.perf_counter() - start)
