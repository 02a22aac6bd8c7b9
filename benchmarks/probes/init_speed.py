"""Codebook initialisation time over SmolLM2-135M's 210 attention and MLP matrices (issue 14).

    python benchmarks/probes/init_speed.py            # writes benchmarks/results/history/init_speed.json

One process, one thread. Per matrix, in turn (so that load on a shared machine hits both
alike): the guide's initial codebook (:func:`sqs_pyro.guides.initialization.initial_codebook`,
K=16, the kept half at 50% sparsity) with outlier-aware windows and with one window; the
totals and their ratio are printed. The window plan's level allocation is exact 1-D k-means
(binned DP + Lloyd polishing) in both.
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from sqs_pyro.guides.initialization import initial_codebook
from sqs_pyro.hf import CausalLM, load_smollm
from sqs_pyro.models import select_layers, transformer_include


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--components", type=int, default=16)
    parser.add_argument("--sparsity", type=float, default=0.5)
    parser.add_argument("--out", type=Path, default=Path(__file__).parents[1] / "results" / "history" / "init_speed.json")
    args = parser.parse_args()
    torch.set_num_threads(1)
    _, lm = load_smollm()
    net = CausalLM(lm)
    totals = {"outlier": 0.0, "none": 0.0}
    sites = select_layers(net, include=transformer_include("llama"))
    for site in sites:
        values = net.get_parameter(site.name).detach().reshape(-1).double().numpy()
        for mode in totals:
            start = time.perf_counter()
            initial_codebook(values, args.components, mode, sparsity=args.sparsity)
            totals[mode] += time.perf_counter() - start
    row = {"matrices": len(sites), "components": args.components, "sparsity": args.sparsity,
           "seconds_outlier": totals["outlier"], "seconds_none": totals["none"],
           "ratio_outlier_to_none": totals["outlier"] / totals["none"]}
    args.out.write_text(json.dumps(row, indent=1))
    print(json.dumps(row, indent=1))


if __name__ == "__main__":
    main()
