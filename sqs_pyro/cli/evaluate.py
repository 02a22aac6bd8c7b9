"""``sqs-pyro evaluate FILE``: MNIST test accuracy of a compressed ccexam MNIST CNN file (with ``--averaged``
also the posterior predictive served from the file's posterior section), or, with ``--model MODULE:FACTORY
--data SPEC``, the held-out metrics of a compressed network of the user's own."""
from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

from sqs_pyro.cli.common import add_device_option, positive_int
from sqs_pyro.cli.user_model import held_out_metrics, load_data, load_network
from sqs_pyro.data import accuracy, calibration, load_mnist, load_mnist_cnn, predictive_probs
from sqs_pyro.errors import SQSInputError
from sqs_pyro.format.container import load_compressed
from sqs_pyro.infer.devices import resolve_device


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "evaluate", help="load a compressed file and report its held-out metrics (MNIST CNN, or --model on --data)",
        description="Load a .sqs file into the ccexam MNIST CNN architecture (strict names, shapes and dtypes) and "
                    "print its top-1 accuracy on the MNIST test set; or load it into FACTORY()'s network "
                    "(--model) and print its metrics on --data (classification: accuracy and NLL; regression: "
                    "MSE; with --weights also the KL to the dense network and the top-1 agreement with it).")
    p.add_argument("file", type=Path, help="the .sqs file (e.g. runs/default/model.sqs)")
    p.add_argument("--averaged", action="store_true",
                   help="also the posterior predictive from the file's posterior section: accuracy, NLL and ECE "
                        "beside the greedy network's")
    p.add_argument("--members", type=positive_int,
                   help="networks drawn for --averaged (default: the file's num_averaged)")
    p.add_argument("--test-limit", type=int, help="MNIST: evaluate on the first N test images only")
    p.add_argument("--model", metavar="MODULE:FACTORY", help="the architecture the file was compressed from")
    p.add_argument("--weights", type=Path, metavar="FILE",
                   help="with --model: the dense network's weights, for the KL to it and the top-1 agreement")
    p.add_argument("--data", metavar="SPEC", help="with --model: held-out data (as compress --data)")
    p.add_argument("--task", choices=("classification", "regression", "distill"), default="classification",
                   help="with --model: what the targets are (default classification; distill needs --weights)")
    add_device_option(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    if not args.file.is_file():
        raise SQSInputError(f"no such file: {args.file}")
    if args.members is not None and not args.averaged:
        raise SQSInputError("--members needs --averaged")
    torch.set_num_threads(1)  # measured fastest for these small nets on 2 vCPUs
    device = resolve_device(args.device)
    if args.model is None:
        if args.data or args.weights:
            raise SQSInputError("--data and --weights need --model MODULE:FACTORY")
        averaged = load_compressed(args.file, load_mnist_cnn(), predictive=True, members=args.members) \
            if args.averaged else None
        # the file's predictive draws its members on the CPU
        model = averaged.net if averaged is not None else load_compressed(args.file, load_mnist_cnn()).to(device)
        x, y = load_mnist("test", args.test_limit)
        print(f"{args.file.name}: test accuracy {accuracy(model, x, y):.4f} on {len(x):,} MNIST test images")
        if averaged is not None:
            for name, probs in (("greedy", predictive_probs(model, x)),
                                (f"averaged (M={len(averaged.member_weights)})",
                                 predictive_probs(averaged, x, outputs="probs"))):
                m = calibration(probs, y)
                print(f"  {name:16s} accuracy {m['accuracy']:.4f}  NLL {m['nll']:.4f}  ECE {m['ece']:.4f}")
        return 0
    if args.averaged:
        raise SQSInputError("--averaged serves the MNIST CNN files for now, not --model networks")
    if args.data is None:
        raise SQSInputError("--model needs --data SPEC to evaluate on")
    if args.task == "distill" and args.weights is None:
        raise SQSInputError("--task distill compares with the dense network: give its --weights")
    dense = load_network(args.model, args.weights).to(device) if args.weights is not None else None
    model = load_compressed(args.file, load_network(args.model)).to(device)
    data = load_data(args.data, args.task)
    started = time.perf_counter()
    metrics = held_out_metrics(model, data, args.task, dense)
    line = ", ".join(f"{name} {value:.4f}" for name, value in metrics.items())
    print(f"{args.file.name}: {line} ({time.perf_counter() - started:.1f} s)")
    return 0
