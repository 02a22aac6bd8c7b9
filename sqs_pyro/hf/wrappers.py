"""Transformers as ``net(x) -> logits`` for :func:`sqs_pyro.infer.compress`, and dense fine-tuning.

* :class:`SentenceClassifier`: ``x`` of shape ``(B, 2, L)`` stacks token ids and the
  attention mask; the sentence embedding is the mask-weighted mean of the last hidden
  state, L2-normalised; a linear head gives class logits.
* :class:`CausalLM`: ``x`` of token ids ``(B, L)`` gives next-token logits ``(B, L, V)``.
"""
from __future__ import annotations

from typing import Callable

import torch
from torch import nn


def encode_sentences(tokenizer, sentences: list[str], max_length: int = 64) -> torch.Tensor:
    """Token ids and attention masks stacked as ``(N, 2, L)`` (padded to the longest, <= max_length)."""
    enc = tokenizer(sentences, padding=True, truncation=True, max_length=max_length, return_tensors="pt")
    return torch.stack([enc["input_ids"], enc["attention_mask"]], dim=1)


class SentenceClassifier(nn.Module):
    """Mean-pooled, L2-normalised sentence embedding of an encoder, then a linear head."""

    def __init__(self, encoder: nn.Module, num_classes: int) -> None:
        super().__init__()
        self.encoder = encoder
        self.head = nn.Linear(encoder.config.hidden_size, num_classes)

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        ids, mask = x[:, 0], x[:, 1]
        hidden = self.encoder(input_ids=ids, attention_mask=mask).last_hidden_state
        weights = mask.unsqueeze(-1).to(hidden.dtype)
        pooled = (hidden * weights).sum(1) / weights.sum(1).clamp_min(1.0)
        return nn.functional.normalize(pooled, dim=-1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.embed(x))


class CausalLM(nn.Module):
    """Next-token logits of a causal language model (no key-value cache: every call reads whole windows)."""

    def __init__(self, lm: nn.Module) -> None:
        super().__init__()
        self.lm = lm

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.lm(input_ids=ids, use_cache=False).logits


def fine_tune(net: nn.Module, x: torch.Tensor, y: torch.Tensor, epochs: float, batch_size: int, lr: float,
              seed: int, loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]) -> None:
    """Dense fine-tuning with Adam on seeded random minibatches (``epochs * N / batch_size`` steps)."""
    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.Adam([p for p in net.parameters() if p.requires_grad], lr=lr)
    net.train()
    for _ in range(int(epochs * len(x) / batch_size)):
        idx = torch.randint(0, len(x), (batch_size,), generator=gen)
        loss = loss_fn(net(x[idx]), y[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    net.eval()
