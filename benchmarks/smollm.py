"""SmolLM2-135M on Jane Austen (issue 6): SQS against dense fine-tuning, per-run peak RSS.

    python benchmarks/smollm.py --austen assets/austen              # all runs, resumable
    python benchmarks/smollm.py --austen assets/austen --runs dense sqs50k16
    python benchmarks/smollm.py --austen assets/austen --report      # the table of finished runs
    python benchmarks/smollm.py --smoke     # CI: a tiny random Llama on made-up text, two runs, a temporary folder

Training text: five novels, cut into windows of ``--seq-len + 1`` tokens, of which
``--steps x --batch-size`` seeded random windows are used once (one epoch: the token budget).
Held out: *Persuasion*, perplexity on its first ``--eval-windows`` windows (stride = length).

Runs (each in its own process, so that its peak RSS is its own; one JSON line each in
``results/smollm.jsonl``, finished runs are skipped):

* ``dense``: the untouched model (fp32 weights de-quantised from the Q4_1 GGUF);
* ``dense_ft``: dense Adam fine-tuning, same windows, batch and steps, lr = ``lr_dense``;
* ``sparse_ft<S>[f]``: Wanda's S% mask per output row, then fine-tuning of the fp32 survivors
  (a classical prune-then-fine-tune baseline; ``f`` as below);
* ``magnitude<S>`` / ``kmeans<K>``: no training, only one-shot per-layer magnitude pruning
  or only per-layer K-level k-means quantisation (the damage of each step on its own);
* ``oneshot_g<G>k<K>e<E>``: no training, dense-and-sparse group-scaled codebooks: fp16 scales
  per G weights of a row, one K-level codebook per matrix on the scaled values, the E largest
  weights of each matrix exact; evaluated from its ``.sqs`` file. With the suffix ``h``
  (``oneshot_g64k16e16h``): the exact weights are the E largest ``|w| ||x||`` and every matrix
  is coded with GPTQ error feedback (:mod:`sqs_pyro.compressed.error_feedback`) under the input
  second moments of ``--calib`` calibration windows: the first windows of the seeded training
  pick, the same windows as the anchors' calibration in ``lm_anchors.py`` (the dense model's
  moments are cached in ``runs/smollm/``). Further suffixes: ``a`` activation order (static
  group scales), ``s`` searched group scales (``oneshot_g64k16e16has``: both, the defaults of
  ``sqs-pyro quantize``). A prefix ``s<S>`` (``oneshot_s50g64k16e0has``) also prunes S% of
  every matrix on the way (SparseGPT's mask, error feedback for the pruned weights too);
* ``sqs<S>k<K>[g<G>][p]``: SQS at sparsity S% with K levels on every attention and MLP matrix
  (``g<G>``: group scales per G weights of a row, the posterior on the normalised weights;
  ``p``: pooled-scale responsibilities; ``q``: started from the one-shot ``oneshot_s<S>g<G>k<K>e0has``
  network instead of k-means, its mask ranking the gates, or with ``--prune-fraction 0`` kept from the first
  step; at S = 0 the gates stay open, nothing is pruned; ``f``: the whole pipeline starts from the
  dense model fine-tuned on the same windows, as ``dense_ft``, whose perplexities the row records), with
  the ``--hf`` defaults (:data:`sqs_pyro.cli.compress_hf.HF_DEFAULTS`: one-shot pruning to
  the target from saliencies, gates learning for 20% of the steps, tempered KL); also
  the perplexity with quantile-binned assignments (``--bins`` per window) instead of
  per-weight ones, a ``.sqs`` file loaded back into ``LlamaForCausalLM`` (perplexity checked),
  and (for ``--outlier-runs``) the tail-outlier report of every compressed matrix
  (``results/smollm_outliers_<run>.json``).

Peak memory: ``VmHWM`` of the run's process; ``bytes_per_param`` = (peak - RSS with the dense
model and data loaded) / compressed parameters.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import re
import subprocess
import sys
import time
from pathlib import Path

import smoke
import torch
from memory import reset_peak, vm

from sqs_pyro.cli.compress_hf import HF_DEFAULTS
from sqs_pyro.config import GATE_RULES

HERE = Path(__file__).parent
RUNS = HERE.parent / "runs" / "smollm"  # per-run folders and the caches every run of the same settings shares
HELD_OUT = "persuasion"
SMOKE_RUNS = ["oneshot_g16k4e2has", "sqs50k4g16pqf"]  # one-shot with error feedback; trained from it


def run_settings(args: argparse.Namespace) -> dict:
    """The settings a run's key hashes (``prune_fraction`` only when not the ``--hf`` default and
    ``distill_weight`` only when not 0, ``gate_rule`` only when not Adam, so that earlier runs keep their keys)."""
    settings = {k: getattr(args, k) for k in ("steps", "batch_size", "seq_len", "eval_windows", "seed", "lr_weights",
                                              "lr_codebook", "lr_dense", "kl_weight", "prune_scope", "mode",
                                              "gate_score", "bins")}
    if args.prune_fraction != HF_DEFAULTS["prune_fraction"]:
        settings["prune_fraction"] = args.prune_fraction
    if args.distill_weight:
        settings["distill_weight"] = args.distill_weight
    if args.gate_rule != "adam":
        settings["gate_rule"] = args.gate_rule
    return settings


def run_key(name: str, settings: dict, calib: int) -> str:
    """The run's name and a hash of its settings (and of ``--calib`` for calibrated one-shot runs)."""
    if (name.startswith("oneshot") and name.endswith("h")) or (name.startswith("sqs") and name.rstrip("f").endswith("q")):
        settings = {**settings, "calib": calib}
    return f"{name}/" + hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:10]


def load_data(args: argparse.Namespace, tokenizer):
    """Training windows (a seeded pick), held-out windows (*Persuasion*; with ``--validation`` the
    validation windows), the validation windows (the next ``--eval-windows`` windows of the seeded order
    of the training novels, used by no run) and the number of training windows available."""
    from sqs_pyro.hf import token_windows
    from sqs_pyro.data.text import austen_novels

    books = smoke.made_up_novels() if args.smoke else austen_novels(args.austen)
    train = torch.cat([token_windows(tokenizer, text, args.seq_len) for name, text in books.items() if name != HELD_OUT])
    order = torch.randperm(len(train), generator=torch.Generator().manual_seed(args.seed))
    used = args.steps * args.batch_size
    validation = train[order[used:used + args.eval_windows]]
    held = validation if args.validation else token_windows(tokenizer, books[HELD_OUT], args.seq_len)[:args.eval_windows]
    return train[order[:used]], held, validation, len(train)


def binned_perplexity(result, held: torch.Tensor, bins: int) -> float:
    """Perplexity of the greedy network whose kept weights take the codes of their quantile bin's mean."""
    from sqs_pyro.guides.binning import quantile_bin_means
    from sqs_pyro.hf import perplexity

    saved = [layer.latent.detach().clone() for layer in result.guide.layers]
    with torch.no_grad():
        for layer in result.guide.layers:
            kept = layer.kept_mask()
            ids = torch.zeros_like(layer.latent, dtype=torch.long) if layer.window_ids is None else layer.window_ids
            ids = torch.where(kept, ids, torch.full_like(ids, -1))  # pruned weights: a bin set of their own
            layer.latent.copy_(quantile_bin_means(layer.latent, ids, bins))
        module = result.greedy_module()
        for layer, latent in zip(result.guide.layers, saved):
            layer.latent.copy_(latent)
    return perplexity(module, held)


def child(args: argparse.Namespace) -> dict:
    from sqs_pyro import SQSConfig
    from sqs_pyro.hf import CausalLM, fine_tune, load_smollm, perplexity
    from sqs_pyro.models import select_layers, transformer_include
    from sqs_pyro.guides.gate_scores import task_loss
    from sqs_pyro.infer import compress
    from sqs_pyro.infer.allocator import return_freed_memory

    if args.return_freed_memory:  # as `sqs-pyro compress --hf --return-freed-memory`
        return_freed_memory()
    torch.set_num_threads(args.threads)
    started = time.perf_counter()
    tokenizer, lm = (smoke.char_tokenizer(), smoke.tiny_llama()) if args.smoke else load_smollm()
    net = CausalLM(lm)
    train, held, validation, available = load_data(args, tokenizer)
    x, y = train[:, :-1], train[:, 1:]
    reset_peak()  # loading de-quantises the GGUF through temporaries: not part of training
    rss_dense = vm("VmRSS")
    row = {"run": args.child, "train_windows": len(train), "train_tokens": int(y.numel()),
           "available_windows": available, "eval_tokens": int(held[:, 1:].numel()), "rss_dense_bytes": rss_dense,
           "return_freed_memory": args.return_freed_memory, "checkpoint_blocks": args.checkpoint_blocks}
    t0 = time.perf_counter()
    if args.child == "dense":
        row["perplexity"] = perplexity(net, held)
    elif args.child == "dense_ft":
        fine_tune(net, x, y, 1.0, args.batch_size, args.lr_dense, args.seed, task_loss("lm"))
        row["train_seconds"] = time.perf_counter() - t0
        row["perplexity"] = perplexity(net, held)
        row["perplexity_validation"] = perplexity(net, validation)
    elif args.child.startswith("sparse_ft"):
        row.update(sparse_fine_tuned(args, net, train, held, validation))
        row["train_seconds"] = time.perf_counter() - t0
    elif args.child.startswith(("magnitude", "kmeans")):
        row["perplexity"] = perplexity(one_shot(net, args.child), held)
    elif args.child.startswith("oneshot"):
        row.update(group_scaled(args, net, held, train[:args.calib, :-1]))
    else:
        sparsity, k, group, pooled, start, tuned = re.fullmatch(r"sqs(\d+)k(\d+)(?:g(\d+))?(p?)(q?)(f?)",
                                                                args.child).groups()
        s_f = int(sparsity) / 100
        config = SQSConfig.from_dict({**HF_DEFAULTS, "sparsity": s_f, "initial_sparsity": s_f, "components": int(k),
                                      "group_size": int(group or 0),
                                      # at 0% nothing is pruned: the gates stay open (no gate-learning phase)
                                      "prune_fraction": args.prune_fraction if s_f > 0 else 0.0,
                                      "responsibility_scale": "pooled" if pooled else "own",
                                      "epochs": 1.0, "batch_size": args.batch_size, "seed": args.seed,
                                      "include": transformer_include("llama"), "lr_weights": args.lr_weights,
                                      "lr_codebook": args.lr_codebook, "lr_dense": args.lr_dense,
                                      "kl_weight": args.kl_weight, "prune_scope": args.prune_scope,
                                      "mode": args.mode, "gate_score": args.gate_score,
                                      "distill_weight": args.distill_weight, "gate_rule": args.gate_rule})
        network = None
        if tuned:  # the pipeline starts from the dense model fine-tuned on the same windows (as `dense_ft`)
            row["dense_ft_cached"] = fine_tuned(args, net, x, y)
            row["dense_ft_seconds"] = time.perf_counter() - t0
            row["dense_ft_perplexity"] = perplexity(net, held)
            row["dense_ft_perplexity_validation"] = perplexity(net, validation)
        if start:  # the one-shot `oneshot_[s<S>]g<G>k<K>e0has` network: GPTQ / SparseGPT error feedback,
            # activation order, searched scales
            from sqs_pyro.compressed.error_feedback import SHRINK_GRID
            from sqs_pyro.compressed.oneshot import quantize_network

            sites = select_layers(net, include=transformer_include("llama"))
            hessians, scores = calibration(args, net, sites, train[:args.calib, :-1], "_ft" if tuned else "")
            network = quantize_network(net, sites, int(k), int(group), 0, scores, hessians, shrink=SHRINK_GRID,
                                       sparsity=s_f)
            del hessians, scores
            reset_peak()
            rss_dense = row["rss_dense_bytes"] = vm("VmRSS")
        # checkpoints on disk, not in memory: the in-memory copy would double the SVI state
        result = compress(net, (x, y), config, task="lm", progress=True, checkpoint_dir=_run_dir(args), start=network,
                          checkpoint_blocks=args.checkpoint_blocks)
        row["train_seconds"] = time.perf_counter() - t0
        row["peak_rss_train_bytes"] = vm("VmHWM")
        row["config"] = config.to_dict()
        row.update(sqs_measurements(args, result, held))
        row["perplexity_validation"] = perplexity(result.greedy_module(), validation)
    row["peak_rss_bytes"] = vm("VmHWM")
    compressed = sum(net.get_parameter(s.name).numel() for s in select_layers(net, include=transformer_include("llama")))
    peak = row.get("peak_rss_train_bytes", row["peak_rss_bytes"])
    row.update(selected_params=compressed, bytes_per_compressed_param=(peak - rss_dense) / compressed)
    row["wall_seconds"] = time.perf_counter() - started
    return row


def _run_dir(args: argparse.Namespace) -> Path:
    path = args.runs_dir / args.child
    path.mkdir(parents=True, exist_ok=True)
    return path


def fine_tuned(args: argparse.Namespace, net, x: torch.Tensor, y: torch.Tensor) -> bool:
    """Fine-tunes ``net`` in place as the ``dense_ft`` run does; the weights are cached in runs/smollm/
    (the same for every run of these settings). True when they came from the cache."""
    from sqs_pyro.guides.gate_scores import task_loss
    from sqs_pyro.hf import fine_tune

    cache = args.runs_dir / f"dense_ft_s{args.steps}_b{args.batch_size}_lr{args.lr_dense}_seed{args.seed}.pt"
    if cache.exists():
        net.load_state_dict(torch.load(cache))
        return True
    fine_tune(net, x, y, 1.0, args.batch_size, args.lr_dense, args.seed, task_loss("lm"))
    cache.parent.mkdir(parents=True, exist_ok=True)
    torch.save(net.state_dict(), cache)
    return False


def sparse_fine_tuned(args: argparse.Namespace, net, train: torch.Tensor, held: torch.Tensor,
                      validation: torch.Tensor) -> dict:
    """``sparse_ft<S>[f]``, a classical baseline (no quantisation, fp32 survivors): Wanda's mask (the S%
    lowest ``|W_ij| ||x_j||`` of every output row, under the ``--calib`` windows' moments) on every
    attention and MLP matrix, then dense Adam fine-tuning of the survivors (pruned weights get no
    gradient) on the same windows, batch, steps and ``lr_dense`` as ``dense_ft``. With ``f``: of the
    dense model fine-tuned first, as ``sqs...f``."""
    from sqs_pyro.guides.gate_scores import task_loss
    from sqs_pyro.hf import fine_tune, perplexity
    from sqs_pyro.models import select_layers, transformer_include

    sparsity, tuned = re.fullmatch(r"sparse_ft(\d+)(f?)", args.child).groups()
    x, y = train[:, :-1], train[:, 1:]
    out = {"dense_ft_cached": fine_tuned(args, net, x, y)} if tuned else {}
    sites = select_layers(net, include=transformer_include("llama"))
    hessians, scores = calibration(args, net, sites, train[:args.calib, :-1], "_ft" if tuned else "")
    del hessians
    pruned = 0
    with torch.no_grad():
        for site in sites:
            w, score = net.get_parameter(site.name), scores.pop(site.name)
            drop = int(int(sparsity) / 100 * w.shape[1])
            keep = torch.ones_like(w).scatter_(1, score.argsort(dim=1)[:, :drop], 0.0)
            w.mul_(keep)
            w.register_hook(lambda g, keep=keep: g * keep)
            pruned += drop * w.shape[0]
    out["pruned_perplexity"] = perplexity(net, held)
    fine_tune(net, x, y, 1.0, args.batch_size, args.lr_dense, args.seed, task_loss("lm"))
    total = sum(net.get_parameter(s.name).numel() for s in sites)
    zeros = sum(int((net.get_parameter(s.name) == 0).sum()) for s in sites)
    return {**out, "sparsity": zeros / total, "pruned_fraction": pruned / total,
            "perplexity": perplexity(net, held), "perplexity_validation": perplexity(net, validation)}


def one_shot(net, run: str):
    """No training: ``magnitude<S>`` zeroes the S% smallest weights of every compressed matrix;
    ``kmeans<K>`` snaps every weight to its layer's K-level codebook (outlier windows, k-means
    on all weights). Separates the damage of pruning and of quantisation."""
    import numpy as np

    from sqs_pyro.guides.initialization import initial_codebook, magnitude_keep
    from sqs_pyro.models import select_layers, transformer_include

    with torch.no_grad():
        for site in select_layers(net, include=transformer_include("llama")):
            w = net.get_parameter(site.name)
            values = w.reshape(-1).double().numpy()
            if run.startswith("magnitude"):
                new = np.where(magnitude_keep(values, int(run[9:]) / 100), values, 0.0)
            else:
                new = initial_codebook(values, int(run[6:]), "outlier").quantize(values)
            w.copy_(torch.as_tensor(new, dtype=w.dtype).reshape(w.shape))
    return net


def calibration(args: argparse.Namespace, net, sites, calib: torch.Tensor, model: str = ""):
    """The input second moments of the dense model (``model`` ``"_ft"``: of the dense model fine-tuned
    by the run) on the calibration windows (cached in runs/smollm/: the same for every calibrated run
    of that model) and the exact-weight scores ``|w| ||x||``."""
    from sqs_pyro.compressed.error_feedback import hessian_scores, input_hessians

    steps = f"_s{args.steps}" if model else ""  # a fine-tuned model depends on its training windows
    cache = args.runs_dir / f"hessians{model}_calib{len(calib)}_seed{args.seed}{steps}.pt"
    if cache.exists():
        hessians = torch.load(cache)
    else:
        cache.parent.mkdir(parents=True, exist_ok=True)
        hessians = input_hessians(net, sites, calib.split(8))
        torch.save(hessians, cache)
    return hessians, hessian_scores(net, sites, hessians)


def group_scaled(args: argparse.Namespace, net, held: torch.Tensor, calib: torch.Tensor) -> dict:
    """``oneshot_g<G>k<K>e<E>``: no training; every attention and MLP matrix on a K-level codebook
    of its values divided by fp16 group scales (groups of G weights of a row), with the E largest
    |w| of the matrix kept exact (:mod:`sqs_pyro.compressed.oneshot`). The ``.sqs`` file is
    written, loaded back into ``LlamaForCausalLM`` and evaluated from the file."""
    import re

    from sqs_pyro.compressed import accounting
    from sqs_pyro.compressed.error_feedback import SHRINK_GRID
    from sqs_pyro.compressed.oneshot import quantize_network
    from sqs_pyro.format.container import save_compressed
    from sqs_pyro.hf import CausalLM, load_transformers, perplexity
    from sqs_pyro.models import select_layers, transformer_include

    sparsity, g, k, e, feedback, act_order, search = re.fullmatch(
        r"oneshot_(?:s(\d+))?g(\d+)k(\d+)e(\d+)(h?)(a?)(s?)", args.child).groups()
    g, k, e, sparsity = int(g), int(k), int(e), int(sparsity or 0) / 100
    sites = select_layers(net, include=transformer_include("llama"))
    t0 = time.perf_counter()
    hessians, scores = calibration(args, net, sites, calib) if feedback else (None, None)
    shrink = SHRINK_GRID if search else (1.0,)
    network = quantize_network(net, sites, k, g, e, scores, hessians, act_order=bool(act_order), shrink=shrink,
                               sparsity=sparsity)
    quantize_seconds = time.perf_counter() - t0
    acc = accounting(network)
    path = _run_dir(args) / "model.sqs"
    file_bytes = save_compressed(network, path, model=net)
    n = acc["compressed_params"]
    return {"group_size": g, "components": k, "exact_per_matrix": e, "sparsity": acc["sparsity"],
            "quantize_seconds": quantize_seconds,
            "calib_windows": len(calib) if feedback else 0,
            "perplexity": perplexity(CausalLM(load_transformers(path)), held), "file_bytes": file_bytes,
            "bits": acc["bits"], "side_bits_per_weight": 8 * acc["side_bytes"] / n,
            "exact_bits_per_weight": 8 * 6 * sum(l["exact"] for l in acc["layers"]) / n,
            "bits_per_weight": acc["bits"] + 8 * acc["side_bytes"] / n, "compressed_params": n,
            "bytes_fp32": acc["bytes_fp32"]}


def sqs_measurements(args: argparse.Namespace, result, held: torch.Tensor) -> dict:
    from sqs_pyro.analysis.outliers import outlier_summary
    from sqs_pyro.format.container import save_compressed
    from sqs_pyro.hf import CausalLM, load_transformers, perplexity

    acc = result.accounting()
    out = {"sparsity": acc["sparsity"], "bits": acc["bits"], "cr_formula": acc["cr_formula"],
           "compressed_params": acc["compressed_params"], "bytes_fp32": acc["bytes_fp32"],
           "bytes_packed": acc["bytes_packed"]}
    out["perplexity"] = perplexity(result.greedy_module(), held)
    out["perplexity_binned"] = binned_perplexity(result, held, args.bins)
    path = _run_dir(args) / "model.sqs"
    out["file_bytes"] = save_compressed(result, path)
    out["perplexity_reloaded"] = perplexity(CausalLM(load_transformers(path)), held)
    if args.child in args.outlier_runs:  # minutes for 210 matrices (k-means window ablation per matrix)
        report = outlier_summary(result, max_listed=10)
        (args.out.parent / f"smollm_outliers_{args.child}.json").write_text(json.dumps(report, indent=1, default=float))
        out["outliers_overall"] = report["overall"]
    return out


def _cell(row: dict, key: str, fmt: str) -> str:
    return format(row[key], fmt) if row.get(key) is not None else ""


def report(path: Path) -> str:
    """A markdown table of the JSON lines in ``path`` (the last line of each key)."""
    rows = {json.loads(line)["key"]: json.loads(line) for line in path.read_text().splitlines() if line.strip()}
    lines = ["| run | scores / scope | train tokens | perplexity | binned codes | reloaded file | sparsity | bits | "
             "CR formula | file MB | peak RSS GB | bytes / param | train s |", "|---" * 13 + "|"]
    for r in rows.values():
        sqs = r["run"].startswith("sqs")
        cells = [r["run"], f"{r.get('gate_score', 'saliency')} / {r.get('prune_scope', 'layer')}" if sqs else "",
                 f"{r['train_tokens']:,}" if sqs or r["run"] == "dense_ft" else "0",
                 _cell(r, "perplexity", ".1f"), _cell(r, "perplexity_binned", ".1f"),
                 _cell(r, "perplexity_reloaded", ".1f"), _cell(r, "sparsity", ".3f"), _cell(r, "bits", "d"),
                 _cell(r, "cr_formula", ".1f"), f"{r['file_bytes'] / 1e6:.1f}" if r.get("file_bytes") else "",
                 f"{r.get('peak_rss_train_bytes', r['peak_rss_bytes']) / 1e9:.2f}",
                 f"{r['bytes_per_compressed_param']:.1f}", _cell(r, "train_seconds", ".0f")]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--austen", type=Path, help="dpkg -x folder of r-cran-janeaustenr (required but with --smoke)")
    parser.add_argument("--runs", nargs="+", default=["dense", "sqs50k16", "dense_ft", "sqs75k16", "sqs50k8"])
    parser.add_argument("--steps", type=int, default=48)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--eval-windows", type=int, default=64)
    parser.add_argument("--lr-weights", type=float, default=2e-5)
    parser.add_argument("--lr-codebook", type=float, default=1e-4)
    parser.add_argument("--lr-dense", type=float, default=2e-5)
    parser.add_argument("--kl-weight", type=float, default=1e-3)
    parser.add_argument("--prune-scope", choices=("layer", "global", "row"), default="layer")
    parser.add_argument("--prune-fraction", type=float, default=HF_DEFAULTS["prune_fraction"],
                        help="gate-learning share of the steps; 0 with a started (q) run keeps the start's mask")
    parser.add_argument("--mode", choices=("expected", "sample", "hard"), default="expected")
    parser.add_argument("--distill-weight", type=float, default=0.0,
                        help="SQS runs: weight of the teacher's (the model being compressed) top tokens in each "
                             "token's target (SQSConfig.distill_weight)")
    parser.add_argument("--gate-rule", choices=GATE_RULES, default="adam",
                        help="SQSConfig.gate_rule: the gate logits' step (sign: no optimiser state)")
    parser.add_argument("--gate-score", choices=("saliency", "activation", "magnitude"), default="saliency")
    parser.add_argument("--bins", type=int, default=32)
    parser.add_argument("--calib", type=int, default=128, help="calibration windows of the 'h' one-shot runs")
    parser.add_argument("--validation", action="store_true",
                        help="evaluate on validation windows of the training novels (results/smollm_validation.jsonl)")
    parser.add_argument("--outlier-runs", nargs="*", default=["sqs50k16"],
                        help="runs that also write the tail-outlier report of every matrix")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--return-freed-memory", action="store_true",
                        help="return freed large tensors to the system (sqs_pyro.infer.allocator): lower peak, slower")
    parser.add_argument("--checkpoint-blocks", action="store_true",
                        help="SQS runs recompute each layer in the backward pass (compress(checkpoint_blocks=True)): "
                             "the same result, less memory")
    parser.add_argument("--out", type=Path, help="results file (default results/smollm.jsonl, or "
                        "results/smollm_validation.jsonl with --validation)")
    parser.add_argument("--runs-dir", type=Path, default=RUNS,
                        help="per-run folders and the caches runs of the same settings share (default runs/smollm)")
    parser.add_argument("--report", action="store_true", help="only print the table of the finished runs")
    smoke.add_smoke_flag(parser)
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.smoke and not args.child:  # the children get these settings and folders on their command lines
        folder = smoke.smoke_folder()
        sys.argv += ["--steps", "4", "--batch-size", "2", "--seq-len", "16", "--eval-windows", "4", "--calib", "4",
                     "--mode", "hard", "--out", str(folder / "smollm.jsonl"), "--runs-dir", str(folder / "runs")]
        args = parser.parse_args(sys.argv[1:])
        args.runs = SMOKE_RUNS
    if args.austen is None and not args.smoke:
        parser.error("--austen is required (but with --smoke)")
    args.out = args.out or HERE / "results" / ("smollm_validation.jsonl" if args.validation else "smollm.jsonl")
    if args.report:
        print(report(args.out))
        from sqs_pyro.analysis.outliers import pooled_report

        for path in sorted(args.out.parent.glob("*outliers*.json")):
            print(path.name, json.dumps(pooled_report(json.loads(path.read_text())), indent=1))
        return
    settings = run_settings(args)
    if args.child:
        row = {"key": run_key(args.child, settings, args.calib), **settings, **child(args)}
        with open(args.out, "a") as f:
            f.write(json.dumps(row) + "\n")
        print(json.dumps(row, indent=1))
        return
    done = {json.loads(line)["key"] for line in args.out.read_text().splitlines() if line.strip()} \
        if args.out.exists() else set()
    for name in args.runs:
        if run_key(name, settings, args.calib) in done:
            print(f"{name}: already in {args.out}")
            continue
        print(f"{name}: running", flush=True)
        subprocess.run([sys.executable, *sys.argv, "--child", name], check=True)


if __name__ == "__main__":
    main()
