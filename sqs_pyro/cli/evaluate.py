"""``sqs-pyro evaluate FILE``: MNIST test accuracy of a compressed ccexam MNIST CNN file; with
``--averaged`` also the posterior predictive served from the file's posterior section."""
from __future__ import annotations

import argparse
from pathlib import Path

import torch

from sqs_pyro.cli.common import positive_int
from sqs_pyro.data import accuracy, calibration, load_mnist, load_mnist_cnn, predictive_probs
from sqs_pyro.errors import SQSInputError
from sqs_pyro.format.container import load_compressed


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "evaluate", help="load a compressed MNIST CNN file and report its MNIST test accuracy",
        description="Load a .sqs file into the ccexam MNIST CNN architecture (strict names, shapes and "
                    "dtypes) and print its top-1 accuracy on the MNIST test set.")
    p.add_argument("file", type=Path, help="the .sqs file (e.g. runs/default/model.sqs)")
    p.add_argument("--test-limit", type=int, help="evaluate on the first N test images only")
    p.add_argument("--averaged", action="store_true",
                   help="also the posterior predictive from the file's posterior section: accuracy, NLL and ECE "
                        "beside the greedy network's")
    p.add_argument("--members", type=positive_int,
                   help="networks drawn for --averaged (default: the file's num_averaged)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    if not args.file.is_file():
        raise SQSInputError(f"no such file: {args.file}")
    if args.members is not None and not args.averaged:
        raise SQSInputError("--members needs --averaged")
    torch.set_num_threads(1)  # measured fastest for these small nets on 2 vCPUs
    averaged = load_compressed(args.file, load_mnist_cnn(), predictive=True, members=args.members) \
        if args.averaged else None
    model = averaged.net if averaged is not None else load_compressed(args.file, load_mnist_cnn())
    x, y = load_mnist("test", args.test_limit)
    print(f"{args.file.name}: test accuracy {accuracy(model, x, y):.4f} on {len(x):,} MNIST test images")
    if averaged is not None:
        for name, probs in (("greedy", predictive_probs(model, x)),
                            (f"averaged (M={len(averaged.member_weights)})",
                             predictive_probs(averaged, x, outputs="probs"))):
            m = calibration(probs, y)
            print(f"  {name:16s} accuracy {m['accuracy']:.4f}  NLL {m['nll']:.4f}  ECE {m['ece']:.4f}")
    return 0
