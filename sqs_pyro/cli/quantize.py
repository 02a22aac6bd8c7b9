"""``sqs-pyro quantize --hf PATH --out DIR``: one-shot (no training) dense-and-sparse, group-scaled
codebook quantisation of a causal LM's attention and MLP matrices (:mod:`sqs_pyro.compressed.oneshot`).

With ``--data`` calibration text, every matrix is coded with GPTQ error feedback under its input
second moments (:mod:`sqs_pyro.compressed.error_feedback`; activation order, searched group
scales) and the exact weights are the largest ``|w| ||x||``; without it, nearest-level coding and the largest ``|w|``. ``--eval-data`` gives
the held-out perplexity of the dense and of the quantised model (from the written file).
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
from tqdm.auto import tqdm

from sqs_pyro import hf
from sqs_pyro.cli.common import Progress, check_files, non_negative_int, positive_int
from sqs_pyro.compressed import accounting
from sqs_pyro.compressed.error_feedback import SHRINK_GRID, hessian_scores, input_hessians
from sqs_pyro.compressed.oneshot import quantize_network
from sqs_pyro.errors import SQSInputError
from sqs_pyro.format import save_compressed
from sqs_pyro.models import select_layers, transformer_include


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "quantize", help="one-shot group-scaled codebook quantisation of a causal LM (no training)",
        description="Quantise a causal LM's attention and MLP matrices in one shot: fp16 scales per group of "
                    "--group-size weights of a row, one K-level k-means codebook per matrix on the scaled "
                    "values, the --exact-outliers largest weights of each matrix kept exact (fp16). With "
                    "--data, GPTQ error feedback on calibration windows of that text.")
    p.add_argument("--hf", required=True, metavar="PATH",
                   help="a transformers causal LM folder, a folder or file with one .gguf, or an installed package")
    p.add_argument("--out", type=Path, required=True, help="output folder: model.sqs and summary.json")
    p.add_argument("--components", "-K", type=positive_int, default=16, help="codebook levels per matrix (16)")
    p.add_argument("--group-size", type=non_negative_int, default=64,
                   help="weights of a row per fp16 scale (64); 0: no scales, one codebook on the raw weights")
    p.add_argument("--exact-outliers", type=float, default=16, metavar="N",
                   help="weights kept exact per matrix: a count, or a fraction of each matrix when below 1 (16)")
    p.add_argument("--sparsity", type=float, default=0.0,
                   help="prune this fraction of every matrix too (0): with --data SparseGPT's mask (error feedback), "
                        "else the smallest |w|; the result can start `compress --start` at that sparsity")
    p.add_argument("--data", type=Path, nargs="+", metavar="FILE", help="calibration text files (error feedback)")
    p.add_argument("--calib-windows", type=positive_int, default=128,
                   help="seeded calibration windows of --seq-len tokens drawn from --data (128)")
    p.add_argument("--natural-order", action="store_true",
                   help="error feedback column by column in stored order, each group's scale set when it is "
                        "reached (default: decreasing input energy, scales fixed up front)")
    p.add_argument("--absmax-scales", action="store_true",
                   help="group scale = max |w| (default: the best of 0.7..1.1 x max |w| by weighted coding error)")
    p.add_argument("--eval-data", type=Path, nargs="+", metavar="FILE", help="held-out text: perplexity")
    p.add_argument("--seq-len", type=int, default=128, help="tokens per window (128)")
    p.add_argument("--max-eval-windows", type=positive_int, help="evaluate on the first N held-out windows only")
    p.add_argument("--seed", type=int, default=0, help="seed of the calibration pick (0)")
    p.add_argument("--no-progress", action="store_true", help="hide the pass-by-pass progress on stderr")
    p.set_defaults(func=run)


def _check(args: argparse.Namespace) -> None:
    if args.components < 2:
        raise SQSInputError("--components must be >= 2")
    if args.exact_outliers < 0 or (args.exact_outliers >= 1 and args.exact_outliers != int(args.exact_outliers)):
        raise SQSInputError("--exact-outliers is a count (an integer >= 0) or a fraction in [0, 1)")
    if not 0.0 <= args.sparsity < 1.0:
        raise SQSInputError(f"--sparsity must be in [0, 1), got {args.sparsity}")
    if args.seq_len < 2:
        raise SQSInputError("--seq-len must be >= 2")
    if args.out.exists() and not args.out.is_dir():
        raise SQSInputError(f"--out {args.out} exists and is not a folder")
    if (args.natural_order or args.absmax_scales) and not args.data:
        raise SQSInputError("--natural-order / --absmax-scales change the error feedback: they need --data")
    check_files("--data", args.data)
    check_files("--eval-data", args.eval_data)


def run(args: argparse.Namespace) -> int:
    """Load, calibrate, quantise, write and (optionally) evaluate."""
    _check(args)
    torch.set_num_threads(1)
    say = Progress(not args.no_progress)
    say("loading the model")
    tokenizer, model = hf.load_model(args.hf, causal=True)
    net = hf.CausalLM(model)
    held = hf.text_windows(tokenizer, args.eval_data, args.seq_len)[:args.max_eval_windows] if args.eval_data else None
    calib = None
    if args.data:
        windows = hf.text_windows(tokenizer, args.data, args.seq_len)
        pick = torch.randperm(len(windows), generator=torch.Generator().manual_seed(args.seed))[:args.calib_windows]
        calib = windows[pick, :-1]
    started = time.perf_counter()
    sites = select_layers(net, include=transformer_include(model.config.model_type))
    hessians = scores = None
    if calib is not None:
        batches = tqdm(calib.split(8), desc="calibration", unit="batch", disable=args.no_progress)
        hessians = input_hessians(net, sites, batches)
        scores = hessian_scores(net, sites, hessians)
    say(f"quantising {len(sites)} matrices" + (" with error feedback" if calib is not None else ""))
    count, fraction = (0, args.exact_outliers) if args.exact_outliers < 1 else (int(args.exact_outliers), 0.0)
    network = quantize_network(net, sites, args.components, args.group_size, count, scores, hessians,
                               act_order=not args.natural_order, shrink=(1.0,) if args.absmax_scales else SHRINK_GRID,
                               exact_fraction=fraction, sparsity=args.sparsity)
    seconds = time.perf_counter() - started
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / "model.sqs"
    file_bytes = save_compressed(network, path, model=net)
    acc = accounting(network)
    n = acc["compressed_params"]
    summary = {"hf": str(args.hf), "components": args.components, "group_size": args.group_size,
               "sparsity": acc["sparsity"],
               "exact_outliers": args.exact_outliers, "calib_windows": 0 if calib is None else len(calib),
               "error_feedback": calib is not None, "act_order": calib is not None and not args.natural_order,
               "scale_search": calib is not None and not args.absmax_scales, "seconds": seconds,
               "file_bytes": file_bytes, "compressed_params": n, "bits": acc["bits"],
               "side_bits_per_weight": 8 * acc["side_bytes"] / n,
               "exact_weights": sum(layer["exact"] for layer in acc["layers"])}
    if held is not None:
        say(f"perplexity of the dense and the quantised model on {len(held)} windows")
        summary["perplexity_dense"] = hf.perplexity(net, held)
        summary["perplexity"] = hf.perplexity(hf.CausalLM(hf.load_transformers(path)), held)
    (args.out / "summary.json").write_text(json.dumps(summary, indent=1))
    for key, value in summary.items():
        print(f"{key:<24} {value:.4g}" if isinstance(value, float) else f"{key:<24} {value}")
    print(f"wrote {path} (load it with sqs_pyro.hf.load_transformers('{path}'), or sqs-pyro export)")
    return 0
