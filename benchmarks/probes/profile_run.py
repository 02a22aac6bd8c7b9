"""Where one SQS run's time goes: cProfile of ``compress`` on a workload of a grid file (issue 13's wall
target on LeNet-300, whose baseline run takes about 2 s).

    python benchmarks/probes/profile_run.py                                  # LeNet-300, 95% / K=4, seed 1
    python benchmarks/probes/profile_run.py --workload lenet5 --sparsity 0.75

Runs the grid's SQS point once to warm up, then once under cProfile, and prints the run's seconds and
the entries with the largest cumulative time (Pyro's traces, the guide's draws, the KL, backward, Adam).
"""
import argparse
import cProfile
import pstats
import time
from pathlib import Path

import torch

from sqs_pyro.experiments.ablation import expand_grid, grid_workload, load_grid
from sqs_pyro.infer import compress

HERE = Path(__file__).parent


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--grid", type=Path, default=HERE / "configs" / "wall_check.yaml")
    parser.add_argument("--workload", default="lenet300")
    parser.add_argument("--sparsity", type=float, default=0.95)
    parser.add_argument("--top", type=int, default=30)
    parser.add_argument("--sort", default="cumulative", help="pstats key: cumulative or tottime")
    args = parser.parse_args()
    torch.set_num_threads(1)
    grid = load_grid(args.grid)
    specs = [s for s in expand_grid(grid) if s.workload == args.workload and s.method.name == "sqs"
             and s.config.sparsity == args.sparsity]
    if not specs:
        raise SystemExit(f"no sqs point for {args.workload} at sparsity {args.sparsity} in {args.grid}")
    workload = grid_workload(args.workload, grid)
    compress(workload.net, workload.train, specs[0].config, progress=False)  # warm-up
    profile = cProfile.Profile()
    started = time.perf_counter()
    profile.enable()
    compress(workload.net, workload.train, specs[0].config, progress=False)
    profile.disable()
    print(f"{args.workload} at {args.sparsity}: {time.perf_counter() - started:.2f} s under cProfile")
    pstats.Stats(profile).sort_stats(args.sort).print_stats(args.top)


if __name__ == "__main__":
    main()
