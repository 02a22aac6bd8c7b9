r"""Calibration of a transformer one decoder block at a time, within a small memory budget.

The input second moments ``H = X^T X / n`` of the Linear weights
(:func:`~sqs_pyro.compressed.error_feedback.input_hessians`) of a whole model take ``C^2`` floats
per matrix, more than the model itself. Here the calibration windows run through the model once,
block by block: the hidden states entering the first decoder block are caught (with the keyword
arguments the model passes to its blocks: rotary embeddings, masks), then every block in turn is
run on them with its Linear inputs recorded, its moments handed out, and its outputs kept as the
next block's inputs (a batch's outputs replacing its inputs as soon as they are made). Only one
block's moments and one set of hidden states are held at a time, and the moments equal those of
the full forward pass.
"""
from __future__ import annotations

import contextlib
from typing import Callable, Iterator, Sequence

import torch
from torch import nn

from sqs_pyro.compressed.error_feedback import recorded_hessians
from sqs_pyro.models.selection import CompressedSite


class _Caught(Exception):
    """Raised by a hook once the inputs it waits for are recorded (the rest of the pass is not run)."""


def decoder_blocks(model: nn.Module, sites: Sequence[CompressedSite]) -> tuple[str, nn.ModuleList]:
    """``(path, blocks)``: the ``nn.ModuleList`` of ``model`` that holds the most selected weights."""
    names = [s.name for s in sites]
    lists = [(path, m) for path, m in model.named_modules() if isinstance(m, nn.ModuleList)]
    held = lambda path: sum(n.startswith(path + ".") for n in names)  # noqa: E731
    best = max(lists, key=lambda pm: held(pm[0]), default=None)
    if best is None or not held(best[0]):
        raise ValueError("no ModuleList of blocks holds a selected weight")
    return best


def _run_until(net: nn.Module, batches: Sequence[torch.Tensor], module: nn.Module, hook: Callable,
               with_kwargs: bool = False) -> None:
    """Pass each batch as ``net(x)`` with ``hook`` as ``module``'s forward pre-hook; a hook that raises
    :class:`_Caught` ends that batch's pass there. The hook is removed afterwards, whatever happens."""
    handle = module.register_forward_pre_hook(hook, with_kwargs=with_kwargs)
    try:
        for x in batches:
            try:
                net(x)
            except _Caught:
                pass
    finally:
        handle.remove()


@torch.no_grad()
def blockwise_hessians(net: nn.Module, sites: Sequence[CompressedSite], batches: Sequence[torch.Tensor]
                       ) -> Iterator[tuple[list[CompressedSite], dict[str, torch.Tensor]]]:
    """``(block's sites, their input second moments)`` for each decoder block of ``net`` that holds a
    selected weight, in block order (each batch passed as ``net(x)``; the moments are
    :func:`~sqs_pyro.compressed.error_feedback.input_hessians`'). A block is run after the caller has
    been given the previous one's; the blocks run with the weights they have then (unchanged by the
    one-shot quantiser, so the moments are the dense model's)."""
    path, blocks = decoder_blocks(net, sites)
    caught: list[tuple[torch.Tensor, dict]] = []

    def catch(module, args, kwargs):
        caught.append((args[0] if args else kwargs["hidden_states"],
                       {k: v for k, v in kwargs.items() if k != "hidden_states"}))
        raise _Caught

    _run_until(net, batches, blocks[0], catch, with_kwargs=True)
    for i, block in enumerate(blocks):
        mine = [s for s in sites if s.name.startswith(f"{path}.{i}.")]
        with recorded_hessians(net, mine) if mine else contextlib.nullcontext({}) as hessians:
            for j, (hidden, kwargs) in enumerate(caught):  # each batch's outputs replace its inputs
                out = block(hidden, **kwargs)
                caught[j] = (out[0] if isinstance(out, tuple) else out, kwargs)
        if mine:
            yield mine, hessians


def embedding_sites(net: nn.Module) -> list[CompressedSite]:
    """The token-embedding table of the transformers model in ``net`` (the first submodule with
    ``get_input_embeddings``) and its output embeddings (LM head) unless tied to the table."""
    model = next((m for m in net.modules() if callable(getattr(m, "get_input_embeddings", None))), None)
    if model is None:
        raise ValueError(f"{type(net).__name__} holds no transformers model")
    output = model.get_output_embeddings() if callable(getattr(model, "get_output_embeddings", None)) else None
    tables = [(model.get_input_embeddings().weight, "embedding")]
    if output is not None and output.weight is not tables[0][0]:
        tables.append((output.weight, "linear"))
    names = {id(p): n for n, p in net.named_parameters()}  # the first name of a tied tensor
    return [CompressedSite(name=names[id(w)], shape=tuple(w.shape), layer_type=kind) for w, kind in tables]


@torch.no_grad()
def tied_head_hessian(net: nn.Module, table: CompressedSite, batches: Sequence[torch.Tensor]) -> torch.Tensor | None:
    """The input second moment of the Linear module whose weight is ``table`` (an LM head, tied to
    the token table or itself the site: the final hidden states' ``X^T X / n`` over ``batches``,
    each passed as ``net(x)`` and stopped at the head, so that no logits are made), or ``None`` when
    no Linear module of ``net`` holds it."""
    weight = net.get_parameter(table.name)
    heads = [path for path, m in net.named_modules() if isinstance(m, nn.Linear) and m.weight is weight]
    if not heads:
        return None
    head = CompressedSite(name=f"{heads[0]}.weight", shape=table.shape, layer_type="linear")
    def stop(module, args):
        raise _Caught

    with recorded_hessians(net, [head]) as hessians:  # its hook records before this one stops the pass
        _run_until(net, batches, net.get_submodule(heads[0]), stop)
    return hessians[head.name]
