"""Probe (issue 38): the posterior predictive, temperature-calibrated on validation. The averaged network is
under-confident near the data (wider than the data support there) and the best predictor far from it. Fitting
one temperature to ``log mean_m p(y | x, W_m)`` on held-out images (as Ashukha et al. 2020 do for ensembles)
sharpens it where the validation images say so. One ccexam CNN run; the same split as partial_stochastic.py:
T fitted on the validation split's first half, metrics on its second half, upright and rotated 30 and 60 degrees.

    python benchmarks/probes/calibrated_predictive.py --epochs 0.5 --out benchmarks/results/history/calibrated_predictive.jsonl
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
from sqs_pyro.data.uncertainty import fit_temperature

sys.path.insert(0, str(Path(__file__).resolve().parent))
from posterior_phase import parse, rotate  # noqa: E402


def metrics(probs: torch.Tensor, y: torch.Tensor) -> dict:
    return {k: round(v, 4) for k, v in calibration(probs, y).items() if k in ("accuracy", "nll", "ece")}


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
    row = {"set": overrides, "epochs": a.epochs, "seed": a.seed, "seconds": round(time.perf_counter() - start, 1),
           "members": a.members}
    greedy, averaged = result.greedy_module(), result.averaged_module(a.members)
    names = [layer.site_name for layer in result.guide.layers]
    full = averaged.member_weights
    views = {deg: ((xv[held], yv[held]) if deg == 0 else (rotate(xv[held], deg), yv[held])) for deg in (0, 30, 60)}
    predictors = {"greedy": lambda xs: predictive_probs(greedy, xs)}
    for label, subset in {"all": names, "first2": names[:2]}.items():
        weights = [{k: v for k, v in w.items() if k in subset} for w in full]

        def draw(xs, weights=weights):
            averaged.member_weights = weights
            return predictive_probs(averaged, xs, outputs="probs")
        predictors[f"avg[{label}]"] = draw
    for name, predict in predictors.items():
        T = fit_temperature(predict(xv[fit]).clamp_min(1e-12).log().float(), yv[fit])
        row[f"T[{name}]"] = round(T, 4)
        for deg, (xs, ys) in views.items():
            probs = predict(xs)
            row[f"{name}_{deg}"] = metrics(probs, ys)
            row[f"{name}+ts_{deg}"] = metrics(torch.softmax(probs.clamp_min(1e-12).log() / T, -1), ys)
    for key in [k for k in row if k.endswith("_0") and isinstance(row[k], dict)]:
        base = key[:-2]
        row[f"{base}_mean_nll"] = round(sum(row[f"{base}_{d}"]["nll"] for d in (0, 30, 60)) / 3, 4)
    print(json.dumps(row, indent=1))
    if a.out:
        with open(a.out, "a") as f:
            f.write(json.dumps(row) + "\n")


if __name__ == "__main__":
    main()
