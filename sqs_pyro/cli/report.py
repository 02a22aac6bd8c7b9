"""``sqs-pyro report RUN_DIR``: write RUN_DIR/report.html from a compress run's files."""
from __future__ import annotations

import argparse
from pathlib import Path

from sqs_pyro.analysis.report import build_report


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "report", help="write a self-contained HTML report of a compress run",
        description="Build RUN_DIR/report.html (figures embedded) from the summary.json, history.json, "
                    "analysis.json and posterior.nc that `sqs-pyro compress` wrote to RUN_DIR.")
    p.add_argument("run_dir", type=Path, metavar="RUN_DIR", help="output folder of a compress run")
    p.add_argument("--compare", type=Path, nargs="+", default=[], metavar="DIR",
                   help="further run folders: adds a comparison table and accuracy against compression")
    p.add_argument("--out", type=Path, help="report path (default RUN_DIR/report.html)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    path = build_report(args.run_dir, args.compare, args.out)
    print(f"report written to {path}")
    return 0
