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
from sqs_pyro.infer import SQSResult
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


#: the validation split's halves: temperatures are fitted on the first, metrics taken on the second
FIT, HELD = slice(0, 5000), slice(5000, 10000)
DEGREES = (0, 30, 60)


def probe_parser(epochs: float, members: int | None) -> argparse.ArgumentParser:
    """The options of the posterior probes: the cell, the budget, the seed, ``--set`` overrides, members, ``--out``."""
    p = argparse.ArgumentParser()
    p.add_argument("--sparsity", type=float, default=0.95)
    p.add_argument("--components", type=int, default=4)
    p.add_argument("--epochs", type=float, default=epochs)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--train-limit", type=int, default=None)
    p.add_argument("--set", nargs="*", default=[])
    p.add_argument("--members", type=int, default=members)
    p.add_argument("--out", default=None)
    return p


def train_cell(a: argparse.Namespace) -> tuple[dict, SQSConfig, SQSResult, float]:
    """The probes' run on the MNIST training images: its overrides, config, result and seconds."""
    torch.set_num_threads(1)
    overrides = parse(a.set)
    config = SQSConfig(sparsity=a.sparsity, components=a.components, epochs=a.epochs, seed=a.seed, **overrides)
    x, y = load_mnist("train", a.train_limit)
    start = time.perf_counter()
    result = compress(load_mnist_cnn(), (x, y), config, progress=False)
    return overrides, config, result, time.perf_counter() - start


def held_out_views(xv: torch.Tensor, yv: torch.Tensor) -> dict[int, tuple[torch.Tensor, torch.Tensor]]:
    """The second half of the validation images, upright and rotated by each of :data:`DEGREES`."""
    x, y = xv[HELD], yv[HELD]
    return {deg: (x if deg == 0 else rotate(x, deg), y) for deg in DEGREES}


def summary(probs: torch.Tensor, y: torch.Tensor) -> dict[str, float]:
    """Accuracy, NLL and ECE of predictive probabilities, rounded to 4 places."""
    c = calibration(probs, y)
    return {k: round(c[k], 4) for k in ("accuracy", "nll", "ece")}


def add_mean_nll(row: dict) -> None:
    """``row[name + "_mean_nll"]``: the NLL averaged over :data:`DEGREES`, for every predictor with a ``name_0`` entry."""
    for key in [k for k in row if k.endswith("_0") and isinstance(row[k], dict)]:
        base = key[:-2]
        row[f"{base}_mean_nll"] = round(sum(row[f"{base}_{d}"]["nll"] for d in DEGREES) / len(DEGREES), 4)


def score_predictors(row: dict, predictors: dict, xv: torch.Tensor, yv: torch.Tensor) -> None:
    """``row[name_deg]`` and ``row[name+ts_deg]`` for each predictor (``x -> probabilities``) on :func:`held_out_views`,
    raw and divided by its own temperature (``row[T[name]]``, fitted to ``log p`` on the :data:`FIT` half with
    :func:`sqs_pyro.data.uncertainty.fit_temperature`), then the mean NLLs (:func:`add_mean_nll`)."""
    from sqs_pyro.data.uncertainty import fit_temperature as fit_log_probs
    views = held_out_views(xv, yv)
    for name, predict in predictors.items():
        T = fit_log_probs(predict(xv[FIT]).clamp_min(1e-12).log().float(), yv[FIT])
        row[f"T[{name}]"] = round(T, 4)
        for deg, (xs, ys) in views.items():
            probs = predict(xs)
            row[f"{name}_{deg}"] = summary(probs, ys)
            row[f"{name}+ts_{deg}"] = summary(torch.softmax(probs.clamp_min(1e-12).log() / T, -1), ys)
    add_mean_nll(row)


def emit(row: dict, out: str | None, indent: int | None = None) -> None:
    """Print ``row`` as JSON and append it as one line to ``out``, if given."""
    print(json.dumps(row, indent=indent))
    if out:
        with open(out, "a") as f:
            f.write(json.dumps(row) + "\n")


def main() -> None:
    a = probe_parser(epochs=1.0, members=None).parse_args()
    overrides, config, result, seconds = train_cell(a)
    xv, yv = load_mnist("val")
    greedy, averaged = result.greedy_module(), result.averaged_module(a.members)
    T = fit_temperature(predictive_probs(greedy, xv[FIT]).log().float(), yv[FIT])
    row = {"set": overrides, "sparsity": a.sparsity, "components": a.components, "epochs": a.epochs,
           "seed": a.seed, "seconds": round(seconds, 1), "temperature": T,
           "achieved_sparsity": result.guide.measured_sparsity(), "objective_kind": result.objective_kind, "members": a.members or config.num_averaged}
    for deg, (xs, ys) in held_out_views(xv, yv).items():
        g = predictive_probs(greedy, xs)
        scaled = torch.softmax(g.log() / T, -1)
        av = predictive_probs(averaged, xs, outputs="probs")
        for name, probs in (("greedy", g), ("ts", scaled), ("avg", av)):
            row[f"{name}_{deg}"] = summary(probs, ys)
    row["scales"] = [[round(float(s), 4) for s in layer.scales] for layer in result.guide.layers]
    row["mix"] = [[round(float(m), 3) for m in layer.log_mix().exp()] for layer in result.guide.layers]
    emit(row, a.out)


if __name__ == "__main__":
    main()
