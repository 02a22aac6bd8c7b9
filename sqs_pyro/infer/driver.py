"""The entry point: ``compress(net, data, config)`` learns the SQS posterior of a network.

It builds the Pyro model (:class:`~sqs_pyro.models.SQSModel`) and the mean-field guide
(:class:`~sqs_pyro.guides.SpikeGMMGuide`), wraps them in Pyro's ``TraceMeanField_ELBO`` (as
:class:`~sqs_pyro.infer.elbo.SQSMeanFieldELBO`, which skips unused log-densities) as a torch module
(so the registered KL bound is used analytically), and optimises
``-ELBO = -E_q[log p(D|W)] + beta KL(q||p)`` with Adam through three phases:

1. warm-up: gates fixed open, codebooks and latent weights learn;
2. pruning: gates learn; after every step the inclusion logits below the global quantile
   ``s_t`` (cubic ramp) are reset to ``pruned_logit`` (they may recover);
3. fine-tuning: the mask ``g_j > 0.5`` is frozen; codebooks and assignments keep learning.

The loop lives in :class:`~sqs_pyro.infer.trainer.Trainer`, whose ``state_dict()`` is a checkpoint (model, guide,
optimiser, step, learning-rate scale, history, RNG states; the data order is a function of
the seed and the epoch, so the step fixes the position in the data). Checkpoints are taken
every ``checkpoint_every`` steps and at phase changes (see :mod:`sqs_pyro.infer.checkpoint`); a
non-finite loss or gradient rolls back to the last one with half the learning rate; and
``distributed=True`` runs data-parallel over ``torchrun`` processes (see
:mod:`sqs_pyro.infer.distributed`).
"""
from __future__ import annotations

import copy
import os
import time
from pathlib import Path
from typing import Any, Callable, Mapping

import pyro
import torch
from torch import nn
from torch.utils.data import Dataset

from sqs_pyro.compressed.materialize import CompressedNetwork
from sqs_pyro.config import SQSConfig
from sqs_pyro.errors import SQSInputError
from sqs_pyro.guides.gate_scores import gate_scores
from sqs_pyro.guides.initialization import StartCoding
from sqs_pyro.guides.spike_gmm import GateState, SpikeGMMGuide
from sqs_pyro.infer.checkpoint import CHECKPOINT_NAME, load_checkpoint
from sqs_pyro.infer.batchnorm import BATCHNORM_MODES, copy_batchnorm_statistics, freeze_batchnorm, recalibrate_batchnorm
from sqs_pyro.infer.data import (TASKS, BatchSource, DatasetBatches, LoaderBatches, TeacherTargets, as_data, check_data,
                                 distillation_targets)
from sqs_pyro.infer.devices import resolve_device
from sqs_pyro.infer.distributed import distributed_context
from sqs_pyro.infer.result import SQSResult
from sqs_pyro.infer.schedules import Schedule
from sqs_pyro.infer.trainer import Trainer
from sqs_pyro.models.block_checkpoints import repeated_blocks
from sqs_pyro.models.likelihoods import (CategoricalLikelihood, GaussianLikelihood, LossLikelihood,
                                         TokenCategoricalLikelihood)
from sqs_pyro.models.network import SQSModel
from sqs_pyro.models.selection import CompressedSite, select_layers


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


def _start_coding(start: CompressedNetwork | None, sites: list[CompressedSite],
                  config: SQSConfig) -> dict[str, StartCoding]:
    """The guide's start codings from a compressed network, after checking it fits the run."""
    if start is None:
        return {}
    if not isinstance(start, CompressedNetwork):
        raise SQSInputError(f"start must be a CompressedNetwork, got {type(start).__name__}")
    layers = {layer.name: layer for layer in start.layers}
    if sorted(layers) != sorted(s.name for s in sites):
        raise SQSInputError(f"start's layers {sorted(layers)[:4]} are not the compressed sites "
                            f"{sorted(s.name for s in sites)[:4]}")
    for site in sites:
        layer = layers[site.name]
        problems = [(tuple(layer.shape) != tuple(site.shape), "its shape differs"),
                    (layer.components != config.components,
                     f"it has {layer.components} levels, not components={config.components}"),
                    (layer.group_size != config.group_size,
                     f"its group size is {layer.group_size}, not group_size={config.group_size}"),
                    (layer.num_exact > 0, "it has exact weights"),
                    (layer.nnz < layer.numel and config.sparsity == 0, "it is pruned and sparsity=0")]
        problem = next((message for bad, message in problems if bad), None)
        if problem:
            raise SQSInputError(f"start layer {site.name} cannot start this run: {problem}")
    return {name: StartCoding(layer.codes, layer.codebook, layer.scales, None if layer.nnz == layer.numel else layer.mask)
            for name, layer in layers.items()}


def _check_start_mask(start: CompressedNetwork | None, sparsity: float) -> None:
    """A run without pruning steps keeps its start's mask: one must be given, at ``sparsity``."""
    if start is None:
        raise SQSInputError("the schedule has no pruning steps; increase epochs or prune_fraction (or start from "
                            "a network pruned to the target sparsity, whose mask the run then keeps)")
    kept = sum(layer.nnz for layer in start.layers) / sum(layer.numel for layer in start.layers)
    if abs((1.0 - kept) - sparsity) > 5e-3:
        raise SQSInputError(f"the schedule has no pruning steps, so the run keeps its start's mask, whose sparsity "
                            f"{1.0 - kept:.4f} is not sparsity={sparsity}; increase epochs or prune_fraction")


def _initial_scores(net: nn.Module, sites: list[CompressedSite], source: BatchSource, task: str, config: SQSConfig,
                    coding: dict[str, StartCoding], loss_fn: Callable[..., torch.Tensor] | None
                    ) -> dict[str, torch.Tensor] | None:
    """The guide's gate scores (``None``: magnitudes); a pruned start's masks rank them first."""
    scores = None
    if config.gate_score != "magnitude":
        mean_loss = None if loss_fn is None else (lambda out, y: loss_fn(out, y).mean())
        scores = gate_scores(net, sites, source.first(config.saliency_batches), task, config.gate_score, mean_loss)
    if any(c.mask is not None for c in coding.values()):
        base = scores or {s.name: net.get_parameter(s.name).detach().abs() for s in sites}
        scores = {name: coding[name].gate_scores(score) for name, score in base.items()}
    return scores


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
    start: CompressedNetwork | None = None,
    checkpoint_blocks: bool = False,
    loss_fn: Callable[[torch.Tensor, torch.Tensor | None], torch.Tensor] | None = None,
    batchnorm: str = "frozen",
    device: str | torch.device | None = None,
    bf16: bool = False,
) -> SQSResult:
    """Learn the SQS posterior of ``net`` on ``train_data`` and return an :class:`SQSResult`.

    Args:
        net: a trained network; it is copied, never modified.
        train_data: tensors ``(inputs..., targets)`` of equal length; a map-style ``Dataset`` of examples; a
            ``DataLoader``, ``IterableDataset`` or any re-iterable of batches (a list, not a generator). A
            batch (or example) is a tuple ``(inputs..., target)``, the network called as ``net(*inputs)``,
            or a dict of keyword inputs ``net(**inputs)`` with the target under ``"labels"``; with
            ``task="distill"`` every entry is an input. A map-style dataset is drawn in the seeded order of
            ``config.batch_size`` minibatches (resumes exactly); a re-iterable's own batches are used as
            they come, one epoch a pass (``config.batch_size`` then only batches an ``IterableDataset``).
        config: an :class:`SQSConfig` (defaults if ``None``).
        task: ``"classification"`` (categorical likelihood on logits), ``"regression"``
            (Gaussian likelihood with standard deviation ``noise_scale``) or ``"lm"`` (token
            ids ``(N, L)`` in, next-token targets ``(N, L)``, logits ``(N, L, V)``; N counts sequences) or
            ``"distill"`` (no labels: the targets are the dense network's predictive distribution
            ``softmax(f(x; W_dense))``, the site the factor ``sum_c t_c log softmax(f(x; W))_c``, so the data term
            is minus N times the cross-entropy to the dense network, ``-N (KL + H(t))`` on average).
        eval_fn: called with the current greedy module at each phase end, every
            ``eval_every`` steps (if > 0) and at the end; its numbers join the history.
        progress: show a progress bar with the NLL, KL, sparsity and bits.
        checkpoint_dir: folder of ``checkpoint.pt``, written atomically at the start, every
            ``checkpoint_every`` steps (0: only at the start, phase changes and the end), at
            both phase changes and at the end. Checkpoints are kept in memory either way.
        resume: continue from ``checkpoint_dir/checkpoint.pt`` (same config, data and network).
        distributed: data-parallel training over the ``torch.distributed`` processes of a
            ``torchrun`` launch (see :mod:`sqs_pyro.infer.distributed`); ``config.batch_size`` is
            the global batch, split evenly over the ranks.
        max_rollbacks: a non-finite loss or gradient restores the last checkpoint and halves
            the learning rate up to this many times; the next divergence raises
            :class:`~sqs_pyro.errors.SQSDivergenceError`.
        start: a compressed network of ``net`` to start from, e.g. a one-shot quantised one
            (:func:`~sqs_pyro.compressed.oneshot.quantize_network`): one layer without exact
            weights per compressed site, with ``config.components`` levels and
            ``config.group_size``. The guide starts on its codes and levels (the greedy network
            at step 0 is ``start`` when its sparsity is ``config.sparsity``), the model's group
            scales at its scales. A pruned start (``config.sparsity > 0``) ranks the gates: every
            weight it kept above every weight it pruned, the gate scores within each set. A
            schedule without pruning steps (``prune_fraction=0``) keeps a pruned start's mask from
            the first step: the gates never learn, so they cost no optimiser state.
        checkpoint_blocks: recompute the network's repeated blocks (the members of its
            ``nn.ModuleList`` objects: a transformer's layers) in the backward pass instead of keeping
            their activations; the same loss and gradients for a second forward pass of the blocks.
        loss_fn: a per-example loss ``loss_fn(outputs, targets) -> (B,)`` that replaces the task's likelihood:
            it becomes the Pyro factor ``-loss_i`` in the data plate (:class:`~sqs_pyro.models.LossLikelihood`),
            ``p(y_i | x_i, W)`` proportional to ``exp(-loss_i)``, scaled by ``N/B`` so that the data term is the loss summed
            over the N examples; it should be a negative log-likelihood in nats to weigh correctly against the
            KL. ``task`` still decides the targets (``"distill"``: the dense network's probabilities).
        batchnorm: ``"frozen"`` (default) keeps the pretrained running statistics of BatchNorm layers during SVI
            (they normalise with them, as at inference); ``"recalibrate"`` also re-estimates them on one pass
            over the training inputs through the greedy compressed network at the end (the file then holds
            those); ``"train"`` leaves BatchNorm layers in the network's mode (train mode: batch statistics,
            running statistics drifting to the compression data). The file holds the statistics in every case.
        device: where to train: ``"cpu"``, ``"cuda"``, ``"cuda:N"``, ``"auto"`` (CUDA when present) or ``None``
            (the network's device). The data may stay on the CPU: each batch is moved to the device.
        bf16: run the loss's forward pass (network and likelihood) under ``torch.autocast`` in bfloat16 (for
            GPUs with bfloat16 units; parameters, optimiser state and the KL stay float32).

    Everything a user passes is checked (raising :class:`SQSInputError`) before the guide is
    built or any step runs.
    """
    config = config or SQSConfig()
    if not isinstance(config, SQSConfig):
        raise SQSInputError(f"config must be an SQSConfig, got {type(config).__name__}")
    if task not in TASKS:
        raise SQSInputError(f"task must be one of {TASKS}, got {task!r}")
    if batchnorm not in BATCHNORM_MODES:
        raise SQSInputError(f"batchnorm must be one of {BATCHNORM_MODES}, got {batchnorm!r}")
    path = _check_checkpoint_options(checkpoint_dir, checkpoint_every, resume, max_rollbacks)
    if device is not None:
        net = copy.deepcopy(net).to(resolve_device(device))
    data = as_data(train_data, config.batch_size)
    if distributed and not isinstance(data, Dataset):
        raise SQSInputError("distributed runs need tensors or a map-style Dataset (each rank draws its share of "
                            "the seeded minibatches), not a DataLoader or an iterable of batches")
    sites = select_layers(net, config.include_types, config.include, config.exclude)
    if config.distill_weight > 0 and task in ("regression", "distill"):
        raise SQSInputError(f"distill_weight applies to classification and lm tasks, not to a {task} task")
    num_data, num_batches = check_data(net, data, task, loss_fn)
    coding = _start_coding(start, sites, config)
    blocks = repeated_blocks(net) if checkpoint_blocks else []
    if checkpoint_blocks and not blocks:
        raise SQSInputError("checkpoint_blocks needs repeated blocks (members of an nn.ModuleList, such as a "
                            f"transformer's layers); {type(net).__name__} has none")
    if num_batches is None and config.batch_size > num_data:
        raise SQSInputError(f"batch_size {config.batch_size} exceeds the {num_data} training examples")
    if config.distill_weight > 0:  # the teacher's pass, once every input is checked
        if not isinstance(data, Dataset):
            raise SQSInputError("distill_weight > 0 needs the train data as (inputs, labels) tensors; "
                                "task='distill' distils from any data")
        data = distillation_targets(net, data, config.distill_weight, task=task,
                                    **({"batch_size": config.batch_size} if task == "lm" else {}))

    started = time.perf_counter()
    with distributed_context(distributed) as ctx:
        if config.batch_size % ctx.world_size:
            raise SQSInputError(f"batch_size {config.batch_size} (the global batch) must be divisible by the "
                                f"{ctx.world_size} processes")
        schedule = Schedule.from_config(config, num_batches or num_data // config.batch_size)
        if config.sparsity > 0 and schedule.prune_end == schedule.prune_start:
            _check_start_mask(start, config.sparsity)
        saved = load_checkpoint(path) if resume else None
        if saved is not None:
            check_resumable(saved, config, task, num_data, sites)
        if ctx.device is not None:
            net = copy.deepcopy(net).to(ctx.device)
        device = next(net.parameters()).device
        source: BatchSource = (DatasetBatches(data, config.batch_size, config.seed, task, ctx.shard, device)
                               if num_batches is None else LoaderBatches(data, task, num_data, num_batches, device))
        if task == "distill":
            source = TeacherTargets(source, copy.deepcopy(net))
        pyro.set_rng_seed(config.seed)
        with pyro.settings.context(module_local_params=True):
            likelihood = (LossLikelihood(num_data, loss_fn) if loss_fn is not None else
                          {"classification": lambda: CategoricalLikelihood(num_data),
                           "distill": lambda: CategoricalLikelihood(num_data),
                           "lm": lambda: TokenCategoricalLikelihood(num_data),
                           "regression": lambda: GaussianLikelihood(num_data, noise_scale)}[task]())
            model = SQSModel(net, sites, config, likelihood,
                             {n: c.scales for n, c in coding.items() if c.scales is not None}, blocks)
            if batchnorm != "train":
                freeze_batchnorm(model.net)
            # the scores are passed, not kept: a weight-sized tensor per site, needed only here
            guide = SpikeGMMGuide(net, sites, config, _initial_scores(net, sites, source, task, config, coding, loss_fn),
                                  coding)
            if config.empirical_bayes:
                model.update_hyperpriors(guide.distributions())
            result = SQSResult(config, net, model, guide)  # net: the architecture, never modified
            trainer = Trainer(result, schedule, source, task, ctx, device, started, bf16)
            if saved is not None:
                trainer.load_state_dict(saved)
            trainer.train(eval_fn, eval_every, progress, path if ctx.is_main else None, checkpoint_every,
                          max_rollbacks)
            if guide.layers[0].state != GateState.FROZEN:
                guide.freeze_mask()
    if batchnorm == "recalibrate":
        greedy = result.greedy_module()
        batches = source.from_step(0)
        recalibrate_batchnorm(greedy, (next(batches)[0] for _ in range(source.per_epoch)))
        copy_batchnorm_statistics(greedy, result.model.net)
    result.seconds = trainer.seconds
    result.evaluate(eval_fn, schedule.end, "final")
    return result


