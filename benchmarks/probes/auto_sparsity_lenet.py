"""Probe (issue 39): where does ``--sparsity auto`` (the ELBO's ladder) land on the literature's LeNets?
The literature benchmark's dense networks and budget (LeNet-300: 6 epochs, LeNet-5: 3; K=4, batch 128),
seed 0; test error, the real file's ratio and Deep Compression's Huffman count, beside the exact runs of
benchmarks/results/literature.md.

    python benchmarks/probes/auto_sparsity_lenet.py --networks lenet5 lenet300
"""
from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch

from sqs_pyro import SQSConfig, compress
from sqs_pyro.data import accuracy
from sqs_pyro.experiments.baselines import file_network
from sqs_pyro.experiments.literature import paper_counts
from sqs_pyro.experiments.workloads import LITERATURE, load_workload
from sqs_pyro.format.container import save_compressed

ROOT = Path(__file__).resolve().parents[2]
EPOCHS = {"lenet300": 6.0, "lenet5": 3.0}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--networks", nargs="+", default=["lenet5"])
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    torch.set_num_threads(1)
    for name in args.networks:
        w = load_workload(name, ROOT / "runs" / "benchmark-cache", recipe=LITERATURE[name])
        config = SQSConfig(sparsity=0.0, sparsity_mode="auto", components=4, epochs=EPOCHS[name], batch_size=128,
                           posterior_epochs=0.0)
        started = time.perf_counter()
        result = compress(w.net, w.train, config, progress=False)
        seconds = time.perf_counter() - started
        compressed = result.compressed()
        with tempfile.TemporaryDirectory() as tmp:
            file_bytes = save_compressed(file_network(compressed), Path(tmp) / "m.sqs", model=w.net)
        fp32 = sum(p.numel() for p in w.net.parameters()) * 4
        ladder = next(h for h in result.history if h.get("phase") == "auto_sparsity")
        row = {"network": name, "chosen": ladder["chosen"], "stopped": ladder["stopped"],
               "negative_elbo": ladder["negative_elbo"], "sparsity": result.accounting()["sparsity"],
               "val_error": 100 * (1 - accuracy(result.greedy_module(), *w.val)),
               "test_error": 100 * (1 - accuracy(result.greedy_module(), *w.test)),
               "file_bytes": file_bytes, "file_ratio": fp32 / file_bytes,
               "cr_dc_huffman": paper_counts(compressed)["cr_dc_huffman"], "seconds": seconds}
        print(json.dumps(row))
        if args.out:
            with open(args.out, "a") as f:
                f.write(json.dumps(row) + "\n")


if __name__ == "__main__":
    main()
