"""Issue-8 numbers on the ccexam MNIST CNN: 1 process vs 2 gloo processes, and resume cost.

    python benchmarks/distributed.py                       # 10k training images, 1 epoch, batch 128
    python benchmarks/distributed.py --train-limit 2000    # quicker look
    python benchmarks/distributed.py --smoke               # CI: 4 global steps of 16 images, a temporary output

Runs the same job (same global batch, seed and data) once in one process and once as two
data-parallel processes (``torchrun --standalone --nproc-per-node 2``), and reports their
training throughput, the max abs difference of all parameters across the two ranks, and
the greedy test accuracy of both; then times a resume of the one-process run from its last
checkpoint. Writes benchmarks/results/distributed.json. On a 2-vCPU machine no speed-up is
expected: the point is that the result is the same.
"""
import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from sqs_pyro import SQSConfig
from sqs_pyro.infer.checkpoint import CHECKPOINT_NAME, load_checkpoint
from sqs_pyro.data import accuracy, load_mnist, load_mnist_cnn
from sqs_pyro.infer.distributed import distributed_context, max_abs_difference_across_ranks
from sqs_pyro.infer import Trainer, compress
from smoke import add_smoke_flag, smoke_folder


def worker(args: argparse.Namespace) -> None:
    """One run (one process, or one rank of a torchrun launch); rank 0 writes ``args.out``."""
    torch.set_num_threads(1)
    net = load_mnist_cnn()
    x, y = load_mnist("train", args.train_limit)
    config = SQSConfig(epochs=args.epochs, batch_size=args.batch_size, seed=0)
    timing = {}
    train = Trainer.train

    def timed_train(self, *a, **kw):  # the training loop alone, without set-up
        start = time.perf_counter()
        train(self, *a, **kw)
        timing.update(seconds=time.perf_counter() - start, steps=self.schedule.total_steps)

    Trainer.train = timed_train
    with distributed_context(args.distributed) as ctx:
        result = compress(net, (x, y), config, progress=False, checkpoint_dir=args.checkpoint_dir,
                          distributed=args.distributed)
        tensors = [*result.model.state_dict().values(), *result.guide.state_dict().values()]
        diff = max_abs_difference_across_ranks([t for t in tensors if t.is_floating_point()]) if ctx.active else None
    Trainer.train = train
    if not ctx.is_main:
        return
    x_test, y_test = load_mnist("test", args.test_limit)
    record = {"processes": ctx.world_size, "steps": timing["steps"], "train_seconds": timing["seconds"],
              "steps_per_second": timing["steps"] / timing["seconds"],
              "examples_per_second": timing["steps"] * config.batch_size / timing["seconds"],
              "max_abs_diff_across_ranks": diff, "accuracy_greedy": accuracy(result.greedy_module(), x_test, y_test),
              "sparsity": result.accounting()["sparsity"]}
    if not ctx.active:
        start = time.perf_counter()
        load_checkpoint(args.checkpoint_dir / CHECKPOINT_NAME)
        record["checkpoint_load_seconds"] = time.perf_counter() - start
        record["checkpoint_bytes"] = (args.checkpoint_dir / CHECKPOINT_NAME).stat().st_size
        start = time.perf_counter()  # a resume with nothing left to train: set-up + load + restore
        compress(net, (x, y), config, progress=False, checkpoint_dir=args.checkpoint_dir, resume=True)
        record["resume_seconds"] = time.perf_counter() - start
    args.out.write_text(json.dumps(record))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--train-limit", type=int, default=10000)
    parser.add_argument("--test-limit", type=int)
    parser.add_argument("--epochs", type=float, default=1.0)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--distributed", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--checkpoint-dir", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "distributed.json")
    add_smoke_flag(parser)
    args = parser.parse_args()
    if args.smoke:
        args.train_limit, args.test_limit, args.batch_size, args.out = 64, 64, 16, smoke_folder() / "distributed.json"
    if args.worker:
        worker(args)
        return

    common = ["--train-limit", str(args.train_limit), "--epochs", str(args.epochs),
              "--batch-size", str(args.batch_size), "--worker"]
    if args.test_limit:
        common += ["--test-limit", str(args.test_limit)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    with tempfile.TemporaryDirectory() as tmp:
        one, two = Path(tmp) / "one.json", Path(tmp) / "two.json"
        subprocess.run([sys.executable, __file__, *common, "--out", str(one), "--checkpoint-dir", f"{tmp}/one"],
                       check=True, env=env)
        subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                        __file__, *common, "--distributed", "--out", str(two), "--checkpoint-dir", f"{tmp}/two"],
                       check=True, env=env)
        rows = [json.loads(one.read_text()), json.loads(two.read_text())]
    payload = {"train_examples": args.train_limit, "epochs": args.epochs, "global_batch": args.batch_size,
               "runs": rows, "accuracy_difference_points": 100 * abs(rows[0]["accuracy_greedy"]
                                                                     - rows[1]["accuracy_greedy"])}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(payload, indent=2))
    print("processes  steps  steps/s  examples/s  greedy acc  sparsity  max|diff| across ranks")
    for r in rows:
        diff = "-" if r["max_abs_diff_across_ranks"] is None else f"{r['max_abs_diff_across_ranks']:g}"
        print(f"{r['processes']:9d}  {r['steps']:5d}  {r['steps_per_second']:7.2f}  {r['examples_per_second']:10.1f}"
              f"  {r['accuracy_greedy']:10.4f}  {r['sparsity']:8.4f}  {diff}")
    print(f"greedy accuracy difference: {payload['accuracy_difference_points']:.2f} points")
    print(f"resume (1 process, nothing left to train): {rows[0]['resume_seconds']:.1f} s, of which checkpoint "
          f"load {rows[0]['checkpoint_load_seconds']:.2f} s ({rows[0]['checkpoint_bytes'] / 1e6:.1f} MB)")
    print(f"written to {args.out}")


if __name__ == "__main__":
    main()
