"""The ``sqs-pyro`` command line. Each subcommand lives in its own module of this package with
a ``register(subparsers)`` function that adds its parser and sets ``func``; :mod:`.common`
holds what they share."""
from __future__ import annotations

import argparse
import sys
from typing import Sequence

from sqs_pyro import __version__
from sqs_pyro.cli import ablate, compress, evaluate, export, inspect, quantize, report
from sqs_pyro.errors import CompressedFileError, SQSDivergenceError, SQSInputError

COMMANDS = (compress, quantize, inspect, evaluate, export, report, ablate)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="sqs-pyro",
        description="Bayesian compression of neural networks (SQS: spike-and-slab GMM priors) with Pyro.",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for command in COMMANDS:
        command.register(subparsers)
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
