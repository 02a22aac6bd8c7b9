"""Probe (issue 38): which layers should the posterior predictive draw? One ccexam CNN run, then the
averaged predictor with only some layers drawn from q (the others at their greedy values: a partially
stochastic network, Sharma et al. 2023), against greedy and temperature-scaled greedy. Validation split
only: T fitted on its first half, metrics on the second half, upright and rotated 30 and 60 degrees.

    python benchmarks/probes/partial_stochastic.py --epochs 0.5 --out benchmarks/results/history/partial_stochastic.jsonl
"""
from __future__ import annotations

import sys
from pathlib import Path

import torch

from sqs_pyro.data import load_mnist
from sqs_pyro.data.metrics import predictive_probs

sys.path.insert(0, str(Path(__file__).resolve().parent))
from posterior_phase import (FIT, add_mean_nll, emit, fit_temperature, held_out_views, probe_parser,  # noqa: E402
                             summary, train_cell)


def main() -> None:
    a = probe_parser(epochs=0.5, members=10).parse_args()
    overrides, _, result, seconds = train_cell(a)
    xv, yv = load_mnist("val")
    greedy, averaged = result.greedy_module(), result.averaged_module(a.members)
    names = [layer.site_name for layer in result.guide.layers]
    full = averaged.member_weights
    subsets = {"all": names, "last": names[-1:], "last2": names[-2:], "first2": names[:2], "none": [],
               "first2+last": names[:2] + names[-1:], "first": names[:1], "second": names[1:2]}
    T = fit_temperature(predictive_probs(greedy, xv[FIT]).log().float(), yv[FIT])
    row = {"set": overrides, "epochs": a.epochs, "seed": a.seed, "seconds": round(seconds, 1), "temperature": T,
           "layers": names, "members": a.members}
    views = held_out_views(xv, yv)
    for deg, (xs, ys) in views.items():
        g = predictive_probs(greedy, xs)
        for name, probs in (("greedy", g), ("ts", torch.softmax(g.log() / T, -1))):
            row[f"{name}_{deg}"] = summary(probs, ys)
    for label, subset in subsets.items():
        averaged.member_weights = [{k: v for k, v in w.items() if k in subset} for w in full]
        for deg, (xs, ys) in views.items():
            row[f"avg[{label}]_{deg}"] = summary(predictive_probs(averaged, xs, outputs="probs"), ys)
    add_mean_nll(row)
    emit(row, a.out, indent=1)


if __name__ == "__main__":
    main()
