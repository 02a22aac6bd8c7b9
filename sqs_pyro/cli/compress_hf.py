"""``sqs-pyro compress --hf PATH --task lm|classification``: compress a Hugging Face model.

* ``--task lm``: a causal LM (e.g. a Llama folder, or a folder / package holding one
  ``.gguf``); ``--data`` text files are cut into windows of ``--seq-len + 1`` tokens; the
  token-level categorical likelihood scales by N sequences / B per minibatch. ``--eval-data``
  text gives held-out perplexity (same windows, stride = length) of the dense and the greedy
  compressed model.
* ``--task classification``: an encoder (e.g. BERT / MiniLM) with a mean-pooled linear head
  (:class:`~sqs_pyro.hf.SentenceClassifier`); ``--data`` and ``--eval-data`` are
  ``label<TAB>sentence`` files. ``--dense-epochs`` first fine-tunes encoder and head densely.

Attention and MLP matrices are compressed by default (the family's preset); embeddings,
norms and the LM head stay dense unless ``--include`` patterns select them. The ``.sqs``
file loads back into the same transformers class: :func:`sqs_pyro.hf.load_transformers`.
"""
from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Any

import torch

from sqs_pyro import hf
from sqs_pyro.cli.common import check_files, config_from_args, run_summary, write_outputs
from sqs_pyro.config import SQSConfig
from sqs_pyro.data import accuracy, labelled_sentences
from sqs_pyro.errors import SQSInputError
from sqs_pyro.format import load_compressed, read_header
from sqs_pyro.guides.gate_scores import task_loss
from sqs_pyro.infer import compress
from sqs_pyro.infer.allocator import return_freed_memory
from sqs_pyro.models import transformer_include

# Pretrained transformers (see docs/results.md, transformers): learning rates for their small weights
# (the image defaults move them far too fast); pruning every layer to the target at once
# from saliencies (per-layer sparsity, the usual choice for language models), so that no
# step runs the not-yet-pruned weights on a codebook fitted to the survivors; the
# deterministic expected forward (sampled levels and slab noise on every weight wreck a
# pretrained LM's outputs); and a tempered KL: with ~1e5 tokens against ~1e8 weights the
# untempered prior would swamp the data. The gates start as sure as they were validated here
# (gate_init 3; the image default of 1 was chosen on the image networks only), and the weights have no
# group scales unless asked for (the image default of one per row was chosen on the image networks only).
# Likewise own-scale responsibilities and slab scales at the codebook's rate (the image defaults: pooled,
# a tenth). The gate logits take sign steps (no Adam moments: 8 bytes per weight less while they learn),
# chosen on SmolLM2's validation text (40.41 against Adam's 40.32, within the rule's 1%).
HF_DEFAULTS = {"epochs": 1.0, "batch_size": 8, "lr_weights": 2e-5, "lr_codebook": 1e-4, "lr_dense": 2e-5,
               "gate_score": "saliency", "saliency_batches": 2, "warmup_fraction": 0.0, "prune_fraction": 0.2,
               "gate_init": 3.0, "group_size": 0, "gate_rule": "sign",
               "prune_scope": "layer",
               "mode": "expected", "responsibility_scale": "own", "slab_scale_rate": 1.0,
               "kl_weight": 1e-3, "log_every": 4}


def register_options(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("Hugging Face models (--hf)")
    g.add_argument("--hf", metavar="PATH",
                   help="a transformers model folder, a folder or file with one .gguf, or an installed package name")
    g.add_argument("--eval-data", type=Path, nargs="+", metavar="FILE", help="with --hf: held-out data, same format")
    g.add_argument("--seq-len", type=int, default=128, help="lm: tokens per training / evaluation window (128)")
    g.add_argument("--max-length", type=int, default=64, help="classification: max tokens per sentence (64)")
    g.add_argument("--max-eval-windows", type=int, help="lm: evaluate on the first N held-out windows only")
    g.add_argument("--dense-epochs", type=float, default=0.0,
                   help="fine-tune the model densely for this many epochs before compressing (default 0)")
    g.add_argument("--start", type=Path, metavar="FILE.sqs",
                   help="start from this compressed model (e.g. `sqs-pyro quantize --exact-outliers 0` output, with "
                        "the run's K and group_size; a pruned one needs --sparsity > 0 and ranks the gates) "
                        "instead of k-means codebooks")
    g.add_argument("--include", nargs="+", metavar="REGEX",
                   help="module-path patterns of the layers to compress (default: the family's attention + MLP preset)")
    g.add_argument("--return-freed-memory", action="store_true",
                   help="return freed large tensors to the system at once (glibc): a lower memory peak for a slower "
                        "run (about 15 bytes per weight less and 1.8x the time on benchmarks/lm_memory.py)")
    g.add_argument("--checkpoint-blocks", action="store_true",
                   help="keep only each transformer layer's inputs for the backward pass and run the layer again "
                        "there: the same result for less memory (about 11 bytes per weight on "
                        "benchmarks/lm_memory.py; best with --return-freed-memory) and a second forward pass of the layers")


def hf_config(args: argparse.Namespace, model_type: str) -> SQSConfig:
    """``HF_DEFAULTS`` (learning rates for pretrained transformers: the image defaults would
    move their small weights far too fast), then ``--config``, then the command line; ``include``
    is the family's attention + MLP preset unless ``--include`` is given."""
    config = config_from_args(args, HF_DEFAULTS)
    include = tuple(args.include) if args.include else config.include or transformer_include(model_type)
    one_shot = {"initial_sparsity": config.sparsity} if config.warmup_fraction == 0 else {}
    types = ("linear", "conv1d_hf", "embedding")  # the include patterns decide; the preset matches matrices only
    return SQSConfig.from_dict({**config.to_dict(), "include": include, "include_types": types, **one_shot})


def _check(args: argparse.Namespace) -> None:
    if args.task not in ("lm", "classification") or not args.data:
        raise SQSInputError("--hf needs --task lm|classification and --data FILE")
    if args.train_limit or args.test_limit:
        raise SQSInputError("--train-limit / --test-limit are for the MNIST job; trim the --data files instead")
    if args.seq_len < 2 or args.max_length < 2:
        raise SQSInputError("--seq-len and --max-length must be >= 2")
    check_files("--data", args.data)
    check_files("--eval-data", args.eval_data)
    if args.start is not None:
        read_header(args.start)  # a missing or damaged file is refused before the model loads


def run_hf(args: argparse.Namespace) -> int:
    """Load, (optionally) fine-tune, compress, evaluate and write a Hugging Face model."""
    _check(args)
    if args.return_freed_memory:
        return_freed_memory()
    causal = args.task == "lm"
    tokenizer, model = hf.load_model(args.hf, causal)
    config = hf_config(args, model.config.model_type)
    if causal:
        net = hf.CausalLM(model)
        train = hf.text_windows(tokenizer, args.data, args.seq_len)
        x, y = train[:, :-1], train[:, 1:]
        held = hf.text_windows(tokenizer, args.eval_data, args.seq_len)[:args.max_eval_windows] if args.eval_data else None
        evaluate = (lambda m: {"perplexity": hf.perplexity(m, held)}) if held is not None else None
    else:
        if len(args.data) != 1:
            raise SQSInputError("classification takes one --data file")
        sentences, y = labelled_sentences(args.data[0])
        x = hf.encode_sentences(tokenizer, sentences, args.max_length)
        net = hf.SentenceClassifier(model, int(y.max()) + 1)
        evaluate = _accuracy_eval(tokenizer, args) if args.eval_data else None
    started = time.perf_counter()
    torch.manual_seed(config.seed)
    if args.dense_epochs > 0:
        hf.fine_tune(net, x, y, args.dense_epochs, config.batch_size, config.lr_dense, config.seed, task_loss(args.task))
    dense_metrics = evaluate(net) if evaluate else {}
    start = load_compressed(args.start) if args.start is not None else None
    result = compress(net, (x, y), config, task=args.task, progress=not args.no_progress, checkpoint_dir=args.out,
                      checkpoint_every=args.checkpoint_every, resume=args.resume, start=start,
                      checkpoint_blocks=args.checkpoint_blocks)
    greedy_metrics = evaluate(result.greedy_module()) if evaluate else {}
    summary = hf_summary(args, result, dense_metrics, greedy_metrics, time.perf_counter() - started, len(x))
    write_outputs(args.out, result, summary, tensor_dtype=args.tensor_dtype, evaluate=evaluate)
    for key, value in summary["table"].items():
        print(f"{key:<32} {value}")
    print(f"results written to {args.out}/ (load the model with sqs_pyro.hf.load_transformers('{args.out}/model.sqs'))")
    return 0


def _accuracy_eval(tokenizer, args: argparse.Namespace):
    sentences, y = labelled_sentences(args.eval_data[0])
    x = hf.encode_sentences(tokenizer, sentences, args.max_length)
    return lambda m: {"accuracy": accuracy(m, x, y, batch_size=64)}


def hf_summary(args: argparse.Namespace, result, dense: dict[str, float], greedy: dict[str, float],
               seconds: float, examples: int) -> dict[str, Any]:
    summary = run_summary(result, args.task, dense, greedy, seconds, {"hf": str(args.hf)})
    summary["table"] = {"task": args.task, "training examples": examples, **summary["table"]}
    return summary
