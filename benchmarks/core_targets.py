"""Issue-2 targets on the pretrained ccexam MNIST CNN: accuracy drop at 75%/K=16 and 95%/K=4.

    python benchmarks/core_targets.py                 # both settings, README numbers
    python benchmarks/core_targets.py --epochs 1 --train-limit 5000   # quicker look

Prints one table (dense / greedy / averaged test accuracy, achieved sparsity, bits, CR
formula, packed-bytes ratio, wall time) and writes benchmarks/results/core_targets.json.
"""
import argparse
import json
import time
from pathlib import Path

import torch

from sqs_pyro import SQSConfig
from sqs_pyro.data import accuracy, load_mnist, load_mnist_cnn
from sqs_pyro.infer import compress

SETTINGS = [  # (sparsity, K, allowed accuracy drop in points)
    (0.75, 16, 0.1),
    (0.95, 4, 0.5),
]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--epochs", type=float, default=3.0)
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--train-limit", type=int)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "core_targets.json")
    args = parser.parse_args()
    torch.set_num_threads(1)

    net = load_mnist_cnn()
    x, y = load_mnist("train", args.train_limit)
    x_test, y_test = load_mnist("test")
    dense = accuracy(net, x_test, y_test)
    rows = []
    for sparsity, k, allowed in SETTINGS:
        config = SQSConfig(sparsity=sparsity, components=k, epochs=args.epochs, batch_size=args.batch_size,
                           seed=args.seed)
        start = time.perf_counter()
        result = compress(net, (x, y), config, progress=False)
        greedy = accuracy(result.greedy_module(), x_test, y_test)
        averaged = accuracy(result.averaged_module(), x_test, y_test)
        acc = result.accounting()
        best = max(greedy, averaged)
        rows.append({"sparsity_target": sparsity, "K": k, "accuracy_dense": dense, "accuracy_greedy": greedy,
                     "accuracy_averaged": averaged, "drop_points": 100 * (dense - best),
                     "allowed_drop_points": allowed, "met": 100 * (dense - best) <= allowed,
                     "sparsity": acc["sparsity"], "bits": acc["bits"], "cr_formula": acc["cr_formula"],
                     "packed_ratio": acc["bytes_fp32"] / acc["bytes_packed"],
                     "seconds": time.perf_counter() - start, "epochs": args.epochs,
                     "train_examples": len(x)})
    print(f"dense test accuracy {dense:.4f}")
    print("target     K  sparsity  bits  CR-formula  packed  greedy  averaged  drop(pt)  met  seconds")
    for r in rows:
        print(f"{r['sparsity_target']:.2f}  {r['K']:4d}  {r['sparsity']:8.4f}  {r['bits']:4d}  {r['cr_formula']:9.1f}x"
              f"  {r['packed_ratio']:5.1f}x  {r['accuracy_greedy']:.4f}  {r['accuracy_averaged']:.4f}"
              f"  {r['drop_points']:8.2f}  {'yes' if r['met'] else 'NO':>3}  {r['seconds']:7.0f}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
