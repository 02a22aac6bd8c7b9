"""SQS against classical baselines and its own ablations on three MNIST workloads.

    python benchmarks/image_suite.py --quick          # configs/image_suite_quick.yaml
    python benchmarks/image_suite.py                  # configs/image_suite.yaml (the full grid)
    python benchmarks/image_suite.py --quick --workloads lenet300 --report-only

Runs (or resumes) the grid with the ablation runner (`sqs-pyro ablate` does the same), then
writes, next to the grid's JSON lines in benchmarks/results/:

* ``<name>.md``: the table (method, achieved sparsity, K, CR formula, real ``.sqs`` file
  ratio, accuracy mean and spread over seeds, wall time), the ablation effects with their
  measured sign, and the issue-5 target check;
* ``<name>_pareto.png``: accuracy against the real compression ratio, one panel per workload.
"""
from __future__ import annotations

import argparse
import dataclasses
import math
from pathlib import Path
from typing import Any, Iterable, Mapping

import torch

from sqs_pyro.experiments.ablation import (ablation_effects, expand_grid, format_effects, format_table, load_grid,
                               read_records, run_grid, summarize)

HERE = Path(__file__).parent
BASELINES = ("magnitude_kmeans", "magnitude_uniform", "dgms")


def _sqs_method(label: str) -> str | None:
    """``"sqs_tuned"`` for ``"sqs_tuned greedy"`` or ``"sqs_tuned averaged M=10"``; ``None`` for baselines."""
    for suffix in (" greedy", " averaged"):
        if suffix in label:
            return label.split(suffix)[0]
    return None


def target_check(rows: Iterable[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """Per workload, K and SQS variant: at how many sparsity levels it (best of greedy /
    averaged, mean over seeds) is at least as accurate as every baseline, and at how many of
    the levels s >= 0.95 strictly more accurate."""
    cells: dict[tuple, dict[float, dict[str, float]]] = {}
    for r in rows:
        cells.setdefault((r["workload"], r["components"]), {}).setdefault(r["sparsity_target"], {})[
            r["method"]] = r["accuracy_mean"]
    out = []
    for (workload, k), levels in sorted(cells.items()):
        variants = sorted({m for accs in levels.values() for m in map(_sqs_method, accs) if m})
        for variant in variants:
            at_least = strict_high = high = compared = 0
            for s, accs in sorted(levels.items()):
                mine = [a for m, a in accs.items() if _sqs_method(m) == variant]
                base = [accs[m] for m in BASELINES if m in accs]
                if not mine or not base:
                    continue
                compared += 1
                at_least += max(mine) >= max(base)
                if s >= 0.95:
                    high += 1
                    strict_high += max(mine) > max(base)
            out.append({"workload": workload, "components": k, "sqs": variant, "levels": compared,
                        "at_least": at_least, "high_levels": high, "strict_high": strict_high})
    return out


def format_targets(checks: Iterable[Mapping[str, Any]]) -> str:
    lines = ["| workload | K | SQS variant | >= every baseline (levels) | > every baseline at s >= 0.95 |",
             "|---|---|---|---|---|"]
    for c in checks:
        lines.append(f"| {c['workload']} | {c['components']} | {c['sqs']} | {c['at_least']} of {c['levels']} | "
                     f"{c['strict_high']} of {c['high_levels']} |")
    return "\n".join(lines)


def pareto_front(points: list[tuple[float, float]]) -> list[tuple[float, float]]:
    """The points not beaten in both ratio and accuracy, by increasing ratio."""
    front, best = [], float("-inf")
    for ratio, acc in sorted(points, key=lambda p: (-p[0], -p[1])):
        if acc > best:
            front.append((ratio, acc))
            best = acc
    return front[::-1]


def pareto_plot(rows: list[Mapping[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FuncFormatter

    workloads = sorted({r["workload"] for r in rows})
    methods = sorted({r["method"] for r in rows})
    colors = plt.get_cmap("tab20")
    fig, axes = plt.subplots(1, len(workloads), figsize=(5.5 * len(workloads), 4.2), squeeze=False)
    for ax, workload in zip(axes[0], workloads):
        mine = [r for r in rows if r["workload"] == workload]
        for i, method in enumerate(methods):
            pts = [r for r in mine if r["method"] == method]
            if not pts:
                continue
            marker = "^" if "averaged" in method else "o" if "greedy" in method else "s"
            color = colors(i % 20)
            ax.errorbar([r["real_ratio"] for r in pts], [100 * r["accuracy_mean"] for r in pts],
                        yerr=[100 * r["accuracy_sd"] for r in pts], fmt=marker, ms=5, capsize=2, color=color,
                        label=method)
            front = pareto_front([(r["real_ratio"], 100 * r["accuracy_mean"]) for r in pts])
            ax.plot(*zip(*front), "-", color=color, lw=1)
        ax.axhline(100 * mine[0]["accuracy_dense"], color="k", ls=":", lw=1, label="dense")
        ax.set_xscale("log")
        ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}x"))
        ax.xaxis.set_minor_formatter(FuncFormatter(
            lambda v, _: f"{v:g}x" if round(v / 10 ** math.floor(math.log10(v))) in (2, 5) else ""))
        ax.set_xlabel("real compression ratio (fp32 bytes / .sqs file bytes)")
        ax.set_ylabel("test accuracy (%)")
        ax.set_title(workload)
        ax.grid(alpha=0.3)
    legend = {}
    for ax in axes[0]:
        legend.update(zip(*reversed(ax.get_legend_handles_labels())))
    fig.tight_layout()
    fig.legend(list(legend.values()), list(legend), fontsize=7, loc="center left", bbox_to_anchor=(1.0, 0.5))
    fig.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="one seed, fewer levels, data subsets")
    parser.add_argument("--config", type=Path, help="another grid file (default: configs/image_suite[_quick].yaml)")
    parser.add_argument("--workloads", nargs="+", help="only these workloads of the grid")
    parser.add_argument("--limit", type=int, help="run at most N new grid points")
    parser.add_argument("--report-only", action="store_true", help="only rebuild the report from the JSON lines")
    args = parser.parse_args()
    torch.set_num_threads(1)

    config = args.config or HERE / "configs" / ("image_suite_quick.yaml" if args.quick else "image_suite.yaml")
    grid = load_grid(config)
    if args.workloads:
        grid = dataclasses.replace(grid, workloads=tuple(w for w in grid.workloads if w in args.workloads))
    if not args.report_only:
        run_grid(grid, limit=args.limit)
    keys = {spec.key for spec in expand_grid(grid)}
    records = [r for r in read_records(grid.output) if r["key"] in keys]
    if not records:
        print("no finished runs yet")
        return
    rows = summarize(records)
    report = "\n\n".join([
        f"# {grid.output.stem}: {len(records)} of {len(keys)} runs finished (config {config.name})",
        format_table(rows),
        "Ablations (paired by workload, sparsity, K and seed; positive = A more accurate):",
        format_effects(ablation_effects(records)),
        "Issue-5 target (SQS best of greedy / averaged vs every baseline, mean over seeds):",
        format_targets(target_check(rows)),
    ])
    stem = grid.output.with_suffix("")
    stem.with_suffix(".md").write_text(report + "\n")
    pareto_plot(rows, Path(f"{stem}_pareto.png"))
    print(report)
    print(f"\nwrote {stem}.md and {stem}_pareto.png")


if __name__ == "__main__":
    main()
