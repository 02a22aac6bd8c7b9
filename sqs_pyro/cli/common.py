"""What the ``sqs-pyro`` commands share: option types, the config from defaults + ``--config`` +
options, and the files a compression run leaves in its output folder."""
from __future__ import annotations

import argparse
import copy
import json
import sys
import time
from pathlib import Path
from typing import Any, Callable, Mapping

from torch import nn

from sqs_pyro.analysis import build_report, write_analysis
from sqs_pyro.config import SQSConfig
from sqs_pyro.errors import SQSInputError
from sqs_pyro.format.atomic import write_json_atomic
from sqs_pyro.format.container import load_compressed, read_header, save_compressed
from sqs_pyro.format.posterior import section_bytes
from sqs_pyro.infer import SQSResult
from sqs_pyro.infer.devices import DEVICE_CHOICES

# The default job's settings, chosen for the MNIST CNN on a 2-core machine (see docs/results.md).
DEFAULTS = {"epochs": 3.0, "batch_size": 256}
# What computed the guide's O(N K) terms (SpikeGMMGuide.kernel_path), as a run's table prints it.
KERNEL_PATHS = {"fused": "the fused C kernels", "mixed": "the fused C kernels for some layers, eager PyTorch for others",
                "eager": "eager PyTorch (the fused C kernels are unavailable: a much slower run)"}


class Progress:
    """Stage lines on stderr, each with the seconds since the command started (nothing when disabled)."""

    def __init__(self, enabled: bool) -> None:
        self.enabled, self.started = enabled, time.perf_counter()

    def __call__(self, stage: str) -> None:
        if self.enabled:
            print(f"[{time.perf_counter() - self.started:6.1f} s] {stage}", file=sys.stderr, flush=True)


def positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text}")
    return value


def sparsity_arg(text: str) -> float | str:
    """``--sparsity``: a fraction in [0, 1) kept exactly, or ``auto`` (the gates choose)."""
    if text == "auto":
        return text
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a fraction in [0, 1) or 'auto', got {text}") from None
    if not 0.0 <= value < 1.0:
        raise argparse.ArgumentTypeError(f"must be a fraction in [0, 1) or 'auto', got {text}")
    return value


def non_negative_int(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be an integer >= 0, got {text}")
    return value


def add_device_option(p: argparse.ArgumentParser) -> None:
    """``--device auto|cpu|cuda|cuda:N`` (default auto: CUDA when present)."""
    p.add_argument("--device", default="auto", metavar="DEVICE",
                   help=f"where to run: {DEVICE_CHOICES} (default auto: CUDA when present, else the CPU)")


def check_files(option: str, paths: list[Path] | None) -> None:
    """:class:`SQSInputError` naming ``option`` for the first of ``paths`` that is not a file: input
    files are checked before a model is loaded."""
    for path in paths or ():
        if not path.is_file():
            raise SQSInputError(f"{option}: no such file: {path}")


CONFIG_OPTIONS = ("sparsity", "components", "windows", "epochs", "batch_size", "mode", "seed", "num_averaged",
                  "adaptive_bits")


def read_config_file(path: Path) -> dict[str, Any]:
    """The JSON object in ``path``; :class:`SQSInputError` if unreadable, not JSON or not an object."""
    try:
        values = json.loads(path.read_text())
    except OSError as exc:
        raise SQSInputError(f"cannot read config file {path}: {exc.strerror or exc}") from exc
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise SQSInputError(f"config file {path} is not valid JSON: {exc}") from exc
    if not isinstance(values, dict):
        raise SQSInputError(f"config file {path} must hold a JSON object of SQSConfig fields, "
                            f"got a {type(values).__name__}")
    return values


def config_from_args(args: argparse.Namespace, defaults: dict[str, Any] = DEFAULTS) -> SQSConfig:
    """The job's ``defaults``, then the ``--config`` file, then the options given on the command line."""
    values: dict[str, Any] = dict(defaults)
    if args.config is not None:
        values.update(read_config_file(args.config))
    values.update({k: getattr(args, k) for k in CONFIG_OPTIONS if getattr(args, k) is not None})
    if values.get("sparsity") == "auto":  # no target: no pruning ramp, the posterior's g_j > 0.5 is the mask
        values.update(sparsity=0.0, sparsity_mode="auto")
    return SQSConfig.from_dict(values)


def write_outputs(out: Path, result: SQSResult, summary: dict[str, Any], posterior: bool = False,
                  tensor_dtype: str | None = None,
                  evaluate: Callable[[nn.Module], dict[str, float]] | None = None) -> None:
    """Everything a run leaves in its output folder; adds the compressed file's ``file`` name and
    ``file_bytes`` to ``summary``, and with ``posterior`` (the file's posterior section) its
    ``file_posterior_bytes``. ``tensor_dtype``: the dtype the file stores the uncompressed tensors in (``None``: as
    trained); then the greedy network is loaded back from the file and ``evaluate`` (metric name -> value) gives
    ``summary["greedy_file"]`` (and the printable ``table``'s rows), since rounding them changes its outputs."""
    out.mkdir(parents=True, exist_ok=True)
    path = out / "model.sqs"
    summary.update(file=path.name, file_bytes=save_compressed(result, path, posterior=posterior,
                                                              tensor_dtype=tensor_dtype), tensor_dtype=tensor_dtype)
    if posterior:
        summary["file_posterior_bytes"] = section_bytes(read_header(path))
    if tensor_dtype is not None and evaluate is not None:
        summary["greedy_file"] = evaluate(load_compressed(path, copy.deepcopy(result.skeleton)).eval())
        if "table" in summary:
            summary["table"].update(greedy_file_rows(summary))
    write_json_atomic(out / "history.json", result.history)
    write_json_atomic(out / "summary.json", summary)
    write_analysis(out, result)  # analysis.json + posterior.nc (ArviZ)
    build_report(out)  # report.html, built from the files above


def greedy_file_rows(summary: Mapping[str, Any]) -> list[tuple[str, str]]:
    """The printable rows of ``summary["greedy_file"]`` (the network loaded back from a file whose tensors were
    stored narrower, :func:`write_outputs`); none without it."""
    return [(f"{name}, greedy from the file ({summary['tensor_dtype']} tensors)", f"{value:.4f}")
            for name, value in summary.get("greedy_file", {}).items()]


def sparsity_row(config: Mapping[str, Any], achieved: float, search: Mapping[str, Any] | None = None
                 ) -> tuple[str, str]:
    """The summary table's sparsity line from a run's config fields: which mode ran, what was asked (or
    searched: ``--max-error``), and the sparsity the file holds."""
    if search is not None:
        met = "met" if search["met"] else "NOT met by any rung"
        return (f"sparsity (searched: validation error <= {search['max_error']:g}, {met}; "
                f"{len(search['trials'])} runs)", f"{achieved:.4f}")
    if config["sparsity_mode"] == "auto":
        return "sparsity (auto: the posterior chose)", f"{achieved:.4f}"
    if config["sparsity_mode"] == "median":
        return f"sparsity (median rule g > 0.5, at least {config['sparsity']:g})", f"{achieved:.4f}"
    return f"sparsity (exact: asked {config['sparsity']:g})", f"{achieved:.4f}"


def run_summary(result: SQSResult, task: str, dense: dict[str, float], greedy: dict[str, float], seconds: float,
                extra: dict[str, Any]) -> dict[str, Any]:
    """A ``summary.json`` of a run on the user's or a transformers model: held-out ``dense`` and ``greedy``
    metrics by name, the size accounting, the config, ``extra`` (what was compressed) and a printable ``table``."""
    acc = result.accounting()
    table = {"task": task, **dict([sparsity_row(result.config.to_dict(), acc["sparsity"], extra.get("sparsity_search"))]), "bits per kept weight": acc["bits"],
             "CR formula 32/((1-s)b)": f"{acc['cr_formula']:.1f}x",
             "compressed parameters": f"{acc['compressed_params']:,}", "wall time": f"{seconds:.0f} s",
             "O(N K) terms computed by": KERNEL_PATHS[result.guide.kernel_path()]}
    for name, value in dense.items():
        table[f"{name}, dense"] = f"{value:.4f}"
    for name, value in greedy.items():
        table[f"{name}, greedy"] = f"{value:.4f}"
    return {**extra, "task": task, "dense": dense, "greedy": greedy, "sparsity": acc["sparsity"],
            "sparsity_mode": result.config.sparsity_mode,
            "bits": acc["bits"], "cr_formula": acc["cr_formula"], "bytes_fp32": acc["bytes_fp32"],
            "bytes_packed": acc["bytes_packed"], "packed_ratio": acc["bytes_fp32"] / acc["bytes_packed"],
            "entropy_bound_bytes": acc["entropy_bound_bytes"], "compressed_params": acc["compressed_params"],
            "seconds": seconds, "train_seconds": result.seconds, "kernels": result.guide.kernel_path(),
            "config": result.config.to_dict(),
            "layers": acc["layers"], "table": table}
