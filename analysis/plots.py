"""Headless matplotlib figures of an SQS run.

Every function draws on its own :class:`matplotlib.figure.Figure` (no pyplot, no global
state) and writes one PNG of exactly ``size`` inches x ``dpi`` pixels per inch to
``target`` (a path or a binary file object). Inputs are the JSON-able tables of
:func:`sqs_pyro.analysis.summary.analyze`, the run's ``history`` and ``summary`` records, and
a posterior Dataset, so a report can be drawn from a run's files alone.
"""
from __future__ import annotations

import math
import os
from typing import IO, Any, Mapping, Sequence

import numpy as np
from matplotlib.figure import Figure
from matplotlib.patches import Patch

Target = str | os.PathLike | IO[bytes]
PHASE_COLOURS = {"warmup": "#fde9c8", "prune": "#f9d0d0", "finetune": "#d6e9f8", "posterior": "#dcefd6"}


def _figure(size: tuple[float, float], dpi: int) -> Figure:
    return Figure(figsize=size, dpi=dpi, layout="constrained")


def _save(fig: Figure, target: Target, dpi: int) -> None:
    fig.savefig(target, format="png", dpi=dpi)


def _grid(n: int, cols: int) -> tuple[int, int]:
    cols = max(1, min(cols, n))
    return math.ceil(n / cols), cols


def plot_weight_histogram(dist: Mapping[str, Any], target: Target, size: tuple[float, float] = (11.0, 4.0),
                          dpi: int = 100) -> None:
    """One layer: full-precision weights with the learned mixture, and the quantized weights.

    Left: histograms of the latent and the pretrained weights (log count axis, so the tails
    show) with the mixture's expected count per bin. Right: the compressed weights, kept
    weights per level and the pruned ones at zero (log count axis). ``dist`` is one entry of
    :func:`sqs_pyro.analysis.codebooks.layer_distributions`.
    """
    fig = _figure(size, dpi)
    left, right = fig.subplots(1, 2, width_ratios=[3, 2])
    edges = np.asarray(dist["edges"])
    left.stairs(dist["latent_counts"], edges, fill=True, alpha=0.5, color="#4c72b0", label="latent x (learned)")
    left.stairs(dist["pretrained_counts"], edges, color="#555555", linewidth=0.8, label="pretrained w")
    left.stairs(dist["mixture_counts"], edges, color="#c44e52", linewidth=1.2, label="learned mixture")
    for mu in dist["levels"]:
        left.axvline(mu, color="#c44e52", alpha=0.25, linewidth=0.6)
    left.set_yscale("log")
    left.set_ylim(bottom=0.5)
    left.set_xlabel("weight value")
    left.set_ylabel("count per bin")
    left.set_title(f"{dist['name']}: full precision")
    left.legend(fontsize="small")
    levels, counts = np.asarray(dist["levels"]), np.asarray(dist["level_counts"], dtype=float)
    colours = np.array([f"C{w % 10}" for w in dist["level_windows"]])
    used = counts > 0
    right.vlines(levels[used], 0.5, counts[used], colors=colours[used], linewidth=2)
    right.scatter(levels[used], counts[used], c=colours[used], s=14, zorder=3, label="kept, per level")
    if not used.all():
        right.scatter(levels[~used], np.full((~used).sum(), 0.7), c=colours[~used], marker="x", s=18,
                      label="unused level")
    right.vlines([0.0], 0.5, max(dist["pruned"], 0.5), colors="black", linewidth=3, label="pruned (spike at 0)")
    right.set_yscale("log")
    right.set_ylim(bottom=0.5)
    right.set_xlabel("compressed weight value (colour = window)")
    right.set_ylabel("count")
    right.set_title("quantized")
    right.legend(fontsize="small")
    _save(fig, target, dpi)


def plot_inclusion_histograms(inclusion: Mapping[str, Any], target: Target,
                              size: tuple[float, float] | None = None, dpi: int = 100, cols: int = 3) -> None:
    """Histogram of the inclusion probabilities g of every layer (log count axis).

    ``inclusion`` is :func:`sqs_pyro.analysis.inclusion.inclusion_summary`'s output; the
    uncertain band is shaded.
    """
    layers = inclusion["layers"]
    rows, cols = _grid(len(layers), cols)
    fig = _figure(size or (3.6 * cols, 2.8 * rows), dpi)
    axes = np.atleast_1d(fig.subplots(rows, cols, squeeze=False)).ravel()
    lo, hi = inclusion["uncertain_band"]
    for ax, row in zip(axes, layers):
        hist = row["histogram"]
        ax.axvspan(lo, hi, color="#eeeeee")
        ax.stairs(np.maximum(hist["counts"], 0), hist["edges"], fill=True, color="#4c72b0")
        ax.axvline(0.5, color="black", linewidth=0.8, linestyle="--")
        ax.set_yscale("log")
        ax.set_ylim(bottom=0.5)
        ax.set_title(f"{row['name']}\nsparsity {row['thresholded_sparsity']:.3f}, "
                     f"uncertain {row['uncertain_fraction']:.3f}", fontsize="small")
        ax.set_xlabel("inclusion probability g")
    for ax in axes[len(layers):]:
        ax.set_axis_off()
    _save(fig, target, dpi)


def plot_sparsity_bits(analysis: Mapping[str, Any], target: Target, size: tuple[float, float] = (11.0, 4.0),
                       dpi: int = 100) -> None:
    """Per layer: thresholded and expected sparsity; nominal bits, code entropy and the entropy bound.

    The bound per original weight is ``H2(1 - s) + (1 - s) H`` (mask entropy plus code
    entropy of the kept weights); ``analysis`` is :func:`~sqs_pyro.analysis.summary.analyze`'s output.
    """
    inc, books = analysis["inclusion"]["layers"], analysis["codebooks"]["layers"]
    names = [r["name"] for r in inc]
    x = np.arange(len(names))
    fig = _figure(size, dpi)
    left, right = fig.subplots(1, 2)
    left.bar(x - 0.2, [r["thresholded_sparsity"] for r in inc], 0.4, label="thresholded (g > 0.5 kept)")
    left.bar(x + 0.2, [r["expected_sparsity"] for r in inc], 0.4, label="expected sum(1-g)/N")
    left.set_ylim(0, 1)
    left.set_ylabel("sparsity")
    left.legend(fontsize="small")
    density = np.array([1.0 - r["thresholded_sparsity"] for r in inc])
    entropy = np.array([b["entropy_bits"] for b in books])
    h2 = np.array([-(p * math.log2(p) + (1 - p) * math.log2(1 - p)) if 0 < p < 1 else 0.0 for p in density])
    right.bar(x - 0.27, [b["bits"] for b in books], 0.27, label="code bits b (per kept weight)")
    right.bar(x, entropy, 0.27, label="code entropy H (per kept weight)")
    right.bar(x + 0.27, h2 + density * entropy, 0.27, label="entropy bound (per weight)")
    right.set_ylabel("bits")
    right.set_ylim(0, 1.45 * max(b["bits"] for b in books))
    right.legend(fontsize="small")
    for ax in (left, right):
        ax.set_xticks(x, names, rotation=30, ha="right", fontsize="small")
    _save(fig, target, dpi)


def plot_elbo_trace(history: Sequence[Mapping[str, Any]], target: Target, size: tuple[float, float] = (11.0, 6.5),
                    dpi: int = 100) -> None:
    """The objective (the ELBO, or the surrogate of ``mode="expected"``), data term
    ``E_q log p(D|W) / N`` and KL per datum against the SVI step, phases shaded."""
    rows = [r for r in history if "objective" in r]
    steps = np.array([r["step"] for r in rows])
    fig = _figure(size, dpi)
    axes = fig.subplots(3, 1, sharex=True)
    surrogate = any(r.get("objective_kind") == "surrogate" for r in rows)
    label = "objective / N (surrogate, then ELBO)" if surrogate and any(
        r.get("objective_kind") != "surrogate" for r in rows) else "surrogate / N" if surrogate else "ELBO (beta KL) / N"
    series = [(label, [r["objective"] for r in rows]), ("data term / N", [-r["nll"] for r in rows]),
              ("KL / N", [r["kl_per_datum"] for r in rows])]
    for ax, (label, values) in zip(axes, series):
        for i in range(1, len(rows)):  # the interval ending at a record is shaded by that record's phase
            colour = PHASE_COLOURS.get(rows[i]["phase"], "white")
            ax.axvspan(steps[i - 1], steps[i], color=colour, linewidth=0)
        ax.plot(steps, values, color="black", marker=".", linewidth=1)
        ax.set_ylabel(label)
    axes[0].legend(handles=[Patch(color=c, label=p) for p, c in PHASE_COLOURS.items()], fontsize="small", ncol=4)
    axes[-1].plot(steps, [r["beta"] * r["kl_per_datum"] for r in rows], color="#c44e52", linewidth=1,
                  linestyle="--", label="beta KL / N")
    axes[-1].legend(fontsize="small")
    axes[-1].set_xlabel("SVI step")
    _save(fig, target, dpi)


def plot_reliability(calibration: Mapping[str, Mapping[str, Any]], target: Target,
                     size: tuple[float, float] = (6.0, 5.0), dpi: int = 100) -> None:
    """Reliability diagram: accuracy against mean confidence per confidence bin, one line per
    predictor (e.g. dense, greedy, averaged), with its ECE in the legend; the diagonal is perfect calibration."""
    fig = _figure(size, dpi)
    ax = fig.subplots()
    ax.plot([0, 1], [0, 1], color="grey", linestyle=":", linewidth=1)
    for name, m in calibration.items():
        pairs = [(c, a) for c, a in zip(m["bins"]["confidence"], m["bins"]["accuracy"]) if c is not None]
        ax.plot([c for c, _ in pairs], [a for _, a in pairs], marker="o", linewidth=1,
                label=f"{name} (ECE {m['ece']:.4f}, NLL {m['nll']:.4f})")
    ax.set_xlabel("confidence (mean max probability in the bin)")
    ax.set_ylabel("accuracy in the bin")
    ax.legend(fontsize="small")
    _save(fig, target, dpi)


def plot_accuracy_vs_compression(runs: Sequence[tuple[str, Mapping[str, Any]]], target: Target,
                                 size: tuple[float, float] = (7.0, 4.5), dpi: int = 100) -> None:
    """Test accuracy (greedy and averaged) against fp32 bytes / packed bytes, one point per run.

    ``runs`` are ``(label, summary)`` pairs, ``summary`` as written to ``summary.json``.
    """
    fig = _figure(size, dpi)
    ax = fig.subplots()
    ratio = np.array([s["packed_ratio"] for _, s in runs])
    ax.scatter(ratio, [s["accuracy_greedy"] for _, s in runs], marker="o", label="greedy")
    ax.scatter(ratio, [s["accuracy_averaged"] for _, s in runs], marker="^", label="averaged")
    for (label, s), r in zip(runs, ratio):
        ax.annotate(label, (r, s["accuracy_greedy"]), fontsize="small", xytext=(4, 4), textcoords="offset points")
    dense = sorted({s["accuracy_dense"] for _, s in runs})
    for acc in dense:
        ax.axhline(acc, color="grey", linestyle="--", linewidth=0.8)
    ax.set_xscale("log")
    ax.set_xlabel("compression ratio (fp32 bytes / packed bytes)")
    ax.set_ylabel("test accuracy")
    ax.legend(fontsize="small", title="dashed: dense", title_fontsize="small")
    _save(fig, target, dpi)


def plot_forest(draws: np.ndarray, labels: Sequence[str], target: Target, title: str = "",
                size: tuple[float, float] | None = None, dpi: int = 100) -> None:
    """Forest plot of draws ``(S, n)``: mean, central 50 % and 90 % intervals per column."""
    d = np.asarray(draws, dtype=np.float64)
    fig = _figure(size or (6.0, 1.0 + 0.22 * d.shape[1]), dpi)
    ax = fig.subplots()
    y = np.arange(d.shape[1])[::-1]
    q05, q25, q75, q95 = np.quantile(d, [0.05, 0.25, 0.75, 0.95], axis=0)
    ax.hlines(y, q05, q95, color="#4c72b0", linewidth=1, label="90 %")
    ax.hlines(y, q25, q75, color="#4c72b0", linewidth=3, label="50 %")
    ax.scatter(d.mean(axis=0), y, color="black", s=10, zorder=3, label="mean")
    ax.set_yticks(y, labels, fontsize="x-small")
    ax.axvline(0.0, color="grey", linewidth=0.6)
    ax.set_title(title, fontsize="small")
    ax.legend(fontsize="x-small", loc="lower right")
    _save(fig, target, dpi)


def plot_rotation(shift: Mapping[str, Any], target: Target, size: tuple[float, float] = (11.0, 4.0),
                  dpi: int = 100) -> None:
    """Accuracy and NLL against rotation angle, one line per predictor; ``shift`` is
    :func:`sqs_pyro.analysis.shift_metrics.shift_evaluation`'s record."""
    fig = _figure(size, dpi)
    axes = fig.subplots(1, 2)
    for name, m in shift["predictors"].items():
        for ax, metric in zip(axes, ("accuracy", "nll")):
            ax.plot(shift["rotations"], m[metric], marker="o", linewidth=1, label=name)
    for ax, label in zip(axes, ("accuracy", "NLL (nats)")):
        ax.set_xlabel("rotation (degrees)")
        ax.set_ylabel(label)
        ax.set_xticks(shift["rotations"])
    axes[1].set_yscale("log")
    axes[0].legend(fontsize="small", title=f"T = {shift['temperature']:.3f}", title_fontsize="small")
    _save(fig, target, dpi)


def plot_ood_entropy(ood: Mapping[str, Any], target: Target, size: tuple[float, float] = (11.0, 4.0),
                     dpi: int = 100) -> None:
    """Predictive-entropy histograms, MNIST test against Fashion-MNIST test, one panel per predictor
    (AUROC in the title); ``ood`` is the ``ood`` entry of the shift record."""
    fig = _figure(size, dpi)
    names = list(ood["auroc"])
    edges = np.asarray(ood["edges"])
    for ax, name in zip(np.atleast_1d(fig.subplots(1, len(names))), names):
        ax.stairs(ood["mnist"][name], edges, fill=True, alpha=0.5, color="#4c72b0", label="MNIST test")
        ax.stairs(ood["fashion"][name], edges, fill=True, alpha=0.5, color="#c44e52", label="Fashion-MNIST test")
        ax.set_yscale("log")
        ax.set_ylim(bottom=0.5)
        ax.set_xlabel("predictive entropy (nats)")
        ax.set_ylabel("images")
        ax.set_title(f"{name}: AUROC {ood['auroc'][name]:.4f}", fontsize="small")
        ax.legend(fontsize="small")
    _save(fig, target, dpi)
