"""Bits read off the posterior: fixed K=16 against per-layer levels the posterior uses and tells apart.

    python benchmarks/adaptive_bits.py                  # 75% / K=16 on the ccexam MNIST CNN, default budget
    python benchmarks/adaptive_bits.py --epochs 1 --train-limit 10000   # quicker look
    python benchmarks/adaptive_bits.py --smoke          # CI: four steps, 256 evaluation images, a temporary output

One SQS run; its posterior is materialised twice (``adaptive_bits`` off and on, the same
mask and codes before merging), so the two files differ only by the read-out. Prints greedy
validation and test accuracy, the real ``.sqs`` bytes and the per-layer bits of each, and
writes benchmarks/results/adaptive_bits.json.
"""
import argparse
import json
import tempfile
import time
from pathlib import Path

import torch

from sqs_pyro import SQSConfig, compress, save_compressed
from sqs_pyro.compressed import accounting, materialize
from sqs_pyro.data import accuracy, load_mnist, load_mnist_cnn
from smoke import add_smoke_flag, smoke_folder


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sparsity", type=float, default=0.75)
    parser.add_argument("--components", type=int, default=16)
    parser.add_argument("--epochs", type=float, default=3.0)
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--train-limit", type=int)
    parser.add_argument("--separation", type=float, default=2.0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "adaptive_bits.json")
    add_smoke_flag(parser)
    args = parser.parse_args()
    torch.set_num_threads(1)
    eval_limit = None
    if args.smoke:
        args.train_limit, args.batch_size, args.epochs, args.out = 256, 64, 1.0, smoke_folder() / "adaptive_bits.json"
        eval_limit = 256
    net = load_mnist_cnn()
    x, y = load_mnist("train", args.train_limit)
    val, test = load_mnist("val", eval_limit), load_mnist("test", eval_limit)
    config = SQSConfig(sparsity=args.sparsity, components=args.components, epochs=args.epochs,
                       batch_size=args.batch_size, seed=args.seed, merge_separation=args.separation)
    start = time.perf_counter()
    result = compress(net, (x, y), config, progress=False)
    seconds = time.perf_counter() - start
    rows = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name, adaptive in (("fixed", False), ("adaptive", True)):
            network = materialize(result.guide, result.model.net, {**config.to_dict(), "adaptive_bits": adaptive},
                                  group_scales=result.model.group_scales())
            module = network.load_into(result.skeleton).eval()
            acc = accounting(network)
            rows[name] = {"accuracy_val": accuracy(module, *val), "accuracy_test": accuracy(module, *test),
                          "file_bytes": save_compressed(network, Path(tmp) / f"{name}.sqs"),
                          "bytes_fp32": acc["bytes_fp32"], "sparsity": acc["sparsity"],
                          "layers": [{"name": l["name"], "bits": l["bits"], "codes_used": l["codes_used"]}
                                     for l in acc["layers"]]}
    print(f"{args.sparsity:.2f} sparsity, K={args.components}, {args.epochs:g} epochs, {seconds:.0f} s training")
    print("read-out    val acc   test acc   file bytes   fp32/file   bits per layer")
    for name, r in rows.items():
        print(f"{name:<9}  {r['accuracy_val']:.4f}    {r['accuracy_test']:.4f}   {r['file_bytes']:10,}   "
              f"{r['bytes_fp32'] / r['file_bytes']:8.1f}x   {[l['bits'] for l in r['layers']]}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"config": config.to_dict(), "train_seconds": seconds, **rows}, indent=2))


if __name__ == "__main__":
    main()
