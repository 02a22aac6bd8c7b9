"""Probe (issue 39): the settings of the ``soft_weight_sharing`` preset that the paper tunes (tau = ``kl_weight``,
the mixture's rate ``lr_codebook``), on the literature benchmark's dense networks and budget (LeNet-300: 6 epochs,
LeNet-5: 3; K=4, batch 128), seed 0, the 10k validation images only. One JSON line per setting.

    python benchmarks/probes/sws_sweep.py lenet300 0.95 out.jsonl kl_weight=0.003,lr_codebook=1e-4 ...
"""
from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import torch

from sqs_pyro.config import SQSConfig
from sqs_pyro.data import accuracy
from sqs_pyro.experiments.ablation import BASELINE_RECIPE, PRESETS
from sqs_pyro.experiments.baselines import compress_soft_weight_sharing
from sqs_pyro.experiments.literature import paper_counts
from sqs_pyro.experiments.workloads import LITERATURE, load_workload

ROOT = Path(__file__).resolve().parents[2]
EPOCHS = {"lenet300": 6.0, "lenet5": 3.0}


def main() -> None:
    name, pi_zero, out, settings = sys.argv[1], float(sys.argv[2]), Path(sys.argv[3]), sys.argv[4:]
    torch.set_num_threads(1)
    w = load_workload(name, ROOT / "runs" / "benchmark-cache", recipe=LITERATURE[name])
    for setting in settings:
        overrides = {**PRESETS["soft_weight_sharing"][1],
                     **{k: float(v) for k, v in (kv.split("=") for kv in setting.split(","))}}
        config = SQSConfig.from_dict({**BASELINE_RECIPE, "epochs": EPOCHS[name], "batch_size": 128,
                                      "posterior_epochs": 0.0, "components": 4, "seed": 0, "sparsity": pi_zero,
                                      **overrides})
        started = time.perf_counter()
        result = compress_soft_weight_sharing(w.net, w.train, config)
        seconds = time.perf_counter() - started
        record = {"network": name, "pi_zero": pi_zero, **overrides,
                  "val_error": 100 * (1 - accuracy(result.greedy_module(), *w.val)),
                  "sparsity": result.accounting()["sparsity"],
                  "cr_dc_huffman": paper_counts(result.compressed())["cr_dc_huffman"],
                  "levels": [layer.components for layer in result.compressed().layers], "train_seconds": seconds}
        print(json.dumps(record), flush=True)
        with out.open("a") as f:
            f.write(json.dumps(record) + "\n")


if __name__ == "__main__":
    main()
