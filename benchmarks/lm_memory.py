"""Peak training memory per compressed parameter of a started, group-scaled SQS run (issue 14), on a
random Llama with SmolLM2-135M's matrix shapes (6 layers instead of 30, a 2,048-token vocabulary),
so that it runs in a minute here.

    python benchmarks/lm_memory.py                         # 0% and 50% sparsity
    python benchmarks/lm_memory.py --return-freed-memory   # freed large tensors go back to the system
    python benchmarks/lm_memory.py --return-freed-memory --sparsity 0.5 --prune-fraction 0 --out F
                                                           # 50% keeping the start's mask: no gate learning
    python benchmarks/lm_memory.py --vocab 49152 --tokens 128 ... # SmolLM2's vocabulary and smollm.py's windows
    python benchmarks/lm_memory.py --checkpoint-blocks ...     # layers recomputed in the backward pass
    python benchmarks/lm_memory.py --smoke                     # CI: a tiny Llama, 50% only, a temporary output

``--return-freed-memory`` calls :func:`sqs_pyro.infer.allocator.return_freed_memory` first (as
``sqs-pyro compress --hf --return-freed-memory``): the peak is then the live tensors', not glibc's
heap high-water mark.

Per run (own process, so that its peak is its own): the one-shot start network
(``quantize_network``, no calibration), then ``compress(start=...)`` in hard mode, K=16, G=64, one
epoch of 64 sequences of 64 tokens, batch 8, checkpoints on disk (as ``benchmarks/smollm.py``).
Prints and writes (``results/lm_memory.json``, or ``results/lm_memory_returned.json``) ``(VmHWM -
VmRSS before compress) / compressed parameters``, the RSS before training starts and the training peak
above it, each training step's own peak (at 50% the gates learn in steps 0-1 of 8), and the seconds
(in all and in training).
"""
import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import smoke
import torch
from memory import reset_peak, vm

from sqs_pyro.config import GATE_RULES

HERE = Path(__file__).parent


def child(sparsity: float, return_freed: bool, prune_fraction: float, vocab: int, tokens: int,
          checkpoint_blocks: bool, gate_rule: str, tiny: bool = False) -> dict:
    """One run in this process (``tiny``: :func:`smoke.tiny_llama` and groups of 16, for CI)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    import sqs_pyro.infer.trainer as trainer
    from sqs_pyro import SQSConfig
    from sqs_pyro.cli.compress_hf import HF_DEFAULTS
    from sqs_pyro.compressed.oneshot import quantize_network
    from sqs_pyro.hf import CausalLM
    from sqs_pyro.infer import compress
    from sqs_pyro.infer.allocator import return_freed_memory
    from sqs_pyro.models import select_layers, transformer_include

    returned = return_freed_memory() if return_freed else False
    torch.set_num_threads(1)
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=vocab, hidden_size=576, intermediate_size=1536, num_hidden_layers=6,
                         num_attention_heads=9, num_key_value_heads=3, max_position_embeddings=256)
    net = CausalLM(smoke.tiny_llama() if tiny else LlamaForCausalLM(config))
    vocab, group = (net.lm.config.vocab_size, 16) if tiny else (vocab, 64)
    ids = torch.randint(0, vocab, (64, tokens + 1))
    include = transformer_include("llama")
    sites = select_layers(net, include=include)
    n = sum(net.get_parameter(s.name).numel() for s in sites)
    start = quantize_network(net, sites, 16, group, 0, sparsity=sparsity)
    sqs = SQSConfig.from_dict({**HF_DEFAULTS, "sparsity": sparsity, "initial_sparsity": sparsity, "components": 16,
                               "group_size": group, "prune_fraction": prune_fraction if sparsity else 0.0,
                               "responsibility_scale": "pooled", "epochs": 1.0, "batch_size": 8, "include": include,
                               "mode": "hard", "gate_rule": gate_rule})
    marks = {}
    train = trainer.Trainer.train

    def measured_train(self, *args, **kwargs):  # the RSS when training starts, then the peak above it
        marks["rss_before_train"] = vm("VmRSS")
        reset_peak()
        t = time.perf_counter()
        out = train(self, *args, **kwargs)
        marks["train_seconds"] = time.perf_counter() - t
        return out

    step_peaks = []
    adam_step = torch.optim.Adam.step

    def measured_step(self, *args, **kwargs):  # each training step's own peak (forward, backward, update)
        out = adam_step(self, *args, **kwargs)
        step_peaks.append(vm("VmHWM"))
        reset_peak()
        return out

    trainer.Trainer.train = measured_train
    torch.optim.Adam.step = measured_step
    reset_peak()
    base = vm("VmRSS")
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory() as folder:
        compress(net, (ids[:, :-1], ids[:, 1:]), sqs, task="lm", progress=False, start=start, checkpoint_dir=folder,
                 checkpoint_blocks=checkpoint_blocks)
    peak = max([vm("VmHWM"), *step_peaks])
    return {"sparsity": sparsity, "prune_fraction": sqs.prune_fraction, "vocab": vocab, "tokens": tokens,
            "checkpoint_blocks": checkpoint_blocks, "gate_rule": gate_rule, "compressed_params": n, "seconds": time.perf_counter() - t0,
            "train_seconds": marks["train_seconds"],
            "return_freed_memory": returned, "malloc_mmap_threshold": os.environ.get("MALLOC_MMAP_THRESHOLD_"),
            "bytes_per_param_before_train": (marks["rss_before_train"] - base) / n,
            "bytes_per_param_train_peak_above_start": (peak - marks["rss_before_train"]) / n,
            "bytes_per_param": (max(peak, marks["rss_before_train"]) - base) / n,
            "step_peaks_bytes_per_param": [(p - base) / n for p in step_peaks]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sparsity", type=float, nargs="+", default=[0.0, 0.5])
    parser.add_argument("--out", type=Path, help="results file (default results/lm_memory.json, or "
                        "results/lm_memory_returned.json with --return-freed-memory)")
    parser.add_argument("--return-freed-memory", action="store_true",
                        help="call sqs_pyro.infer.allocator.return_freed_memory() first")
    parser.add_argument("--prune-fraction", type=float, default=0.2,
                        help="gate-learning share of the steps (the --hf default 0.2); 0 keeps the start's mask")
    parser.add_argument("--vocab", type=int, default=2048, help="vocabulary size (SmolLM2's: 49152)")
    parser.add_argument("--tokens", type=int, default=64, help="tokens per sequence (benchmarks/smollm.py: 128)")
    parser.add_argument("--checkpoint-blocks", action="store_true",
                        help="compress(checkpoint_blocks=True): each layer runs again in the backward pass")
    parser.add_argument("--gate-rule", choices=GATE_RULES, default="adam",
                        help="SQSConfig.gate_rule: the gate logits' step (sign: no optimiser state)")
    smoke.add_smoke_flag(parser)
    parser.add_argument("--child", type=float, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.smoke and args.child is None:
        args.sparsity, args.tokens, args.out = [0.5], 8, smoke.smoke_folder() / "lm_memory.json"
    args.out = args.out or HERE / "results" / ("lm_memory_returned.json" if args.return_freed_memory else "lm_memory.json")
    if args.child is not None:
        print(json.dumps(child(args.child, args.return_freed_memory, args.prune_fraction, args.vocab, args.tokens,
                               args.checkpoint_blocks, args.gate_rule, args.smoke)))
        return
    rows = []
    for s in args.sparsity:
        flags = ["--return-freed-memory"] if args.return_freed_memory else []
        flags += ["--checkpoint-blocks"] if args.checkpoint_blocks else []
        flags += ["--gate-rule", args.gate_rule] + (["--smoke"] if args.smoke else [])
        flags += ["--prune-fraction", str(args.prune_fraction), "--vocab", str(args.vocab), "--tokens", str(args.tokens)]
        out = subprocess.run([sys.executable, __file__, "--child", str(s), *flags], capture_output=True, text=True,
                             check=True)
        rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
        r = rows[-1]
        print(f"sparsity {s:.2f}: {r['bytes_per_param']:.1f} bytes / compressed param "
              f"(before training {r['bytes_per_param_before_train']:.1f}, training peak above that "
              f"{r['bytes_per_param_train_peak_above_start']:.1f}), {r['seconds']:.0f} s ({r['train_seconds']:.0f} s training)")
    args.out.write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
