"""The HTML report: written by the compress outputs and by `sqs-pyro report`, self-contained, every figure embedded."""
import base64
import json
import re

import pytest
import torch
from torch import nn

from sqs_pyro.analysis import load_posterior
from sqs_pyro.analysis.report import read_run, render_report
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
    write_outputs(out, result, summary)
    return result, summary


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
                                       "fig-weights-1", "fig-forest-0", "fig-forest-1", "fig-reliability"]
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
    assert 'id="fig-accuracy-compression"' in page and len(_images(page)) == 9  # + the reliability diagram
    assert "Runs compared" in page and ">outlier<" in page and ">none<" in page


def test_report_command_names_missing_files(tmp_path, capsys):
    (tmp_path / "summary.json").write_text("{}")
    assert main(["report", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "history.json" in err and "posterior.nc" in err and "summary.json" not in err.split("lacks")[1]
