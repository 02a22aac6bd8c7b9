"""Which device a run uses: ``auto`` (CUDA when present), ``cpu``, ``cuda`` or ``cuda:N``."""
from __future__ import annotations

import re

import torch

from sqs_pyro.errors import SQSInputError

DEVICE_CHOICES = "auto, cpu, cuda or cuda:N"


def resolve_device(device: str | torch.device) -> torch.device:
    """The ``torch.device`` for ``device``; :class:`SQSInputError` for an unknown name or a CUDA device that is
    not present (checked before any work starts)."""
    if isinstance(device, torch.device):
        name = str(device)
    elif isinstance(device, str):
        name = device.strip().lower()
    else:
        raise SQSInputError(f"device must be {DEVICE_CHOICES}, got {type(device).__name__}")
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cpu":
        return torch.device("cpu")
    match = re.fullmatch(r"cuda(?::(\d+))?", name)
    if match is None:
        raise SQSInputError(f"device must be {DEVICE_CHOICES}, got {device!r}")
    if not torch.cuda.is_available():
        raise SQSInputError(f"device {name!r}: CUDA is not available on this machine (use cpu or auto)")
    index = int(match.group(1) or 0)
    if index >= torch.cuda.device_count():
        raise SQSInputError(f"device {name!r}: only {torch.cuda.device_count()} CUDA device(s) present")
    return torch.device("cuda", index)
