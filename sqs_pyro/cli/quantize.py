"""``sqs-pyro quantize --hf PATH --out DIR``: one-shot (no training) dense-and-sparse, group-scaled
codebook quantisation of a causal LM's attention and MLP matrices and of its token embeddings
(:mod:`sqs_pyro.compressed.oneshot`); the other tensors (norms, biases) are stored in fp16.

With ``--data`` calibration text, every matrix is coded with GPTQ error feedback under its input
second moments (:mod:`sqs_pyro.compressed.error_feedback`; activation order, searched group
scales), gathered one decoder block at a time (:mod:`sqs_pyro.hf.oneshot`), and the exact weights
are the largest ``|w| ||x||``; the token table, tied to the LM head, is coded with error feedback
under the head's input moments (``--no-head-feedback``: nearest level with searched scales).
Without it, nearest-level coding and the largest ``|w|``. ``--eval-data`` gives the held-out
perplexity of the dense and of the quantised model (from the written file). ``--device`` is where
the model's forward passes run (the calibration moments and the perplexities); the coding itself
runs on the CPU. The summary reports the process's peak resident memory, also per parameter and
against the fp32 model's bytes.
"""
from __future__ import annotations

import argparse
import gc
import json
import resource
import time
from pathlib import Path

import torch

from sqs_pyro import hf
from sqs_pyro.cli.common import Progress, add_device_option, check_files, non_negative_int, positive_int
from sqs_pyro.compressed import accounting
from sqs_pyro.compressed.entropy_levels import matrix_sensitivity, sensitivity_lambdas
from sqs_pyro.compressed.error_feedback import SHRINK_GRID, hessian_scores
from sqs_pyro.compressed.oneshot import oneshot_config, oneshot_network, quantize_sites
from sqs_pyro.errors import SQSInputError
from sqs_pyro.format import save_compressed
from sqs_pyro.format.container import FLOAT_DTYPES
from sqs_pyro.hf.oneshot import blockwise_hessians, embedding_sites, tied_head_hessian
from sqs_pyro.infer.allocator import return_freed_memory
from sqs_pyro.infer.devices import resolve_device
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
    p.add_argument("--embedding-components", type=non_negative_int, metavar="K",
                   help="codebook levels of the token-embedding table (and of an untied LM head); default 2 x -K "
                        "(one bit more: the table is the most sensitive tensor); 0 keeps them as they are (stored "
                        "in --tensor-dtype), as a file that starts `compress --start` needs")
    p.add_argument("--head-feedback", action=argparse.BooleanOptionalAction,
                   help="code a token table that is also the LM head (tied), or an untied head, with error feedback "
                        "under the head's input moments (default: on with --data; --no-head-feedback: nearest level)")
    p.add_argument("--tensor-dtype", choices=FLOAT_DTYPES, default="float16",
                   help="dtype the other floating-point tensors (norms, biases) are stored in (float16)")
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
    p.add_argument("--weighted-codebook", action="store_true",
                   help="sensitivity-weighted k-means codebooks (SqueezeLLM): each normalised weight counts "
                        "H_cc sigma^2, its input's second moment times its group scale squared")
    p.add_argument("--entropy-lambda", type=float, default=0.0, metavar="LAMBDA",
                   help="entropy-constrained levels for the matrices (ECSQ; 0: off, nearest level): each normalised "
                        "weight u takes the level minimising (u - mu_k)^2 + LAMBDA (-log2 p_k), p_k the level's "
                        "usage, the levels from entropy-constrained Lloyd started at the -K k-means ones; the "
                        "file's entropy coder then pays about -log2 p_k bits per code. Larger LAMBDA, fewer bits "
                        "(with -K 16 about 0.006 gives some 2.9 bits per code)")
    p.add_argument("--embedding-entropy-lambda", type=float, metavar="LAMBDA",
                   help="--entropy-lambda for the token table (and an untied head); default: --entropy-lambda")
    p.add_argument("--rate-importance", action="store_true",
                   help="with --entropy-lambda and --data: in the error feedback, weigh each weight's squared error "
                        "by its share of the loss (sigma^2 / U_cc^2, over its matrix's mean), so that important "
                        "weights take finer levels and unimportant ones cheaper codes")
    p.add_argument("--lambda-sensitivity", type=float, default=0.0, metavar="ALPHA",
                   help="with --entropy-lambda and --data: each matrix's LAMBDA scaled by (G / s_m)^ALPHA, s_m = "
                        "mean H_cc w^2 (its output error per unit of relative error, from a first calibration "
                        "pass), G the geometric mean of s_m over the matrices: more bits for sensitive matrices "
                        "(0, the default: one LAMBDA for all; 1: equal slope in output-error units)")
    p.add_argument("--eval-data", type=Path, nargs="+", metavar="FILE",
                   help="held-out text: perplexity over all files, and of each file when there are several")
    p.add_argument("--seq-len", type=int, default=128, help="tokens per window (128)")
    p.add_argument("--max-eval-windows", type=positive_int,
                   help="evaluate on the first N windows of each held-out file only")
    p.add_argument("--seed", type=int, default=0, help="seed of the calibration pick (0)")
    p.add_argument("--no-progress", action="store_true", help="hide the pass-by-pass progress on stderr")
    p.add_argument("--return-freed-memory", action=argparse.BooleanOptionalAction, default=True,
                   help="return freed large tensors to the system at once (glibc), so that a stage's peak is its "
                        "own tensors, not the heap left by the stages before (default: on)")
    add_device_option(p)
    p.set_defaults(func=run)


def _check(args: argparse.Namespace) -> None:
    if args.components < 2 or args.embedding_components == 1:
        raise SQSInputError("--components and --embedding-components must be >= 2 (--embedding-components 0: "
                            "embeddings kept)")
    if args.exact_outliers < 0 or (args.exact_outliers >= 1 and args.exact_outliers != int(args.exact_outliers)):
        raise SQSInputError("--exact-outliers is a count (an integer >= 0) or a fraction in [0, 1)")
    if not 0.0 <= args.sparsity < 1.0:
        raise SQSInputError(f"--sparsity must be in [0, 1), got {args.sparsity}")
    if args.embedding_entropy_lambda is None:
        args.embedding_entropy_lambda = args.entropy_lambda
    if not (args.entropy_lambda >= 0 and args.embedding_entropy_lambda >= 0):  # also rejects nan
        raise SQSInputError("--entropy-lambda and --embedding-entropy-lambda must be >= 0 (0: nearest level)")
    if args.rate_importance and not (args.entropy_lambda > 0 or args.embedding_entropy_lambda > 0):
        raise SQSInputError("--rate-importance weighs the rate term of --entropy-lambda: give --entropy-lambda > 0")
    alpha = args.lambda_sensitivity
    if not 0.0 <= alpha <= 1.0 or (alpha and not (args.entropy_lambda > 0 and args.data)):  # also rejects nan
        raise SQSInputError("--lambda-sensitivity is an exponent in [0, 1] and needs --entropy-lambda > 0 and --data")
    if args.seq_len < 2:
        raise SQSInputError("--seq-len must be >= 2")
    if args.out.exists() and not args.out.is_dir():
        raise SQSInputError(f"--out {args.out} exists and is not a folder")
    if args.head_feedback is None:
        args.head_feedback = bool(args.data)
    if (args.natural_order or args.absmax_scales or args.weighted_codebook or args.head_feedback
            or args.rate_importance) and not args.data:
        raise SQSInputError("--natural-order / --absmax-scales / --weighted-codebook / --head-feedback / "
                            "--rate-importance use the "
                            "calibration data: they need --data")
    check_files("--data", args.data)
    check_files("--eval-data", args.eval_data)
    args.device = resolve_device(args.device)


def run(args: argparse.Namespace) -> int:
    """Load, calibrate, quantise, write and (optionally) evaluate."""
    _check(args)
    torch.set_num_threads(1)
    if args.return_freed_memory:
        return_freed_memory()
    say = Progress(not args.no_progress)
    say("loading the model")
    tokenizer, model = hf.load_model(args.hf, causal=True)
    net = hf.CausalLM(model).to(args.device)
    held = {str(f): hf.text_windows(tokenizer, [f], args.seq_len)[:args.max_eval_windows] for f in args.eval_data or ()}
    calib = None
    if args.data:
        windows = hf.text_windows(tokenizer, args.data, args.seq_len)
        pick = torch.randperm(len(windows), generator=torch.Generator().manual_seed(args.seed))[:args.calib_windows]
        calib = windows[pick, :-1].to(args.device)
    if held:
        say(f"perplexity of the dense model on {sum(len(w) for w in held.values())} windows")
    dense = _perplexities(net, held, "perplexity_dense")
    started = time.perf_counter()
    if calib is not None:
        say(f"calibration on {len(calib)} windows: input moments one decoder block at a time, then quantising "
            "the matrices with error feedback")
    else:
        say("quantising the matrices")
    network = _quantize(args, net, calib)
    seconds = time.perf_counter() - started
    model.to("meta")  # every weight is coded or copied into the network: free them before writing (config stays)
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / "model.sqs"
    file_bytes = save_compressed(network, path, model=net, tensor_dtype=args.tensor_dtype)
    acc = accounting(network)
    n = acc["compressed_params"]
    params = n + acc["other_params"]
    summary = {"hf": str(args.hf), "device": str(args.device), "components": args.components, "embedding_components": _embedding_k(args),
               "group_size": args.group_size, "sparsity": acc["sparsity"],
               "exact_outliers": args.exact_outliers, "calib_windows": 0 if calib is None else len(calib),
               "error_feedback": calib is not None, "act_order": calib is not None and not args.natural_order,
               "scale_search": calib is not None and not args.absmax_scales, "seconds": seconds,
               "file_bytes": file_bytes, "params": params, "bits_per_param": 8 * file_bytes / params,
               "compressed_params": n, "bits": acc["bits"], "side_bits_per_weight": 8 * acc["side_bytes"] / n,
               "exact_weights": sum(layer["exact"] for layer in acc["layers"]), **_entropy_config(args), **dense}
    del network, net, model
    gc.collect()
    if held:
        say(f"perplexity of the quantised model on {sum(len(w) for w in held.values())} windows")
        summary.update(_perplexities(hf.CausalLM(hf.load_transformers(path)).to(args.device), held, "perplexity"))
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux: kilobytes
    summary.update(peak_rss_bytes=peak, peak_bytes_per_param=peak / params, peak_over_fp32=peak / (4 * params))
    (args.out / "summary.json").write_text(json.dumps(summary, indent=1))
    for key, value in summary.items():
        if isinstance(value, dict):
            print(key, *(f"  {k}: {v:.4g}" for k, v in value.items()), sep="\n")
        else:
            print(f"{key:<24} {value:.4g}" if isinstance(value, float) else f"{key:<24} {value}")
    print(f"wrote {path} (load it with sqs_pyro.hf.load_transformers('{path}'), or sqs-pyro export)")
    return 0


def _perplexities(net: torch.nn.Module, held: dict[str, torch.Tensor], key: str) -> dict:
    """``{key: perplexity over every held-out window}``, and ``{key}_by_file`` with several files."""
    if not held:
        return {}
    out = {key: hf.perplexity(net, torch.cat(list(held.values())))}
    if len(held) > 1:
        out[f"{key}_by_file"] = {name: hf.perplexity(net, windows) for name, windows in held.items()}
    return out


def _embedding_k(args: argparse.Namespace) -> int:
    return 2 * args.components if args.embedding_components is None else args.embedding_components


def _quantize(args: argparse.Namespace, net: torch.nn.Module, calib: torch.Tensor | None):
    """The one-shot network: the embedding tables (never pruned) by nearest level, with searched scales
    when calibrated, or (``--head-feedback``) a table tied to the LM head with error feedback under the
    head's input moments; then the matrices of each decoder block under that block's input moments
    (gathered one block at a time)."""
    sites = select_layers(net, include=transformer_include(net.lm.config.model_type))
    tables = embedding_sites(net) if _embedding_k(args) else []
    count, fraction = (0, args.exact_outliers) if args.exact_outliers < 1 else (int(args.exact_outliers), 0.0)
    shrink = (1.0,) if args.absmax_scales else SHRINK_GRID
    options = dict(act_order=not args.natural_order, shrink=shrink, exact_fraction=fraction, sparsity=args.sparsity,
                   weighted_codebook=args.weighted_codebook, rate_importance=args.rate_importance)
    layers = {}
    lambdas = _matrix_lambdas(args, net, sites, calib)
    for s in tables:  # first, while little else is held: a table's temporaries are the quantiser's peak
        moments = None
        if args.head_feedback:
            moments = tied_head_hessian(net, s, calib.split(8))
            moments = None if moments is None else moments.cpu()
        if calib is not None and moments is None:
            moments = torch.eye(s.shape[1])  # nearest level, with the scale search
        layer, = quantize_sites(net, [s], _embedding_k(args), args.group_size, count, None,
                                None if moments is None else {s.name: moments},
                                entropy_lambda=args.embedding_entropy_lambda, **{**options, "sparsity": 0.0})
        layers[layer.name] = layer
    if calib is not None:
        for block, hessians in blockwise_hessians(net, sites, calib.split(8)):
            scores = hessian_scores(net, block, hessians)
            hessians = {name: h.cpu() for name, h in hessians.items()}
            for site in block:
                layer, = quantize_sites(net, [site], args.components, args.group_size, count, scores, hessians,
                                        entropy_lambda=lambdas.get(site.name, args.entropy_lambda), **options)
                layers[layer.name] = layer
            del hessians, scores
    rest = [s for s in sites if s.name not in layers]
    for layer in quantize_sites(net, rest, args.components, args.group_size, count,
                                entropy_lambda=args.entropy_lambda, **options):
        layers[layer.name] = layer
    net.cpu()  # the forward passes are done: the file is written from the CPU
    order = [s.name for s in tables] + [s.name for s in sites]
    config = oneshot_config(args.components, args.group_size, count, fraction, calib is not None,
                            not args.natural_order, shrink, args.sparsity, embedding_components=_embedding_k(args),
                            weighted_codebook=args.weighted_codebook, head_feedback=args.head_feedback,
                            **_entropy_config(args))
    return oneshot_network(net, [layers[name] for name in order], config)


def _matrix_lambdas(args: argparse.Namespace, net: torch.nn.Module, sites: list, calib: torch.Tensor | None
                    ) -> dict[str, float]:
    """``--lambda-sensitivity``: each matrix's LAMBDA from its sensitivity, over a first calibration pass
    (:func:`~sqs_pyro.compressed.entropy_levels.sensitivity_lambdas`); empty when off."""
    if not args.lambda_sensitivity:
        return {}
    s = {name: matrix_sensitivity(net.get_parameter(name), h)
         for _, hessians in blockwise_hessians(net, sites, calib.split(8)) for name, h in hessians.items()}
    return sensitivity_lambdas(s, args.entropy_lambda, args.lambda_sensitivity)


def _entropy_config(args: argparse.Namespace) -> dict:
    """The entropy-constrained options a file records (none when off, so that other files' configs stay as
    they were)."""
    if not (args.entropy_lambda > 0 or args.embedding_entropy_lambda > 0):
        return {}
    more = {"lambda_sensitivity": args.lambda_sensitivity} if args.lambda_sensitivity else {}
    return {"entropy_lambda": args.entropy_lambda, "embedding_entropy_lambda": args.embedding_entropy_lambda,
            "rate_importance": args.rate_importance, **more}
