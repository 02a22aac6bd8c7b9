"""SQS against classical baselines and its own ablations on three MNIST workloads.

    python benchmarks/image_suite.py --quick          # configs/image_suite_quick.yaml
    python benchmarks/image_suite.py --standard       # configs/image_suite_standard*.yaml (issue 13)
    python benchmarks/image_suite.py                  # configs/image_suite.yaml (the full grid)
    python benchmarks/image_suite.py --quick --workloads lenet300 --report-only
    python benchmarks/image_suite.py --smoke          # CI: SQS and a baseline on the MNIST CNN, 4 steps, a temporary grid

Runs (or resumes) the grid with the ablation runner (`sqs-pyro ablate` does the same), then
writes, next to the grid's JSON lines in benchmarks/results/:

* ``<name>.md``: the table (method, achieved sparsity, K, CR formula, real ``.sqs`` file
  ratio, validation accuracy, test accuracy mean and spread over seeds, wall time), the
  ablation effects with their measured sign, and the issue-13 target check on the greedy
  network (the headline predictor, fixed before testing);
* ``<name>_pareto.png``: accuracy against the real compression ratio, one panel per workload.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import math
from pathlib import Path
from typing import Any, Iterable, Mapping

import torch

from sqs_pyro.experiments.ablation import (ablation_effects, expand_grid, format_effects, format_table, load_grid,
                               read_records, run_grid, summarize)
from smoke import add_smoke_flag, smoke_folder

HERE = Path(__file__).parent
# --smoke: two runs on the pretrained CNN (no LeNet to train), 256 training images, batch 64, 256 evaluation images
SMOKE_GRID = {"output": "smoke.jsonl", "workloads": ["mnist_cnn"], "methods": ["sqs", "magnitude_kmeans"],
              "sparsity": [0.75], "components": [4], "seeds": [0], "train_limit": 256, "test_limit": 256,
              "config": {"epochs": 1.0, "batch_size": 64}}
BASELINES = ("magnitude_kmeans", "magnitude_uniform", "dgms", "soft_weight_sharing")


def _cells(rows: Iterable[Mapping[str, Any]]) -> dict[tuple, dict[str, Mapping[str, Any]]]:
    """Rows by (workload, K, target sparsity) and method label."""
    cells: dict[tuple, dict[str, Mapping[str, Any]]] = {}
    for r in rows:
        cells.setdefault((r["workload"], r["components"], r["sparsity_target"]), {})[r["method"]] = r
    return cells


def target_check(rows: Iterable[Mapping[str, Any]], records: Iterable[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """Issue-13 targets per cell (workload, K, s), on the headline **greedy** network (never the
    better of greedy and averaged): SQS mean >= every baseline's mean; at s >= 0.95 a lead over
    the best baseline larger than the larger of the two standard deviations (each baseline at its
    setting with the better validation accuracy, when the grid tries several); every SQS ablation
    >= ``magnitude_kmeans`` - 3 points (no collapse); ``sqs`` >= ``sqs_noprior``; SQS wall time
    per run <= 2x ``magnitude_kmeans``: the same work as a baseline run (training, the compressed
    network, its file and its evaluation), beside the whole run (SQS's posterior-predictive
    ensemble on the test set included) and training alone."""
    wall, whole, train = {}, {}, {}
    for r in records:
        if "predictive_seconds" not in r:  # older runs timed the predictive inside their evaluation
            continue
        key = (r["workload"], r["components"], r["sparsity_target"], r["method"])
        whole.setdefault(key, []).append(r["wall_seconds"])
        wall.setdefault(key, []).append(r["wall_seconds"] - r["predictive_seconds"])
        train.setdefault(key, []).append(r["train_seconds"])
    out = []
    for (workload, k, s), methods in sorted(_cells(rows).items()):
        sqs = methods.get("sqs greedy")
        base = {}  # each baseline at its better setting, chosen on validation (e.g. its own learning rate)
        for kind in BASELINES:
            tried = [r for m, r in methods.items() if m == kind or m.startswith(f"{kind}_")]
            if tried:
                base[kind] = max(tried, key=lambda r: r["accuracy_val_mean"] or 0.0)
        if sqs is None or not base:
            continue
        best = max(base.values(), key=lambda r: r["accuracy_mean"])
        lead = sqs["accuracy_mean"] - best["accuracy_mean"]
        kmeans = base.get("magnitude_kmeans")
        ablations = {m.split(" ")[0]: r["accuracy_mean"] for m, r in methods.items()
                     if m.startswith("sqs_") and m.endswith("greedy")}
        noprior = ablations.get("sqs_noprior")
        ratio = whole_ratio = train_ratio = None
        if kmeans is not None and (workload, k, s, "magnitude_kmeans") in wall:
            mean = lambda times: sum(times) / len(times)  # noqa: E731
            sqs_key, kmeans_key = (workload, k, s, "sqs"), (workload, k, s, "magnitude_kmeans")
            ratio = mean(wall[sqs_key]) / mean(wall[kmeans_key])
            whole_ratio = mean(whole[sqs_key]) / mean(whole[kmeans_key])
            train_ratio = mean(train[sqs_key]) / mean(train[kmeans_key])
        out.append({
            "workload": workload, "components": k, "sparsity": s, "sqs": sqs["accuracy_mean"],
            "best_baseline": best["method"], "best": best["accuracy_mean"], "lead_points": 100 * lead,
            "at_least": lead >= 0,
            "clear_lead": (lead > max(sqs["accuracy_sd"], best["accuracy_sd"])) if s >= 0.95 else None,
            "worst_ablation": min(ablations.items(), key=lambda kv: kv[1]) if ablations else None,
            "no_collapse": (all(a >= kmeans["accuracy_mean"] - 0.03 for a in ablations.values())
                            if kmeans is not None and ablations else None),
            "prior_helps": sqs["accuracy_mean"] >= noprior if noprior is not None else None,
            "wall_ratio": ratio, "whole_ratio": whole_ratio, "train_ratio": train_ratio})
    return out


def format_targets(checks: list[Mapping[str, Any]]) -> str:
    mark = lambda v: "-" if v is None else ("yes" if v else "NO")  # noqa: E731
    lines = ["| workload | K | s | SQS greedy | best baseline | lead (pt) | >= all | clear lead (s>=0.95) | "
             "worst ablation | no collapse | sqs >= noprior | wall / kmeans | with predictive | train / kmeans |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for c in checks:
        worst = f"{c['worst_ablation'][0]} {c['worst_ablation'][1]:.4f}" if c["worst_ablation"] else "-"
        ratio, whole_ratio, train_ratio = (f"{c[k]:.2f}x" if c.get(k) is not None else "-"
                                           for k in ("wall_ratio", "whole_ratio", "train_ratio"))
        lines.append(f"| {c['workload']} | {c['components']} | {c['sparsity']:g} | {c['sqs']:.4f} | "
                     f"{c['best_baseline']} {c['best']:.4f} | {c['lead_points']:+.2f} | {mark(c['at_least'])} | "
                     f"{mark(c['clear_lead'])} | {worst} | {mark(c['no_collapse'])} | {mark(c['prior_helps'])} | "
                     f"{ratio} | {whole_ratio} | {train_ratio} |")
    prior = [c["prior_helps"] for c in checks if c["prior_helps"] is not None]
    lines.append("")
    lines.append(f"SQS >= every baseline in {sum(c['at_least'] for c in checks)} of {len(checks)} cells; "
                 f"sqs >= sqs_noprior in {sum(prior)} of {len(prior)} cells with the ablation.")
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
    parser.add_argument("--standard", action="store_true",
                        help="the standard suite: configs/image_suite_standard*.yaml (3 seeds, ablations at one)")
    parser.add_argument("--config", type=Path, nargs="+",
                        help="other grid files sharing one output (default: configs/image_suite[_quick].yaml)")
    parser.add_argument("--workloads", nargs="+", help="only these workloads of the grid")
    parser.add_argument("--limit", type=int, help="run at most N new grid points")
    parser.add_argument("--report-only", action="store_true", help="only rebuild the report from the JSON lines")
    add_smoke_flag(parser)
    args = parser.parse_args()
    torch.set_num_threads(1)

    if args.smoke:
        configs = [smoke_folder() / "smoke.json"]
        configs[0].write_text(json.dumps(SMOKE_GRID))
    elif args.standard:
        configs = sorted((HERE / "configs").glob("image_suite_standard*.yaml"))
    else:
        configs = args.config or [HERE / "configs" / ("image_suite_quick.yaml" if args.quick else "image_suite.yaml")]
    grids = [load_grid(c) for c in configs]
    if len({g.output for g in grids}) != 1:
        raise SystemExit("the grid files must share one output")
    if args.workloads:
        grids = [dataclasses.replace(g, workloads=tuple(w for w in g.workloads if w in args.workloads)) for g in grids]
    for grid in grids:
        if not args.report_only:
            run_grid(grid, limit=args.limit)
    grid, config = grids[0], configs[0]
    keys = {spec.key for g in grids for spec in expand_grid(g)}
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
        "Issue-13 targets (the greedy network, means over seeds):",
        format_targets(target_check(rows, records)),
    ])
    stem = grid.output.with_suffix("")
    stem.with_suffix(".md").write_text(report + "\n")
    pareto_plot(rows, Path(f"{stem}_pareto.png"))
    print(report)
    print(f"\nwrote {stem}.md and {stem}_pareto.png")


if __name__ == "__main__":
    main()
