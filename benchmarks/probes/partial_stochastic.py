"""Probe (issue 38): which layers should the posterior predictive draw? One ccexam CNN run, then the
averaged predictor with only some layers drawn from q (the others at their greedy values: a partially
stochastic network, Sharma et al. 2023), against greedy and temperature-scaled greedy. Validation split
only: T fitted on its first half, metrics on the second half, upright and rotated 30 and 60 degrees.

    python benchmarks/probes/partial_stochastic.py --epochs 0.5 --out benchmarks/results/history/partial_stochastic.jsonl
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

from sqs_pyro import SQSConfig, compress
from sqs_pyro.data import load_mnist, load_mnist_cnn
from sqs_pyro.data.metrics import calibration, predictive_probs

sys.path.insert(0, str(Path(__file__).resolve().parent))
from posterior_phase import fit_temperature, parse, rotate  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--sparsity", type=float, default=0.95)
    p.add_argument("--components", type=int, default=4)
    p.add_argument("--epochs", type=float, default=0.5)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--members", type=int, default=10)
    p.add_argument("--set", nargs="*", default=[])
    p.add_argument("--out", default=None)
    a = p.parse_args()
    torch.set_num_threads(1)
    overrides = parse(a.set)
    config = SQSConfig(sparsity=a.sparsity, components=a.components, epochs=a.epochs, seed=a.seed, **overrides)
    x, y = load_mnist("train")
    xv, yv = load_mnist("val")
    fit, held = slice(0, 5000), slice(5000, 10000)
    start = time.perf_counter()
    result = compress(load_mnist_cnn(), (x, y), config, progress=False)
    seconds = time.perf_counter() - start
    greedy, averaged = result.greedy_module(), result.averaged_module(a.members)
    names = [layer.site_name for layer in result.guide.layers]
    full = averaged.member_weights
    subsets = {"all": names, "last": names[-1:], "last2": names[-2:], "first2": names[:2], "none": [],
               "first2+last": names[:2] + names[-1:], "first": names[:1], "second": names[1:2]}
    T = fit_temperature(predictive_probs(greedy, xv[fit]).log().float(), yv[fit])
    row = {"set": overrides, "epochs": a.epochs, "seed": a.seed, "seconds": round(seconds, 1), "temperature": T,
           "layers": names, "members": a.members}
    views = {deg: ((xv[held], yv[held]) if deg == 0 else (rotate(xv[held], deg), yv[held])) for deg in (0, 30, 60)}
    for deg, (xs, ys) in views.items():
        g = predictive_probs(greedy, xs)
        for name, probs in (("greedy", g), ("ts", torch.softmax(g.log() / T, -1))):
            row[f"{name}_{deg}"] = {k: round(v, 4) for k, v in calibration(probs, ys).items() if k in ("accuracy", "nll", "ece")}
    for label, subset in subsets.items():
        averaged.member_weights = [{k: v for k, v in w.items() if k in subset} for w in full]
        for deg, (xs, ys) in views.items():
            c = calibration(predictive_probs(averaged, xs, outputs="probs"), ys)
            row[f"avg[{label}]_{deg}"] = {k: round(c[k], 4) for k in ("accuracy", "nll", "ece")}
    for key in [k for k in row if k.endswith("_0") and isinstance(row[k], dict)]:
        base = key[:-2]
        row[f"{base}_mean_nll"] = round(sum(row[f"{base}_{d}"]["nll"] for d in (0, 30, 60)) / 3, 4)
    print(json.dumps(row, indent=1))
    if a.out:
        with open(a.out, "a") as f:
            f.write(json.dumps(row) + "\n")


if __name__ == "__main__":
    main()
