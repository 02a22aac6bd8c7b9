"""The HTML report: written by the compress outputs and by `sqs-pyro report`, self-contained, every figure embedded."""
import base64
import dataclasses
import json
import re

import pytest
import torch
from torch import nn

from sqs_pyro.analysis import load_posterior
from sqs_pyro.analysis.report import read_run, render_report
from sqs_pyro.analysis.shift_metrics import shift_evaluation
from sqs_pyro.cli import main
from sqs_pyro.cli.compress import build_summary, write_outputs
from sqs_pyro.config import SQSConfig
from sqs_pyro.data import accuracy, calibration, predictive_probs
from sqs_pyro.infer import compress

torch.set_num_threads(1)

IMG = re.compile(r'<img src="([^"]*)"')


def _run(out, windows, planted_outlier_problem):
    net, x, y = planted_outlier_problem()
    result = compress(net, (x, y), SQSConfig(components=4, sparsity=0.5, epochs=2, batch_size=32, windows=windows,
                                             log_every=4), progress=False)
    metrics = {"dense": calibration(predictive_probs(net, x), y),
               "greedy": calibration(predictive_probs(result.greedy_module(), x), y),
               "averaged": calibration(predictive_probs(result.averaged_module(2), x, outputs="probs"), y)}
    summary = build_summary(result, metrics, 1.0)
    assert summary["accuracy_greedy"] == accuracy(result.greedy_module(), x, y)
    summary["shift"] = _shift(result)
    write_outputs(out, result, summary)
    return result, summary


def _shift(result):
    """The shift record of the run's networks behind a fixed 28x28 -> 8 pooling, on random images
    labelled by the greedy network itself (so greedy is exactly right on the unrotated images)."""
    pool = lambda m: nn.Sequential(nn.AdaptiveAvgPool2d((2, 4)), nn.Flatten(), m)  # noqa: E731
    greedy, averaged = pool(result.greedy_module()), pool(result.averaged_module(2))
    gen = torch.Generator().manual_seed(0)
    x, x_val, fashion = (torch.randn(64, 1, 28, 28, generator=gen) * 4 for _ in range(3))
    with torch.no_grad():
        y, y_val = greedy(x).argmax(-1), greedy(x_val).argmax(-1)
    return shift_evaluation(greedy, averaged, (x, y), (x_val, y_val), fashion + 3.0, images=48)


@pytest.fixture(scope="module")
def runs(tmp_path_factory, planted_outlier_problem):
    base = tmp_path_factory.mktemp("runs")
    return {w: (base / w, *_run(base / w, w, planted_outlier_problem)) for w in ("outlier", "none")}


def _images(page):
    srcs = IMG.findall(page)
    assert srcs and all(s.startswith("data:image/png;base64,") for s in srcs)
    pngs = [base64.b64decode(s.split(",", 1)[1]) for s in srcs]
    assert all(p[:8] == b"\x89PNG\r\n\x1a\n" and len(p) > 1000 for p in pngs)
    return pngs


def test_compress_outputs_include_analysis_posterior_and_report(runs):
    out, result, summary = runs["outlier"]
    for name in ("summary.json", "history.json", "analysis.json", "posterior.nc", "report.html"):
        assert (out / name).is_file(), name
    analysis = json.loads((out / "analysis.json").read_text())
    assert analysis["inclusion"]["overall"]["thresholded_sparsity"] == pytest.approx(summary["sparsity"])
    assert [l["name"] for l in analysis["codebooks"]["layers"]] == ["0.weight", "2.weight"]
    posterior = load_posterior(out / "posterior.nc")
    assert posterior.posterior.sizes["draw"] == 200
    assert posterior.sample_stats.sizes["step"] == sum("objective" in r for r in result.history)


def test_report_embeds_every_figure_and_the_tables(runs):
    out, _, summary = runs["outlier"]
    page = (out / "report.html").read_text()
    run = read_run(out)
    rendered, figures = render_report(run, load_posterior(out / "posterior.nc"))
    assert [f.id for f in figures] == ["fig-elbo", "fig-sparsity-bits", "fig-inclusion", "fig-weights-0",
                                       "fig-weights-1", "fig-forest-0", "fig-forest-1", "fig-reliability",
                                       "fig-rotation", "fig-ood-entropy"]
    assert "<h2>Calibration</h2>" in page and f"{summary['calibration']['greedy']['ece']:.4g}" in page
    pngs = _images(page)
    assert len(pngs) == len(figures)
    for fig in figures:
        assert f'<figure id="{fig.id}">' in page and fig.data_uri() in rendered
    assert not re.search(r'(src|href)="(?!data:)', page)  # nothing outside the file
    for text in ("0.weight", "2.weight", f"{summary['accuracy_greedy']:.4f}", "Tail outliers", "Codebooks",
                 "R-hat", "With and without outlier-aware windows"):
        assert text in page, text


def test_report_command_compares_runs(runs, capsys):
    out, _, _ = runs["outlier"]
    other = runs["none"][0]
    target = out / "compare.html"
    assert main(["report", str(out), "--compare", str(other), "--out", str(target)]) == 0
    assert str(target) in capsys.readouterr().out
    page = target.read_text()
    assert 'id="fig-accuracy-compression"' in page and len(_images(page)) == 11  # + reliability, rotation, OOD
    assert "Runs compared" in page and ">outlier<" in page and ">none<" in page


def test_report_command_names_missing_files(tmp_path, capsys):
    (tmp_path / "summary.json").write_text("{}")
    assert main(["report", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "history.json" in err and "posterior.nc" in err and "summary.json" not in err.split("lacks")[1]


def test_report_shows_the_objective_the_learned_scales_and_the_shift(runs):
    out, result, summary = runs["outlier"]
    page = (out / "report.html").read_text()
    shift = summary["shift"]
    assert shift["images"] == 48 and shift["rotations"] == [0, 15, 30, 45, 60, 90]
    assert shift["predictors"]["greedy"]["accuracy"][0] == 1.0  # labels planted by the greedy network
    assert json.loads((out / "summary.json").read_text())["shift"] == shift  # `sqs-pyro report` re-renders it
    assert result.objective_kind == "surrogate+elbo" == summary["objective_kind"]
    assert "Objective: <b>surrogate+elbo</b>" in page and "posterior: elbo" in page
    assert "learned from the data in the posterior phase" in page
    layer = result.guide.layers[0]
    for values in (layer.scales.detach(), layer.log_mix().detach().exp()):
        assert f"{float(values[0]):.3g}" in page
    for name in ("greedy", "greedy_temperature", "averaged"):
        assert f"{shift['predictors'][name]['nll'][3]:.4g}" in page
    assert "first 48 test images" in page and f"{shift['temperature']:.4g}" in page
    assert f"{shift['ood']['auroc']['averaged']:.4g}" in page and "make assets-fashion" not in page


def test_report_without_fashion_says_how_to_get_it(runs):
    out, _, summary = runs["outlier"]
    run = read_run(out)
    run = dataclasses.replace(run, summary={**summary, "shift": {**summary["shift"], "ood": None}})
    page, figures = render_report(run, load_posterior(out / "posterior.nc"))
    assert "fig-ood-entropy" not in [f.id for f in figures] and "fig-rotation" in [f.id for f in figures]
    assert "make assets-fashion" in page and "--fashion assets/fashion" in page
