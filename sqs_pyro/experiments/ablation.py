"""The ablation runner: a grid of compression runs from a small YAML/JSON file, resumable,
one JSON line per finished run.

Grid file keys (paths are relative to the grid file's folder)::

    output: results/grid.jsonl         # where the JSON lines go (required)
    cache_dir: cache                   # trained reference LeNets (default: beside output)
    workloads: [mnist_cnn, lenet300]   # see sqs_pyro.experiments.workloads.WORKLOADS
    methods: [sqs, sqs_equal, magnitude_kmeans, {name: sqs_k3, method: sqs, overrides: {equal_windows: 3}}]
    sparsity: [0.5, 0.9]
    components: [4, 16]
    seeds: [0, 1, 2]
    config: {epochs: 1.0, batch_size: 128}   # SQSConfig fields shared by all runs
    train_limit: 10000                 # first N training images (default: all 50k)
    test_limit: 2000                   # first N test images (default: all 10k)
    reference_epochs: 4                # training epochs of the reference LeNets
    reference_seed: 0
    reference_recipe: short            # or "literature": the LeNets at the papers' dense accuracy

Each run is keyed by workload, method, sparsity, K, seed and a digest of every setting that
affects it; a run whose key is already in the output file is skipped, so an interrupted grid
resumes where it stopped, and changed settings never reuse stale lines. Lines are appended
whole, flushed and fsynced; a torn last line (a crash mid-write) is ignored and cut off.
"""
from __future__ import annotations

import copy
import hashlib
import importlib.util
import json
import math
import os
import statistics
import tempfile
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping

import yaml
from tqdm.auto import tqdm

from sqs_pyro.config import SQSConfig
from sqs_pyro.data import accuracy, calibration, predictive_probs
from sqs_pyro.errors import SQSInputError
from sqs_pyro.experiments.baselines import BASELINES, baseline_accounting, file_network
from sqs_pyro.compressed.materialize import CompressedNetwork
from sqs_pyro.experiments.workloads import LITERATURE, WORKLOADS, Workload, dense_accuracy, load_workload
from sqs_pyro.format.container import load_compressed, read_header, save_compressed
from sqs_pyro.infer import compress

SQS = "sqs"
BASELINE_KINDS = ("magnitude_kmeans", "magnitude_uniform", "dgms", "soft_weight_sharing")
PRESETS: dict[str, tuple[str, dict[str, Any]]] = {
    "sqs": (SQS, {}),
    "sqs_noprior": (SQS, {"kl_weight": 0.0}),
    "sqs_eb": (SQS, {"empirical_bayes": True}),  # the prior learned by variational EM (the KL = code length)
    "sqs_equal": (SQS, {"windows": "equal"}),
    "sqs_nowindows": (SQS, {"windows": "none"}),
    "sqs_sampled": (SQS, {"mode": "sample", "lr_weights": 1e-3}),  # the exact-ELBO forward, its own tuned rate
    **{kind: (kind, {}) for kind in BASELINE_KINDS},
    # the paper's weight rate (5e-4); tau (kl_weight) and the mixture's rate chosen on validation at the
    # literature budget (issue 39's history: the paper's tau 0.003 and rate 1e-4 leave 82% error in 6 epochs)
    "soft_weight_sharing": ("soft_weight_sharing", {"kl_weight": 0.3, "lr_weights": 5e-4, "lr_codebook": 1e-2}),
}
# The baselines' recipe under a grid's config: gradual magnitude pruning after a dense warm-up of 10%
# of the steps (Zhu & Gupta, 2017), and their codebook rate: the settings they were tuned with (SQS's gates
# learn from step 0, and its codebook rate was chosen on its own).
BASELINE_RECIPE = {"warmup_fraction": 0.1, "lr_codebook": 1e-3}
GRID_KEYS = {"output", "cache_dir", "workloads", "methods", "sparsity", "components", "seeds", "config",
             "train_limit", "test_limit", "reference_epochs", "reference_seed", "reference_recipe", "data_dir"}
REFERENCE_RECIPES = ("short", "literature")


@dataclass(frozen=True)
class MethodSpec:
    """A named method: ``kind`` (``sqs`` or a baseline) plus SQSConfig overrides."""

    name: str
    kind: str
    overrides: tuple[tuple[str, Any], ...] = ()


@dataclass(frozen=True)
class Grid:
    """A parsed grid file."""

    output: Path
    cache_dir: Path
    workloads: tuple[str, ...]
    methods: tuple[MethodSpec, ...]
    sparsity: tuple[float, ...]
    components: tuple[int, ...]
    seeds: tuple[int, ...]
    config: Mapping[str, Any] = field(default_factory=dict)
    train_limit: int | None = None
    test_limit: int | None = None
    reference_epochs: int = 4
    reference_seed: int = 0
    data_dir: Path | None = None
    reference_recipe: str = "short"


@dataclass(frozen=True)
class RunSpec:
    """One point of the grid."""

    key: str
    workload: str
    method: MethodSpec
    config: SQSConfig


def _method(entry: Any) -> MethodSpec:
    if isinstance(entry, str):
        if entry not in PRESETS:
            raise SQSInputError(f"unknown method {entry!r}; presets: {sorted(PRESETS)} (or a mapping with "
                                f"name, method and overrides)")
        kind, overrides = PRESETS[entry]
        return MethodSpec(entry, kind, tuple(sorted(overrides.items())))
    if isinstance(entry, Mapping) and set(entry) <= {"name", "method", "overrides"} and "name" in entry:
        kind = entry.get("method", entry["name"])
        if kind not in (SQS, *BASELINE_KINDS):
            raise SQSInputError(f"method {kind!r} of {entry['name']!r} must be one of {(SQS, *BASELINE_KINDS)}")
        overrides = entry.get("overrides") or {}
        if not isinstance(overrides, Mapping):
            raise SQSInputError(f"overrides of method {entry['name']!r} must be a mapping")
        return MethodSpec(str(entry["name"]), kind, tuple(sorted(overrides.items())))
    raise SQSInputError(f"a method is a preset name or a mapping with keys name, method, overrides; got {entry!r}")


def _list(raw: Mapping[str, Any], key: str, kind: type | tuple[type, ...], what: str) -> tuple:
    value = raw.get(key)
    if not isinstance(value, list) or not value:
        raise SQSInputError(f"grid key {key!r} must be a non-empty list")
    if not all(isinstance(v, kind) and not isinstance(v, bool) for v in value):
        raise SQSInputError(f"grid key {key!r} must list {what}, got {value!r}")
    return tuple(value)


def _optional_int(raw: Mapping[str, Any], key: str, default: int | None) -> int | None:
    """``raw[key]`` as a non-negative integer; ``None`` only where the default is ``None``."""
    value = raw.get(key, default)
    if (value is not None or default is not None) and (
            not isinstance(value, int) or isinstance(value, bool) or value < 0):
        raise SQSInputError(f"grid key {key!r} must be a non-negative integer, got {value!r}")
    return value


def parse_grid(raw: Mapping[str, Any], base_dir: Path = Path(".")) -> Grid:
    """Validate a grid mapping; relative paths are taken from ``base_dir``."""
    if not isinstance(raw, Mapping):
        raise SQSInputError("a grid file must hold a mapping")
    unknown = sorted(set(raw) - GRID_KEYS)
    if unknown:
        raise SQSInputError(f"unknown grid keys {unknown}; known: {sorted(GRID_KEYS)}")
    if "output" not in raw:
        raise SQSInputError("the grid needs an 'output' path for its JSON lines")
    workloads = _list(raw, "workloads", str, "workload names")
    bad = [w for w in workloads if w not in WORKLOADS]
    if bad:
        raise SQSInputError(f"unknown workloads {bad}; known: {WORKLOADS}")
    methods = tuple(_method(m) for m in raw.get("methods") or [])
    if not methods:
        raise SQSInputError("grid key 'methods' must be a non-empty list")
    sparsity = tuple(float(s) for s in _list(raw, "sparsity", (int, float), "numbers"))
    recipe = raw.get("reference_recipe", "short")
    if recipe not in REFERENCE_RECIPES:
        raise SQSInputError(f"grid key 'reference_recipe' must be one of {REFERENCE_RECIPES}, got {recipe!r}")
    config = raw.get("config") or {}
    if not isinstance(config, Mapping):
        raise SQSInputError("grid key 'config' must be a mapping of SQSConfig fields")
    output = Path(os.path.normpath(base_dir / str(raw["output"])))
    cache_dir = Path(os.path.normpath(base_dir / str(raw["cache_dir"]))) if "cache_dir" in raw else output.parent / "cache"
    grid = Grid(output=output, cache_dir=cache_dir, workloads=workloads, methods=methods, sparsity=sparsity,
                components=_list(raw, "components", int, "integers"), seeds=_list(raw, "seeds", int, "integers"),
                config=dict(config), train_limit=_optional_int(raw, "train_limit", None),
                test_limit=_optional_int(raw, "test_limit", None),
                reference_epochs=_optional_int(raw, "reference_epochs", 4),
                reference_seed=_optional_int(raw, "reference_seed", 0),
                data_dir=Path(os.path.normpath(base_dir / str(raw["data_dir"]))) if "data_dir" in raw else None,
                reference_recipe=recipe)
    expand_grid(grid)  # validates every SQSConfig of the grid now, not mid-run
    return grid


def load_grid(path: str | os.PathLike) -> Grid:
    """Read a grid from a YAML or JSON file (JSON is read by the YAML parser too)."""
    path = Path(path)
    try:
        raw = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError) as exc:
        raise SQSInputError(f"cannot read grid file {path}: {exc}") from exc
    return parse_grid(raw, path.parent)


# Config fields added after results were recorded: left out of the digest at the value that
# reproduces those results, so that their keys (and the runs behind them) stay valid.
_KEY_NEUTRAL = {"group_size": 0, "responsibility_scale": "own", "distill_weight": 0.0, "slab_scale_rate": 1.0,
                "gate_rule": "adam", "posterior_epochs": 0.0, "lr_posterior": 0.1, "posterior_kl_weight": 1.0,
                "sparsity_mode": "median"}
# Fields a baseline never reads (SQS's gates), held in a baseline's key at the values its recorded runs
# were keyed with: a change of SQS's defaults keeps the baselines' rows.
_BASELINE_KEY_PINNED = {"gate_init": 3.0, "group_size": 0, "responsibility_scale": "own", "slab_scale_rate": 1.0,
                        "posterior_epochs": 0.0, "sparsity_mode": "median"}


# Fields removed in issue 37 (never set away from these values) and the prior's scale as it was spelled:
# the digest still covers them as they were, so that the recorded runs keep their keys.
_REMOVED_FIELDS = {"codebook_fit": "kept", "forced_extremes": False, "responsibility_temperature": 1.0,
                   "slab_weights": (1.0,), "slab_locs": (0.0,), "weight_decay": 0.0}


def _digest_values(config: SQSConfig) -> dict[str, Any]:
    """``config``'s fields as the digest has always seen them (see ``_REMOVED_FIELDS``)."""
    values = {**config.to_dict(), **_REMOVED_FIELDS}
    values["slab_scales"] = (values.pop("slab_scale"),)
    return values


def run_key(workload: str, method: MethodSpec, config: SQSConfig, grid: Grid) -> str:
    """``workload/method/s=../K=../seed=../digest``: the digest covers every setting of the run."""
    values = {**_digest_values(config), **(_BASELINE_KEY_PINNED if method.kind != SQS else {})}
    values = {k: v for k, v in values.items() if k not in _KEY_NEUTRAL or v != _KEY_NEUTRAL[k]}
    settings = {"workload": workload, "kind": method.kind, "config": values,
                "train_limit": grid.train_limit, "test_limit": grid.test_limit,
                "reference_epochs": grid.reference_epochs, "reference_seed": grid.reference_seed}
    if grid.reference_recipe != "short":  # the short recipe's runs keep their keys
        settings["reference_recipe"] = grid.reference_recipe
    digest = hashlib.sha256(json.dumps(settings, sort_keys=True, default=str).encode()).hexdigest()[:10]
    return f"{workload}/{method.name}/s={config.sparsity:g}/K={config.components}/seed={config.seed}/{digest}"


def expand_grid(grid: Grid) -> list[RunSpec]:
    """All runs, seeds outermost, then workload, sparsity, K and method (so each finished block
    compares all methods at one setting)."""
    runs = []
    for seed in grid.seeds:
        for workload in grid.workloads:
            for sparsity in grid.sparsity:
                for k in grid.components:
                    for method in grid.methods:
                        recipe = BASELINE_RECIPE if method.kind != SQS else {}
                        values = {**recipe, **grid.config, **dict(method.overrides), "sparsity": sparsity,
                                  "components": k, "seed": seed}
                        config = SQSConfig.from_dict(values)
                        runs.append(RunSpec(run_key(workload, method, config, grid), workload, method, config))
    return runs


def read_records(path: str | os.PathLike) -> list[dict[str, Any]]:
    """The records of ``path``, one JSON object with a ``key`` per line (none if the file is missing).

    A last line without its newline that is not valid JSON is a write torn by a crash: it is left
    out (and :func:`append_record` removes it). Any other line that is not a record raises
    :class:`SQSInputError` naming the file and the line.
    """
    path = Path(path)
    if not path.exists():
        return []
    text = path.read_text()
    lines = text.splitlines()
    records = []
    for number, line in enumerate(lines, 1):
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            if number == len(lines) and not text.endswith("\n"):
                break  # a torn last line
            raise SQSInputError(f"{path}, line {number}: not valid JSON ({exc.msg}); fix or remove the line") from exc
        if not (isinstance(record, dict) and "key" in record):
            raise SQSInputError(f"{path}, line {number}: not a result record (a JSON object with a 'key')")
        records.append(record)
    return records


def append_record(path: str | os.PathLike, record: Mapping[str, Any]) -> None:
    """Append one JSON line in a single write, then flush and fsync. A torn last line left by a
    crash (no newline, not valid JSON) is first cut off; a complete last line without its
    newline gets one."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    line = json.dumps(record, sort_keys=True, allow_nan=False, default=str) + "\n"
    with open(path, "ab+") as f:
        f.seek(0)
        text = f.read()
        if text and not text.endswith(b"\n"):
            start = text.rfind(b"\n") + 1
            try:
                json.loads(text[start:])
                line = "\n" + line
            except ValueError:
                f.truncate(start)
        f.write(line.encode())
        f.flush()
        os.fsync(f.fileno())


def _json_number(value: float | None) -> float | None:
    return None if value is None or not math.isfinite(value) else value


def execute_run(spec: RunSpec, workload: Workload,
                measures: Callable[[CompressedNetwork], Mapping[str, Any]] | None = None,
                tensor_dtype: str | None = None) -> dict[str, Any]:
    """Train one method on a workload and measure it: accuracies, achieved sparsity, bits, the
    CR formula, packed bytes, the real ``.sqs`` file size, and wall times; ``measures`` adds its
    fields, measured on the compressed network (e.g. :func:`sqs_pyro.experiments.literature.paper_counts`).
    ``tensor_dtype`` (e.g. ``"float16"``): the file stores the other tensors (biases) so, and the
    validation and test accuracy of the file's network, loaded back, are recorded as ``accuracy_val_file``
    and ``accuracy_file``."""
    started = time.perf_counter()
    if spec.method.kind == SQS:
        result = compress(workload.net, workload.train, spec.config, progress=False)
    else:
        result = BASELINES[spec.method.kind](workload.net, workload.train, spec.config)
    train_seconds = time.perf_counter() - started
    compressed = result.compressed()
    t0 = time.perf_counter()
    greedy_module = result.greedy_module()
    metrics = {("greedy", split): calibration(predictive_probs(greedy_module, data[0], 256, "logits"), data[1])
               for split, data in (("val", workload.val), ("test", workload.test))}
    eval_seconds = time.perf_counter() - t0
    members, averaged, averaged_val, predictive_seconds = spec.config.num_averaged, None, None, 0.0
    if spec.method.kind == SQS:  # the posterior predictive on both splits: validation is what may choose
        t0 = time.perf_counter()
        predictor = result.averaged_module(members)
        averaged, averaged_val = (calibration(predictive_probs(predictor, x, 256, "probs"), y)
                                  for x, y in (workload.test, workload.val))
        predictive_seconds = time.perf_counter() - t0
    greedy = metrics[("greedy", "test")]
    acc = baseline_accounting(compressed)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "model.sqs"
        file_bytes = save_compressed(file_network(compressed), path, model=workload.net, tensor_dtype=tensor_dtype)
        code_bytes = sum(layer["codes"]["bytes"] for layer in read_header(path)["layers"])
        if tensor_dtype is not None:
            loaded = load_compressed(path, copy.deepcopy(workload.net)).eval()
            file_accuracy = {f"accuracy{tag}_file": accuracy(loaded, x, y)
                             for tag, (x, y) in (("_val", workload.val), ("", workload.test))}
    record: dict[str, Any] = {
        "accuracy_greedy": greedy["accuracy"], "accuracy_averaged": averaged["accuracy"] if averaged else None,
        "accuracy_val_greedy": metrics[("greedy", "val")]["accuracy"],
        "accuracy_val_averaged": averaged_val["accuracy"] if averaged_val else None,
        **{f"{m}_greedy": greedy[m] for m in ("nll", "brier", "ece")},
        **{f"{m}_averaged": averaged[m] if averaged else None for m in ("nll", "brier", "ece")},
        "num_averaged": members if averaged else None,
        "sparsity": acc["sparsity"], "bits": acc["bits"], "cr_formula": _json_number(acc["cr_formula"]),
        "compressed_params": acc["compressed_params"], "other_params": acc["other_params"],
        "bytes_fp32": acc["bytes_fp32"], "bytes_packed": acc["bytes_packed"], "side_bytes": acc["side_bytes"],
        "packed_ratio": acc["bytes_fp32"] / acc["bytes_packed"],
        "entropy_bound_bytes": acc["entropy_bound_bytes"],
        "file_bytes": file_bytes, "file_ratio": acc["bytes_fp32"] / file_bytes, "code_stream_bytes": code_bytes,
        "file_tensor_dtype": tensor_dtype, **(file_accuracy if tensor_dtype is not None else {}),
        "train_seconds": train_seconds, "eval_seconds": eval_seconds, "predictive_seconds": predictive_seconds,
        "kernels": result.guide.kernel_path() if spec.method.kind == SQS else None,
        "layers": [{k: layer[k] for k in ("name", "numel", "nnz", "density", "codes_used", "code_entropy_bits")}
                   for layer in acc["layers"]],
    }
    if measures is not None:
        record.update(measures(compressed))
    if averaged:  # the posterior predictive needs q: fp32 latents, a mask bit per weight, the rest dense
        record["averaged_bytes_est"] = acc["bytes_fp32"] + acc["compressed_params"] // 8
        record["averaged_ratio_est"] = acc["bytes_fp32"] / record["averaged_bytes_est"]
    return record


def source_digest() -> str:
    """A digest of the installed sources (``sqs_pyro``, its models and guides): records carry it
    so that numbers can be traced to the code that produced them (it is not part of the key)."""
    h = hashlib.sha256()
    for package in ("sqs_pyro", "sqs_pyro.models", "sqs_pyro.guides"):
        root = Path(importlib.util.find_spec(package).submodule_search_locations[0])
        for path in sorted(p for p in root.rglob("*") if p.suffix in (".py", ".c")):
            h.update(str(path.relative_to(root)).encode())
            h.update(path.read_bytes())
    return h.hexdigest()[:12]


def grid_workload(name: str, grid: Grid) -> Workload:
    """Workload ``name`` with the grid's data limits and reference-network settings."""
    recipe = LITERATURE.get(name) if grid.reference_recipe == "literature" else None
    return load_workload(name, grid.cache_dir, grid.train_limit, grid.test_limit, grid.reference_epochs,
                         grid.reference_seed, grid.data_dir, recipe)


def run_grid(grid: Grid, execute: Callable[[RunSpec, Workload], dict[str, Any]] = execute_run,
             log: Callable[[str], None] = print, limit: int | None = None,
             workload_loader: Callable[[str, Grid], Workload] | None = None,
             progress: bool = False) -> list[dict[str, Any]]:
    """Run every grid point whose key is not yet in ``grid.output`` (at most ``limit`` new runs)
    and append one line per run; returns the new records. ``progress``: a bar over the runs (the
    log lines are written above it)."""
    loader = workload_loader or grid_workload
    runs = expand_grid(grid)
    done = {r["key"] for r in read_records(grid.output)}
    todo = [r for r in runs if r.key not in done]
    log(f"{len(runs)} runs in the grid, {len(runs) - len(todo)} already in {grid.output}, {len(todo)} to run")
    workloads: dict[str, tuple[Workload, float]] = {}
    new = []
    digest = source_digest()
    chosen = todo[:limit] if limit is not None else todo
    bar = tqdm(total=len(chosen), disable=not progress, desc="ablate", unit="run")
    if progress and log is print:
        log = tqdm.write  # the lines above the bar
    for i, spec in enumerate(chosen, 1):
        if spec.workload not in workloads:
            w = loader(spec.workload, grid)
            workloads[spec.workload] = (w, dense_accuracy(w))
            log(f"workload {spec.workload}: dense test accuracy {workloads[spec.workload][1]:.4f}")
        workload, dense = workloads[spec.workload]
        started = time.perf_counter()
        measured = execute(spec, workload)
        record = {
            "key": spec.key, "workload": spec.workload, "method": spec.method.name, "kind": spec.method.kind,
            "overrides": dict(spec.method.overrides), "sparsity_target": spec.config.sparsity,
            "components": spec.config.components, "seed": spec.config.seed,
            "train_examples": len(workload.train[0]), "test_examples": len(workload.test[0]),
            "accuracy_dense": dense, **measured, "wall_seconds": time.perf_counter() - started,
            "finished_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "config": spec.config.to_dict(), "source_digest": digest,
        }
        append_record(grid.output, record)
        new.append(record)
        log(f"[{i}/{len(todo)}] {spec.key}: validation accuracy {record['accuracy_val_greedy']:.4f}, sparsity "
            f"{record['sparsity']:.4f}, file {record['file_ratio']:.1f}x, {record['wall_seconds']:.0f} s")
        bar.update(1)
    bar.close()
    return new


# ------------------------------------------------------------------ summaries


def variants(record: Mapping[str, Any]) -> Iterable[tuple[str, float, float, float | None]]:
    """``(label, test accuracy, real ratio, validation accuracy)`` rows of one record: SQS runs give
    a greedy row (the headline network, its file) and a posterior-predictive row (ratio: the fp32
    model plus a mask bit per weight, as it needs the variational parameters, not a file)."""
    if record["kind"] == SQS:
        yield (f"{record['method']} greedy", record["accuracy_greedy"], record["file_ratio"],
               record.get("accuracy_val_greedy"))
        yield (f"{record['method']} averaged M={record['num_averaged']}", record["accuracy_averaged"],
               record["averaged_ratio_est"], record.get("accuracy_val_averaged"))
    else:
        yield record["method"], record["accuracy_greedy"], record["file_ratio"], record.get("accuracy_val_greedy")


def _mean_sd(values: list[float]) -> tuple[float, float]:
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def summarize(records: Iterable[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """Rows per (workload, method variant, target sparsity, K): means and spreads over seeds."""
    groups: dict[tuple, list[tuple[Mapping[str, Any], float, float, float | None]]] = {}
    for r in records:
        for label, acc, ratio, val in variants(r):
            groups.setdefault((r["workload"], label, r["sparsity_target"], r["components"]), []).append(
                (r, acc, ratio, val))
    rows = []
    for (workload, label, target, k), items in sorted(groups.items(), key=lambda kv: (kv[0][0], kv[0][2], kv[0][3], kv[0][1])):
        acc_mean, acc_sd = _mean_sd([a for _, a, _, _ in items])
        vals = [v for *_, v in items if v is not None]
        rows.append({
            "workload": workload, "method": label, "sparsity_target": target, "components": k,
            "seeds": sorted(r["seed"] for r, *_ in items),
            "sparsity": statistics.fmean(r["sparsity"] for r, *_ in items),
            "cr_formula": statistics.fmean(r["cr_formula"] for r, *_ in items),
            "real_ratio": statistics.fmean(q for _, _, q, _ in items),
            "accuracy_mean": acc_mean, "accuracy_sd": acc_sd,
            "accuracy_val_mean": statistics.fmean(vals) if vals else None,
            "accuracy_dense": items[0][0]["accuracy_dense"],
            "wall_seconds": statistics.fmean(r["wall_seconds"] for r, *_ in items),
            "predictive_seconds": statistics.fmean(r.get("predictive_seconds", 0.0) for r, *_ in items),
        })
    return rows


def _wall(row: Mapping[str, Any]) -> str:
    """Wall seconds, with the posterior predictive's share when the run has one."""
    extra = row.get("predictive_seconds") or 0.0
    return f"{row['wall_seconds']:.0f}" + (f" ({extra:.0f} predictive)" if extra >= 0.5 else "")


def format_table(rows: Iterable[Mapping[str, Any]]) -> str:
    """A Markdown table of :func:`summarize` rows."""
    lines = ["| workload | method | target s | achieved s | K | CR formula | real file ratio | val accuracy | "
             "test accuracy (mean ± sd, n) | wall s (of which posterior predictive) |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        val = f"{r['accuracy_val_mean']:.4f}" if r.get("accuracy_val_mean") is not None else "-"
        lines.append(f"| {r['workload']} | {r['method']} | {r['sparsity_target']:g} | {r['sparsity']:.4f} | "
                     f"{r['components']} | {r['cr_formula']:.1f}x | {r['real_ratio']:.1f}x | {val} | "
                     f"{r['accuracy_mean']:.4f} ± {r['accuracy_sd']:.4f} ({len(r['seeds'])}) | {_wall(r)} |")
    return "\n".join(lines)


EFFECTS = (  # (name, method A, accuracy field of A, method B, accuracy field of B): effect = A - B
    ("Bayesian averaging vs greedy (sqs)", "sqs", "accuracy_averaged", "sqs", "accuracy_greedy"),
    ("outlier-aware vs equal-count windows (greedy)", "sqs", "accuracy_greedy", "sqs_equal", "accuracy_greedy"),
    ("outlier-aware vs no windows (greedy)", "sqs", "accuracy_greedy", "sqs_nowindows", "accuracy_greedy"),
    ("spike-and-slab prior vs no prior KL (greedy)", "sqs", "accuracy_greedy", "sqs_noprior", "accuracy_greedy"),
    ("empirical-Bayes prior vs the fixed prior (greedy)", "sqs_eb", "accuracy_greedy", "sqs", "accuracy_greedy"),
    ("hard straight-through vs sampled assignment (greedy)", "sqs", "accuracy_greedy", "sqs_sampled",
     "accuracy_greedy"),
)


def ablation_effects(records: Iterable[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """Paired accuracy differences A - B (in points) over matching (workload, s, K, seed) runs,
    with their measured sign: mean, sd, wins / ties / losses of A."""
    index = {(r["workload"], r["method"], r["sparsity_target"], r["components"], r["seed"]): r for r in records}
    out = []
    for name, a, field_a, b, field_b in EFFECTS:
        diffs = [100 * (ra[field_a] - index[(w, b, s, k, seed)][field_b])
                 for (w, m, s, k, seed), ra in index.items()
                 if m == a and (w, b, s, k, seed) in index and ra.get(field_a) is not None]
        if not diffs:
            continue
        mean, sd = _mean_sd(diffs)
        out.append({"effect": name, "pairs": len(diffs), "mean_points": mean, "sd_points": sd,
                    "wins": sum(d > 0 for d in diffs), "ties": sum(d == 0 for d in diffs),
                    "losses": sum(d < 0 for d in diffs)})
    return out


def format_effects(effects: Iterable[Mapping[str, Any]]) -> str:
    lines = ["| ablation (A vs B) | pairs | mean A - B (points) | sd | A wins / ties / losses |", "|---|---|---|---|---|"]
    for e in effects:
        lines.append(f"| {e['effect']} | {e['pairs']} | {e['mean_points']:+.2f} | {e['sd_points']:.2f} | "
                     f"{e['wins']} / {e['ties']} / {e['losses']} |")
    return "\n".join(lines)
