"""A user's network and data for the CLI: ``MODULE:FACTORY`` specs, weight files, tensor files, and the
held-out metrics of ``compress --model`` and ``evaluate --model``.

A spec ``MODULE:FACTORY`` names a module importable from the current folder (or a ``path/to/file.py``)
and a callable in it, called without arguments. A data spec is such a factory returning tensors
``(inputs..., targets)``, a ``Dataset`` or a ``DataLoader``, or a ``.pt`` / ``.npz`` / ``.safetensors``
file holding tensors ``x`` and (except for ``--task distill``) ``y``. Every problem raises one
:class:`SQSInputError` naming the spec.
"""
from __future__ import annotations

import importlib
import importlib.util
import sys
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

from sqs_pyro.errors import SQSInputError
from sqs_pyro.infer.data import as_data, split_batch, to_device
from sqs_pyro.models.network import network_arguments

DATA_SUFFIXES = (".pt", ".npz", ".safetensors")


def _import(module: str) -> Any:
    if module.endswith(".py"):
        path = Path(module)
        if not path.is_file():
            raise SQSInputError(f"no such file: {path}")
        spec = importlib.util.spec_from_file_location(path.stem, path)
        loaded = importlib.util.module_from_spec(spec)
        sys.modules[path.stem] = loaded
        spec.loader.exec_module(loaded)
        return loaded
    if "" not in sys.path and str(Path.cwd()) not in sys.path:
        sys.path.insert(0, str(Path.cwd()))  # like `python -m`: modules in the current folder import
    return importlib.import_module(module)


def call_factory(spec: str, what: str) -> Any:
    """The value of ``FACTORY()`` for ``spec = "MODULE:FACTORY"``; :class:`SQSInputError` when the module is
    not found or fails to import, the factory is missing or not callable, or calling it fails."""
    module, sep, name = spec.rpartition(":")
    if not sep or not module or not name:
        raise SQSInputError(f"{what} {spec!r} must be MODULE:FACTORY (e.g. mymodels:build)")
    try:
        loaded = _import(module)
    except ModuleNotFoundError as exc:
        raise SQSInputError(f"{what} {spec!r}: module {exc.name!r} not found (run from the folder that holds it, "
                            "or give path/to/file.py:FACTORY)") from exc
    except SQSInputError:
        raise
    except Exception as exc:  # noqa: BLE001 - a user's module failing at import
        raise SQSInputError(f"{what} {spec!r}: importing {module} failed: {type(exc).__name__}: {exc}") from exc
    factory = getattr(loaded, name, None)
    if not callable(factory):
        raise SQSInputError(f"{what} {spec!r}: {module} has no callable {name!r}")
    try:
        return factory()
    except Exception as exc:  # noqa: BLE001 - a user's factory failing
        raise SQSInputError(f"{what} {spec!r}: {name}() failed: {type(exc).__name__}: {exc}") from exc


def read_tensors(path: Path) -> dict[str, torch.Tensor]:
    """The named tensors of a ``.pt`` (a dict, loaded with ``weights_only=True``), ``.npz`` (no pickles) or
    ``.safetensors`` file."""
    if not path.is_file():
        raise SQSInputError(f"no such file: {path}")
    try:
        if path.suffix == ".pt" or path.suffix == ".pth":
            values = torch.load(path, map_location="cpu", weights_only=True)
        elif path.suffix == ".npz":
            with np.load(path, allow_pickle=False) as arrays:
                values = {k: torch.from_numpy(arrays[k]) for k in arrays.files}
        elif path.suffix == ".safetensors":
            from safetensors.torch import load_file
            values = load_file(str(path))
        else:
            raise SQSInputError(f"{path}: unknown file type {path.suffix!r} (use .pt, .npz or .safetensors)")
    except SQSInputError:
        raise
    except Exception as exc:  # noqa: BLE001 - unreadable or unsafe file
        raise SQSInputError(f"cannot read {path}: {type(exc).__name__}: {exc}") from exc
    if not (isinstance(values, dict) and all(isinstance(v, torch.Tensor) for v in values.values())):
        raise SQSInputError(f"{path} must hold a dict of named tensors")
    return values


def load_network(spec: str, weights: Path | None = None) -> nn.Module:
    """``FACTORY()`` of ``spec`` (an ``nn.Module``), with the state_dict of ``weights`` loaded strictly, in eval mode."""
    net = call_factory(spec, "--model")
    if not isinstance(net, nn.Module):
        raise SQSInputError(f"--model {spec!r} returned a {type(net).__name__}, not a torch nn.Module")
    if weights is not None:
        state = read_tensors(weights)
        try:
            net.load_state_dict(state, strict=True)
        except RuntimeError as exc:
            raise SQSInputError(f"--weights {weights} do not fit --model {spec}: {exc}") from exc
    if not any(True for _ in net.parameters()):
        raise SQSInputError(f"--model {spec!r} has no parameters")
    return net.eval()


def load_data(spec: str, task: str, option: str = "--data") -> Any:
    """The data of a spec: a tensor file's ``(x, y)`` (``x`` alone for ``task="distill"``), or what a factory returns."""
    path = Path(spec)
    if path.suffix in DATA_SUFFIXES or path.suffix == ".pth":
        tensors = read_tensors(path)
        keys = ("x",) if task == "distill" else ("x", "y")
        missing = [k for k in keys if k not in tensors]
        if missing:
            raise SQSInputError(f"{option} {path} holds {sorted(tensors)}; it needs tensors named {', '.join(keys)}")
        return tuple(tensors[k] for k in keys)
    data = call_factory(spec, option)
    if isinstance(data, dict) and all(isinstance(v, torch.Tensor) for v in data.values()) and "x" in data:
        if task != "distill" and "y" not in data:
            raise SQSInputError(f"{option} {spec!r} returned tensors {sorted(data)} without targets 'y' "
                                "(only --task distill needs none)")
        return (data["x"],) if task == "distill" else (data["x"], data["y"])
    return data


def eval_batches(data: Any, task: str, device: torch.device, batch_size: int = 256
                 ) -> Iterator[tuple[Any, torch.Tensor | None]]:
    """``(inputs, target)`` batches of held-out data on ``device``: a Dataset in order, a loader as it comes."""
    data = as_data(data, batch_size)
    loader = DataLoader(data, batch_size=batch_size) if isinstance(data, Dataset) else data
    for batch in loader:
        inputs, y = split_batch(batch, task)
        yield to_device(inputs, device), y


def _call(net: nn.Module, inputs: Any) -> torch.Tensor:
    args, kwargs = network_arguments(inputs)
    return net(*args, **kwargs)


@torch.no_grad()
def held_out_metrics(net: nn.Module, data: Any, task: str, dense: nn.Module | None = None) -> dict[str, float]:
    """Mean metrics of ``net`` (eval mode) on held-out data. Classification: ``accuracy`` and ``nll``;
    regression: ``mse``; with the ``dense`` network: ``kl_to_dense`` (``KL(p_dense || p_net)`` per example, nats)
    and ``agreement`` (top-1 of ``net`` equal to the dense network's), the only metrics of ``task="distill"``."""
    net.eval()
    device = next(net.parameters()).device
    sums: dict[str, float] = {}
    count = 0
    for inputs, y in eval_batches(data, task, device):
        out = _call(net, inputs).float().cpu()
        n = out.shape[0]
        if task == "classification":
            sums["accuracy"] = sums.get("accuracy", 0.0) + float((out.argmax(-1) == y).sum())
            sums["nll"] = sums.get("nll", 0.0) + float(nn.functional.cross_entropy(out, y, reduction="sum"))
        elif task == "regression":
            sums["mse"] = sums.get("mse", 0.0) + float(((out - y.float()) ** 2).reshape(n, -1).mean(1).sum())
        if dense is not None and task != "regression":
            ref = _call(dense.eval(), inputs).float().cpu().log_softmax(-1)
            log_q = out.log_softmax(-1)
            sums["kl_to_dense"] = sums.get("kl_to_dense", 0.0) + float((ref.exp() * (ref - log_q)).sum())
            sums["agreement"] = sums.get("agreement", 0.0) + float((ref.argmax(-1) == out.argmax(-1)).sum())
        count += n
    if count == 0:
        raise SQSInputError("the held-out data are empty")
    return {k: v / count for k, v in sums.items()}
