r"""Calibration under rotation and out-of-distribution entropy of a run's predictors (for the report).

On the first ``images`` MNIST test images, rotated by ``theta`` in ``(0,) + ROTATIONS`` degrees
(:func:`sqs_pyro.data.shift.rotate`), three predictors of one compressed network:

* ``greedy``: ``softmax(z)`` of the greedy network's logits ``z``;
* ``greedy_temperature``: ``softmax(z / T)``, ``T`` fitted on the first ``images`` validation images
  (:func:`~sqs_pyro.data.uncertainty.fit_temperature`);
* ``averaged``: the posterior predictive ``(1/M) sum_m softmax(z_m)`` over networks drawn from ``q``.

Each gets accuracy, NLL, Brier and ECE (:func:`~sqs_pyro.data.metrics.calibration`). With Fashion-MNIST
test images (as many as the MNIST images evaluated), the predictive entropies ``H(p) = -sum_c p_c log p_c`` of MNIST (unrotated) and
Fashion-MNIST are histogrammed on ``[0, log 10]`` and summarised by the AUROC of telling them apart
(:func:`~sqs_pyro.data.uncertainty.ood_auroc`). Everything is JSON-able, so a report re-renders it.
"""
from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch
from torch import nn

from sqs_pyro.data.metrics import calibration, predictive_probs
from sqs_pyro.data.shift import ROTATIONS, rotate
from sqs_pyro.data.uncertainty import fit_temperature, predictive_entropy, ood_auroc, temperature_scaled
from sqs_pyro.errors import SQSInputError

SHIFT_IMAGES = 2000
ENTROPY_BINS = 30
PREDICTORS = ("greedy", "greedy_temperature", "averaged")
METRICS = ("accuracy", "nll", "brier", "ece")


def _logits(module: nn.Module, x: torch.Tensor, batch_size: int = 1000) -> torch.Tensor:
    module.eval()
    with torch.no_grad():
        return torch.cat([module(x[i:i + batch_size]).double() for i in range(0, len(x), batch_size)])


def shift_evaluation(greedy: nn.Module, averaged: nn.Module, test: tuple[torch.Tensor, torch.Tensor],
                     val: tuple[torch.Tensor, torch.Tensor], fashion: torch.Tensor | None = None,
                     images: int = SHIFT_IMAGES) -> dict[str, Any]:
    """The rotation table and, with ``fashion`` images, the OOD entropy histograms (module docstring).

    ``greedy`` returns logits, ``averaged`` probabilities. Returns ``{"images", "val_images", "temperature",
    "rotations", "predictors": {name: {metric: [value per angle]}}, "ood"}`` (``ood`` is ``None``
    without Fashion-MNIST, else ``{"images", "edges", "auroc": {name: a}, "mnist": {name: counts},
    "fashion": {name: counts}}`` for ``greedy`` and ``averaged``).
    """
    if images < 1 or len(test[0]) == 0 or len(val[0]) == 0:
        raise SQSInputError(f"shift evaluation needs test and validation images and images >= 1, got {images}")
    x, y = test[0][:images], test[1][:images]
    x_val, y_val = val[0][:images], val[1][:images]
    temperature = fit_temperature(_logits(greedy, x_val), y_val)
    angles = (0, *ROTATIONS)
    table: dict[str, dict[str, list[float]]] = {p: {m: [] for m in METRICS} for p in PREDICTORS}
    unrotated: dict[str, torch.Tensor] = {}
    for angle in angles:
        xr = rotate(x, angle) if angle else x
        z = _logits(greedy, xr)
        probs = {"greedy": torch.softmax(z, -1), "greedy_temperature": temperature_scaled(z, temperature),
                 "averaged": predictive_probs(averaged, xr, outputs="probs")}
        for name, p in probs.items():
            metrics = calibration(p, y)
            for m in METRICS:
                table[name][m].append(metrics[m])
        if not angle:
            unrotated = probs
    return {"images": len(x), "val_images": len(x_val), "temperature": temperature, "rotations": list(angles), "predictors": table,
            "ood": None if fashion is None else ood_histograms(greedy, averaged, unrotated, fashion[:len(x)])}


def ood_histograms(greedy: nn.Module, averaged: nn.Module, mnist: dict[str, torch.Tensor],
                   fashion: torch.Tensor) -> dict[str, Any]:
    """Entropy histograms on ``ENTROPY_BINS`` bins over ``[0, log 10]`` and AUROC, MNIST ``mnist`` probabilities
    (by predictor) against the predictors' probabilities on the ``fashion`` images."""
    out = {"greedy": torch.softmax(_logits(greedy, fashion), -1),
           "averaged": predictive_probs(averaged, fashion, outputs="probs")}
    edges = np.linspace(0.0, math.log(10.0), ENTROPY_BINS + 1)
    hist = lambda p: np.histogram(predictive_entropy(p).clamp(0.0, edges[-1]).numpy(), edges)[0].tolist()  # noqa: E731
    return {"images": len(fashion), "edges": edges.tolist(),
            "auroc": {n: ood_auroc(mnist[n], out[n]) for n in out},
            "mnist": {n: hist(mnist[n]) for n in out}, "fashion": {n: hist(out[n]) for n in out}}
