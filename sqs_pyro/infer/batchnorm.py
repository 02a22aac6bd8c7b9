"""BatchNorm during and after compression: pretrained running statistics kept frozen while SVI learns
the weights, and optionally re-estimated on the user's data once the compressed network is materialised."""
from __future__ import annotations

from typing import Any, Iterable

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from sqs_pyro.models.network import network_arguments

BATCHNORM_MODES = ("frozen", "recalibrate", "train")


def batchnorm_layers(net: nn.Module) -> list[tuple[str, _BatchNorm]]:
    """The network's BatchNorm layers (1d, 2d, 3d, sync) by name."""
    return [(name, m) for name, m in net.named_modules() if isinstance(m, _BatchNorm)]


def freeze_batchnorm(net: nn.Module) -> None:
    """Put every BatchNorm layer in eval mode: it normalises with its running statistics and never updates them
    (the rest of the network keeps its mode). Its affine weight and bias stay learnable."""
    for _, m in batchnorm_layers(net):
        m.eval()


@torch.no_grad()
def recalibrate_batchnorm(net: nn.Module, inputs: Iterable[Any]) -> int:
    r"""Re-estimate every BatchNorm layer's running statistics of ``net`` from the batches' inputs (a tensor, a
    tuple of positional or a dict of keyword inputs each): the statistics are reset and the cumulative
    average over the batches is kept (``momentum=None``: ``mu = (1/T) sum_t mean_t``, likewise the unbiased
    variances), with the rest of the network in eval mode. Returns the number of batches; ``net`` ends in
    eval mode with each layer's momentum restored."""
    layers = [m for _, m in batchnorm_layers(net)]
    momenta = [m.momentum for m in layers]
    net.eval()
    count = 0
    try:
        for m in layers:
            m.reset_running_stats()
            m.momentum = None
            m.train()
        for batch in inputs:
            args, kwargs = network_arguments(batch)
            net(*args, **kwargs)
            count += 1
    finally:
        for m, momentum in zip(layers, momenta):
            m.momentum = momentum
        net.eval()
    return count


def copy_batchnorm_statistics(source: nn.Module, target: nn.Module) -> None:
    """Copy the running statistics (mean, variance, batch count) of ``source``'s BatchNorm layers into
    ``target``'s layers of the same names."""
    layers = dict(batchnorm_layers(target))
    for name, m in batchnorm_layers(source):
        for attr in ("running_mean", "running_var", "num_batches_tracked"):
            value = getattr(m, attr)
            if value is not None:
                getattr(layers[name], attr).copy_(value)
