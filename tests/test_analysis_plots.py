"""Every plot function writes a non-empty PNG of exactly the requested pixel size."""
import io
import struct

import numpy as np
import pytest
import torch
from matplotlib.image import imread
from torch import nn

from sqs_pyro.analysis import plots
from sqs_pyro.analysis.summary import analyze
from sqs_pyro.config import SQSConfig
from sqs_pyro.infer import compress

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def run(planted_outlier_problem):
    net, x, y = planted_outlier_problem()
    result = compress(net, (x, y), SQSConfig(components=4, sparsity=0.5, epochs=2, batch_size=32, windows="outlier",
                                             log_every=2), progress=False)
    return result, analyze(result)


def _png_size(data: bytes) -> tuple[int, int]:
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and data[12:16] == b"IHDR"
    return struct.unpack(">II", data[16:24])


def _check(path, width, height):
    data = path.read_bytes()
    assert _png_size(data) == (width, height)
    pixels = imread(io.BytesIO(data))
    assert pixels.shape[:2] == (height, width)
    assert pixels[..., :3].std() > 0.05  # something was drawn
    assert (pixels[..., :3] < 0.5).mean() > 0.005  # dark pixels: lines, text


def test_weight_histogram(run, tmp_path):
    _, a = run
    for i, dist in enumerate(a["distributions"]["layers"]):
        plots.plot_weight_histogram(dist, tmp_path / f"w{i}.png", size=(8.0, 3.0), dpi=50)
        _check(tmp_path / f"w{i}.png", 400, 150)


def test_inclusion_histograms(run, tmp_path):
    _, a = run
    plots.plot_inclusion_histograms(a["inclusion"], tmp_path / "inc.png", size=(6.0, 2.5), dpi=60)
    _check(tmp_path / "inc.png", 360, 150)
    plots.plot_inclusion_histograms(a["inclusion"], tmp_path / "auto.png", dpi=50, cols=1)  # default size: 1 x 2 grid
    _check(tmp_path / "auto.png", 180, 280)


def test_sparsity_bits(run, tmp_path):
    _, a = run
    plots.plot_sparsity_bits(a, tmp_path / "sb.png", size=(7.0, 3.0), dpi=70)
    _check(tmp_path / "sb.png", 490, 210)


def test_elbo_trace(run, tmp_path):
    result, _ = run
    plots.plot_elbo_trace(result.history, tmp_path / "elbo.png", size=(6.0, 5.0), dpi=50)
    _check(tmp_path / "elbo.png", 300, 250)


def test_accuracy_vs_compression(tmp_path):
    runs = [(f"run{i}", {"accuracy_greedy": 0.9 - 0.02 * i, "accuracy_averaged": 0.91 - 0.02 * i,
                         "accuracy_dense": 0.95, "packed_ratio": 10.0 * (i + 1)}) for i in range(3)]
    plots.plot_accuracy_vs_compression(runs, tmp_path / "acc.png", size=(5.0, 4.0), dpi=40)
    _check(tmp_path / "acc.png", 200, 160)


def test_forest_to_a_file_object():
    draws = np.random.default_rng(0).normal(size=(100, 6)) * 0.1 + np.arange(6)
    buf = io.BytesIO()
    plots.plot_forest(draws, [f"[{j}]" for j in range(6)], buf, "layer", size=(4.0, 3.0), dpi=50)
    assert _png_size(buf.getvalue()) == (200, 150)


def test_rotation_and_ood_entropy(tmp_path):
    angles = [0, 15, 30, 45, 60, 90]
    shift = {"rotations": angles, "temperature": 1.3,
             "predictors": {n: {"accuracy": [0.99 - 0.01 * a for a in angles], "nll": [0.04 + 0.05 * a for a in angles]}
                            for n in ("greedy", "greedy_temperature", "averaged")}}
    plots.plot_rotation(shift, tmp_path / "rot.png", size=(6.0, 3.0), dpi=50)
    _check(tmp_path / "rot.png", 300, 150)
    ood = {"edges": np.linspace(0, 2.3, 11).tolist(), "auroc": {"greedy": 0.98, "averaged": 0.97},
           "mnist": {n: [90, 5, 3, 1, 1, 0, 0, 0, 0, 0] for n in ("greedy", "averaged")},
           "fashion": {n: [20, 10, 10, 10, 10, 10, 10, 10, 5, 5] for n in ("greedy", "averaged")}}
    plots.plot_ood_entropy(ood, tmp_path / "ood.png", size=(6.0, 3.0), dpi=50)
    _check(tmp_path / "ood.png", 300, 150)
