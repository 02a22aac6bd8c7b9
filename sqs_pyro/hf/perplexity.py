"""Language-model evaluation: token windows and held-out perplexity
``exp(-(1/T) sum_t log p(x_t | x_<t))``."""
from __future__ import annotations

import math
from pathlib import Path

import torch
from torch import nn

from sqs_pyro.errors import SQSInputError


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
    """``exp`` of the mean next-token negative log-likelihood over all target tokens of ``windows``
    (moved batch by batch to the device of ``model``'s parameters, if it has any)."""
    model.eval()
    device = next(model.parameters(), torch.empty(0)).device  # CPU for a module without parameters
    total, count = 0.0, 0
    for i in range(0, len(windows), batch_size):
        w = windows[i:i + batch_size].to(device)
        logits = model(w[:, :-1])
        nll = nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), w[:, 1:].reshape(-1), reduction="sum")
        total += float(nll)
        count += w[:, 1:].numel()
    return math.exp(total / count)


def text_windows(tokenizer, paths: list[Path], length: int) -> torch.Tensor:
    """Non-overlapping windows of ``length + 1`` tokens from UTF-8 text files (each file on its own)."""
    chunks = []
    for path in paths:
        try:
            text = Path(path).read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            raise SQSInputError(f"cannot read text file {path}: {exc}") from exc
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        if len(ids) > length:
            chunks.append(token_windows(tokenizer, text, length))
    if not chunks:
        raise SQSInputError(f"the text files hold no window of {length + 1} tokens")
    return torch.cat(chunks)
