"""One SQS run on the ccexam MNIST CNN with config overrides, scored on validation: the driver
behind the "how the defaults were chosen" tables in docs/history/issue-13.md.

    python benchmarks/probes/probe.py sparsity=0.98 epochs=1.0 prune_scope=lamp
    python benchmarks/probes/probe.py --tag eb sparsity=0.95 empirical_bayes=True

Defaults: 95% / K=4, 3 epochs over the 50k training images, batch 256, seed 0, the package
defaults otherwise. Prints one JSON line (greedy and averaged accuracy on the first
``--val-limit`` validation images, achieved sparsity, last logged data term and KL per datum,
per-layer densities, packed ratio, entropy bound, seconds) and appends it to ``--log``. Test
accuracy only with ``--test`` (for reporting a setting already chosen on validation).
"""
import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # benchmarks/: overrides.py
from overrides import parse_overrides  # noqa: E402

from sqs_pyro import SQSConfig
from sqs_pyro.data import accuracy, load_mnist, load_mnist_cnn
from sqs_pyro.infer import compress


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--test", action="store_true", help="also report test accuracy")
    parser.add_argument("--train-limit", type=int)
    parser.add_argument("--val-limit", type=int, default=5000)
    parser.add_argument("--tag", default="")
    parser.add_argument("--log", type=Path, default=Path(__file__).parents[1] / "results" / "history" / "probe.jsonl")
    parser.add_argument("overrides", nargs="*", help="SQSConfig fields as key=value (Python literals)")
    args = parser.parse_args()
    torch.set_num_threads(1)
    defaults = dict(sparsity=0.95, components=4, epochs=3.0, batch_size=256, seed=0)
    values = {**defaults, **parse_overrides(args.overrides)}
    config = SQSConfig.from_dict(values)
    net = load_mnist_cnn()
    x, y = load_mnist("train", args.train_limit)
    x_val, y_val = load_mnist("val", args.val_limit)
    start = time.perf_counter()
    result = compress(net, (x, y), config, progress=False)
    seconds = time.perf_counter() - start
    logged = [e for e in result.history if "nll" in e]
    acc = result.accounting()
    out = {"tag": args.tag, "overrides": args.overrides,
           "val": accuracy(result.greedy_module(), x_val, y_val),
           "val_averaged": accuracy(result.averaged_module(), x_val, y_val),
           "sparsity": acc["sparsity"], "nll_end": logged[-1]["nll"], "kl_end": logged[-1]["kl_per_datum"],
           "packed_ratio": acc["bytes_fp32"] / acc["bytes_packed"], "entropy_bound_bytes": acc["entropy_bound_bytes"],
           "layer_density": {layer["name"]: round(layer["density"], 4) for layer in acc["layers"]},
           "seconds": round(seconds)}
    if args.test:
        x_test, y_test = load_mnist("test")
        out["test"] = accuracy(result.greedy_module(), x_test, y_test)
    print(json.dumps(out), flush=True)
    args.log.parent.mkdir(parents=True, exist_ok=True)
    with args.log.open("a") as f:
        f.write(json.dumps(out) + "\n")


if __name__ == "__main__":
    main()
