"""MiniLM (all-MiniLM-L6-v2) on movie-review polarity: dense fine-tuning vs SQS (issue 6).

    python benchmarks/minilm.py --reviews DIR/vaderSentiment-3.3.2.tar.gz
    python benchmarks/minilm.py --reviews ... --train 2000 --test 500 --epochs 1   # quicker
    python benchmarks/minilm.py --smoke [--start-oneshot ...]   # CI: a tiny random BERT on made-up sentences

1. fine-tunes the encoder + a linear head densely (Adam) on the training sentences;
2. compresses the fine-tuned network with SQS (attention q/k/v/o and MLP matrices; default
   75% sparsity, K=16: the paper's BERT setting) for the same number of epochs, with the
   ``--hf`` defaults (``sqs_pyro.cli.compress_hf.HF_DEFAULTS``) and a KL weight of 1e-4;
3. reports held-out accuracy (dense, greedy, averaged), achieved sparsity, bits, CR formula,
   packed ratio, each matrix's density, the mean cosine between compressed and dense sentence embeddings, peak RSS
   and wall times (and, with ``--val N``, accuracy on N validation sentences carved out
   between the training and the test ones, for choosing settings); with ``--start-oneshot``
   SQS starts from the one-shot network of ``sqs-pyro quantize``'s method (SparseGPT's mask and
   GPTQ error feedback under the input second moments of ``--calib`` training sentences, no
   exact weights), whose accuracy is reported too; writes ``--out``
   (benchmarks/results/minilm.json). The fine-tuned network is cached in ``--cache-dir``
   (runs/minilm/; ``dense_seconds`` is then the loading time), which also holds SQS's checkpoint.
   ``--transfer N``: SQS also trains on N further sentences (after the validation ones, before the test
   ones) labelled by the fine-tuned dense network's argmax, a transfer set for the distillation; their
   gold labels are never read, and SQS runs the same number of steps as without them. ``--sqs-epochs E``:
   SQS runs E passes over the training sentences (the dense fine-tuning keeps ``--epochs``). The rows also
   record both networks' accuracy on the training sentences and, on the training, test and validation
   ones, how often the two agree, how often each predicts the second class, the mean shift of the logit
   margin and the mean cosine between their sentence embeddings. ``--resume`` rebuilds SQS's network from the
   checkpoint of a finished run with the same settings in ``--cache-dir`` and evaluates it.
   ``--checkpoint-blocks``: SQS recomputes each encoder layer in the backward pass
   (``compress(checkpoint_blocks=True)``; the same result).
"""
import argparse
import copy
import json
import math
import time
from pathlib import Path

import smoke
import torch
from memory import reset_peak, vm
from overrides import parse_overrides

from sqs_pyro import SQSConfig
from sqs_pyro.analysis.outliers import outlier_summary
from sqs_pyro.cli.compress_hf import HF_DEFAULTS
from sqs_pyro.data import accuracy, predictive_probs
from sqs_pyro.hf import SentenceClassifier, encode_sentences, fine_tune, load_minilm
from sqs_pyro.models import transformer_include
from sqs_pyro.infer import compress
from sqs_pyro.data.text import movie_reviews


@torch.no_grad()
def against_dense(dense: SentenceClassifier, other: SentenceClassifier, x: torch.Tensor, y: torch.Tensor,
                  tag: str = "") -> dict[str, float]:
    """Both classifiers on ``(x, y)``, one pass each (sentence embeddings, then the head's logits): their
    accuracies, how often they predict the same class, the rate of the second class ("positive") for each, the
    mean shift of the logit margin ``l_1 - l_0`` and the mean cosine between their sentence embeddings (keys
    ``accuracy{tag}_dense``, ``accuracy{tag}_greedy``, ``agreement{tag}``, ``positive_rate{tag}_dense``,
    ``positive_rate{tag}_greedy``, ``margin_shift{tag}``, ``cosine{tag}_greedy_vs_dense``)."""
    dense.eval()
    other.eval()
    sign = torch.tensor([-1.0, 1.0], device=x.device)
    batches = [x[i:i + 64] for i in range(0, len(x), 64)]
    embedded = [[m.embed(b) for b in batches] for m in (dense, other)]  # forward() is head(embed(x)), per batch
    margins = [torch.cat([m.head(e) @ sign for e in parts]) for m, parts in zip((dense, other), embedded)]
    embeddings = [torch.cat(parts) for parts in embedded]
    positive = [margin > 0 for margin in margins]  # argmax: class 1 only above a tie, as here
    return {f"accuracy{tag}_dense": int((positive[0] == y.bool()).sum()) / len(y),  # exact, as accuracy() counts
            f"accuracy{tag}_greedy": int((positive[1] == y.bool()).sum()) / len(y),
            f"agreement{tag}": float((positive[0] == positive[1]).float().mean()),
            f"positive_rate{tag}_dense": float(positive[0].float().mean()),
            f"positive_rate{tag}_greedy": float(positive[1].float().mean()),
            f"margin_shift{tag}": float((margins[1] - margins[0]).mean()),
            f"cosine{tag}_greedy_vs_dense": float(torch.nn.functional.cosine_similarity(*embeddings, dim=-1).mean())}


def one_shot_start(net: SentenceClassifier, config: SQSConfig, calib: torch.Tensor):
    """The one-shot network at ``config``'s sparsity, K and group size: SparseGPT's mask and GPTQ
    error feedback under the input second moments of ``calib`` (activation order, searched scales)."""
    from sqs_pyro.compressed.error_feedback import hessian_scores, input_hessians
    from sqs_pyro.compressed.oneshot import quantize_network
    from sqs_pyro.models import select_layers

    sites = select_layers(net, config.include_types, config.include, config.exclude)
    hessians = input_hessians(net, sites, calib.split(32))
    return quantize_network(net, sites, config.components, config.group_size, 0, hessian_scores(net, sites, hessians),
                            hessians, sparsity=config.sparsity)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--reviews", type=Path, help="path to vaderSentiment-3.3.2.tar.gz (required but with --smoke)")
    parser.add_argument("--train", type=int, default=8000)
    parser.add_argument("--test", type=int, default=2000)
    parser.add_argument("--epochs", type=float, default=1.0)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--sparsity", type=float, default=0.75)
    parser.add_argument("--components", type=int, default=16)
    parser.add_argument("--windows", default="outlier")
    parser.add_argument("--max-length", type=int, default=48)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--kl-weight", type=float, default=1e-4)
    parser.add_argument("--lr-weights", type=float, default=HF_DEFAULTS["lr_weights"])
    parser.add_argument("--lr-codebook", type=float, default=HF_DEFAULTS["lr_codebook"])
    parser.add_argument("--mode", choices=("expected", "sample", "hard"), default=HF_DEFAULTS["mode"])
    parser.add_argument("--group-size", type=int, default=0, help="group scales per G weights of a row (0: none)")
    parser.add_argument("--responsibility-scale", choices=("own", "pooled"), default="own")
    parser.add_argument("--start-oneshot", action="store_true",
                        help="start SQS from the one-shot sparse, error-fed network (see above)")
    parser.add_argument("--calib", type=int, default=512, help="calibration sentences of --start-oneshot")
    parser.add_argument("--val", type=int, default=0,
                        help="also score N validation sentences (after the training ones, before the test ones)")
    parser.add_argument("--sqs-epochs", type=float, default=None,
                        help="SQS's passes over the training sentences (default: --epochs, the dense fine-tuning's)")
    parser.add_argument("--transfer", type=int, default=0,
                        help="N unlabelled sentences after the validation ones, labelled by the dense network")
    parser.add_argument("--out", type=Path, help="result file (default benchmarks/results/minilm.json; with --smoke a "
                        "temporary one)")
    parser.add_argument("--checkpoint-blocks", action="store_true",
                        help="SQS recomputes each encoder layer in the backward pass (the same result, less memory)")
    parser.add_argument("--resume", action="store_true",
                        help="rebuild SQS's network from the checkpoint in --cache-dir (same settings) and evaluate it")
    parser.add_argument("--cache-dir", type=Path,
                        help="the fine-tuned network's cache and SQS's checkpoint")
    parser.add_argument("--device", default="cpu", help="torch device of the network and the data (e.g. cuda)")
    parser.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE",
                        help="further SQSConfig fields, applied last (e.g. gate_score=magnitude prune_scope=lamp)")
    smoke.add_smoke_flag(parser)
    args = parser.parse_args()
    if args.smoke:  # 4 SQS steps of 8 sentences; results and caches in a temporary folder unless given
        folder = smoke.smoke_folder()
        args.train, args.test, args.val, args.batch_size, args.calib, args.max_length = 32, 16, 16, 8, 8, 16
        args.transfer, args.out = min(args.transfer, 8), args.out or folder / "minilm.json"
        args.cache_dir = args.cache_dir or folder / "cache"
    elif args.reviews is None:
        parser.error("--reviews is required (but with --smoke)")
    args.out = args.out or Path(__file__).parent / "results" / "minilm.json"
    args.cache_dir = args.cache_dir or Path("runs/minilm")
    device = torch.device(args.device)
    if device.type != "cpu" and not (torch.accelerator.is_available()
                                     and torch.accelerator.current_accelerator().type == device.type):
        parser.error(f"--device {args.device}: no such accelerator here")
    torch.set_num_threads(1)
    torch.manual_seed(args.seed)

    sentences, labels = smoke.made_up_sentences(80) if args.smoke else movie_reviews(args.reviews)
    order = torch.randperm(len(sentences), generator=torch.Generator().manual_seed(args.seed))
    tokenizer, encoder = (smoke.char_tokenizer(), smoke.tiny_bert()) if args.smoke else load_minilm()
    x_all = encode_sentences(tokenizer, [sentences[i] for i in order], args.max_length)
    x_all, y_all = x_all.to(device), labels[order].to(device)
    x, y = x_all[:args.train], y_all[:args.train]
    x_test, y_test = x_all[-args.test:], y_all[-args.test:]
    x_val, y_val = x_all[args.train:args.train + args.val], y_all[args.train:args.train + args.val]
    x_pool = x_all[args.train + args.val:args.train + args.val + args.transfer]
    if args.train + args.val + args.transfer + args.test > len(x_all):
        parser.error(f"--train + --val + --transfer + --test exceed the {len(x_all)} sentences")

    net = SentenceClassifier(encoder, 2).to(device)
    reset_peak()
    rss_dense = vm("VmRSS")
    start = time.perf_counter()
    # the fine-tuned network is cached: it depends only on these settings
    cache = args.cache_dir / f"dense_ft_train{args.train}_ep{args.epochs}_b{args.batch_size}_l{args.max_length}_s{args.seed}.pt"
    if cache.exists():
        net.load_state_dict(torch.load(cache, map_location=device))
    else:
        fine_tune(net, x, y, args.epochs, args.batch_size, 5e-5, args.seed, torch.nn.functional.cross_entropy)
        cache.parent.mkdir(parents=True, exist_ok=True)
        torch.save(net.state_dict(), cache)
    dense_seconds = time.perf_counter() - start
    peak_dense_ft = vm("VmHWM")
    reset_peak()

    sqs_epochs = args.epochs if args.sqs_epochs is None else args.sqs_epochs
    steps = math.ceil(sqs_epochs * (len(x) // args.batch_size))
    if args.transfer:  # the dense network's argmax labels the transfer set; SQS keeps its number of steps
        x, y = torch.cat([x, x_pool]), torch.cat([y, predictive_probs(net, x_pool, 64).argmax(-1).to(y.dtype)])
    # ceil() in the schedule gives back `steps` over the longer epochs
    sqs_epochs = (steps - 0.5) / (len(x) // args.batch_size) if args.transfer else sqs_epochs
    s_f = args.sparsity
    config = SQSConfig.from_dict({**HF_DEFAULTS, "sparsity": s_f, "initial_sparsity": s_f,
                                  "components": args.components, "windows": args.windows, "epochs": sqs_epochs,
                                  "batch_size": args.batch_size, "seed": args.seed, "kl_weight": args.kl_weight,
                                  "lr_weights": args.lr_weights, "lr_codebook": args.lr_codebook,
                                  "mode": args.mode, "group_size": args.group_size,
                                  "responsibility_scale": args.responsibility_scale,
                                  "include": transformer_include("bert"),
                                  "gate_rule": "adam",  # the rule of the recorded MiniLM runs (HF_DEFAULTS: sign)
                                  **parse_overrides(args.set)})
    start = time.perf_counter()
    oneshot = one_shot_start(net, config, x[:args.calib]) if args.start_oneshot else None
    oneshot_scores = {}
    if oneshot is not None:
        plain = oneshot.load_into(copy.deepcopy(net)).eval()
        oneshot_scores = {"accuracy_oneshot": accuracy(plain, x_test, y_test, batch_size=64),
                          **({"accuracy_val_oneshot": accuracy(plain, x_val, y_val, batch_size=64)} if args.val else {})}
        del plain
    result = compress(net, (x, y), config, progress=True, checkpoint_dir=args.cache_dir, start=oneshot,
                      resume=args.resume, checkpoint_blocks=args.checkpoint_blocks)
    sqs_seconds = time.perf_counter() - start
    peak_sqs = vm("VmHWM")
    greedy = result.greedy_module()
    acc = result.accounting()
    row = {
        "train": args.train, "transfer": args.transfer, "sqs_steps": steps, "test": len(x_test),
        "epochs": args.epochs, "sqs_epochs": args.sqs_epochs, "sparsity_target": args.sparsity,
        "K": args.components, "windows": args.windows, "kl_weight": args.kl_weight, "lr_weights": args.lr_weights,
        "lr_codebook": args.lr_codebook, "mode": args.mode,
        "group_size": args.group_size, "responsibility_scale": args.responsibility_scale, "val": len(x_val),
        "start_oneshot": args.start_oneshot, "overrides": args.set,
        "checkpoint_blocks": args.checkpoint_blocks, "seed": args.seed, "device": str(device), **oneshot_scores,
        **against_dense(net, greedy, x_test, y_test),
        "accuracy_averaged": accuracy(result.averaged_module(), x_test, y_test, batch_size=64),
        **against_dense(net, greedy, x[:args.train], y[:args.train], "_train"),
        **(against_dense(net, greedy, x_val, y_val, "_val") if args.val else {}),
        "sparsity": acc["sparsity"], "layer_density": {l["name"]: l["density"] for l in acc["layers"]},
        "bits": acc["bits"], "cr_formula": acc["cr_formula"],
        "compressed_params": acc["compressed_params"], "packed_ratio": acc["bytes_fp32"] / acc["bytes_packed"],
        "dense_seconds": dense_seconds, "sqs_seconds": sqs_seconds,
        "rss_dense_bytes": rss_dense, "peak_rss_dense_ft_bytes": peak_dense_ft, "peak_rss_sqs_bytes": peak_sqs,
        "bytes_per_param_dense_ft": (peak_dense_ft - rss_dense) / acc["compressed_params"],
        "bytes_per_param_sqs": (peak_sqs - rss_dense) / acc["compressed_params"],
    }
    report = outlier_summary(result, max_listed=10)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    (args.out.parent / f"{args.out.stem}_outliers.json").write_text(json.dumps(report, indent=1, default=float))
    row["outliers_overall"] = report["overall"]
    print(json.dumps(row, indent=2))
    args.out.write_text(json.dumps(row, indent=2))


if __name__ == "__main__":
    main()
