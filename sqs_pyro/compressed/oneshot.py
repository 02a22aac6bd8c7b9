r"""One-shot (no training) dense-and-sparse, group-scaled codebook quantisation of a weight tensor.

For a weight viewed as ``R`` rows of ``C`` values:

1. **exact weights**: the ``n`` largest scores (default ``|w|``; e.g. Wanda's ``|w| ||x||``)
   are kept exactly (fp16, a position and a value each): the "super weights" that a shared
   level would destroy;
2. **group scales**: ``sigma_{r,g} = max |w|`` over the other weights of group ``g`` (``G``
   consecutive weights of row ``r``), rounded to fp16;
3. **codebook on the normalised values** ``u = w / sigma`` in ``[-1, 1]``: K levels by 1-D
   k-means (:func:`~sqs_pyro.guides.kmeans.kmeans_1d`: exact on up to ``max_points`` bins,
   then Lloyd polishing), each weight coded by its nearest level. With input second moments
   the k-means may be sensitivity-weighted (SqueezeLLM): weight ``u_{rc}`` by
   ``H_cc sigma_{r,g}^2``, its share of the layer's output error ``sum_c H_cc (w_rc - q_rc)^2``.

With a target ``sparsity``, the fraction ``sparsity`` of the other weights with the smallest
scores is pruned and the codebook is fit on the survivors only (with input second moments,
:func:`~sqs_pyro.compressed.error_feedback.feedback_quantize` then chooses the mask itself,
SparseGPT-style).

The result is a :class:`~sqs_pyro.compressed.materialize.CompressedLayer` with
``w = sigma mu_a`` on the kept weights, whose scales and exact weights the ``.sqs`` file stores and
the accounting counts. It is also what the SQS guide starts from when group scales are used:
the spike-and-GMM posterior lives on ``u``.
"""
from __future__ import annotations

from typing import Iterator, Sequence

import torch
from torch import nn

from sqs_pyro.compressed.entropy_levels import assign, decisions, entropy_constrained_levels, histogram
from sqs_pyro.compressed.error_feedback import SHRINK_GRID, feedback_quantize
from sqs_pyro.compressed.materialize import (CompressedLayer, CompressedNetwork, code_dtype, tied_to_compressed,
                                             uncompressed_state)
from sqs_pyro.compressed.topk import top_indices
from sqs_pyro.guides.kmeans import kmeans_codebook
from sqs_pyro.models.group_scales import apply_group_scales, group_absmax, normalise
from sqs_pyro.models.selection import CompressedSite

CHUNK = 1 << 20  # values per chunk of rows normalised and coded at a time


@torch.no_grad()
def quantize_layer(name: str, weight: torch.Tensor, components: int, group_size: int, exact: int = 0,
                   scores: torch.Tensor | None = None, sparsity: float = 0.0,
                   input_energy: torch.Tensor | None = None, entropy_lambda: float = 0.0) -> CompressedLayer:
    """The dense-and-sparse group-scaled layer of ``weight`` (see the module docstring);
    ``group_size = 0`` gives one codebook over the raw weights (no scales). ``input_energy``
    (``H_cc`` per column of a 2-D weight) weights the k-means by ``H_cc sigma^2``. ``entropy_lambda > 0``:
    entropy-constrained levels from the k-means ones, each weight coded by ``(u - mu_k)^2 + lambda ell_k``
    (:mod:`~sqs_pyro.compressed.entropy_levels`).

    Memory: beyond the mask and the codes (1 byte per weight each), one float32 per coded weight for
    the k-means (sorted in place unless weighted); the exact weights are a chunked top-k and the
    normalised values are made a chunk of rows at a time, twice (for the k-means, then the codes)."""
    if not 0.0 <= sparsity < 1.0:
        raise ValueError(f"sparsity must be in [0, 1), got {sparsity}")
    w = weight.detach().float().cpu()
    flat = w.reshape(-1)
    exact = min(exact, flat.numel() - 1)
    index = values = None
    mask = torch.ones(flat.numel(), dtype=torch.bool)
    given = None if scores is None else scores.detach().float().cpu().reshape(-1)
    if exact > 0:
        index = torch.sort(top_indices(flat, exact) if given is None else top_indices(given, exact, _same)).values
        values = flat[index].to(torch.float16)
        mask[index] = False
    prune = round(sparsity * int(torch.count_nonzero(mask)))
    if prune:  # the smallest scores among the coded weights
        s = flat.abs() if given is None else given
        mask[torch.argsort(s.masked_fill(~mask, float("inf")), stable=True)[:prune]] = False
        del s
    rows = _rows(w)
    scales = None
    if group_size:  # from the weights with the exact ones zeroed (not the pruned ones)
        scales = torch.cat([_group_absmax(piece, group_size) for _, piece in _zeroed_rows(w, index)])
    layer = CompressedLayer(name, tuple(w.shape), mask.reshape(w.shape), torch.zeros(0, dtype=code_dtype(components)),
                            torch.zeros(components), torch.zeros(components, dtype=torch.long), group_size,
                            scales, index, values)
    u = torch.empty(int(torch.count_nonzero(mask)))  # the coded normalised values, in order
    weights = None if input_energy is None else torch.empty(u.numel())
    energy = None if input_energy is None else input_energy.float().cpu()
    kept = mask.reshape(rows, -1)
    at = 0
    for r, piece in _normalised_rows(w, index, scales, group_size):
        keep = kept[r:r + len(piece)]
        sel = torch.masked_select(piece, keep)
        u[at:at + sel.numel()] = sel
        if weights is not None:
            sigma = None if scales is None else scales[r:r + len(piece)]
            sensitivity = _sensitivity(sigma, energy, piece.shape, group_size)
            weights[at:at + sel.numel()] = torch.masked_select(sensitivity, keep)
        at += sel.numel()
    moments = histogram(u, weights) if entropy_lambda > 0 and u.numel() else None  # before u is sorted
    codebook = kmeans_codebook(u, components, weights, overwrite=True)
    del u, weights
    rule = decisions(codebook)
    if moments is not None:
        codebook, lengths = entropy_constrained_levels(moments, codebook, entropy_lambda)
        rule = decisions(codebook, entropy_lambda * lengths)
    codes = torch.zeros(rows, flat.numel() // rows, dtype=code_dtype(components))
    for r, piece in _normalised_rows(w, index, scales, group_size):  # nearest sorted level, as in the k-means
        keep = kept[r:r + len(piece)]
        nearest = assign(torch.masked_select(piece, keep), rule)
        codes[r:r + len(piece)].masked_scatter_(keep, nearest.to(codes.dtype))
    layer.codes, layer.codebook = codes.reshape(w.shape), codebook.to(weight.dtype)
    return layer


def _same(x: torch.Tensor) -> torch.Tensor:
    """The identity: given scores are ranked as they are."""
    return x


def _rows(w: torch.Tensor) -> int:
    """The rows of ``w`` for its group scales (its first dimension; 1 for a scalar)."""
    return w.shape[0] if w.dim() else 1


def _zeroed_rows(w: torch.Tensor, index: torch.Tensor | None) -> Iterator[tuple[int, torch.Tensor]]:
    """``(first row, rows of w)``, about :data:`CHUNK` values at a time, copied with the exact weights
    (sorted flat ``index``) zeroed."""
    rows = _rows(w)
    view = w.reshape(rows, -1)
    cols = max(view.shape[1], 1)
    step = max(1, CHUNK // cols)
    for r in range(0, rows, step):
        piece = view[r:r + step].clone()
        if index is not None:
            lo, hi = torch.searchsorted(index, torch.tensor([r * cols, (r + step) * cols])).tolist()
            piece.view(-1)[index[lo:hi] - r * cols] = 0.0
        yield r, piece


def _normalised_rows(w: torch.Tensor, index: torch.Tensor | None, scales: torch.Tensor | None,
                     group_size: int) -> Iterator[tuple[int, torch.Tensor]]:
    """``(first row, u = w / sigma)`` for chunks of rows of ``w``, the exact weights zeroed (``w`` itself
    without scales)."""
    for r, piece in _zeroed_rows(w, index):
        yield r, _over_scales_(piece, scales[r:r + len(piece)], group_size) if group_size else piece


def _sensitivity(scales: torch.Tensor | None, energy: torch.Tensor, shape: torch.Size, group_size: int) -> torch.Tensor:
    """``sigma^2 H_cc`` of every weight of a chunk of rows (``shape``) with its fp16 ``scales`` (``sigma = 1``
    without scales)."""
    if group_size and shape[1] % group_size == 0:  # group by group, no full tensor of scales
        return (scales.float()[..., None] ** 2 * energy.view(1, -1, group_size)).reshape(shape)
    sigma = apply_group_scales(torch.ones(shape), scales, group_size) if group_size else torch.ones(shape)
    return sigma ** 2 * energy[None, :]


def _group_absmax(values: torch.Tensor, group_size: int) -> torch.Tensor:
    """:func:`~sqs_pyro.models.group_scales.group_absmax`, as ``max(max w, -min w)`` per group (no copy of
    ``|w|``) when the groups tile the rows."""
    rows = values.shape[0]
    if (values.numel() // rows) % group_size:
        return group_absmax(values, group_size)
    groups = values.reshape(rows, -1, group_size)
    peak = torch.maximum(groups.amax(-1), groups.amin(-1).neg_())
    return peak.clamp_min(torch.finfo(torch.float16).tiny).to(torch.float16)


def _over_scales_(values: torch.Tensor, scales: torch.Tensor, group_size: int) -> torch.Tensor:
    """``u = w / sigma`` (:func:`~sqs_pyro.models.group_scales.normalise`'s values), group by group
    in place of ``values`` (contiguous) when the groups tile the rows, else a new tensor."""
    rows = values.shape[0]
    if (values.numel() // rows) % group_size:
        return normalise(values, group_size, scales)[0]
    values.view(rows, -1, group_size).div_(scales.float()[..., None])
    return values


@torch.no_grad()
def quantize_sites(net: nn.Module, sites: Sequence[CompressedSite], components: int, group_size: int,
                   exact: int = 0, scores: dict[str, torch.Tensor] | None = None,
                   hessians: dict[str, torch.Tensor] | None = None, act_order: bool = True,
                   shrink: Sequence[float] = SHRINK_GRID, exact_fraction: float = 0.0,
                   sparsity: float = 0.0, weighted_codebook: bool = False, entropy_lambda: float = 0.0,
                   rate_importance: bool = False) -> list[CompressedLayer]:
    """:func:`quantize_layer` for every selected weight of ``net``. Each matrix keeps ``exact +
    round(exact_fraction numel)`` exact weights. A weight with an input second moment in ``hessians``
    (:func:`~sqs_pyro.compressed.error_feedback.input_hessians`) is then re-coded by
    :func:`~sqs_pyro.compressed.error_feedback.feedback_quantize` (GPTQ error feedback, with its
    ``act_order`` and scale ``shrink`` options; with ``sparsity``, SparseGPT's mask); with
    ``weighted_codebook`` its k-means is weighted by ``H_cc sigma^2``. ``entropy_lambda``, ``rate_importance``:
    entropy-constrained levels and coding (:func:`quantize_layer`,
    :func:`~sqs_pyro.compressed.error_feedback.feedback_quantize`)."""
    layers = []
    for s in sites:
        weight = net.get_parameter(s.name)
        budget = exact + round(exact_fraction * weight.numel())
        hessian = (hessians or {}).get(s.name)
        energy = hessian.diagonal() if weighted_codebook and hessian is not None else None
        layer = quantize_layer(s.name, weight, components, group_size, budget, (scores or {}).get(s.name), sparsity,
                               energy, entropy_lambda)
        if hessian is not None:
            layer = feedback_quantize(layer, weight, hessian, act_order=act_order, shrink=shrink,
                                      sparsity=sparsity, entropy_lambda=entropy_lambda,
                                      rate_importance=rate_importance and entropy_lambda > 0)
        layers.append(layer)
    return layers


def oneshot_network(net: nn.Module, layers: list[CompressedLayer], config: dict) -> CompressedNetwork:
    """The network of ``layers`` and every other tensor of ``net``; a tensor tied to a compressed
    weight (e.g. an LM head tied to the token embeddings) is recorded as tied to its layer."""
    names = {layer.name for layer in layers}
    return CompressedNetwork(layers, uncompressed_state(net, names), config, tied_to_compressed(net, names))


@torch.no_grad()
def quantize_network(net: nn.Module, sites: list[CompressedSite], components: int, group_size: int,
                     exact: int = 0, scores: dict[str, torch.Tensor] | None = None,
                     hessians: dict[str, torch.Tensor] | None = None, act_order: bool = True,
                     shrink: Sequence[float] = SHRINK_GRID, exact_fraction: float = 0.0,
                     sparsity: float = 0.0) -> CompressedNetwork:
    """:func:`quantize_sites` over ``sites`` as a :func:`oneshot_network` (the other tensors as they are)."""
    layers = quantize_sites(net, sites, components, group_size, exact, scores, hessians, act_order, shrink,
                            exact_fraction, sparsity)
    return oneshot_network(net, layers, oneshot_config(components, group_size, exact, exact_fraction, bool(hessians),
                                                       act_order, shrink, sparsity))


def oneshot_config(components: int, group_size: int, exact: int, exact_fraction: float, error_feedback: bool,
                   act_order: bool, shrink: Sequence[float], sparsity: float, **more) -> dict:
    """The config a one-shot file records."""
    return {"method": "oneshot", "components": components, "group_size": group_size, "exact": exact,
            "exact_fraction": exact_fraction, "error_feedback": error_feedback, "act_order": act_order,
            "shrink": list(shrink), "sparsity": sparsity, **more}
