r"""``torch.topk(score(x), k).indices`` a chunk of ``x`` at a time: the same indices, ties included.

On the CPU, ``torch.topk`` copies its whole input into (float64 value, int64 index) pairs, 16 bytes
per value, and, when ``64 k <= n``, runs ``std::partial_sort`` on them: a heap of the first ``k``
pairs, into which each later value ``x_i`` goes (evicting the heap's least) iff ``x_i`` is greater
than that least (NaN above every number). A value that does not go in changes nothing, so the heap
of any subsequence that keeps the first ``k`` values and every value that goes in, in their order,
is the same heap, and ``torch.topk`` of that subsequence picks the same pairs in the same order.

The heap's least at the start of a chunk is the ``k``-th largest value so far, ``t``; only the
chunk's values above ``t`` can go in (``t`` only rises). So the candidates are the first ``k`` values
and every later value above the ``k``-th largest before its chunk: a few per chunk once the first
chunks have been seen (all of a chunk at worst). ``torch.topk`` of the candidates, padded with
``-inf`` (never taken) to at least ``64 k`` values so that it takes the same ``partial_sort`` path,
gives the indices.
"""
from __future__ import annotations

from typing import Callable

import torch

TOPK_CHUNK = 1 << 20  # values scored per step
PARTIAL_SORT = 64  # torch.topk's CPU kernel runs std::partial_sort when k * 64 <= n, else std::nth_element


def top_indices(values: torch.Tensor, k: int,
                score: Callable[[torch.Tensor], torch.Tensor] = torch.abs) -> torch.Tensor:
    """``torch.topk(score(values.reshape(-1)), k).indices`` (the same indices in the same order) with
    ``score`` (elementwise, e.g. ``abs``) taken a chunk of :data:`TOPK_CHUNK` values at a time and no
    full-size temporary; see the module docstring."""
    flat = values.reshape(-1)
    n = flat.numel()
    if n <= TOPK_CHUNK or k * PARTIAL_SORT > n or k <= 0:
        return torch.topk(score(flat), k).indices
    first = score(flat[:k])
    kept, where = [first], [torch.arange(k)]
    best = first  # the k largest values so far (their order is irrelevant)
    for start in range(k, n, TOPK_CHUNK):
        chunk = score(flat[start:start + TOPK_CHUNK])
        least = torch.topk(best, k).values[-1]  # the heap's least: NaN ranks above every number
        take = (chunk > least) | (chunk.isnan() & ~least.isnan())
        kept.append(chunk[take])
        where.append(take.nonzero().squeeze(1) + start)
        best = torch.topk(torch.cat([best, kept[-1]]), k).values
    candidates = torch.cat(kept)
    pad = max(0, k * PARTIAL_SORT - candidates.numel())
    candidates = torch.cat([candidates, candidates.new_full((pad,), float("-inf"))])
    return torch.cat(where)[torch.topk(candidates, k).indices]
