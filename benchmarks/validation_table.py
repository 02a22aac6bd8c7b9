"""Validation greedy / validation averaged accuracy per (workload, method) and sparsity, from an
ablation runner's JSON lines (seed means): the table a default is chosen from.

`python benchmarks/validation_table.py benchmarks/results/slab_scale_rate_probe.jsonl`"""
from __future__ import annotations

import argparse
import statistics
from collections import defaultdict

from sqs_pyro.experiments.ablation import read_records


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("records", help="JSON-lines file written by `sqs-pyro ablate`")
    p.add_argument("--components", type=int, default=4, help="K to tabulate (default 4)")
    args = p.parse_args()
    cells: dict[tuple[str, str], dict[float, list[tuple[float, float | None]]]] = defaultdict(lambda: defaultdict(list))
    for r in read_records(args.records):
        if r["components"] == args.components:
            cells[(r["workload"], r["method"])][r["sparsity_target"]].append(
                (r["accuracy_val_greedy"], r.get("accuracy_val_averaged")))
    targets = sorted({s for by_s in cells.values() for s in by_s})
    print("| workload | method | " + " | ".join(f"{s:g}" for s in targets) + " | mean | worst averaged - greedy |")
    print("|---|---|" + "---|" * (len(targets) + 2))
    for (workload, method), by_s in sorted(cells.items()):
        means = {s: (statistics.fmean(g for g, _ in runs),
                     statistics.fmean(a for _, a in runs) if all(a is not None for _, a in runs) else None)
                 for s, runs in by_s.items()}
        row = ["-" if s not in means else f"{means[s][0]:.4f} / " + ("-" if means[s][1] is None else f"{means[s][1]:.4f}")
               for s in targets]
        greedy = statistics.fmean(g for g, _ in means.values())
        averaged = [a for _, a in means.values() if a is not None]
        gap = min((a - g for g, a in means.values() if a is not None), default=None)
        summary = f"{greedy:.4f} / {statistics.fmean(averaged):.4f}" if len(averaged) == len(means) else f"{greedy:.4f} / -"
        print(f"| {workload} | {method} | " + " | ".join(row) + f" | {summary} | "
              + (f"{100 * gap:+.2f} points" if gap is not None else "-") + " |")


if __name__ == "__main__":
    main()
