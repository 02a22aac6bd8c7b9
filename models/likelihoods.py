r"""Likelihoods: observation sites inside a subsampled data plate.

A minibatch of size B out of N training examples enters the ELBO scaled by N/B, so
that ``E_q[log p(D | W)]`` is estimated without bias and weighs against the KL at its
true size.
"""
from __future__ import annotations

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


class TokenCategoricalLikelihood(_PlateLikelihood):
    """Language-model likelihood: ``y_it ~ Categorical(logits_it)`` for every token t of sequence i.

    ``logits`` has shape ``(B, L, V)`` and ``y`` ``(B, L)``; a sequence's tokens form one event,
    the plate runs over the ``num_data`` training sequences, so the data term is
    ``N/B * sum_i sum_t log p(y_it | y_i<t)`` with N counted in sequences.
    """

    def __call__(self, logits: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        with self._plate(logits.shape[0]):
            return pyro.sample("obs", TokenCategorical(logits).to_event(1), obs=y)


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
        return _TokenLogLikelihood.apply(self.logits, value)


_ROWS = 256  # rows of logits per chunk: 256 x V floats at a time beside the logits


class _TokenLogLikelihood(torch.autograd.Function):
    """``log softmax(logits)[y]`` per row; the gradient ``(onehot(y) - softmax(logits)) g`` is formed
    chunk by chunk from the saved logits and row log-normalisers."""

    @staticmethod
    def forward(ctx, logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        flat, idx = logits.reshape(-1, logits.shape[-1]), y.reshape(-1, 1).long()
        lse = torch.cat([torch.logsumexp(flat[i:i + _ROWS], -1) for i in range(0, flat.shape[0], _ROWS)])
        ctx.save_for_backward(logits, idx, lse)
        return (flat.gather(1, idx).squeeze(1) - lse).reshape(y.shape)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        logits, idx, lse = ctx.saved_tensors
        flat, g = logits.reshape(-1, logits.shape[-1]), grad.reshape(-1, 1)
        out = torch.empty_like(flat)
        for i in range(0, flat.shape[0], _ROWS):
            rows = slice(i, i + _ROWS)
            torch.sub(flat[rows], lse[rows].unsqueeze(1), out=out[rows])
            out[rows].exp_().mul_(-g[rows])
        out.scatter_add_(1, idx, g)
        return out.reshape(logits.shape), None
