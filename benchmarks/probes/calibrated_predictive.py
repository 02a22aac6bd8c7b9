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

from sqs_pyro.data import load_mnist
from sqs_pyro.data.metrics import predictive_probs

sys.path.insert(0, str(Path(__file__).resolve().parent))
from posterior_phase import emit, probe_parser, score_predictors, train_cell  # noqa: E402


def main() -> None:
    a = probe_parser(epochs=0.5, members=10).parse_args()
    overrides, _, result, seconds = train_cell(a)
    xv, yv = load_mnist("val")
    row = {"set": overrides, "epochs": a.epochs, "seed": a.seed, "seconds": round(seconds, 1), "members": a.members}
    greedy, averaged = result.greedy_module(), result.averaged_module(a.members)
    names = [layer.site_name for layer in result.guide.layers]
    full = averaged.member_weights
    predictors = {"greedy": lambda xs: predictive_probs(greedy, xs)}
    for label, subset in {"all": names, "first2": names[:2]}.items():
        weights = [{k: v for k, v in w.items() if k in subset} for w in full]

        def draw(xs, weights=weights):
            averaged.member_weights = weights
            return predictive_probs(averaged, xs, outputs="probs")
        predictors[f"avg[{label}]"] = draw
    score_predictors(row, predictors, xv, yv)
    emit(row, a.out, indent=1)


if __name__ == "__main__":
    main()
