"""A ``.sqs`` file's network as plain dense files that load without sqs-pyro: a torch state_dict (``.pt``), a
safetensors file, or an ONNX graph of the user's architecture (the optional ``onnx`` extra)."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

from sqs_pyro.errors import SQSInputError
from sqs_pyro.format.atomic import atomic_path
from sqs_pyro.format.container import load_compressed

DENSE_FORMATS = ("torch", "safetensors")


def dense_state(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """The decompressed state_dict of a ``.sqs`` file: every compressed weight dense (zeros where pruned,
    codebook values elsewhere) and every other tensor (biases, BatchNorm statistics) as stored."""
    return {name: t.contiguous() for name, t in load_compressed(path).state_dict().items()}


def write_dense(state: dict[str, torch.Tensor], out: str | os.PathLike, fmt: str) -> Path:
    """Write ``state`` atomically as a torch ``.pt`` file (``torch.load(out, weights_only=True)`` reads it) or a
    safetensors file (``safetensors.torch.load_file``); tensors that share storage are written as copies."""
    if fmt not in DENSE_FORMATS:
        raise SQSInputError(f"format must be one of {DENSE_FORMATS}, got {fmt!r}")
    state = {name: t.detach().clone() for name, t in state.items()}
    out = Path(out)
    with atomic_path(out) as tmp:
        if fmt == "torch":
            torch.save(state, tmp)
        else:
            from safetensors.torch import save_file

            save_file(state, str(tmp), metadata={"format": "pt", "source": "sqs-pyro"})
    return out


def export_onnx(model: nn.Module, example_inputs: Any, out: str | os.PathLike, opset: int = 18) -> Path:
    """Write ``model`` (eval mode; e.g. ``load_compressed(FILE, skeleton)``) as an ONNX graph traced on
    ``example_inputs`` (a tensor, a tuple of positional or a dict of keyword inputs), its batch dimension
    dynamic; needs ``pip install sqs-pyro[onnx]``."""
    try:
        import onnx  # noqa: F401 - the exporter needs it
    except ImportError as exc:
        raise SQSInputError("--onnx needs the onnx package: pip install 'sqs-pyro[onnx]'") from exc
    if isinstance(example_inputs, dict):
        args, kwargs = (), example_inputs
    else:
        args, kwargs = (tuple(example_inputs) if isinstance(example_inputs, (tuple, list)) else (example_inputs,)), {}
    names = list(kwargs) or [f"input_{i}" for i in range(len(args))]
    out = Path(out)
    with atomic_path(out) as tmp:
        torch.onnx.export(model.eval(), args, str(tmp), kwargs=kwargs or None, input_names=names,
                          output_names=["output"], opset_version=opset, dynamo=True,
                          dynamic_axes={name: {0: "batch"} for name in [*names, "output"]})
    return out
