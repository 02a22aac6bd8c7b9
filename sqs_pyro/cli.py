"""The ``sqs-pyro`` command line. Each subcommand lives in its own ``cli_*`` module with a
``register(subparsers)`` function that adds its parser and sets ``func``."""
from __future__ import annotations

import argparse
import importlib
import sys
from typing import Sequence

from sqs_pyro.errors import CompressedFileError, SQSDivergenceError, SQSInputError

COMMAND_MODULES = (
    "sqs_pyro.cli_compress",
    "sqs_pyro.cli_inspect",
    "sqs_pyro.cli_evaluate",
    "sqs_pyro.cli_report",
    "sqs_pyro.cli_ablate",
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="sqs-pyro",
        description="Bayesian compression of neural networks (SQS: spike-and-slab GMM priors) with Pyro.",
    )
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name in COMMAND_MODULES:
        importlib.import_module(name).register(subparsers)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except (SQSInputError, CompressedFileError) as exc:
        print(f"sqs-pyro: error: {exc}", file=sys.stderr)
        return 2
    except SQSDivergenceError as exc:
        print(f"sqs-pyro: training diverged: {exc}", file=sys.stderr)
        return 3


if __name__ == "__main__":
    sys.exit(main())
