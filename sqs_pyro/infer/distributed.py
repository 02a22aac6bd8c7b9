r"""Data-parallel SVI on ``torch.distributed`` (launched with ``torchrun``).

Every rank holds the full model and guide, draws the same weight sample (all ranks share
the seed, so their generators stay in step) and sees its own share of each global batch.
The differentiable ELBO loss module (Pyro's ``ELBOModule``) is wrapped in
``DistributedDataParallel``, which all-reduces (averages) the gradients of the data term and
of the KL term. The scaling that makes this the single-process gradient:

* the data plate has size ``N`` (the *global* number of training examples) and each rank a
  local batch of ``b = B / W`` examples (``B`` the global batch, ``W`` the world size), so
  rank ``r``'s loss is ``L_r = -(N/b) sum_{i in batch_r} log p(y_i | x_i, W) + beta KL``;
* every rank computes the same KL of the same (global) variational parameters;
* DDP averages: ``(1/W) sum_r grad L_r = -(N/(bW)) sum_{i in global batch} grad log p(y_i | ...)
  + beta grad KL = -(N/B) sum_i grad log p(...) + beta grad KL``, the gradient of a
  single-process run on the same global batch with the same weight sample.

The optimiser steps and the pruning threshold (a deterministic function of the parameters)
are then identical on every rank, so the ranks' parameters stay bit-identical.

Launch (one process per CPU socket or GPU; gloo on CPU, NCCL on GPUs)::

    torchrun --nproc-per-node 2 -m sqs_pyro.cli compress --distributed --out runs/ddp
"""
from __future__ import annotations

import contextlib
import gc
import os
from dataclasses import dataclass
from typing import Iterator, Sequence

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from sqs_pyro.errors import SQSInputError

_TORCHRUN_ENV = ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


@dataclass(frozen=True)
class DistContext:
    """Where this process stands: its rank among ``world_size`` data-parallel processes.

    ``active`` is False for an ordinary single-process run (every method is then a no-op);
    ``device`` is the device this rank trains on in a distributed run (``None``: the
    network's own device).
    """

    rank: int = 0
    world_size: int = 1
    active: bool = False
    device: torch.device | None = None

    @property
    def is_main(self) -> bool:
        """Whether this process writes files (checkpoints, outputs) and shows progress."""
        return self.rank == 0

    def shard(self, indices: torch.Tensor) -> torch.Tensor:
        """This rank's share of a global batch (strided, like ``DistributedSampler``)."""
        return indices[self.rank::self.world_size] if self.active else indices

    def wrap(self, loss_module: nn.Module) -> nn.Module:
        """``loss_module`` wrapped in ``DistributedDataParallel`` (gradient all-reduce), if active.

        Rank 0's parameters and persistent buffers are first broadcast to all ranks (DDP's
        own initial sync would also write the zero-stride weight placeholders of
        :class:`~sqs_pyro.models.SQSModel`, which cannot be written). Parameters without a
        gradient in a step (gates during warm-up and fine-tuning) are allowed; they stay
        ``None`` on every rank, as in a single process.
        """
        if not self.active:
            return loss_module
        for tensor in loss_module.state_dict().values():
            dist.broadcast(tensor, src=0)
        device_ids = None if self.device is None or self.device.type == "cpu" else [self.device]
        return DistributedDataParallel(loss_module, device_ids=device_ids, find_unused_parameters=True,
                                       init_sync=False, forward_sync_buffers=False)

    def any(self, flag: bool, device: torch.device) -> bool:
        """Whether ``flag`` is true on any rank (one all-reduce)."""
        if not self.active:
            return flag
        t = torch.tensor(float(flag), device=device)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return bool(t.item())

    def mean(self, value: torch.Tensor) -> float:
        """The mean of a scalar over the ranks (one all-reduce)."""
        if not self.active:
            return float(value.detach())
        t = value.detach().clone().reshape(())
        dist.all_reduce(t)
        return float(t) / self.world_size


def _accelerator_device() -> torch.device | None:
    if not torch.accelerator.is_available():
        return None
    return torch.device(torch.accelerator.current_accelerator().type, int(os.environ.get("LOCAL_RANK", 0)))


@contextlib.contextmanager
def distributed_context(enabled: bool) -> Iterator[DistContext]:
    """The :class:`DistContext` of this process.

    With ``enabled`` it uses the default process group if one is initialised, or else
    initialises one from the environment ``torchrun`` sets (NCCL/XCCL/... on an
    accelerator at ``LOCAL_RANK``, gloo on CPU) and destroys it on exit, after a barrier
    when the body succeeded. Raises :class:`SQSInputError` when neither is available.
    """
    if not enabled:
        yield DistContext()
        return
    if not dist.is_available():
        raise SQSInputError("distributed training needs a torch build with torch.distributed")
    created = False
    if not dist.is_initialized():
        missing = [k for k in _TORCHRUN_ENV if k not in os.environ]
        if missing:
            raise SQSInputError(f"distributed training needs a torchrun launch (environment lacks {missing}), e.g. "
                                "torchrun --nproc-per-node 2 -m sqs_pyro.cli compress --distributed")
        device = _accelerator_device()
        if device is not None:
            torch.accelerator.set_device_index(device.index)
        dist.init_process_group(dist.get_default_backend_for_device(device or torch.device("cpu")))
        created = True
    else:
        device = _accelerator_device() if dist.get_backend() != "gloo" else None
    try:
        yield DistContext(dist.get_rank(), dist.get_world_size(), True, device)
        if created:  # no rank tears down while another is still in a collective
            dist.barrier()
    finally:
        if created:
            gc.collect()  # DDP reducers left in reference cycles go while their group still exists
            dist.destroy_process_group()


def max_abs_difference_across_ranks(tensors: Sequence[torch.Tensor]) -> float:
    """Max over ranks and elements of ``|t - t on rank 0|`` (0.0 when the ranks agree bit for bit)."""
    worst = torch.zeros((), dtype=torch.float64, device=tensors[0].device if tensors else None)
    for t in tensors:
        ref = t.detach().clone()
        dist.broadcast(ref, src=0)
        worst = torch.maximum(worst, (t.detach().double() - ref.double()).abs().max())
    dist.all_reduce(worst, op=dist.ReduceOp.MAX)
    return float(worst)
