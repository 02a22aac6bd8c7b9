"""Evaluation metrics of a trained or compressed network on held-out data."""
from __future__ import annotations

import torch
from torch import nn


@torch.no_grad()
def accuracy(module: nn.Module, x: torch.Tensor, y: torch.Tensor, batch_size: int = 1000) -> float:
    """Top-1 accuracy of ``module`` (logits or probabilities) on ``(x, y)``."""
    module.eval()
    correct = 0
    for i in range(0, len(x), batch_size):
        correct += int((module(x[i:i + batch_size]).argmax(-1) == y[i:i + batch_size]).sum())
    return correct / len(x)
