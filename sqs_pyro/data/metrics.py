r"""Evaluation metrics of a trained or compressed classifier on held-out data.

For predictive probabilities ``p_i`` (a row per example) and labels ``y_i``:

* accuracy: ``mean_i [argmax_c p_ic = y_i]``;
* negative log-likelihood: ``-mean_i log p_{i y_i}``;
* Brier score: ``mean_i sum_c (p_ic - [c = y_i])^2``;
* expected calibration error over ``B`` equal-width confidence bins (Guo et al., 2017):
  ``ECE = sum_b (n_b / n) |acc_b - conf_b|`` with ``conf_i = max_c p_ic``.
"""
from __future__ import annotations

from typing import Any

import torch
from torch import nn

ECE_BINS = 15


def module_device(module: nn.Module) -> torch.device:
    """The device of a module's first parameter or buffer (the CPU for a module without tensors)."""
    tensor = next(iter(module.parameters()), None)
    if tensor is None:
        tensor = next(iter(module.buffers()), None)
    return tensor.device if tensor is not None else torch.device("cpu")


@torch.no_grad()
def predictive_probs(module: nn.Module, x: torch.Tensor, batch_size: int = 1000, outputs: str = "logits"
                     ) -> torch.Tensor:
    """Class probabilities of ``module`` on ``x``; ``outputs``: what the module returns ("logits" or "probs")."""
    if outputs not in ("logits", "probs"):
        raise ValueError(f"outputs must be 'logits' or 'probs', got {outputs!r}")
    module.eval()
    device = module_device(module)
    parts = []
    for i in range(0, len(x), batch_size):
        out = module(x[i:i + batch_size].to(device)).double().cpu()
        parts.append(out if outputs == "probs" else torch.softmax(out, dim=-1))
    return torch.cat(parts)


@torch.no_grad()
def accuracy(module: nn.Module, x: torch.Tensor, y: torch.Tensor, batch_size: int = 1000) -> float:
    """Top-1 accuracy of ``module`` (logits or probabilities) on ``(x, y)``."""
    module.eval()
    device = module_device(module)
    correct = 0
    for i in range(0, len(x), batch_size):
        correct += int((module(x[i:i + batch_size].to(device)).argmax(-1).cpu() == y[i:i + batch_size]).sum())
    return correct / len(x)


def calibration(probs: torch.Tensor, y: torch.Tensor, bins: int = ECE_BINS) -> dict[str, Any]:
    """Accuracy, NLL (nats), Brier score and ECE of predictive ``probs`` (N, C), with the
    reliability diagram's bins (``confidence``, ``accuracy``, ``count``; empty bins give ``None``)."""
    probs = probs.double()
    y = y.to(probs.device).long()
    conf, pred = probs.max(-1)
    correct = (pred == y).double()
    nll = -torch.log(probs.gather(1, y[:, None]).squeeze(1).clamp_min(1e-300)).mean()
    brier = ((probs - nn.functional.one_hot(y, probs.shape[-1]).double()) ** 2).sum(-1).mean()
    which = (conf * bins).long().clamp(0, bins - 1)  # bin b holds confidences in [b/B, (b+1)/B)
    count = torch.bincount(which, minlength=bins).double()
    conf_sum = torch.zeros(bins, dtype=torch.float64).index_add_(0, which, conf)
    acc_sum = torch.zeros(bins, dtype=torch.float64).index_add_(0, which, correct)
    ece = ((acc_sum - conf_sum).abs().sum() / len(y))  # sum_b (n_b/n) |acc_b - conf_b|
    nonempty = count > 0
    per_bin = lambda t: [float(v) if ok else None for v, ok in zip(t / count.clamp_min(1), nonempty)]  # noqa: E731
    return {"accuracy": float(correct.mean()), "nll": float(nll), "brier": float(brier), "ece": float(ece),
            "bins": {"confidence": per_bin(conf_sum), "accuracy": per_bin(acc_sum),
                     "count": [int(c) for c in count]}}
