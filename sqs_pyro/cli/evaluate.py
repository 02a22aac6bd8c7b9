"""``sqs-pyro evaluate FILE``: MNIST test accuracy of a compressed ccexam MNIST CNN file."""
from __future__ import annotations

import argparse
from pathlib import Path

import torch

from sqs_pyro.data import accuracy, load_mnist, load_mnist_cnn
from sqs_pyro.errors import SQSInputError
from sqs_pyro.format.container import load_compressed


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "evaluate", help="load a compressed MNIST CNN file and report its MNIST test accuracy",
        description="Load a .sqs file into the ccexam MNIST CNN architecture (strict names, shapes and "
                    "dtypes) and print its top-1 accuracy on the MNIST test set.")
    p.add_argument("file", type=Path, help="the .sqs file (e.g. runs/default/model.sqs)")
    p.add_argument("--test-limit", type=int, help="evaluate on the first N test images only")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    if not args.file.is_file():
        raise SQSInputError(f"no such file: {args.file}")
    torch.set_num_threads(1)  # measured fastest for these small nets on 2 vCPUs
    model = load_compressed(args.file, load_mnist_cnn())
    x, y = load_mnist("test", args.test_limit)
    print(f"{args.file.name}: test accuracy {accuracy(model, x, y):.4f} on {len(x):,} MNIST test images")
    return 0
