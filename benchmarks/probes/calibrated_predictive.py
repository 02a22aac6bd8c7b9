"""Probe (issue 38): the posterior predictive, temperature-calibrated on validation. The averaged network is
under-confident near the data (wider than the data support there) and the best predictor far from it. Fitting
one temperature to ``log mean_m p(y | x, W_m)`` on held-out images (as Ashukha et al. 2020 do for ensembles)
sharpens it where the validation images say so. One ccexam CNN run; the same split as partial_stochastic.py:
T fitted on the validation split's first half, metrics on its second half, upright and rotated 30 and 60 degrees.

    python benchmarks/probes/calibrated_predictive.py --epochs 0.5 --out benchmarks/results/history/calibrated_predictive.jsonl
"""
from __future__ import annotations

import sys
from pathlib import Path

import torch

from sqs_pyro.data import load_mnist
from sqs_pyro.data.metrics import predictive_probs
from sqs_pyro.data.uncertainty import fit_temperature

sys.path.insert(0, str(Path(__file__).resolve().parent))
from posterior_phase import FIT, add_mean_nll, emit, held_out_views, probe_parser, summary, train_cell  # noqa: E402


def main() -> None:
    a = probe_parser(epochs=0.5, members=10).parse_args()
    overrides, _, result, seconds = train_cell(a)
    xv, yv = load_mnist("val")
    row = {"set": overrides, "epochs": a.epochs, "seed": a.seed, "seconds": round(seconds, 1), "members": a.members}
    greedy, averaged = result.greedy_module(), result.averaged_module(a.members)
    names = [layer.site_name for layer in result.guide.layers]
    full = averaged.member_weights
    views = held_out_views(xv, yv)
    predictors = {"greedy": lambda xs: predictive_probs(greedy, xs)}
    for label, subset in {"all": names, "first2": names[:2]}.items():
        weights = [{k: v for k, v in w.items() if k in subset} for w in full]

        def draw(xs, weights=weights):
            averaged.member_weights = weights
            return predictive_probs(averaged, xs, outputs="probs")
        predictors[f"avg[{label}]"] = draw
    for name, predict in predictors.items():
        T = fit_temperature(predict(xv[FIT]).clamp_min(1e-12).log().float(), yv[FIT])
        row[f"T[{name}]"] = round(T, 4)
        for deg, (xs, ys) in views.items():
            probs = predict(xs)
            row[f"{name}_{deg}"] = summary(probs, ys)
            row[f"{name}+ts_{deg}"] = summary(torch.softmax(probs.clamp_min(1e-12).log() / T, -1), ys)
    add_mean_nll(row)
    emit(row, a.out, indent=1)


if __name__ == "__main__":
    main()
