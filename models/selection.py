"""Choosing which weight tensors of a network become stochastic (compressed) sample sites."""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Sequence

import torch
from torch import nn

from sqs_pyro.errors import SQSInputError


@dataclass(frozen=True)
class CompressedSite:
    """One compressed weight tensor: its parameter path in the network and its shape."""

    name: str
    shape: tuple[int, ...]
    layer_type: str

    @property
    def numel(self) -> int:
        n = 1
        for d in self.shape:
            n *= d
        return n


def _layer_type(module: nn.Module) -> str | None:
    if isinstance(module, nn.Linear):
        return "linear"
    if isinstance(module, (nn.Conv1d, nn.Conv2d, nn.Conv3d)):
        return "conv"
    # transformers' GPT-2 style Conv1D (a transposed Linear); matched by name so that
    # transformers is not needed at import time.
    if type(module).__name__ == "Conv1D" and isinstance(getattr(module, "weight", None), torch.Tensor):
        return "conv1d_hf"
    if isinstance(module, nn.Embedding):
        return "embedding"
    return None


def select_layers(
    net: nn.Module,
    include_types: Sequence[str] = ("linear", "conv"),
    include: Sequence[str] = (),
    exclude: Sequence[str] = (),
) -> list[CompressedSite]:
    """Return the weight tensors of ``net`` to compress, in module order.

    A layer is selected when its type is in ``include_types`` (``"linear"``, ``"conv"``
    for Conv1d/2d/3d including grouped and depthwise, ``"conv1d_hf"`` for transformers'
    Conv1D, ``"embedding"`` for ``nn.Embedding`` tables), its module path matches one of the regular expressions ``include`` (all if
    empty) and none of ``exclude``. Only ``.weight`` tensors are compressed; biases and all
    other parameters stay deterministic.

    Raises :class:`SQSInputError` when ``net`` is not a module, when nothing is selected,
    when a selected weight is shared with any other parameter (tied weights: compressing one
    name would silently untie them), when a selected weight is frozen
    (``requires_grad=False``: SQS must learn it; exclude the layer to keep it as it is), or
    when any parameter contains NaN/Inf. Frozen parameters that are not selected stay frozen.
    """
    if not isinstance(net, nn.Module):
        raise SQSInputError(f"the network must be a torch.nn.Module, got {type(net).__name__}")
    inc = [re.compile(p) for p in include]
    exc = [re.compile(p) for p in exclude]
    sites: list[CompressedSite] = []
    names: dict[int, list[str]] = {}
    for pname, p in net.named_parameters(remove_duplicate=False):
        names.setdefault(id(p), []).append(pname)
    for path, module in net.named_modules():
        kind = _layer_type(module)
        if kind is None or kind not in include_types:
            continue
        if inc and not any(p.search(path) for p in inc):
            continue
        if any(p.search(path) for p in exc):
            continue
        weight = module.weight
        name = f"{path}.weight" if path else "weight"
        others = [n for n in names.get(id(weight), []) if n != name]
        if others:
            raise SQSInputError(f"weight {name} is shared with {', '.join(others)} (tied weights); untie them or "
                                "exclude the layer")
        if not weight.requires_grad:
            raise SQSInputError(f"weight {name} is frozen (requires_grad=False) but selected for compression; "
                                "exclude the layer to keep it as it is, or unfreeze it")
        if not torch.isfinite(weight).all():
            raise SQSInputError(f"weight {name} contains NaN or Inf values")
        sites.append(CompressedSite(name=name, shape=tuple(weight.shape), layer_type=kind))
    if not sites:
        raise SQSInputError(
            f"no selectable layers in {type(net).__name__} (types={tuple(include_types)}, "
            f"include={tuple(include)}, exclude={tuple(exclude)})"
        )
    for pname, p in net.named_parameters():
        if not torch.isfinite(p).all():
            raise SQSInputError(f"parameter {pname} contains NaN or Inf values")
    return sites


# Default compressed layers of Hugging Face transformers (attention projections and MLP
# matrices); embeddings, norms, poolers and the LM head (often tied to the embeddings) stay
# dense unless selected explicitly.
TRANSFORMER_PATTERNS = {
    "bert": r"encoder\.layer\.\d+\.(attention\.(self\.(query|key|value)|output\.dense)|intermediate\.dense|output\.dense)$",
    "llama": r"layers\.\d+\.(self_attn\.(q|k|v|o)_proj|mlp\.(gate|up|down)_proj)$",
}


def transformer_include(model_type: str) -> tuple[str, ...]:
    """``include`` patterns selecting a transformer family's attention and MLP matrices."""
    family = "llama" if model_type in ("llama", "mistral", "qwen2", "smollm") else model_type
    if family not in TRANSFORMER_PATTERNS:
        raise SQSInputError(f"no layer preset for model type {model_type!r}; known: {sorted(TRANSFORMER_PATTERNS)} "
                            "(pass include/exclude patterns instead)")
    return (TRANSFORMER_PATTERNS[family],)
