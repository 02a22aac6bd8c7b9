"""Training checkpoints: atomic writes, safe reads, RNG states.

A checkpoint is a plain nested dict of tensors, numbers, strings, lists and tuples (see
:meth:`sqs_pyro.infer.trainer.Trainer.state_dict`), written with ``torch.save`` to a temporary file in
the target folder, flushed, fsync'ed and renamed over the old one, so a crash at any moment
leaves either the old or the new checkpoint, never a torn one. It is read back with
``torch.load(..., weights_only=True)`` only: nothing in it is unpickled as an arbitrary object.
"""
from __future__ import annotations

import os
import random
from pathlib import Path
from typing import Any, Mapping

import numpy as np
import torch

from sqs_pyro.format.atomic import atomic_path
from sqs_pyro.errors import SQSInputError

CHECKPOINT_NAME = "checkpoint.pt"
FORMAT = "sqs-pyro-checkpoint"
VERSION = 1


def save_checkpoint(state: Mapping[str, Any], path: str | os.PathLike) -> None:
    """Write ``state`` to ``path`` atomically (temporary file + fsync + rename + fsync of the folder)."""
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        torch.save({"format": FORMAT, "version": VERSION, **state}, f)


def load_checkpoint(path: str | os.PathLike) -> dict[str, Any]:
    """Read a checkpoint written by :func:`save_checkpoint` onto the CPU (``weights_only=True``).

    Raises :class:`SQSInputError` if the file is missing, unreadable or not an sqs-pyro checkpoint.
    """
    path = Path(path)
    if not path.is_file():
        raise SQSInputError(f"no checkpoint to resume from at {path}")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - any failure to read means the same to the user
        raise SQSInputError(f"checkpoint {path} is unreadable (truncated, corrupted or not a checkpoint): "
                            f"{exc}") from exc
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise SQSInputError(f"{path} is not an sqs-pyro checkpoint")
    if state.get("version") != VERSION:
        raise SQSInputError(f"checkpoint {path} has version {state.get('version')!r}; this sqs-pyro reads {VERSION}")
    return state


def rng_state(device: torch.device) -> dict[str, Any]:
    """The states of every generator that ``pyro.set_rng_seed`` seeds (torch, Python, NumPy),
    plus ``device``'s own torch generator when it is an accelerator, as plain tensors and tuples."""
    version, internal, gauss = random.getstate()
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    state = {"torch": torch.get_rng_state(), "python": (version, internal, gauss),
             "numpy": (kind, torch.from_numpy(keys.astype(np.int64)), int(pos), int(has_gauss), float(cached))}
    if device.type != "cpu":
        state["device"] = torch.get_device_module(device).get_rng_state(device)
    return state


def set_rng_state(state: Mapping[str, Any], device: torch.device) -> None:
    """Restore the generators saved by :func:`rng_state`."""
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    if device.type != "cpu" and "device" in state:
        torch.get_device_module(device).set_rng_state(state["device"], device)
