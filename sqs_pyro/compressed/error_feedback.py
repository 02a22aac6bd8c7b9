r"""Hessian-aware one-shot quantisation: GPTQ error feedback onto a dense-and-sparse, group-scaled codebook.

A Linear layer's output error for a quantised weight ``Q`` on calibration inputs ``X`` is

.. math::

    \| X W^\top - X Q^\top \|_F^2 = \operatorname{tr}\big((W - Q) H (W - Q)^\top\big),
    \qquad H = X^\top X / n .

Quantising the input columns one at a time (Frantar et al., 2023, "GPTQ"), the error of column
``c``, ``e = (w_c - q_c) / U_{cc}``, is pushed onto the columns not yet quantised,
``w_{c'} \leftarrow w_{c'} - e\, U_{c c'}`` (``U``: upper Cholesky factor of ``H^{-1}``), which
minimises the quadratic error given the columns fixed so far. Here every column is coded on the
layer's own K-level codebook of normalised values (:func:`~sqs_pyro.compressed.oneshot.quantize_layer`
chooses the codebook and the exact weights), with a group's fp16 scale set from its error-fed
values when the quantiser reaches the group, and the exact weights stored with their error-fed
values (zero error). With ``H = I`` nothing is fed forward and the result is the plain
nearest-level coding.

With a target ``sparsity`` the same pass also prunes (Frantar & Alistarh, 2023, "SparseGPT"):
at the start of each block of columns, the fraction ``sparsity`` of its (non-exact) weights with
the smallest optimal-brain-surgeon saliency ``w^2 / U_{cc}^2`` (on the error-fed values) is
coded as zero, and their errors are fed forward like the quantisation errors.
"""
from __future__ import annotations

import contextlib
import math
from typing import Iterable, Iterator, Sequence

import torch
from torch import nn

from sqs_pyro.compressed.entropy_levels import assign, code_lengths, decisions
from sqs_pyro.compressed.accounting import code_usage
from sqs_pyro.compressed.materialize import CompressedLayer, code_dtype
from sqs_pyro.models.selection import CompressedSite

# Candidate factors of a group's max |w| for its scale (chosen per group by weighted coding error).
SHRINK_GRID = tuple(x / 40 for x in range(28, 45))  # 0.7, 0.725, ..., 1.1
ROW_CHUNK = 4096  # rows per step of the error update of the columns not yet coded (bounds its temporary)


@torch.no_grad()
def input_hessians(net: nn.Module, sites: Sequence[CompressedSite], batches: Iterable[torch.Tensor]
                   ) -> dict[str, torch.Tensor]:
    r"""``H = X^T X / n`` of the inputs of every selected Linear weight, over all tokens / examples
    of ``batches`` (each passed as ``net(x)``; see :func:`recorded_hessians`)."""
    with recorded_hessians(net, sites) as hessians:
        for x in batches:
            net(x)
    return hessians


@contextlib.contextmanager
def recorded_hessians(net: nn.Module, sites: Sequence[CompressedSite]) -> Iterator[dict[str, torch.Tensor]]:
    r"""While the ``with`` block runs, the inputs of every selected Linear weight of ``net`` are recorded
    (forward pre-hooks, float64 sums of float32 batch products); on leaving it, the dict it gave holds
    ``H = X^T X / n`` per weight name. Raises ``ValueError`` if no selected Linear weight saw an input."""
    modules = {s.name: net.get_submodule(s.name.rpartition(".")[0]) for s in sites if s.layer_type == "linear"}
    sums: dict[str, torch.Tensor] = {}
    counts: dict[str, int] = {}

    def hook(name):
        def record(module, args):
            x = args[0].detach().reshape(-1, args[0].shape[-1]).float()
            sums[name] = sums.get(name, 0) + (x.T @ x).double()
            counts[name] = counts.get(name, 0) + x.shape[0]
        return record

    hessians: dict[str, torch.Tensor] = {}
    handles = [m.register_forward_pre_hook(hook(name)) for name, m in modules.items()]
    try:
        yield hessians
    finally:
        for h in handles:
            h.remove()
    if not counts:
        raise ValueError("input_hessians: no selected Linear layer saw an input")
    for name in list(sums):
        hessians[name] = (sums.pop(name) / counts[name]).float()


def hessian_scores(net: nn.Module, sites: Sequence[CompressedSite], hessians: dict[str, torch.Tensor]
                   ) -> dict[str, torch.Tensor]:
    r"""Activation-aware scores ``|W_ij| sqrt(H_jj) = |W_ij| ||x_j||`` (Wanda's, from the input second
    moments of :func:`input_hessians`) of every selected weight that has one: the exact-weight ranking."""
    return {s.name: net.get_parameter(s.name).detach().abs() * hessians[s.name].diagonal().sqrt()
            for s in sites if s.name in hessians}


def _inverse_factor(hessian: torch.Tensor, damp: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Upper Cholesky factor of ``(H + damp mean(diag H) I)^{-1}`` (dead inputs get ``H_cc = 1``),
    and the mask of dead inputs."""
    h = hessian.double().clone()
    dead = torch.diagonal(h) <= 0
    h[dead, dead] = 1.0
    h.diagonal().add_(damp * torch.diagonal(h).mean())
    inverse = torch.cholesky_inverse(torch.linalg.cholesky(h))
    return torch.linalg.cholesky(inverse, upper=True).float(), dead


def _weighted_rule(values: torch.Tensor, levels: torch.Tensor, penalty: torch.Tensor, importance: torch.Tensor
                   ) -> torch.Tensor:
    """``argmin_k importance (v - mu_k)^2 + penalty_k`` for every value (the first level on ties)."""
    cost = importance[:, None] * (values[:, None] - levels[None, :]) ** 2 + penalty.float()[None, :]
    return cost.argmin(1)


def group_scales(values: torch.Tensor, excluded: torch.Tensor, levels: torch.Tensor,
                 importance: torch.Tensor | None = None, shrink: Sequence[float] = (1.0,),
                 penalty: torch.Tensor | None = None) -> torch.Tensor:
    r"""fp16 scale of each row of ``values`` (``(R, G)``, one group per row): ``alpha max |w|`` over the
    members not ``excluded``, with ``alpha`` the factor of ``shrink`` that minimises the importance-weighted
    coding error ``sum_j h_j (w_j - sigma mu_{a(w_j / sigma)})^2`` on ``levels`` (the first factor on ties);
    ``a`` is the nearest level, or with a ``penalty`` per level the entropy-constrained rule
    (:func:`~sqs_pyro.compressed.entropy_levels.decisions`)."""
    members = values.masked_fill(excluded, 0.0)
    peak = members.abs().amax(1)
    weight = torch.ones(values.shape[1]) if importance is None else importance
    rule = decisions(levels, penalty)
    best = best_err = None
    for alpha in shrink:
        scale = (alpha * peak).clamp_min(torch.finfo(torch.float16).tiny).half()
        err = ((members - scale.float()[:, None] * levels[assign(members / scale.float()[:, None], rule)]) ** 2
               * weight).masked_fill(excluded, 0.0).sum(1)
        if best is None:
            best, best_err = scale, err
        else:
            better = err < best_err
            best, best_err = torch.where(better, scale, best), torch.where(better, err, best_err)
    return best


@torch.no_grad()
def feedback_quantize(layer: CompressedLayer, weight: torch.Tensor, hessian: torch.Tensor, damp: float = 0.01,
                      block: int = 128, act_order: bool = True, shrink: Sequence[float] = SHRINK_GRID,
                      sparsity: float = 0.0, entropy_lambda: float = 0.0, rate_importance: bool = False
                      ) -> CompressedLayer:
    """Re-code ``layer`` (its codebook and exact positions kept) by GPTQ error feedback under the
    input second moment ``hessian`` (``C x C`` for a ``(R, C)`` weight); see the module docstring.

    ``act_order``: quantise the columns in decreasing ``H_cc`` (the most active inputs first, while
    the most columns are left to absorb their errors); the group scales are then fixed up front from
    the weights as given ("static groups"), else set from the error-fed values when a group starts.
    ``shrink``: candidate factors of a group's ``max |w|`` (:func:`group_scales`, ``H_cc`` as importance).
    Both defaults were chosen on validation text (SmolLM2, docs/results.md). ``sparsity``: the
    fraction of each block's weights pruned on the way (see the module docstring). ``entropy_lambda > 0``:
    each weight is coded by the entropy-constrained rule ``(u - mu_k)^2 + lambda ell_k``, with ``ell_k`` from
    ``layer``'s code usage (:mod:`~sqs_pyro.compressed.entropy_levels`); ``rate_importance``: by
    ``h (u - mu_k)^2 + lambda ell_k`` with ``h = sigma^2 / U_cc^2`` over its layer mean, the weight's share of
    the GPTQ loss, so that rate goes where the loss is. Returns ``layer`` with new codes, mask, group scales
    and exact values."""
    if rate_importance and not entropy_lambda > 0:
        raise ValueError("feedback_quantize: rate_importance needs entropy_lambda > 0")
    if weight.dim() != 2 or hessian.shape != (weight.shape[1], weight.shape[1]):
        raise ValueError(f"feedback_quantize needs a (R, C) weight and a (C, C) hessian, got "
                         f"{tuple(weight.shape)} and {tuple(hessian.shape)}")
    rows, cols = weight.shape
    g = layer.group_size or 0
    order = torch.argsort(torch.diagonal(hessian), descending=True, stable=True) if act_order else torch.arange(cols)
    factor, dead = _inverse_factor(hessian[order][:, order], damp)
    w = weight.detach().float().cpu()[:, order]  # a copy (advanced indexing)
    w[:, dead] = 0.0
    energy = torch.diagonal(hessian).float()
    importance = energy[order]
    levels = layer.codebook.float()
    penalty = entropy_lambda * code_lengths(code_usage(layer)[:layer.components]) if entropy_lambda > 0 else None
    rule = decisions(levels, penalty)
    exact_given = torch.zeros(rows * cols, dtype=torch.bool)
    if layer.num_exact:
        exact_given[layer.exact_index] = True
    exact_given = exact_given.reshape(rows, cols)
    exact = exact_given[:, order]
    groups = math.ceil(cols / g) if g else 1
    scales = torch.empty(rows, groups, dtype=torch.float16)
    group_of = order // g if g else torch.zeros(cols, dtype=torch.long)
    static = bool(act_order and g)
    if static:
        original = weight.detach().float().cpu()
        for k in range(groups):
            cut = slice(k * g, (k + 1) * g)
            scales[:, k] = group_scales(original[:, cut], exact_given[:, cut], levels, energy[cut], shrink, penalty)
    elif g:
        block = g * max(1, math.ceil(block / g))  # a group never straddles two blocks
    if rate_importance:  # the mean of scale^2 / U_cc^2 over the weights
        sigma2 = (scales if static else layer.scales if g else torch.ones(rows, 1)).float() ** 2
        mean_h = float((sigma2.mean(0)[group_of] / factor.diagonal() ** 2).mean())
    codes = torch.zeros(rows, cols, dtype=code_dtype(layer.components))
    pruned = torch.zeros(rows, cols, dtype=torch.bool)
    # the exact weights' error-fed values (at their sorted flat positions), written when their column is reached
    exact_values = torch.zeros(layer.num_exact, dtype=torch.float16)
    exact_columns = exact.any(0).tolist()
    scale = torch.ones(rows)
    for start in range(0, cols, block):
        stop = min(start + block, cols)
        part = w[:, start:stop].clone()
        errors = torch.zeros_like(part)
        if sparsity > 0:
            pruned[:, start:stop] = _obs_prune(part, factor.diagonal()[start:stop], exact[:, start:stop], sparsity)
        for j in range(stop - start):
            c = start + j
            if static:
                scale = scales[:, group_of[c]].float()
            elif g and c % g == 0:
                scales[:, c // g] = group_scales(part[:, j:j + g], exact[:, c:c + g], levels, importance[c:c + g], shrink,
                                                 penalty)
                scale = scales[:, c // g].float()
            column = part[:, j]
            if rate_importance:  # scale^2 / U_cc^2 over its layer mean
                code = _weighted_rule(column / scale, levels, penalty, scale ** 2 / (factor[c, c] ** 2 * mean_h))
            else:
                code = assign(column / scale, rule)
            q = torch.where(exact[:, c], column.half().float(), scale * levels[code])
            q = q.masked_fill(pruned[:, c], 0.0)
            codes[:, c] = code.to(codes.dtype)
            if exact_columns[c]:
                r = exact[:, c].nonzero().squeeze(1)
                exact_values[torch.searchsorted(layer.exact_index, r * cols + int(order[c]))] = q[r].half()
            err = (column - q) / factor[c, c]
            part[:, j:] -= err[:, None] * factor[c, c:stop][None, :]
            errors[:, j] = err
        for top in range(0, rows, ROW_CHUNK):  # the update in chunks of rows: no full-width temporary
            w[top:top + ROW_CHUNK, stop:] -= errors[top:top + ROW_CHUNK] @ factor[start:stop, stop:]
    codes = _unpermute(codes, order)
    layer.mask = (~exact_given & ~_unpermute(pruned, order)).reshape(layer.shape).to(layer.mask.device)
    layer.codes = torch.where(layer.mask, codes.reshape(layer.shape), 0).to(layer.codes.device)
    if g:
        layer.scales = scales
    if layer.num_exact:
        layer.exact_values = exact_values
    return layer


def _obs_prune(part: torch.Tensor, diagonal: torch.Tensor, exact: torch.Tensor, sparsity: float) -> torch.Tensor:
    """SparseGPT's block mask: the ``round(sparsity n)`` of the ``n`` non-exact weights of ``part``
    with the smallest saliency ``w^2 / U_cc^2`` (ties to the lower flat position)."""
    saliency = (part / diagonal[None, :]) ** 2
    candidates = (~exact).reshape(-1).nonzero().squeeze(1)
    count = round(sparsity * candidates.numel())
    pruned = torch.zeros(part.numel(), dtype=torch.bool)
    if count:
        order = torch.argsort(saliency.reshape(-1)[candidates], stable=True)
        pruned[candidates[order[:count]]] = True
    return pruned.reshape(part.shape)


def _unpermute(columns: torch.Tensor, order: torch.Tensor) -> torch.Tensor:
    """The columns of a matrix whose column ``j`` is original column ``order[j]``, back in their original order."""
    out = torch.empty_like(columns)
    out[:, order] = columns
    return out
