"""``sqs-pyro ablate CONFIG``: run (or resume) a grid of compression runs from a YAML/JSON file."""
from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path

import torch

from sqs_pyro.experiments.ablation import (PRESETS, ablation_effects, expand_grid, format_effects, format_table,
                                          load_grid, read_records, run_grid, summarize)


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "ablate", help="run a grid of methods x sparsity x K x seeds from a YAML/JSON file (resumable)",
        description="Run every point of the grid in CONFIG that is not yet in its output file, appending "
                    "one JSON line per run (every measured number, seed and wall time), then print a "
                    "summary table and the ablation effects. Interrupt and rerun to resume. See "
                    "sqs_pyro/experiments/ablation.py for the file's keys; methods: "
                    f"{', '.join(PRESETS)}.")
    p.add_argument("config", type=Path, help="grid file (.yaml, .yml or .json)")
    p.add_argument("--output", type=Path, help="JSON-lines output (overrides the file's 'output')")
    p.add_argument("--limit", type=int, help="run at most N new grid points, then stop")
    p.add_argument("--dry-run", action="store_true", help="list the runs still to do and exit")
    p.add_argument("--no-progress", action="store_true", help="hide the progress bar over the runs")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    torch.set_num_threads(1)  # measured fastest for these small nets on 2 vCPUs
    grid = load_grid(args.config)
    if args.output is not None:
        grid = dataclasses.replace(grid, output=args.output)
    if args.dry_run:
        done = {r["key"] for r in read_records(grid.output)}
        todo = [spec.key for spec in expand_grid(grid) if spec.key not in done]
        print("\n".join(todo))
        print(f"{len(todo)} runs to do, output {grid.output}")
        return 0
    run_grid(grid, limit=args.limit, progress=not args.no_progress)
    keys = {spec.key for spec in expand_grid(grid)}
    records = [r for r in read_records(grid.output) if r["key"] in keys]
    print(format_table(summarize(records)))
    effects = ablation_effects(records)
    if effects:
        print()
        print(format_effects(effects))
    return 0
