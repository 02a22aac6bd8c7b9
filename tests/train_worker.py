"""A tiny SQS training run in its own process, for the kill-and-resume and distributed tests.

    python tests/train_worker.py --out DIR [--checkpoint-dir DIR] [--resume] [--stall]
    torchrun --nproc-per-node 2 tests/train_worker.py --out DIR --distributed

Writes ``DIR/rank{r}.pt``: the materialised weights, every model and guide tensor, the
history, and (distributed) the max abs difference of the parameters across ranks.
``--stall`` blocks the run in its first evaluation (step ``EVAL_EVERY``, a few steps after a
checkpoint) and prints ``STALLED`` so that a test can kill it there.
"""
import argparse
import sys
import time
from pathlib import Path

import torch
from torch import nn

from sqs_pyro import SQSConfig
from sqs_pyro.infer.distributed import distributed_context, max_abs_difference_across_ranks
from sqs_pyro.infer import compress

CONFIG = SQSConfig(components=4, sparsity=0.5, epochs=4, batch_size=32, log_every=5, seed=7,
                   warmup_fraction=0.15, prune_fraction=0.45,  # phase-change checkpoints away from EVAL_EVERY
                   lr_weights=2e-4, lr_codebook=2e-4, lr_dense=2e-4,  # small steps: rank reduction order stays invisible
                   mode="sample",  # the exact draw: an argmax level (mode="hard") would turn round-off into a flip
                   gate_score="saliency")  # gates spread by saliency: no near-ties at the pruning quantile
EVAL_EVERY = 25


def tiny_problem() -> tuple[nn.Module, torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(512, 12, generator=gen)
    y = (x[:, :3] * torch.tensor([1.0, -1.0, 0.5])).argmax(-1)
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(12, 32), nn.ReLU(), nn.Linear(32, 3)), x, y


def snapshot(result) -> dict:
    return {"compressed": result.compressed().state_dict(),
            "model": {k: v.clone() for k, v in result.model.state_dict().items()},
            "guide": {k: v.clone() for k, v in result.guide.state_dict().items()},
            "history": result.history}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--checkpoint-dir", type=Path)
    parser.add_argument("--checkpoint-every", type=int, default=10)
    parser.add_argument("--resume", action="store_true")
    parser.add_argument("--distributed", action="store_true")
    parser.add_argument("--stall", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(1)
    net, x, y = tiny_problem()
    calls = []

    def eval_fn(module: nn.Module) -> dict[str, float]:
        calls.append(1)
        if args.stall and len(calls) == 1:
            print("STALLED", flush=True)
            time.sleep(600)
        return {"nonzero": float(sum(int((p != 0).sum()) for p in module.parameters()))}

    with distributed_context(args.distributed) as ctx:
        result = compress(net, (x, y), CONFIG, eval_fn=eval_fn, eval_every=EVAL_EVERY, progress=False,
                          checkpoint_dir=args.checkpoint_dir, checkpoint_every=args.checkpoint_every,
                          resume=args.resume, distributed=args.distributed)
        state = snapshot(result)
        if ctx.active:
            tensors = [*state["model"].values(), *state["guide"].values()]
            state["max_abs_diff"] = max_abs_difference_across_ranks([t for t in tensors if t.is_floating_point()])
        state["seconds"] = result.seconds
    args.out.mkdir(parents=True, exist_ok=True)
    torch.save(state, args.out / f"rank{ctx.rank}.pt")
    print("DONE", flush=True)


if __name__ == "__main__":
    sys.exit(main())
