"""Training data for every loop of the package: checks, the seeded epoch order, minibatches.

The order of epoch ``e`` is a permutation that depends on ``(seed, e)`` alone, so a resumed
run rebuilds its position in the data from the step, and SQS and the baselines see the
same minibatches for the same seed (:class:`Minibatches`).
"""
from __future__ import annotations

from typing import Any, Callable, Iterator

import numpy as np
import torch
from torch import nn
from torch.utils.data import Dataset, TensorDataset, default_collate

from sqs_pyro.data.metrics import predictive_probs
from sqs_pyro.errors import SQSInputError
from sqs_pyro.models.likelihoods import sparse_token_targets

TASKS = ("classification", "regression", "lm")


def as_dataset(data: Any) -> Dataset:
    """A torch ``Dataset`` of ``(input, target)`` pairs from a Dataset or an ``(inputs, targets)`` pair."""
    if isinstance(data, Dataset):
        return data
    if isinstance(data, (tuple, list)) and len(data) == 2 and all(isinstance(t, torch.Tensor) for t in data):
        x, y = data
        if x.shape[0] != y.shape[0]:
            raise SQSInputError(f"inputs and targets differ in length: {x.shape[0]} vs {y.shape[0]}")
        return TensorDataset(x, y)
    raise SQSInputError("train data must be an (inputs, targets) pair of tensors or a torch Dataset")


def check_data(net: nn.Module, dataset: Dataset, task: str) -> None:
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


def distillation_targets(net: nn.Module, dataset: Dataset, weight: float, batch_size: int = 256,
                         task: str = "classification") -> TensorDataset:
    """The dataset with each label ``y_i`` replaced by ``(1 - weight) onehot(y_i) + weight softmax(net(x_i))``
    (``net`` in eval mode, its training mode restored, ``batch_size`` inputs at a time), for
    :class:`CategoricalLikelihood`'s soft targets.

    ``task="lm"``: per token, the label with weight ``1 - weight`` and the teacher's
    :data:`TEACHER_TOKENS` most probable tokens with ``weight`` times their probabilities renormalised
    over those tokens, packed for :class:`TokenCategoricalLikelihood` (:func:`sparse_token_targets`)."""
    tensors = getattr(dataset, "tensors", None)
    if tensors is None:
        raise SQSInputError("distill_weight > 0 needs the train data as (inputs, labels) tensors")
    x, y = tensors
    training = net.training
    try:
        if task == "lm":
            return TensorDataset(x, _token_targets(net, x, y, weight, batch_size))
        probs = predictive_probs(net, x, batch_size).to(next(net.parameters()).dtype)
    finally:
        net.train(training)
    onehot = torch.nn.functional.one_hot(y, probs.shape[-1]).to(probs.dtype)
    return TensorDataset(x, (1.0 - weight) * onehot + weight * probs)


TEACHER_TOKENS = 32  # the teacher's tokens kept per position in a language model's soft targets


@torch.no_grad()
def _token_targets(net: nn.Module, x: torch.Tensor, y: torch.Tensor, weight: float, batch_size: int) -> torch.Tensor:
    net.eval()
    dtype = next(net.parameters()).dtype
    parts = []
    for i in range(0, len(x), batch_size):
        probs, tokens = net(x[i:i + batch_size]).softmax(-1).topk(TEACHER_TOKENS, dim=-1)
        label = y[i:i + batch_size].unsqueeze(-1)
        parts.append(sparse_token_targets(
            torch.cat([label, tokens], -1),
            torch.cat([torch.full_like(label, 1.0 - weight, dtype=dtype),
                       weight * (probs / probs.sum(-1, keepdim=True)).to(dtype)], -1)))
    return torch.cat(parts)


def epoch_permutation(num_data: int, seed: int, epoch: int) -> torch.Tensor:
    """The order of the training examples in ``epoch``: a function of ``(seed, epoch)`` alone,
    so a resumed run rebuilds its position in the data without replaying it."""
    epoch_seed = int(np.random.SeedSequence([seed, epoch]).generate_state(1, dtype=np.uint64)[0])
    return torch.randperm(num_data, generator=torch.Generator().manual_seed(epoch_seed))


def fetch(dataset: Dataset, indices: torch.Tensor) -> list[torch.Tensor]:
    """The examples at ``indices`` as stacked tensors (one per field)."""
    tensors = getattr(dataset, "tensors", None)
    if tensors is not None:
        return [t[indices] for t in tensors]
    return default_collate([dataset[i] for i in indices.tolist()])


class Minibatches:
    """Drop-last minibatches of ``batch_size`` in the seeded order of :func:`epoch_permutation`.

    ``from_step(step)`` yields the batches from global step ``step`` on, forever (epoch after
    epoch); ``shard`` picks this process's share of each global batch (data-parallel runs).
    """

    def __init__(self, dataset: Dataset, batch_size: int, seed: int,
                 shard: Callable[[torch.Tensor], torch.Tensor] = lambda idx: idx,
                 device: torch.device | None = None) -> None:
        if batch_size > len(dataset):
            raise SQSInputError(f"batch_size {batch_size} exceeds the {len(dataset)} training examples")
        self.dataset, self.batch_size, self.seed, self.shard, self.device = dataset, batch_size, seed, shard, device
        self.per_epoch = len(dataset) // batch_size

    def indices(self, step: int) -> torch.Tensor:
        """The dataset indices of the global batch at ``step`` (before sharding)."""
        epoch, b = divmod(step, self.per_epoch)
        return epoch_permutation(len(self.dataset), self.seed, epoch)[b * self.batch_size:(b + 1) * self.batch_size]

    def from_step(self, step: int = 0) -> Iterator[list[torch.Tensor]]:
        epoch, first = divmod(step, self.per_epoch)
        size = self.batch_size
        while True:
            order = epoch_permutation(len(self.dataset), self.seed, epoch)
            for b in range(first, self.per_epoch):
                batch = fetch(self.dataset, self.shard(order[b * size:(b + 1) * size]))
                yield [t.to(self.device) for t in batch] if self.device is not None else batch
            epoch, first = epoch + 1, 0


def saliency_batches(dataset: Dataset, batch_size: int, count: int, seed: int,
                     device: torch.device) -> list[list[torch.Tensor]]:
    """The first ``count`` minibatches of a seeded permutation (at least one), for gate scores."""
    order = torch.randperm(len(dataset), generator=torch.Generator().manual_seed(seed))
    return [[t.to(device) for t in fetch(dataset, order[i * batch_size:(i + 1) * batch_size])]
            for i in range(min(count, max(1, len(dataset) // batch_size)))]
