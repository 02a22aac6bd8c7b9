"""Probe (issue 38): the linearised (GLM) posterior predictive of the same posterior.

The sampled predictive averages ``softmax f(x, W_m)`` over draws ``W_m ~ q``; near the data each draw is a worse
network than the greedy one ``W*``, so the average loses NLL there. The linearised predictive (Immer, Korzepa and
Bauer, AISTATS 2021) keeps ``q`` and replaces the network by its first-order expansion around ``W*``:

    p(y | x, D) ~ (1/M) sum_m softmax( f(x, W*) + J_x (W_m - W*) ),   J_x = df(x, W)/dW at W*

one forward-mode product (``torch.func.jvp``) per member and batch. Same run, same draws, same split as
posterior_phase.py (T of the temperature-scaled rows fitted on the validation split's first half).

    python benchmarks/probes/linearized_predictive.py --epochs 0.5 --out benchmarks/results/history/linearized_predictive.jsonl
"""
from __future__ import annotations

import sys
from pathlib import Path

import torch

from sqs_pyro.data import load_mnist
from sqs_pyro.data.metrics import predictive_probs

sys.path.insert(0, str(Path(__file__).resolve().parent))
from posterior_phase import emit, probe_parser, score_predictors, train_cell  # noqa: E402


def linearized(averaged, greedy_weights: dict[str, torch.Tensor], scale: float = 1.0):
    """``x -> mean_m softmax(f(x, W*) + scale J_x (W_m - W*))`` over the members of ``averaged``."""
    net = averaged.net
    names = list(greedy_weights)
    deltas = [tuple(scale * (w[n] - greedy_weights[n]) for n in names) for w in averaged.member_weights]

    @torch.no_grad()
    def probs(x: torch.Tensor) -> torch.Tensor:
        primal = tuple(greedy_weights[n] for n in names)
        total = 0.0
        for delta in deltas:
            out, tangent = torch.func.jvp(
                lambda *w: torch.func.functional_call(net, dict(zip(names, w)), (x,), strict=False), primal, delta)
            total = total + torch.softmax(out + tangent, -1)
        return total / len(deltas)
    return probs


def batched(predict, x: torch.Tensor, size: int = 1000) -> torch.Tensor:
    return torch.cat([predict(x[i:i + size]) for i in range(0, len(x), size)])


def main() -> None:
    a = probe_parser(epochs=0.5, members=10).parse_args()
    overrides, _, result, seconds = train_cell(a)
    xv, yv = load_mnist("val")
    greedy, averaged = result.greedy_module(), result.averaged_module(a.members)
    greedy_weights = {k: v.detach() for k, v in greedy.named_parameters() if k in averaged.member_weights[0]}
    predictors = {"greedy": lambda xs: predictive_probs(greedy, xs),
                  "sampled": lambda xs: predictive_probs(averaged, xs, outputs="probs"),
                  "linearized": lambda xs, lin=linearized(averaged, greedy_weights): batched(lin, xs)}
    row = {"probe": "linearized_predictive", "set": overrides, "epochs": a.epochs, "seed": a.seed,
           "seconds": round(seconds, 1), "members": a.members, "objective_kind": result.objective_kind}
    score_predictors(row, predictors, xv, yv)
    emit(row, a.out, indent=1)


if __name__ == "__main__":
    main()
