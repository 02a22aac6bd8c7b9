r"""Group scales: a weight viewed as ``R`` rows of ``C`` values is ``w_{rc} = sigma_{r, floor(c / G)} u_{rc}``.

One scale per group of ``G`` consecutive weights of a row (``G >= C``: one per row); the
spike-and-GMM prior and the guide live on the normalised values ``u = w / sigma``. The scales
are fp16 values (as the ``.sqs`` file stores them) of shape ``(R, ceil(C / G))``.
"""
from __future__ import annotations

import contextlib
import math
from typing import Iterator, Sequence

import numpy as np
import torch


def _rows(shape: torch.Size | tuple[int, ...]) -> int:
    return shape[0] if len(shape) else 1


def occupied_groups(mask: np.ndarray, rows: int, group_size: int) -> np.ndarray:
    """Which groups of a flat boolean ``mask`` (``rows`` rows of ``C`` values) hold at least one ``True``:
    a boolean array of shape ``(R, ceil(C / G))``, row-major (no copy of the mask when ``G`` divides ``C``)."""
    flat = mask.reshape(rows, -1)
    cols = flat.shape[1]
    if cols == 0:
        return np.zeros((rows, 0), dtype=bool)
    size = min(group_size, cols)
    if cols % size == 0:
        return flat.reshape(rows, cols // size, size).any(axis=2)
    return np.logical_or.reduceat(flat, np.arange(0, cols, size), axis=1)


def group_absmax(weight: torch.Tensor, group_size: int) -> torch.Tensor:
    """``max |w|`` per group of ``group_size`` consecutive weights of each row, as float16
    (shape ``(R, ceil(C / G))``; all-zero groups get the smallest normal fp16 value)."""
    rows = _rows(weight.shape)
    flat = weight.detach().reshape(rows, -1).abs().float()
    cols = flat.shape[1]
    group_size = min(group_size, max(cols, 1))
    groups = math.ceil(cols / group_size)
    padded = torch.nn.functional.pad(flat, (0, groups * group_size - cols))
    scale = padded.reshape(rows, groups, group_size).amax(-1)
    return scale.clamp_min(torch.finfo(torch.float16).tiny).to(torch.float16)


def apply_group_scales(values: torch.Tensor, scales: torch.Tensor, group_size: int) -> torch.Tensor:
    """``sigma * u``: every value times its group's scale (``values`` of any shape ``(R, ...)``,
    ``scales`` of shape ``(R, ceil(C / G))``); differentiable in both."""
    rows = _rows(values.shape)
    flat = values.reshape(rows, -1)
    cols = flat.shape[1]
    s = scales.to(values.dtype)
    if s.shape[1] == 1:
        out = flat * s
    elif cols % group_size == 0:
        out = flat.reshape(rows, cols // group_size, group_size) * s.unsqueeze(-1)
    else:
        out = flat * s.repeat_interleave(group_size, dim=1)[:, :cols]
    return out.reshape(values.shape)


def normalise(weight: torch.Tensor, group_size: int,
              scales: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """``(u, sigma)``: ``u = w / sigma`` with the given ``scales``, by default the fp16 absmax
    scales of ``weight``'s groups (then ``u`` lies in ``[-1, 1]``)."""
    scales = group_absmax(weight, group_size) if scales is None else scales
    return weight / apply_group_scales(torch.ones_like(weight), scales, group_size), scales


#: ``(u, sigma, G)``: how a scaled weight ``w = sigma * u`` is made again
Recipe = tuple[torch.Tensor, torch.Tensor, int]


def product_recipes(products: Sequence[tuple[torch.Tensor, torch.Tensor, torch.Tensor, int]]) -> dict[int, Recipe]:
    """The recipe of every scaled weight ``w`` of ``products`` (``(w, u, sigma, G)``), keyed by ``w``'s storage."""
    return {w.untyped_storage().data_ptr(): (u, sigma, g) for w, u, sigma, g in products}


def remember(t: torch.Tensor, recipes: dict[int, Recipe]) -> torch.Tensor | tuple:
    """``t`` itself, or, if ``t`` is one of the scaled weights of ``recipes`` or a view of it, its recipe and view."""
    recipe = recipes.get(t.untyped_storage().data_ptr()) if t.layout == torch.strided else None
    if recipe is None or t.dtype != recipe[0].dtype:
        return t
    return recipe, t.size(), t.stride(), t.storage_offset()


def recall(kept: torch.Tensor | tuple) -> torch.Tensor:
    """The tensor :func:`remember` kept: ``sigma * u`` made again outside autograd (the forward's elementwise
    product: the same bits), viewed as it was."""
    if isinstance(kept, torch.Tensor):
        return kept
    (u, sigma, g), size, stride, offset = kept
    with torch.no_grad():
        w = apply_group_scales(u.detach(), sigma.detach(), g)
    return w if (w.size(), w.stride(), w.storage_offset()) == (size, stride, offset) else w.as_strided(size, stride, offset)


@contextlib.contextmanager
def recomputed_products(products: Sequence[tuple[torch.Tensor, torch.Tensor, torch.Tensor, int]]) -> Iterator[None]:
    """Saved-tensor hooks under which autograd saves a scaled weight ``w = sigma * u`` (or a view of it) as
    the recipe ``(u, sigma)`` and recomputes it when the backward pass asks for it.

    ``products``: ``(w, u, sigma, G)`` with ``w = apply_group_scales(u, sigma, G)``. The product's own
    gradient saves ``u`` and ``sigma`` anyway, so a matrix product that saves ``w`` for its input's
    gradient no longer holds a second weight-sized tensor (4 bytes per weight) until the backward pass;
    the recomputation repeats the forward's elementwise product, so the values are the same bits.
    """
    recipes = product_recipes(products)
    with torch.autograd.graph.saved_tensors_hooks(lambda t: remember(t, recipes), recall):
        yield
