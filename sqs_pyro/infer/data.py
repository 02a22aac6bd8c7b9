"""Training data for every loop of the package: checks, the seeded epoch order, minibatches.

The order of epoch ``e`` is a permutation that depends on ``(seed, e)`` alone, so a resumed
run rebuilds its position in the data from the step, and SQS and the baselines see the
same minibatches for the same seed (:class:`Minibatches`).
"""
from __future__ import annotations

from typing import Any, Callable, Iterable, Iterator

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset, IterableDataset, TensorDataset, default_collate

from sqs_pyro.data.metrics import predictive_probs
from sqs_pyro.errors import SQSInputError
from sqs_pyro.models.likelihoods import sparse_token_targets
from sqs_pyro.models.network import network_arguments

TASKS = ("classification", "regression", "lm", "distill")
TARGET_KEY = "labels"  # the target's key in a dict batch; the other entries are the network's keyword inputs


def split_batch(batch: Any, task: str) -> tuple[Any, torch.Tensor | None]:
    """``(inputs, target)`` of a collated batch (or of an example, or of a dataset's tensors).

    A dict's :data:`TARGET_KEY` entry is the target and the others are keyword inputs; a tuple or list's
    last tensor is the target and the others positional inputs. ``task="distill"`` has no target: a
    dict's :data:`TARGET_KEY` is dropped, a tuple is all inputs, and so is a bare tensor (the targets
    are the dense network's predictions, :class:`TeacherTargets`)."""
    if isinstance(batch, dict):
        inputs = {k: v for k, v in batch.items() if k != TARGET_KEY}
        if task == "distill":
            return inputs, None
        if TARGET_KEY not in batch:
            raise SQSInputError(f"a dict batch needs its target under {TARGET_KEY!r} (found keys {sorted(batch)}); "
                                "task='distill' needs none")
        return inputs, batch[TARGET_KEY]
    if isinstance(batch, (tuple, list)):
        if task == "distill":
            return (batch[0] if len(batch) == 1 else tuple(batch)), None
        if len(batch) < 2:
            raise SQSInputError("a batch must be (inputs..., target); task='distill' needs no target")
        return (batch[0] if len(batch) == 2 else tuple(batch[:-1])), batch[-1]
    if isinstance(batch, torch.Tensor) and task == "distill":
        return batch, None
    raise SQSInputError(f"a batch must be a tuple (inputs..., target) or a dict of tensors, got "
                        f"{type(batch).__name__}")


def tensors_in(obj: Any) -> list[torch.Tensor]:
    """The tensors of a batch's inputs: a tensor, a tuple or list, or a dict of them."""
    if isinstance(obj, torch.Tensor):
        return [obj]
    items = obj.values() if isinstance(obj, dict) else obj if isinstance(obj, (tuple, list)) else ()
    return [t for item in items for t in tensors_in(item)]


def to_device(obj: Any, device: torch.device | None) -> Any:
    """A batch (tensor, tuple, list or dict of them) with every tensor on ``device`` (unchanged for ``None``)."""
    if device is None:
        return obj
    if isinstance(obj, torch.Tensor):
        return obj.to(device, non_blocking=True)
    if isinstance(obj, dict):
        return {k: to_device(v, device) for k, v in obj.items()}
    if isinstance(obj, (tuple, list)):
        return type(obj)(to_device(v, device) for v in obj)
    return obj


def _rows(obj: Any, rows: slice) -> Any:
    if isinstance(obj, torch.Tensor):
        return obj[rows]
    if isinstance(obj, dict):
        return {k: _rows(v, rows) for k, v in obj.items()}
    return type(obj)(_rows(v, rows) for v in obj)


def batch_length(inputs: Any) -> int:
    """The number of examples in a batch: the first dimension of its first input tensor."""
    tensors = tensors_in(inputs)
    if not tensors or tensors[0].dim() == 0:
        raise SQSInputError("a batch's inputs must be tensors with a batch dimension")
    return int(tensors[0].shape[0])


def as_data(data: Any, batch_size: int) -> Dataset | Iterable[Any]:
    """Training data as a map-style ``Dataset`` (tensors become a ``TensorDataset``) or a re-iterable of batches.

    Accepted: a map-style ``Dataset``; tensors ``(inputs..., targets)`` of equal length (one tensor of
    inputs for ``task="distill"``); an ``IterableDataset`` (batched by a ``DataLoader`` of ``batch_size``);
    a ``DataLoader`` or any other re-iterable of batches (a list, an object whose ``__iter__`` starts again).
    A one-pass iterator (a generator) is refused: every epoch iterates the data again."""
    if isinstance(data, torch.Tensor):
        data = (data,)
    if isinstance(data, (tuple, list)) and data and all(isinstance(t, torch.Tensor) for t in data):
        lengths = {t.shape[0] if t.dim() else 0 for t in data}
        if len(lengths) != 1:
            raise SQSInputError(f"inputs and targets differ in length: {[t.shape[0] if t.dim() else 0 for t in data]}")
        return TensorDataset(*data)
    if isinstance(data, IterableDataset):
        return DataLoader(data, batch_size=batch_size)
    if isinstance(data, Dataset) and hasattr(data, "__len__"):
        return data
    if isinstance(data, Iterable) and not isinstance(data, (str, bytes, dict)):
        if iter(data) is data:
            raise SQSInputError(f"train data is a one-pass iterator ({type(data).__name__}); give a re-iterable "
                                "of batches (a DataLoader, a list) so that every epoch can iterate it again")
        return data
    raise SQSInputError("train data must be tensors (inputs..., targets), a torch Dataset, a DataLoader or a "
                        f"re-iterable of batches, got {type(data).__name__}")


def as_dataset(data: Any) -> Dataset:
    """A map-style ``Dataset`` from a Dataset or tensors ``(inputs..., targets)`` (see :func:`as_data`)."""
    dataset = as_data(data, 1)
    if not isinstance(dataset, Dataset):
        raise SQSInputError("train data must be tensors (inputs, targets) or a map-style torch Dataset here")
    return dataset


def _probe(net: nn.Module, inputs: Any, name: str) -> torch.Tensor:
    """``net(inputs)`` in eval mode (running statistics untouched) without gradients, on the network's device."""
    training = net.training
    device = next(net.parameters()).device
    args, kwargs = network_arguments(to_device(inputs, device))
    shapes = [tuple(t.shape) for t in tensors_in(inputs)]
    try:
        with torch.no_grad():
            out = net.eval()(*args, **kwargs)
    except Exception as exc:  # noqa: BLE001 - re-raised with context
        raise SQSInputError(f"the network cannot process the {name} inputs of shape{'s' * (len(shapes) > 1)} "
                            f"{', '.join(map(str, shapes))}: {type(exc).__name__}: {exc}") from exc
    finally:
        net.train(training)
    if not isinstance(out, torch.Tensor):
        raise SQSInputError(f"the network must return a tensor, got {type(out).__name__}")
    return out.cpu()


def _check_values(inputs: Any, y: torch.Tensor | None, name: str) -> None:
    if any(t.is_floating_point() and not torch.isfinite(t).all() for t in tensors_in(inputs)):
        raise SQSInputError(f"{name} inputs contain NaN or Inf")
    if y is not None and y.is_floating_point() and not torch.isfinite(y).all():
        raise SQSInputError(f"{name} targets contain NaN or Inf")


def _check_loss(loss_fn: Callable[..., torch.Tensor], out: torch.Tensor, probe_y: torch.Tensor | None) -> None:
    loss = loss_fn(out, probe_y)
    if not (isinstance(loss, torch.Tensor) and loss.shape == out.shape[:1]):
        raise SQSInputError(f"loss_fn must return one loss per example, shape {tuple(out.shape[:1])}, got "
                            f"{tuple(loss.shape) if isinstance(loss, torch.Tensor) else type(loss).__name__}")
    if not torch.isfinite(loss).all():
        raise SQSInputError("loss_fn returns NaN or Inf on the dense network's outputs")


def _check_targets(out: torch.Tensor, y: torch.Tensor | None, task: str) -> None:
    """The targets ``y`` fit the task and the network's outputs ``out`` (compared beyond the batch dimension)."""
    if task == "distill":
        if out.dim() != 2:
            raise SQSInputError(f"task='distill' needs logits of shape (batch, classes), got {tuple(out.shape)}")
        return
    if y is None:
        raise SQSInputError(f"a {task} task needs targets")
    if task in ("classification", "lm"):
        if y.is_floating_point():
            raise SQSInputError(f"{task} targets must be integer labels, got dtype {y.dtype}")
        if y.shape[1:] != out.shape[1:-1]:
            raise SQSInputError(f"classification targets of shape {tuple(y.shape)} do not match the network's "
                                f"logits of shape {tuple(out.shape)}: give one class index per example")
        num_classes = out.shape[-1]
        if y.numel() and (int(y.min()) < 0 or int(y.max()) >= num_classes):
            raise SQSInputError(f"labels out of range: found [{int(y.min())}, {int(y.max())}], "
                                f"the network has {num_classes} outputs")
        return
    if y.shape[1:] != out.shape[1:]:
        raise SQSInputError(f"regression targets of shape {tuple(y.shape)} do not match the network's "
                            f"outputs of shape {tuple(out.shape)}")


def check_data(net: nn.Module, data: Dataset | Iterable[Any], task: str,
               loss_fn: Callable[..., torch.Tensor] | None = None, name: str = "train") -> tuple[int, int | None]:
    """Fail fast on empty data, non-finite values, wrong target types or shapes, labels out of range,
    inputs the network cannot process (a probe in eval mode on the network's device; the data may sit
    elsewhere). Returns the number of examples and, for a re-iterable of batches, of batches per pass.

    A ``TensorDataset`` is checked whole; another ``Dataset`` through its first example; a
    re-iterable of batches batch by batch (one pass, the network probed on the first). ``name`` says which
    data the messages are about.
    """
    if isinstance(data, Dataset):
        if len(data) == 0:
            raise SQSInputError(f"{name} data is empty")
        tensors = getattr(data, "tensors", None)
        inputs, y = split_batch(tensors if tensors is not None else default_collate([data[0]]), task)
        _check_values(inputs, y, name)
        out = _probe(net, _rows(inputs, slice(0, 2)), name)
        if loss_fn is not None:
            _check_loss(loss_fn, out, None if y is None else y[:2])
        else:
            _check_targets(out, y, task)
        return len(data), None
    num_data = num_batches = 0
    out = None
    for batch in data:
        inputs, y = split_batch(batch, task)
        rows = batch_length(inputs)
        if y is not None and y.shape[:1] != (rows,):
            raise SQSInputError(f"batch {num_batches}: {rows} inputs but targets of shape {tuple(y.shape)}")
        _check_values(inputs, y, name)
        if out is None:
            out = _probe(net, _rows(inputs, slice(0, 2)), name)
            if loss_fn is not None:
                _check_loss(loss_fn, out, None if y is None else y[:2])
        if loss_fn is None:
            _check_targets(out, y, task)
        num_data, num_batches = num_data + rows, num_batches + 1
    if num_data == 0:
        raise SQSInputError(f"{name} data is empty")
    return num_data, num_batches


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


def fetch(dataset: Dataset, indices: torch.Tensor) -> Any:
    """The examples at ``indices`` collated: stacked tensors (one per field), or a dict of them."""
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
                 shard: Callable[[torch.Tensor], torch.Tensor] = lambda idx: idx) -> None:
        if batch_size > len(dataset):
            raise SQSInputError(f"batch_size {batch_size} exceeds the {len(dataset)} training examples")
        self.dataset, self.batch_size, self.seed, self.shard = dataset, batch_size, seed, shard
        self.per_epoch = len(dataset) // batch_size

    def indices(self, step: int) -> torch.Tensor:
        """The dataset indices of the global batch at ``step`` (before sharding)."""
        epoch, b = divmod(step, self.per_epoch)
        return epoch_permutation(len(self.dataset), self.seed, epoch)[b * self.batch_size:(b + 1) * self.batch_size]

    def from_step(self, step: int = 0) -> Iterator[Any]:
        epoch, first = divmod(step, self.per_epoch)
        size = self.batch_size
        while True:
            order = epoch_permutation(len(self.dataset), self.seed, epoch)
            for b in range(first, self.per_epoch):
                batch = fetch(self.dataset, self.shard(order[b * size:(b + 1) * size]))
                yield batch
            epoch, first = epoch + 1, 0


def saliency_batches(dataset: Dataset, batch_size: int, count: int, seed: int,
                     device: torch.device) -> list[list[torch.Tensor]]:
    """The first ``count`` minibatches of a seeded permutation (at least one), for gate scores."""
    order = torch.randperm(len(dataset), generator=torch.Generator().manual_seed(seed))
    return [to_device(fetch(dataset, order[i * batch_size:(i + 1) * batch_size]), device)
            for i in range(min(count, max(1, len(dataset) // batch_size)))]


class DatasetBatches:
    """A map-style dataset's :class:`Minibatches` as ``(inputs, target)`` pairs (:func:`split_batch`) on ``device``;
    resumed runs continue exactly (the order is a function of the seed and the epoch)."""

    def __init__(self, dataset: Dataset, batch_size: int, seed: int, task: str,
                 shard: Callable[[torch.Tensor], torch.Tensor] = lambda idx: idx,
                 device: torch.device | None = None) -> None:
        self.minibatches = Minibatches(dataset, batch_size, seed, shard)
        self.task, self.device = task, device
        self.num_data, self.per_epoch = len(dataset), self.minibatches.per_epoch

    def from_step(self, step: int = 0) -> Iterator[tuple[Any, torch.Tensor | None]]:
        """The batches from global step ``step`` on, forever (epoch after epoch)."""
        for batch in self.minibatches.from_step(step):
            yield split_batch(to_device(batch, self.device), self.task)

    def first(self, count: int) -> list[tuple[Any, torch.Tensor | None]]:
        """``count`` batches for the gate scores (:func:`saliency_batches`)."""
        m = self.minibatches
        return [split_batch(b, self.task) for b in saliency_batches(m.dataset, m.batch_size, count, m.seed, self.device)]


class LoaderBatches:
    """A re-iterable of batches (a ``DataLoader``, a list) as ``(inputs, target)`` pairs on ``device``: each epoch
    iterates it again, in its own order; a resumed run skips the batches of the current epoch already seen
    (the same batches again only when the loader's order is fixed)."""

    def __init__(self, loader: Iterable[Any], task: str, num_data: int, num_batches: int,
                 device: torch.device | None = None) -> None:
        self.loader, self.task, self.device = loader, task, device
        self.num_data, self.per_epoch = num_data, num_batches

    def from_step(self, step: int = 0) -> Iterator[tuple[Any, torch.Tensor | None]]:
        """The batches from global step ``step`` on, forever (epoch after epoch)."""
        skip = step % self.per_epoch
        while True:
            for b, batch in enumerate(self.loader):
                if b >= skip:
                    yield split_batch(to_device(batch, self.device), self.task)
            skip = 0

    def first(self, count: int) -> list[tuple[Any, torch.Tensor | None]]:
        """The loader's first ``count`` batches (at most one pass), for the gate scores."""
        batches = self.from_step(0)
        return [next(batches) for _ in range(min(count, self.per_epoch))]


class TeacherTargets:
    """A batch source whose targets are the dense network's predictive probabilities ``softmax(f(x; W_dense))``
    (``task="distill"``): the teacher runs in eval mode without gradients on every batch."""

    def __init__(self, source: DatasetBatches | LoaderBatches, teacher: nn.Module) -> None:
        self.source, self.teacher = source, teacher.eval()
        self.num_data, self.per_epoch = source.num_data, source.per_epoch

    @torch.no_grad()
    def targets(self, inputs: Any) -> torch.Tensor:
        args, kwargs = network_arguments(inputs)
        return self.teacher(*args, **kwargs).softmax(-1)

    def from_step(self, step: int = 0) -> Iterator[tuple[Any, torch.Tensor]]:
        for inputs, _ in self.source.from_step(step):
            yield inputs, self.targets(inputs)

    def first(self, count: int) -> list[tuple[Any, torch.Tensor]]:
        return [(inputs, self.targets(inputs)) for inputs, _ in self.source.first(count)]


BatchSource = DatasetBatches | LoaderBatches | TeacherTargets  # what the Trainer draws its (inputs, target) pairs from
