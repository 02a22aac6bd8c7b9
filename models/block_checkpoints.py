r"""Block checkpoints: a network's repeated blocks (its transformer layers) keep only their inputs for the
backward pass and run again, with the same sampled weights, when the backward pass reaches them.

A transformer of ``L`` layers holds every layer's activations from the forward pass to the backward pass
(about 40 MB per SmolLM2-sized layer at 8 x 128 tokens, by ``benchmarks/lm_memory.py``); with block
checkpoints it holds the ``L`` layer inputs and one layer's activations at a time, for a second forward
pass of the layers. The recomputation repeats the forward's operations on the same tensors, so the loss
and the gradients are the same bits (:func:`torch.utils.checkpoint.checkpoint`, non-reentrant).

The sampled weights reach the network through ``functional_call``, which has put the placeholders back
by the time the backward pass recomputes a block; each checkpointed block therefore remembers the
weights it ran with and installs them again for its recomputation. A group-scaled weight ``w = sigma * u``
is remembered as its recipe ``(u, sigma)`` (:mod:`~sqs_pyro.models.group_scales`) and made again, so that
no block keeps a weight-sized tensor alive between the passes.
"""
from __future__ import annotations

import contextlib
from typing import Callable, Iterator, Sequence

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from sqs_pyro.models.group_scales import Recipe, product_recipes, recall, remember


def repeated_blocks(net: nn.Module) -> list[str]:
    """Names of the members of the outermost ``nn.ModuleList`` objects of ``net`` (a transformer's layers)."""
    lists = [name for name, m in net.named_modules() if isinstance(m, nn.ModuleList)]
    outer = [name for name in lists if not any(name.startswith(f"{other}.") for other in lists if other != name)]
    return [f"{name}.{i}" if name else str(i) for name in outer for i in range(len(net.get_submodule(name)))]


@contextlib.contextmanager
def checkpointed_blocks(blocks: Sequence[nn.Module],
                        products: Sequence[tuple[torch.Tensor, torch.Tensor, torch.Tensor, int]] = ()) -> Iterator[None]:
    """Within this context every module of ``blocks`` is checkpointed when it runs with gradients.

    ``products``: the scaled weights ``(w, u, sigma, G)`` of the forward pass (see
    :func:`~sqs_pyro.models.group_scales.recomputed_products`), remembered by recipe."""
    recipes = product_recipes(products)
    for block in blocks:
        block.forward = _checkpointed(block, block.forward, recipes)  # an instance attribute, deleted on exit
    try:
        yield
    finally:
        for block in blocks:
            del block.forward


def _checkpointed(block: nn.Module, forward: Callable, recipes: dict[int, Recipe]) -> Callable:
    def run(*args, **kwargs):
        if not torch.is_grad_enabled():
            return forward(*args, **kwargs)
        # the tensors in the block's buffers now (the sampled weights among them), scaled weights by recipe
        kept = [(owner, attr, remember(t, recipes), t.requires_grad) for owner in block.modules()
                for attr, t in owner._buffers.items() if t is not None]
        calls = []

        def body(*a, **k):
            calls.append(None)
            if len(calls) == 1:  # the forward pass: the sampled weights are in place
                return forward(*a, **k)
            with _installed(kept):  # the backward pass's recomputation
                return forward(*a, **k)

        return checkpoint(body, *args, use_reentrant=False, **kwargs)

    return run


@contextlib.contextmanager
def _installed(kept: list[tuple[nn.Module, str, torch.Tensor | tuple, bool]]) -> Iterator[None]:
    """The remembered tensors in the blocks' buffers again (a scaled weight made again needs a gradient where
    the forward's did, so that autograd saves the same tensors), the placeholders back afterwards."""
    previous = [(owner, attr, owner._buffers[attr]) for owner, attr, _, _ in kept]
    for owner, attr, value, requires_grad in kept:
        t = recall(value)
        owner._buffers[attr] = t if t is value else t.requires_grad_(requires_grad)
    try:
        yield
    finally:
        for owner, attr, t in previous:
            owner._buffers[attr] = t
