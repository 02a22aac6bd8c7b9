r"""Likelihoods: observation sites inside a subsampled data plate.

A minibatch of size B out of N training examples enters the ELBO scaled by N/B, so
that ``E_q[log p(D | W)]`` is estimated without bias and weighs against the KL at its
true size.
"""
from __future__ import annotations

from typing import Callable

import pyro
import pyro.distributions as dist
import torch
from torch.distributions import constraints

from sqs_pyro.errors import SQSInputError


class _PlateLikelihood:
    def __init__(self, num_data: int) -> None:
        if num_data < 1:
            raise SQSInputError(f"num_data must be >= 1, got {num_data}")
        self.num_data = int(num_data)

    def _plate(self, batch: int) -> pyro.plate:
        return pyro.plate("data", size=self.num_data, subsample=torch.arange(batch), dim=-1)


class CategoricalLikelihood(_PlateLikelihood):
    """``y_i ~ Categorical(logits = f(x_i; W))`` for classifiers (logits of shape ``(B, C)``).

    Targets are class indices ``(B,)`` or target distributions ``t`` of shape ``(B, C)`` (soft
    labels, e.g. distillation): then the site is the factor ``sum_c t_ic log softmax(f(x_i; W))_c``,
    the expected log-likelihood of a label drawn from ``t_i`` (equal to the indexed one for one-hot ``t``).
    """

    def __call__(self, logits: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        with self._plate(logits.shape[0]):
            if y is not None and y.is_floating_point():
                return pyro.factor("obs", (y * logits.log_softmax(-1)).sum(-1))
            return pyro.sample("obs", dist.Categorical(logits=logits), obs=y)


class GaussianLikelihood(_PlateLikelihood):
    """``y_i ~ Normal(f(x_i; W), scale^2)`` for regression (predictions of shape ``(B,)`` or ``(B, D)``)."""

    def __init__(self, num_data: int, scale: float = 1.0) -> None:
        super().__init__(num_data)
        if not scale > 0:
            raise SQSInputError(f"Gaussian likelihood scale must be > 0, got {scale}")
        self.scale = float(scale)

    def __call__(self, pred: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        with self._plate(pred.shape[0]):
            d = dist.Normal(pred, self.scale)
            if pred.dim() > 1:
                d = d.to_event(pred.dim() - 1)
            return pyro.sample("obs", d, obs=y)


class LossLikelihood(_PlateLikelihood):
    r"""A user's loss as the likelihood ``p(y_i | x_i, W) \propto exp(-loss_fn(f(x_i; W), y_i))``.

    ``loss_fn(outputs, targets)`` returns the per-example losses, shape ``(B,)`` (e.g. a torch loss with
    ``reduction="none"``, summed over any further dimensions by the caller); the site is the factor
    ``-loss_i`` inside the data plate, so the data term is ``-(N/B) sum_i loss_i``: the loss summed over
    the N training examples, weighed against the KL in nats. ``cross_entropy`` gives
    :class:`CategoricalLikelihood`'s data term and ``0.5 * squared error`` :class:`GaussianLikelihood`'s with
    unit scale (up to constants); a loss in other units should be rescaled to a negative log-likelihood.
    """

    def __init__(self, num_data: int, loss_fn: Callable[[torch.Tensor, torch.Tensor | None], torch.Tensor]) -> None:
        super().__init__(num_data)
        if not callable(loss_fn):
            raise SQSInputError(f"loss_fn must be callable, got {type(loss_fn).__name__}")
        self.loss_fn = loss_fn

    def __call__(self, outputs: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        with self._plate(outputs.shape[0]):
            return pyro.factor("obs", -self.loss_fn(outputs, y))


class TokenCategoricalLikelihood(_PlateLikelihood):
    """Language-model likelihood: ``y_it ~ Categorical(logits_it)`` for every token t of sequence i.

    ``logits`` has shape ``(B, L, V)`` and ``y`` ``(B, L)``; a sequence's tokens form one event,
    the plate runs over the ``num_data`` training sequences, so the data term is
    ``N/B * sum_i sum_t log p(y_it | y_i<t)`` with N counted in sequences.

    Soft targets (distillation): ``y`` of shape ``(B, L, 2, m)`` from :func:`sparse_token_targets`, ``m``
    tokens and their weights per position; the site is then the factor
    ``N/B * sum_i sum_t sum_j t_itj log softmax(logits_it)[v_itj]``, the expected log-likelihood of a
    token drawn from the target (equal to the indexed one for a single token of weight 1).
    """

    def __call__(self, logits: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        with self._plate(logits.shape[0]):
            if y is not None and y.is_floating_point():
                return pyro.factor("obs", sparse_token_log_likelihood(logits, y).sum(-1))
            return pyro.sample("obs", TokenCategorical(logits).to_event(1), obs=y)


def sparse_token_targets(tokens: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """Soft targets of ``m`` tokens per position, ``tokens`` (ids) and ``weights`` of shape ``(..., m)``,
    packed as one float tensor of shape ``(..., 2, m)`` (ids stored exactly as floats below 2^24)."""
    if tokens.shape != weights.shape:
        raise SQSInputError(f"token ids {tuple(tokens.shape)} and weights {tuple(weights.shape)} differ in shape")
    if tokens.numel() and int(tokens.max()) >= 2 ** 24:
        raise SQSInputError("token ids must be below 2^24 to be packed as floats")
    return torch.stack([tokens.to(weights.dtype), weights], dim=-2)


def sparse_token_log_likelihood(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """``sum_j t_j log softmax(logits)[v_j]`` per position for packed soft targets (:func:`sparse_token_targets`),
    shape ``logits.shape[:-1]``; the backward pass keeps only the logits (as :class:`TokenCategorical`)."""
    ids, weights = targets[..., 0, :].long(), targets[..., 1, :].to(logits.dtype)
    return _TokenLogLikelihood.apply(logits, ids, weights)


class TokenCategorical(dist.TorchDistribution):
    """``Categorical(logits)`` over the last dimension for large vocabularies: ``log_prob`` is
    ``logits[y] - logsumexp(logits)`` computed in row chunks, keeping only a reference to the logits
    for the backward pass (``Categorical`` stores a normalised copy, and its backward makes several
    more), so a language model's step holds the logits and their gradient, nothing else vocabulary-sized."""

    arg_constraints = {"logits": constraints.independent(constraints.real, 1)}

    def __init__(self, logits: torch.Tensor, validate_args: bool | None = None) -> None:
        self.logits = logits
        super().__init__(logits.shape[:-1], validate_args=validate_args)

    @constraints.dependent_property(is_discrete=True, event_dim=0)
    def support(self) -> constraints.Constraint:
        return constraints.integer_interval(0, self.logits.shape[-1] - 1)

    def sample(self, sample_shape: torch.Size = torch.Size()) -> torch.Tensor:
        return dist.Categorical(logits=self.logits).sample(sample_shape)

    def log_prob(self, value: torch.Tensor) -> torch.Tensor:
        if self._validate_args:
            self._validate_sample(value)
        return _TokenLogLikelihood.apply(self.logits, value.unsqueeze(-1), None)


_ROWS = 256  # rows of logits per chunk: 256 x V floats at a time beside the logits


class _TokenLogLikelihood(torch.autograd.Function):
    """``sum_j t_j log softmax(logits)[v_j]`` per row (``t = 1`` for one token when ``weights`` is None);
    the gradient ``g (sum_j t_j onehot(v_j) - (sum_j t_j) softmax(logits))`` is formed chunk by chunk
    from the saved logits and row log-normalisers."""

    @staticmethod
    def forward(ctx, logits: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor | None) -> torch.Tensor:
        flat, idx = logits.reshape(-1, logits.shape[-1]), ids.reshape(-1, ids.shape[-1]).long()
        w = torch.ones_like(idx, dtype=logits.dtype) if weights is None else weights.reshape(idx.shape)
        lse = torch.cat([torch.logsumexp(flat[i:i + _ROWS], -1) for i in range(0, flat.shape[0], _ROWS)])
        ctx.save_for_backward(logits, idx, w, lse)
        return ((flat.gather(1, idx) * w).sum(1) - w.sum(1) * lse).reshape(ids.shape[:-1])

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, None, None]:
        logits, idx, w, lse = ctx.saved_tensors
        flat, g = logits.reshape(-1, logits.shape[-1]), grad.reshape(-1, 1)
        out = torch.empty_like(flat)
        for i in range(0, flat.shape[0], _ROWS):
            rows = slice(i, i + _ROWS)
            torch.sub(flat[rows], lse[rows].unsqueeze(1), out=out[rows])
            out[rows].exp_().mul_(-g[rows] * w[rows].sum(1, keepdim=True))
        out.scatter_add_(1, idx, g * w)
        return out.reshape(logits.shape), None, None
