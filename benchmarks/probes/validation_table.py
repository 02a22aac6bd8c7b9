"""Validation greedy / validation averaged accuracy per (workload, method) and sparsity, from an
ablation runner's JSON lines (seed means, as :func:`sqs_pyro.experiments.ablation.summarize` takes
them): the table a default is chosen from.

`python benchmarks/probes/validation_table.py benchmarks/results/history/slab_scale_rate_probe.jsonl`"""
from __future__ import annotations

import argparse
import statistics

from sqs_pyro.experiments.ablation import read_records, summarize


def _cell(pair: tuple[float | None, float | None] | None) -> str:
    if pair is None:
        return "-"
    greedy, averaged = pair
    return f"{greedy:.4f} / " + ("-" if averaged is None else f"{averaged:.4f}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("records", help="JSON-lines file written by `sqs-pyro ablate`")
    p.add_argument("--components", type=int, default=4, help="K to tabulate (default 4)")
    args = p.parse_args()
    # summarize's rows are "<method> greedy" and "<method> averaged M=.." per (workload, s, K)
    val: dict[tuple[str, str], dict[float, list[float | None]]] = {}
    for row in summarize(read_records(args.records)):
        if row["components"] == args.components:
            method, read_out = row["method"].split(" ", 1)
            pair = val.setdefault((row["workload"], method), {}).setdefault(row["sparsity_target"], [None, None])
            pair[read_out != "greedy"] = row["accuracy_val_mean"]
    targets = sorted({s for by_s in val.values() for s in by_s})
    print("| workload | method | " + " | ".join(f"{s:g}" for s in targets) + " | mean | worst averaged - greedy |")
    print("|---|---|" + "---|" * (len(targets) + 2))
    for (workload, method), by_s in sorted(val.items()):
        greedy = statistics.fmean(g for g, _ in by_s.values())
        averaged = [a for _, a in by_s.values() if a is not None]
        gaps = [a - g for g, a in by_s.values() if a is not None]
        mean = (greedy, statistics.fmean(averaged) if len(averaged) == len(by_s) else None)
        print(f"| {workload} | {method} | " + " | ".join(_cell(by_s.get(s)) for s in targets)
              + f" | {_cell(mean)} | " + (f"{100 * min(gaps):+.2f} points" if gaps else "-") + " |")


if __name__ == "__main__":
    main()
