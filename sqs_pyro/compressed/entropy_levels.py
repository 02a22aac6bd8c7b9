r"""Entropy-constrained scalar quantisation (ECSQ) of normalised weights.

The file's entropy coder pays about ``-log2 p_k`` bits for a code of level ``k`` used by a fraction
``p_k`` of the weights (:mod:`sqs_pyro.format.codecs`, tree coding). Coding each value ``u`` by

.. math::

    a(u) = \arg\min_k \; (u - \mu_k)^2 + \pi_k, \qquad \pi_k = \lambda\, \ell_k, \quad \ell_k = -\log_2 p_k ,

trades squared error for rate at the slope ``lambda`` (``u^2`` per bit): more levels stay available while
the codes cost what their usage says. ``lambda = 0`` is the nearest level. The levels come from
entropy-constrained Lloyd (Chou, Lookabaugh & Gray, 1989): from the k-means levels, alternate the rule
above, the (optionally ``h``-weighted) means of the cells, and ``ell_k`` from the cells' usage; a level
left without values gets ``ell_k = inf`` and is never chosen again.

The rule is monotone in ``u``: each ``(u - mu_k)^2 + pi_k`` is ``u^2`` plus a line in ``u`` with slope
``-2 mu_k``, so the winners along ``u`` are the sorted levels on the lower envelope of those lines, and
``a`` is a search among the thresholds between envelope neighbours,
``t_{ij} = (mu_i + mu_j) / 2 + (pi_j - pi_i) / (2 (mu_j - mu_i))`` (the midpoints when ``pi = 0``).
"""
from __future__ import annotations

import math

import torch

BINS = 4096  # histogram bins of the values for the Lloyd iterations
ITERATIONS = 40  # entropy-constrained Lloyd steps
CHUNK = 1 << 20  # values per step of the histogram


def code_lengths(counts: torch.Tensor) -> torch.Tensor:
    """``ell_k = -log2 p_k`` in bits from level usage ``counts`` (``inf`` for an unused level)."""
    c = counts.double()
    return torch.where(c > 0, -(c / c.sum()).log2(), torch.full_like(c, math.inf))


def decisions(levels: torch.Tensor, penalty: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """``(thresholds, index)`` of the rule ``argmin_k (u - mu_k)^2 + penalty_k`` for sorted ``levels``:
    ``a(u) = index[bucketize(u, thresholds)]`` (a value on a threshold takes the lower level).
    Without a penalty, the midpoints and every level; with one, the lower envelope (a level with an
    infinite penalty, or a larger one than an equal level, never wins)."""
    mu = levels.double()
    if penalty is None:
        return ((mu[1:] + mu[:-1]) / 2).to(levels.dtype), torch.arange(len(levels))
    pi = penalty.double()
    if not torch.all(mu[1:] >= mu[:-1]):
        raise ValueError("decisions: the levels must be sorted")
    keep: list[int] = []
    cuts: list[float] = []
    for j in range(len(mu)):
        if not math.isfinite(pi[j]):
            continue
        while keep:
            i = keep[-1]
            if mu[j] == mu[i]:
                if pi[j] >= pi[i]:
                    break  # j never wins
                keep.pop()
                del cuts[-1:]  # the cut between i and the level before it, if any
                continue
            cut = float((mu[i] + mu[j]) / 2 + (pi[j] - pi[i]) / (2 * (mu[j] - mu[i])))
            if cuts and cut <= cuts[-1]:  # i is beaten everywhere by its neighbours
                keep.pop()
                cuts.pop()
                continue
            keep.append(j)
            cuts.append(cut)
            break
        else:
            keep.append(j)
    if not keep:
        raise ValueError("decisions: every level has an infinite penalty")
    return torch.tensor(cuts, dtype=levels.dtype), torch.tensor(keep)


def assign(values: torch.Tensor, rule: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    """The level index (int64) of every value under ``rule`` (from :func:`decisions`)."""
    thresholds, index = rule
    return index[torch.bucketize(values.contiguous(), thresholds)]


def histogram(values: torch.Tensor, weights: torch.Tensor | None = None, bins: int = BINS
              ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per equal-width bin over ``[min, max]`` of the flat ``values``: count, sum of values, sum of
    weights and weighted sum (float64; weights 1 if None), a chunk at a time."""
    lo, hi = float(values.min()), float(values.max())
    width = (hi - lo) / bins or 1.0
    moments = torch.zeros(4, bins, dtype=torch.float64)
    for a in range(0, values.numel(), CHUNK):
        v = values[a:a + CHUNK].double()
        h = torch.ones_like(v) if weights is None else weights[a:a + CHUNK].double()
        b = ((v - lo) / width).long().clamp_(0, bins - 1)
        for row, x in enumerate((torch.ones_like(v), v, h, h * v)):
            moments[row] += torch.bincount(b, x, minlength=bins)
    return tuple(moments)


def entropy_constrained_levels(moments: tuple[torch.Tensor, ...], start: torch.Tensor, lam: float,
                               iterations: int = ITERATIONS) -> tuple[torch.Tensor, torch.Tensor]:
    """Entropy-constrained Lloyd on a :func:`histogram` from the sorted ``start`` levels (k-means):
    the sorted levels and their code lengths ``ell_k`` (bits, from the last assignment's usage).
    Each bin is assigned as its mean value; a level's new value is its cells' weighted mean."""
    count, total, mass, weighted = moments
    used = count > 0
    count, mass, weighted = count[used], mass[used], weighted[used]
    centre = total[used] / count
    levels = start.double().clone()
    k = len(levels)
    lengths = code_lengths(torch.bincount(assign(centre, decisions(levels)), count, minlength=k))
    for _ in range(iterations):
        cell = assign(centre, decisions(levels, lam * lengths))
        m = torch.bincount(cell, mass, minlength=k)
        levels = torch.where(m > 0, torch.bincount(cell, weighted, minlength=k) / m.clamp_min(1e-300), levels)
        lengths = code_lengths(torch.bincount(cell, count, minlength=k))
        order = torch.argsort(levels, stable=True)
        levels, lengths = levels[order], lengths[order]
    return levels.to(start.dtype), lengths


def matrix_sensitivity(weight: torch.Tensor, hessian: torch.Tensor) -> float:
    r"""``s = mean_{rc} H_cc w_rc^2``: the output error a matrix's weights cause per unit of relative
    squared error, the diagonal estimate of ``tr(W H W^T) / (R C)`` for a ``(R, C)`` weight."""
    return float((weight.detach().float().pow(2).mean(0) * hessian.diagonal().float()).mean())


def sensitivity_lambdas(sensitivity: dict[str, float], lam: float, alpha: float) -> dict[str, float]:
    r"""Per-matrix slopes ``lambda_m = lambda (G / s_m)^alpha`` from :func:`matrix_sensitivity`'s ``s_m``,
    ``G`` their geometric mean (so the log-mean slope is ``lambda``). ``alpha = 1`` equalises the slope in
    output-error units (each matrix pays ``s_m lambda_m`` per bit); ``alpha = 0`` gives every matrix ``lambda``.
    A matrix with ``s_m = 0`` (no input energy) takes the largest slope of the others."""
    if not (0.0 <= alpha <= 1.0 and lam >= 0):
        raise ValueError(f"sensitivity_lambdas: need alpha in [0, 1] and lambda >= 0, got {alpha}, {lam}")
    live = {name: s for name, s in sensitivity.items() if s > 0}
    if not live:
        return {name: lam for name in sensitivity}
    log_g = sum(math.log(s) for s in live.values()) / len(live)
    out = {name: lam * math.exp(alpha * (log_g - math.log(s))) for name, s in live.items()}
    top = max(out.values())
    return {name: out.get(name, top) for name in sensitivity}
