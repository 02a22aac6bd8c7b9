"""Probe (issue 38): does the posterior phase teach the posterior? One ccexam CNN cell, settings given by
--set, evaluated on the validation split only: greedy, greedy temperature-scaled (T fitted on the first half
of validation), and the averaged posterior predictive, on the second half, upright and rotated.

    python benchmarks/probes/posterior_phase.py --sparsity 0.95 --components 4 --epochs 1 \
        --set posterior_epochs=0.25 --out benchmarks/results/history/posterior_phase.jsonl
"""
from __future__ import annotations

import argparse
import json
import math
import time

import torch
import torch.nn.functional as F

from sqs_pyro import SQSConfig, compress
from sqs_pyro.data import load_mnist, load_mnist_cnn
from sqs_pyro.data.images import MNIST_MEAN, MNIST_STD
from sqs_pyro.data.metrics import calibration, predictive_probs


def rotate(x: torch.Tensor, degrees: float) -> torch.Tensor:
    raw = x * MNIST_STD + MNIST_MEAN
    a = math.radians(degrees)
    theta = torch.tensor([[math.cos(a), -math.sin(a), 0.0], [math.sin(a), math.cos(a), 0.0]]).expand(len(x), 2, 3)
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    return (F.grid_sample(raw, grid, align_corners=False) - MNIST_MEAN) / MNIST_STD


def fit_temperature(logits: torch.Tensor, y: torch.Tensor) -> float:
    grid = torch.linspace(-1.5, 1.5, 301).exp()
    nll = [F.cross_entropy(logits / t, y).item() for t in grid]
    return float(grid[min(range(len(nll)), key=nll.__getitem__)])


def parse(pairs):
    out = {}
    for pair in pairs:
        key, value = pair.split("=", 1)
        out[key] = json.loads(value)
    return out


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--sparsity", type=float, default=0.95)
    p.add_argument("--components", type=int, default=4)
    p.add_argument("--epochs", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--train-limit", type=int, default=None)
    p.add_argument("--set", nargs="*", default=[])
    p.add_argument("--members", type=int, default=None)
    p.add_argument("--out", default=None)
    a = p.parse_args()
    torch.set_num_threads(1)
    overrides = parse(a.set)
    config = SQSConfig(sparsity=a.sparsity, components=a.components, epochs=a.epochs, seed=a.seed, **overrides)
    x, y = load_mnist("train", a.train_limit)
    xv, yv = load_mnist("val")
    fit, held = slice(0, 5000), slice(5000, 10000)
    start = time.perf_counter()
    result = compress(load_mnist_cnn(), (x, y), config, progress=False)
    seconds = time.perf_counter() - start
    greedy, averaged = result.greedy_module(), result.averaged_module(a.members)
    T = fit_temperature(predictive_probs(greedy, xv[fit]).log().float(), yv[fit])
    row = {"set": overrides, "sparsity": a.sparsity, "components": a.components, "epochs": a.epochs,
           "seed": a.seed, "seconds": round(seconds, 1), "temperature": T,
           "achieved_sparsity": result.guide.measured_sparsity(), "objective_kind": result.objective_kind, "members": a.members or config.num_averaged}
    for deg in (0, 30, 60):
        xs, ys = (xv[held], yv[held]) if deg == 0 else (rotate(xv[held], deg), yv[held])
        g = predictive_probs(greedy, xs)
        scaled = torch.softmax(g.log() / T, -1)
        av = predictive_probs(averaged, xs, outputs="probs")
        for name, probs in (("greedy", g), ("ts", scaled), ("avg", av)):
            c = calibration(probs, ys)
            row[f"{name}_{deg}"] = {k: round(c[k], 4) for k in ("accuracy", "nll", "ece")}
    row["scales"] = [[round(float(s), 4) for s in layer.scales] for layer in result.guide.layers]
    row["mix"] = [[round(float(m), 3) for m in layer.log_mix().exp()] for layer in result.guide.layers]
    print(json.dumps(row))
    if a.out:
        with open(a.out, "a") as f:
            f.write(json.dumps(row) + "\n")


if __name__ == "__main__":
    main()
