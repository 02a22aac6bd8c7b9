"""Calibration of a compressed network under shift and out of distribution (issue 38, item 2).

    python benchmarks/calibration.py --network ccexam --cells 75:16 95:4 98:4 --seeds 0 1 2 --fashion assets/fashion
    python benchmarks/calibration.py --network lenet5 --cells 95:4 --set posterior_epochs=0.5
    python benchmarks/calibration.py --smoke --fashion DIR      # a few hundred images, to a temporary folder

For every cell (``sparsity%:K``) and seed it compresses the network once with SQS (the CLI's
defaults, ``--epochs``, and the ``--set key=value`` overrides, validated by ``SQSConfig``) and runs
four predictors of that same compressed network on the same data:

* ``greedy``: the greedy compressed network;
* ``greedy_temperature``: its logits divided by a temperature fitted on MNIST's 10k validation images;
* ``laplace_last_layer``: a full-GGN Laplace posterior over its last ``nn.Linear`` (GGN summed over the
  training images, prior precision tuned on validation NLL, probit predictive;
  :class:`sqs_pyro.data.uncertainty.LastLayerLaplace`);
* ``sqs_averaged``: the SQS posterior predictive, ``result.averaged_module()``.

Metrics (accuracy, NLL, ECE with 15 bins, Brier) on the MNIST test images, each rotation
(15-90 degrees) and each corruption (:mod:`sqs_pyro.data.shift`), and the AUROC of telling
Fashion-MNIST test images from MNIST test images by predictive entropy. Writes into ``--output``
(replaced on each run): ``calibration.jsonl`` (a row per cell, seed, method and split, with wall
times), ``calibration.md`` (means, and sd over seeds) and per cell ``*_reliability.png`` (test
split, first seed) and ``*_rotation.png`` (accuracy and NLL against rotation angle).
"""
from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from overrides import parse_overrides  # noqa: E402

from sqs_pyro.cli.common import DEFAULTS  # noqa: E402
from sqs_pyro.config import SQSConfig  # noqa: E402
from sqs_pyro.data import calibration, predictive_probs  # noqa: E402
from sqs_pyro.data.uncertainty import LastLayerLaplace, fit_temperature, ood_auroc, temperature_scaled  # noqa: E402
from sqs_pyro.data.shift import ROTATIONS, load_fashion_mnist, shifted_sets  # noqa: E402
from sqs_pyro.errors import SQSInputError  # noqa: E402
from sqs_pyro.experiments.workloads import load_workload  # noqa: E402
from sqs_pyro.infer import compress  # noqa: E402

NETWORKS = {"ccexam": "mnist_cnn", "lenet5": "lenet5", "lenet300": "lenet300"}
METHODS = ("greedy", "greedy_temperature", "laplace_last_layer", "sqs_averaged")
METRICS = ("accuracy", "nll", "ece", "brier")
SMOKE = {"train_limit": 512, "eval_limit": 200, "config": {"epochs": 0.5, "batch_size": 32, "num_averaged": 2}}
BATCH = 500


def parse_cell(text: str) -> tuple[float, int]:
    """``"95:4"`` -> ``(0.95, 4)``."""
    try:
        percent, k = text.split(":")
        return float(percent) / 100.0, int(k)
    except ValueError:
        raise argparse.ArgumentTypeError(f"a cell is SPARSITY%:K such as 95:4, got {text!r}") from None


def commit() -> str:
    """The checked-out commit, with ``+dirty`` when tracked files differ from it."""
    head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=HERE, capture_output=True, text=True).stdout
    if not head:
        return "unknown (not a git checkout)"
    dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=HERE,
                           capture_output=True, text=True).stdout
    return head.strip() + ("+dirty" if dirty.strip() else "")


@torch.no_grad()
def logits_of(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    module.eval()
    return torch.cat([module(x[i:i + BATCH]).double() for i in range(0, len(x), BATCH)])


def timed(fn: Callable[[], Any]) -> tuple[Any, float]:
    started = time.perf_counter()
    value = fn()
    return value, time.perf_counter() - started


def run_cell(net: nn.Module, train: tuple, val: tuple, sets: dict[str, torch.Tensor], y_test: torch.Tensor,
             fashion: torch.Tensor, config: SQSConfig) -> list[dict[str, Any]]:
    """The four methods on one compressed network: a row per method and split, and one OOD row per method."""
    result, train_seconds = timed(lambda: compress(net, train, config, progress=False))
    greedy = result.greedy_module()
    inputs = {**sets, "fashion": fashion}
    logits, logit_seconds = {}, {}
    for name, x in inputs.items():
        logits[name], logit_seconds[name] = timed(lambda: logits_of(greedy, x))
    temperature, t_seconds = timed(lambda: fit_temperature(logits_of(greedy, val[0]), val[1]))
    laplace = LastLayerLaplace(greedy)
    _, laplace_seconds = timed(lambda: laplace.fit(*train).tune_prior_precision(*val))
    averaged, averaged_seconds = timed(lambda: result.averaged_module())
    predictors = {
        "greedy": (train_seconds, lambda name: torch.softmax(logits[name], -1), {}),
        "greedy_temperature": (t_seconds, lambda name: temperature_scaled(logits[name], temperature),
                               {"temperature": temperature}),
        "laplace_last_layer": (laplace_seconds, lambda name: predictive_probs(laplace, inputs[name], BATCH, "probs"),
                               {"prior_precision": laplace.prior_precision}),
        "sqs_averaged": (averaged_seconds, lambda name: predictive_probs(averaged, inputs[name], BATCH, "probs"),
                         {"num_averaged": config.num_averaged}),
    }
    rows = []
    for method, (fit_seconds, probs_of, extra) in predictors.items():
        probs = {}
        for name in inputs:
            probs[name], seconds = timed(lambda: probs_of(name))
            if method in ("greedy", "greedy_temperature"):
                seconds += logit_seconds[name]
            if name == "fashion":
                continue
            metrics = calibration(probs[name], y_test)
            rows.append({"method": method, "split": name, "seconds": seconds, "fit_seconds": fit_seconds,
                         **{m: metrics[m] for m in METRICS}, **extra,
                         **({"bins": metrics["bins"]} if name == "test" else {})})
        rows.append({"method": method, "split": "fashion_ood", "fit_seconds": fit_seconds,
                     "ood_auroc": ood_auroc(probs["test"], probs["fashion"]), **extra})
    for row in rows:
        row["train_seconds"] = train_seconds
    return rows


def _summary(values: list[float], digits: int) -> str:
    mean = statistics.fmean(values)
    return f"{mean:.{digits}f}" + (f"±{statistics.stdev(values):.{digits}f}" if len(values) > 1 else "")


def _pick(rows: list[dict[str, Any]], method: str, split: str) -> list[dict[str, Any]]:
    """The rows of one method on one split (one per seed)."""
    return [r for r in rows if r["method"] == method and r["split"] == split]


def cell_table(rows: list[dict[str, Any]]) -> str:
    """Per split: accuracy / NLL / ECE / Brier of every method (mean±sd over seeds), then the OOD AUROC."""
    splits = list(dict.fromkeys(r["split"] for r in rows if r["split"] != "fashion_ood"))
    lines = ["| split | " + " | ".join(f"{m}: acc / NLL / ECE / Brier" for m in METHODS) + " |",
             "|---|" + "---|" * len(METHODS)]
    for split in splits:
        cells = []
        for method in METHODS:
            mine = _pick(rows, method, split)
            cells.append(" / ".join(_summary([r[m] for r in mine], 4 if m == "accuracy" else 3) for m in METRICS))
        lines.append(f"| {split} | " + " | ".join(cells) + " |")
    auroc = [_summary([r["ood_auroc"] for r in _pick(rows, m, "fashion_ood")], 4) for m in METHODS]
    lines.append("| OOD AUROC (Fashion-MNIST, entropy) | " + " | ".join(auroc) + " |")
    lines += ["", "Fit seconds: greedy's is the SQS training (shared by all four methods); the others add theirs to it.",
              "", "| method | fit seconds | eval seconds (all splits) | settings (per seed) |", "|---|---|---|---|"]
    for method in METHODS:
        mine = [r for r in rows if r["method"] == method]
        fits = [r["fit_seconds"] for r in mine if r["split"] == "fashion_ood"]
        seeds = len(fits)
        evals = sum(r.get("seconds", 0.0) for r in mine) / seeds
        settings = ", ".join(f"{k}=" + "/".join(f"{r[k]:.4g}" for r in mine if r["split"] == "fashion_ood")
                             for k in ("temperature", "prior_precision", "num_averaged") if k in mine[0])
        lines.append(f"| {method} | {_summary(fits, 1)} | {evals:.1f} | {settings or '-'} |")
    return "\n".join(lines)


def nll_table(rows: list[dict[str, Any]]) -> str:
    """The docs' view of a cell: per split, each method's NLL mean ± sd over seeds and its mean ECE in brackets (the
    lowest NLL in bold), then the OOD AUROC and the test accuracy (mean ± sd)."""
    splits = list(dict.fromkeys(r["split"] for r in rows if r["split"] != "fashion_ood"))
    lines = ["| split | " + " | ".join(METHODS) + " |", "|---|" + "---|" * len(METHODS)]
    for split in splits:
        mine = {m: _pick(rows, m, split) for m in METHODS}
        best = min(METHODS, key=lambda m: statistics.fmean(r["nll"] for r in mine[m]))
        cells = [_summary([r["nll"] for r in mine[m]], 3) + f" ({statistics.fmean(r['ece'] for r in mine[m]):.3f})"
                 for m in METHODS]
        lines.append(f"| {split} | " + " | ".join(f"**{c}**" if m == best else c for m, c in zip(METHODS, cells)) + " |")
    lines.append("| OOD AUROC (higher is better) | " + " | ".join(
        _summary([r["ood_auroc"] for r in _pick(rows, m, "fashion_ood")], 4) for m in METHODS) + " |")
    lines.append("| test accuracy | " + " | ".join(_summary([r["accuracy"] for r in _pick(rows, m, "test")], 4)
                                                   for m in METHODS) + " |")
    return "\n".join(lines)


def plots(rows: list[dict[str, Any]], stem: Path) -> None:
    """``<stem>_reliability.png`` (test split, first seed) and ``<stem>_rotation.png``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    seed = min(r["seed"] for r in rows)
    fig, axes = plt.subplots(1, len(METHODS), figsize=(3.2 * len(METHODS), 3.2), sharey=True)
    for ax, method in zip(axes, METHODS):
        row = next(r for r in rows if r["method"] == method and r["split"] == "test" and r["seed"] == seed)
        bins = row["bins"]
        edges = [b / len(bins["count"]) for b in range(len(bins["count"]))]
        acc = [a if a is not None else 0.0 for a in bins["accuracy"]]
        ax.bar(edges, acc, width=1 / len(edges), align="edge", edgecolor="k", alpha=0.7, label="accuracy")
        ax.plot([0, 1], [0, 1], "k--", lw=1)
        ax.set_title(f"{method}\nECE {row['ece']:.3f}", fontsize=9)
        ax.set_xlabel("confidence")
    axes[0].set_ylabel("accuracy")
    fig.tight_layout()
    fig.savefig(f"{stem}_reliability.png", dpi=110)
    plt.close(fig)

    fig, axes = plt.subplots(1, 2, figsize=(10, 3.6))
    angles = [0, *ROTATIONS]
    for method, style in zip(METHODS, ("o-", "x--", "s:", "^-")):  # greedy and its temperature share the argmax
        for ax, metric, scale in zip(axes, ("accuracy", "nll"), (100, 1)):
            means = [statistics.fmean(r[metric] for r in rows if r["method"] == method
                                      and r["split"] == ("test" if a == 0 else f"rot{a}")) for a in angles]
            ax.plot(angles, [scale * m for m in means], style, label=method, alpha=0.8)
    for ax, label in zip(axes, ("test accuracy (%)", "test NLL (nats)")):
        ax.set_xlabel("rotation (degrees)")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(f"{stem}_rotation.png", dpi=110)
    plt.close(fig)


def write_report(rows: list[dict[str, Any]], output: Path, report: list[str]) -> None:
    """``calibration.md`` (``report``'s lines, then a table per cell over its seeds) and each cell's plots."""
    for s, k in dict.fromkeys((r["sparsity"], r["components"]) for r in rows):
        cell_rows = [r for r in rows if (r["sparsity"], r["components"]) == (s, k)]
        network, seeds = cell_rows[0]["network"], sorted({r["seed"] for r in cell_rows})
        stem = output / f"{network}_s{round(100 * s)}_k{k}"
        plots(cell_rows, stem)
        report += ["", f"## {network} at {100 * s:g}% / K={k}, seeds {seeds}", "", cell_table(cell_rows), "",
                   "NLL (mean ECE), the lowest NLL in bold:", "", nll_table(cell_rows),
                   "", f"![reliability]({stem.name}_reliability.png) ![rotation]({stem.name}_rotation.png)"]
    (output / "calibration.md").write_text("\n".join(report) + "\n")
    print("\n".join(report))


def merge(parts: list[Path], output: Path) -> None:
    """One report from the ``calibration.jsonl`` of runs split by cell or seed (one core: pieces that queue
    between other jobs), written with their rows into ``output``."""
    rows = [json.loads(line) for part in parts for line in part.read_text().splitlines() if line.strip()]
    if not rows:
        raise SystemExit("error: --merge: the files hold no rows")
    output.mkdir(parents=True, exist_ok=True)
    (output / "calibration.jsonl").write_text("".join(json.dumps(r, sort_keys=True) + "\n" for r in rows))
    commits = sorted({r["commit"] for r in rows})
    write_report(rows, output, [f"# Calibration: {', '.join(sorted({r['network'] for r in rows}))}, commit "
                                f"{', '.join(commits)}", "", "Merged from " + ", ".join(f"`{p}`" for p in parts)
                                + " (`" + " ".join(["python", *sys.argv]) + "`)."])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--network", choices=sorted(NETWORKS), default="ccexam")
    parser.add_argument("--cells", type=parse_cell, nargs="+", default=[(0.75, 16), (0.95, 4), (0.98, 4)],
                        help="SPARSITY%%:K cells (default 75:16 95:4 98:4)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--epochs", type=float, default=DEFAULTS["epochs"])
    parser.add_argument("--set", dest="overrides", nargs="*", default=[], metavar="KEY=VALUE",
                        help="SQSConfig overrides (any key but sparsity, components, seed and epochs)")
    parser.add_argument("--fashion", type=Path, default=Path("assets/fashion"),
                        help="a folder holding t10k-images-idx3-ubyte[.gz] (make assets-fashion)")
    parser.add_argument("--output", type=Path, help="output folder (default benchmarks/results/calibration-NETWORK)")
    parser.add_argument("--train-limit", type=int, help="first N training images (default all 50k)")
    parser.add_argument("--eval-limit", type=int, help="first N validation, test and Fashion-MNIST images (default all 10k)")
    parser.add_argument("--cache-dir", type=Path, default=HERE.parent / "runs" / "benchmark-cache",
                        help="trained reference LeNets")
    parser.add_argument("--smoke", action="store_true", help="a few hundred images and a few steps")
    parser.add_argument("--merge", type=Path, nargs="+", metavar="JSONL",
                        help="no runs: one report in --output from these calibration.jsonl files (runs split by cell or seed)")
    args = parser.parse_args()
    torch.set_num_threads(1)
    if args.merge:
        if args.output is None:
            raise SystemExit("error: --merge needs --output")
        return merge(args.merge, args.output)

    eval_limit = SMOKE["eval_limit"] if args.smoke else args.eval_limit
    train_limit = SMOKE["train_limit"] if args.smoke else args.train_limit
    overrides = parse_overrides(args.overrides)
    flagged = sorted(set(overrides) & {"sparsity", "components", "seed", "epochs"})
    if flagged:
        raise SystemExit(f"error: set {flagged} with --cells, --seeds and --epochs, not --set")
    base = {**DEFAULTS, "epochs": args.epochs, **(SMOKE["config"] if args.smoke else {}), **overrides}
    try:  # every config and the OOD images before any work
        configs = {(s, k, seed): SQSConfig.from_dict({**base, "sparsity": s, "components": k, "seed": seed})
                   for s, k in args.cells for seed in args.seeds}
        fashion = load_fashion_mnist(args.fashion, eval_limit)
    except SQSInputError as exc:
        raise SystemExit(f"error: {exc}") from None
    output = args.output or (Path(tempfile.mkdtemp(prefix="calibration-smoke-")) if args.smoke
                             else HERE / "results" / f"calibration-{args.network}")
    output.mkdir(parents=True, exist_ok=True)
    jsonl = output / "calibration.jsonl"
    jsonl.write_text("")

    workload = load_workload(NETWORKS[args.network], args.cache_dir, train_limit, eval_limit)
    sets = {"test": workload.test[0], **shifted_sets(workload.test[0])}
    source = commit()
    report = [f"# Calibration: {args.network}, commit {source}", "",
              "`" + " ".join(["python", *sys.argv]) + "`", "",
              f"Config (beside each cell's sparsity, K, seed): `{json.dumps(base, sort_keys=True)}`; "
              f"{len(workload.train[0])} training images, {len(workload.test[0])} test images, "
              f"{len(fashion)} Fashion-MNIST images."]
    rows = []
    for s, k in args.cells:
        for seed in args.seeds:
            print(f"{args.network} {100 * s:g}%/K={k} seed {seed}", flush=True)
            cell_rows = run_cell(workload.net, workload.train, workload.val, sets, workload.test[1], fashion,
                                 configs[(s, k, seed)])
            for row in cell_rows:
                row.update(network=args.network, sparsity=s, components=k, seed=seed, commit=source,
                           epochs=args.epochs, overrides=overrides)
            with open(jsonl, "a") as f:
                f.writelines(json.dumps(r, sort_keys=True) + "\n" for r in cell_rows)
            rows += cell_rows
    write_report(rows, output, report)
    print(f"wrote {output}")


if __name__ == "__main__":
    main()
