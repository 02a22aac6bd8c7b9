"""Does the prior earn its place (issue 13)? ``sqs`` against ``sqs_noprior`` on the standard grid's K = 4 cells,
at the same target and at the same size.

    python benchmarks/image_suite.py --standard      # first: sqs (3 seeds) and sqs_noprior (3 seeds)
    python benchmarks/probes/prior_check.py                 # then: sqs_noprior at sqs's achieved sparsity, and the table

With the prior, the KL term prunes weights the data do not pay for, so ``sqs`` can end sparser than its target
(e.g. 0.796 at 75% on LeNet-5) and is then compared with a larger ``sqs_noprior`` network. For every cell whose
``sqs`` runs end more than 0.002 above the target, this script runs ``sqs_noprior`` at their mean achieved
sparsity (rounded to 3 decimals), with the same seeds, data and epochs (``results/history/prior_matched.jsonl``), and
writes ``results/history/prior_check.md``: test (and validation) accuracy of the greedy network, mean ± sd over the
seeds, at the same target and at the same size.
"""
from __future__ import annotations

import dataclasses
import statistics
from pathlib import Path

import torch

from sqs_pyro.experiments.ablation import expand_grid, load_grid, read_records, run_grid

HERE = Path(__file__).parent
CONFIGS = HERE.parent / "configs"
OVERSHOOT = 0.002


def _by_cell(grid, records, method: str) -> dict[tuple[str, float], list[dict]]:
    """The grid's finished runs of ``method`` by (workload, target sparsity)."""
    keys = {spec.key for spec in expand_grid(grid) if spec.method.name == method}
    cells: dict[tuple[str, float], list[dict]] = {}
    for r in records:
        if r["key"] in keys:
            cells.setdefault((r["workload"], r["sparsity_target"]), []).append(r)
    return cells


def _stats(runs: list[dict], field: str) -> tuple[float, float]:
    values = [r[field] for r in runs]
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def main() -> None:
    torch.set_num_threads(1)
    suite = load_grid(CONFIGS / "image_suite_standard.yaml")
    noprior_grid = load_grid(CONFIGS / "image_suite_standard_noprior.yaml")
    noprior_grid = dataclasses.replace(noprior_grid, seeds=suite.seeds)
    records = read_records(suite.output)
    sqs = _by_cell(suite, records, "sqs")
    noprior = _by_cell(noprior_grid, records, "sqs_noprior")
    output = HERE.parent / "results" / "history" / "prior_matched.jsonl"
    matched_grids = {}
    for (workload, target), runs in sorted(sqs.items()):
        size = round(statistics.fmean(r["sparsity"] for r in runs), 3)
        if size > target + OVERSHOOT:
            matched_grids[workload, target] = dataclasses.replace(
                noprior_grid, output=output, workloads=(workload,), sparsity=(size,))
    for grid in matched_grids.values():
        run_grid(grid)
    matched_records = read_records(output)
    lines = ["| workload | s | sqs: achieved s | sqs test | sqs_noprior at s: test | at sqs's size: s, test | "
             "val: sqs / noprior at s / at size |", "|---|---|---|---|---|---|---|"]
    same_target = same_size = cells = 0
    for (workload, target), runs in sorted(sqs.items()):
        base = noprior.get((workload, target), [])
        if len(base) != len(runs):
            continue
        cells += 1
        grid = matched_grids.get((workload, target))
        matched = (_by_cell(grid, matched_records, "sqs_noprior").get((workload, grid.sparsity[0]), [])
                   if grid else base)
        (a, a_sd), (b, b_sd) = _stats(runs, "accuracy_greedy"), _stats(base, "accuracy_greedy")
        same_target += a >= b
        c, c_sd = _stats(matched, "accuracy_greedy") if matched else (float("nan"), 0.0)
        same_size += a >= c
        vals = [_stats(x, "accuracy_val_greedy")[0] if x else float("nan") for x in (runs, base, matched)]
        size = f"{grid.sparsity[0]:.3f}, {c:.4f} ± {c_sd:.4f}" if grid else "(the same)"
        lines.append(f"| {workload} | {target:g} | {_stats(runs, 'sparsity')[0]:.4f} | {a:.4f} ± {a_sd:.4f} | "
                     f"{b:.4f} ± {b_sd:.4f} | {size} | {vals[0]:.4f} / {vals[1]:.4f} / {vals[2]:.4f} |")
    lines += ["", f"sqs >= sqs_noprior (test means over {len(suite.seeds)} seeds): {same_target} of {cells} cells "
              f"at the same target, {same_size} of {cells} at the same size."]
    report = "\n".join(lines)
    (HERE.parent / "results" / "history" / "prior_check.md").write_text(
        "# The prior against no prior, standard grid, K = 4 (`python benchmarks/probes/prior_check.py`)\n\n" + report + "\n")
    print(report)


if __name__ == "__main__":
    main()
