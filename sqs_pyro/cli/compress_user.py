"""``sqs-pyro compress --model MODULE:FACTORY --data SPEC``: compress a user's own network on their data.

The network comes from a factory (``--model``) with optional pretrained ``--weights`` (.pt state_dict or
.safetensors); the data from a factory or a tensor file (``--data``, see :mod:`sqs_pyro.cli.user_model`).
Every input is checked before training (:func:`sqs_pyro.infer.data.check_data`); the held-out metrics of
the dense and the greedy network on ``--val-data`` go into ``summary.json``.
"""
from __future__ import annotations

import argparse
import copy
import time
from pathlib import Path
from typing import Any

import torch

from sqs_pyro.cli.common import DEFAULTS, config_from_args, run_summary, write_outputs
from sqs_pyro.cli.user_model import held_out_metrics, load_data, load_network
from sqs_pyro.errors import SQSInputError
from sqs_pyro.infer import compress
from sqs_pyro.infer.batchnorm import BATCHNORM_MODES
from sqs_pyro.infer.data import as_data, check_data
from sqs_pyro.infer.devices import resolve_device
from sqs_pyro.infer.sparsity_search import search_sparsity

USER_TASKS = ("classification", "regression", "distill")
# Label-free (--task distill): a tenth of the KL (a tempered posterior: with a few thousand unlabelled inputs the
# prior's KL, a sum over every weight, outweighs the data term) and the latent weights at 3e-3; chosen on MNIST's
# validation split across a BatchNorm + depthwise network and LeNet-5 (docs/ecosystem.md, "defaults").
DISTILL_DEFAULTS = {**DEFAULTS, "kl_weight": 0.1, "lr_weights": 3e-3}


def register_options(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("your own network (--model)")
    g.add_argument("--model", metavar="MODULE:FACTORY",
                   help="compress the nn.Module that FACTORY() in MODULE returns (a module importable from the "
                        "current folder, or path/to/file.py:FACTORY) instead of the bundled MNIST CNN")
    g.add_argument("--weights", type=Path, metavar="FILE",
                   help="pretrained state_dict for --model: a .pt file (loaded with weights_only=True) or .safetensors")
    g.add_argument("--val-data", metavar="SPEC", help="held-out data (same forms as --data) for the summary's metrics")
    g.add_argument("--noise-scale", type=float, default=1.0, help="regression: the Gaussian likelihood's sd (default 1)")
    g.add_argument("--batchnorm", choices=BATCHNORM_MODES, default="frozen",
                   help="BatchNorm running statistics: frozen at their pretrained values (default), recalibrate "
                        "(frozen, then re-estimated on --data through the compressed network), train (batch statistics)")


def check_options(args: argparse.Namespace) -> None:
    """The --model options fit together (before anything loads)."""
    if not args.data or len(args.data) != 1:
        raise SQSInputError("--model needs one --data SPEC (MODULE:FACTORY or a .pt/.npz/.safetensors file of x and y)")
    if args.task not in (None, *USER_TASKS):
        raise SQSInputError(f"--model: --task must be one of {', '.join(USER_TASKS)}, not {args.task}")
    if args.hf is not None:
        raise SQSInputError("--model and --hf are exclusive")
    if args.distributed:
        raise SQSInputError("--distributed is not supported with --model yet")
    if args.weights is not None and not args.weights.is_file():
        raise SQSInputError(f"--weights: no such file: {args.weights}")
    if args.max_error is not None and (args.val_data is None or args.task == "regression"):
        raise SQSInputError("--max-error with --model needs --val-data, and a classification or distill task "
                            "(the error is 1 - accuracy, or 1 - top-1 agreement with the dense network)")


def run_user(args: argparse.Namespace) -> int:
    """Load the network and the data, compress, evaluate on --val-data and write --out."""
    check_options(args)
    task = args.task or "classification"
    device = resolve_device(args.device)
    net = load_network(args.model, args.weights).to(device)
    spec = str(args.data[0])
    train = load_data(spec, task)
    val = load_data(args.val_data, task, "--val-data") if args.val_data else None
    if val is not None:  # checked before training, as compress() checks the training data
        check_data(net, as_data(val, 256), task, name="--val-data")
    config = config_from_args(args, DISTILL_DEFAULTS if task == "distill" else DEFAULTS)
    started = time.perf_counter()
    torch.manual_seed(config.seed)
    extra: dict[str, Any] = {}
    if args.max_error is not None:
        metric = "accuracy" if task == "classification" else "agreement"
        result, trials, met = search_sparsity(
            lambda c: compress(net, train, c, task=task, progress=not args.no_progress, batchnorm=args.batchnorm,
                               bf16=args.bf16),
            lambda r: 1.0 - held_out_metrics(r.greedy_module(), val, task, dense=copy.deepcopy(net))[metric],
            config, args.max_error)
        extra["sparsity_search"] = {"max_error": args.max_error, "met": met, "trials": [t.to_dict() for t in trials]}
    else:
        result = compress(net, train, config, task=task, noise_scale=args.noise_scale, progress=not args.no_progress,
                          checkpoint_dir=args.out, checkpoint_every=args.checkpoint_every, resume=args.resume,
                          batchnorm=args.batchnorm, bf16=args.bf16)
    dense: dict[str, Any] = {}
    greedy: dict[str, Any] = {}
    if val is not None:
        dense = held_out_metrics(net, val, task, dense=net)  # KL 0, agreement 1: the reference row
        greedy = held_out_metrics(result.greedy_module(), val, task, dense=copy.deepcopy(net))
    summary = run_summary(result, task, dense, greedy, time.perf_counter() - started,
                          {"model": args.model, "weights": str(args.weights) if args.weights else None,
                           "data": spec, "val_data": args.val_data, "batchnorm": args.batchnorm,
                           "device": str(device), **extra})
    write_outputs(args.out, result, summary, tensor_dtype=args.tensor_dtype, evaluate=None if val is None else
                  lambda m: held_out_metrics(m, val, task, dense=copy.deepcopy(net)))
    for key, value in summary["table"].items():
        print(f"{key:<32} {value}")
    print(f"results written to {args.out}/ (check it: sqs-pyro evaluate {args.out}/model.sqs --model {args.model} "
          f"--data SPEC)")
    return 0
