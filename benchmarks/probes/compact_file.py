"""Probe (issue 39): where a small network's ``.sqs`` bytes go, before and after the compact file (format
version 4: a deflated header, no scales for groups without a kept weight), and what fp16 biases add.

One short SQS run of a literature LeNet (its cached dense network) or the pretrained MNIST CNN at the given
sparsity and K (batch 128), saved four
ways: ``compact=False`` (version 2, as before), compact, and each with ``tensor_dtype="float16"``. Prints the
bytes of each, the header's JSON and stored bytes, the empty groups, and the test accuracy of each file's
network loaded back (the fp16 biases' cost).

    python benchmarks/probes/compact_file.py --network lenet5 --sparsity 0.993 --epochs 1
    python benchmarks/probes/compact_file.py --network mnist_cnn --sparsity 0.95 --epochs 1
"""
from __future__ import annotations

import argparse
import copy
import json
import tempfile
from pathlib import Path

import torch

from sqs_pyro import SQSConfig, compress
from sqs_pyro.data import accuracy
from sqs_pyro.experiments.baselines import file_network
from sqs_pyro.experiments.workloads import LITERATURE, load_workload
from sqs_pyro.format.container import PREAMBLE, load_compressed, read_header, save_compressed

ROOT = Path(__file__).resolve().parents[2]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--network", default="lenet5", choices=["mnist_cnn", *sorted(LITERATURE)])
    parser.add_argument("--sparsity", type=float, default=0.993)
    parser.add_argument("--components", type=int, default=4)
    parser.add_argument("--epochs", type=float, default=1.0)
    parser.add_argument("--train-limit", type=int, default=None, help="training images (all 50k)")
    args = parser.parse_args()
    torch.set_num_threads(1)
    w = load_workload(args.network, ROOT / "runs" / "benchmark-cache", recipe=LITERATURE.get(args.network),
                      train_limit=args.train_limit)
    config = SQSConfig(sparsity=args.sparsity, components=args.components, epochs=args.epochs, posterior_epochs=0.0)
    network = file_network(compress(w.net, w.train, config, progress=False).compressed())
    rows = {}
    with tempfile.TemporaryDirectory() as tmp:
        for compact in (False, True):
            for tensor_dtype in (None, "float16"):
                path = Path(tmp) / f"{compact}-{tensor_dtype}.sqs"
                size = save_compressed(network, path, model=w.net, compact=compact, tensor_dtype=tensor_dtype)
                header = read_header(path)
                stored = PREAMBLE.unpack(path.read_bytes()[:PREAMBLE.size])[2]
                net = load_compressed(path, copy.deepcopy(w.net)).eval()
                rows[f"compact={compact}, tensors={tensor_dtype or 'as is'}"] = {
                    "version": header["format_version"], "file_bytes": size, "header_stored": stored,
                    "header_json": len(json.dumps({k: v for k, v in header.items() if k != "file_bytes"},
                                                  separators=(",", ":"))),
                    "scaled_groups": [e.get("scaled_groups") for e in header["layers"]],
                    "ratio": header["accounting"]["bytes_fp32"] / size,
                    "test_accuracy": accuracy(net, *w.test)}
    rows["empty rows"] = {layer.name: int((~layer.mask.reshape(layer.shape[0], -1).any(1)).sum())
                          for layer in network.layers}
    print(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
