"""The ablation runner: grid expansion, keys, resume, JSON lines, measured fields, summaries."""
import json
import os

import pytest
import torch
import yaml
from torch import nn

from sqs_pyro.experiments.ablation import (ablation_effects, append_record, execute_run, expand_grid, load_grid, parse_grid,
                               read_records, run_grid, summarize)
from sqs_pyro.cli import main
from sqs_pyro.errors import SQSInputError
from sqs_pyro.experiments.workloads import LeNet5, LeNet300, Workload

GRID = {
    "output": "out/grid.jsonl",
    "workloads": ["mnist_cnn", "lenet300"],
    "methods": ["sqs", "sqs_equal", "sqs_noprior", {"name": "sqs_w3", "method": "sqs", "overrides": {"equal_windows": 3}}],
    "sparsity": [0.5, 0.9],
    "components": [4, 16],
    "seeds": [0, 1, 2],
    "config": {"epochs": 1.5, "batch_size": 32},
}


def _tiny_workload() -> Workload:
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(192, 10, generator=g)
    y = (x @ torch.randn(10, 3, generator=g)).argmax(-1)
    net = nn.Sequential(nn.Linear(10, 16), nn.ReLU(), nn.Linear(16, 3))
    return Workload("tiny", net, (x[:128], y[:128]), (x[128:160], y[128:160]), (x[160:], y[160:]))


def test_grid_expansion_counts_overrides_and_keys(tmp_path):
    grid = parse_grid(GRID, tmp_path)
    runs = expand_grid(grid)
    assert len(runs) == 2 * 4 * 2 * 2 * 3
    assert len({r.key for r in runs}) == len(runs)
    assert grid.output == tmp_path / "out" / "grid.jsonl" and grid.cache_dir == tmp_path / "out" / "cache"
    by_method = {r.method.name: r.config for r in runs}
    assert by_method["sqs"].windows == "outlier" and by_method["sqs"].kl_weight == 1.0
    assert by_method["sqs_equal"].windows == "equal"
    assert by_method["sqs_noprior"].kl_weight == 0.0
    assert by_method["sqs_w3"].equal_windows == 3
    assert all(r.config.epochs == 1.5 and r.config.batch_size == 32 for r in runs)
    assert {(r.config.sparsity, r.config.components, r.config.seed) for r in runs} == {
        (s, k, seed) for s in (0.5, 0.9) for k in (4, 16) for seed in (0, 1, 2)}
    # keys are stable and change with any setting of the run
    assert [r.key for r in expand_grid(parse_grid(GRID, tmp_path))] == [r.key for r in runs]
    changed = expand_grid(parse_grid({**GRID, "config": {"epochs": 2.0, "batch_size": 32}}, tmp_path))
    assert not {r.key for r in changed} & {r.key for r in runs}
    assert runs[0].key.startswith("mnist_cnn/sqs/s=0.5/K=4/seed=0/")


def test_baselines_keep_their_recipe_and_keys_ignore_what_they_never_read(tmp_path):
    base = {**GRID, "methods": ["sqs", "magnitude_kmeans"], "seeds": [0]}
    runs = expand_grid(parse_grid(base, tmp_path))
    one = {r.method.name: r for r in runs}
    assert one["magnitude_kmeans"].config.warmup_fraction == 0.1  # the recipe, under the grid's config
    assert one["sqs"].config.warmup_fraction == 0.0 and one["sqs"].config.gate_init == 1.0  # SQS's defaults
    pinned = expand_grid(parse_grid({**base, "config": {**GRID["config"], "warmup_fraction": 0.2}}, tmp_path))
    assert {r.config.warmup_fraction for r in pinned} == {0.2}  # a grid's config wins over the recipe
    regated = expand_grid(parse_grid({**base, "config": {**GRID["config"], "gate_init": 2.0}}, tmp_path))
    same = {r.key for r in regated} & {r.key for r in runs}
    assert same and all("/magnitude_kmeans/" in key for key in same)  # a baseline never reads gate_init
    assert len(same) == len(regated) // 2  # control: every SQS key changes


def test_grid_file_yaml_and_json_are_equivalent(tmp_path):
    (tmp_path / "g.yaml").write_text(yaml.safe_dump(GRID))
    (tmp_path / "g.json").write_text(json.dumps(GRID))
    a, b = load_grid(tmp_path / "g.yaml"), load_grid(tmp_path / "g.json")
    assert [r.key for r in expand_grid(a)] == [r.key for r in expand_grid(b)]


@pytest.mark.parametrize("change, message", [
    ({"bogus": 1}, "unknown grid keys"),
    ({"methods": ["nope"]}, "unknown method"),
    ({"workloads": ["cifar"]}, "unknown workloads"),
    ({"sparsity": []}, "non-empty list"),
    ({"components": [1]}, "components"),
    ({"config": {"epochz": 1}}, "unknown config keys"),
    ({"train_limit": -3}, "train_limit"),
])
def test_bad_grids_are_rejected(tmp_path, change, message):
    with pytest.raises(SQSInputError, match=message):
        parse_grid({**GRID, **change}, tmp_path)


def _fake_grid(tmp_path):
    grid = parse_grid({**GRID, "workloads": ["lenet300"], "methods": ["sqs", "magnitude_kmeans"],
                       "seeds": [0]}, tmp_path)
    calls = []

    def execute(spec, workload):
        calls.append(spec.key)
        return {"accuracy_greedy": 0.9, "accuracy_val_greedy": 0.89,
                "accuracy_averaged": 0.91 if spec.method.kind == "sqs" else None,
                "sparsity": spec.config.sparsity, "file_ratio": 10.0}

    def loader(name, g):
        return _tiny_workload()

    return grid, calls, execute, loader


def test_runner_resumes_without_rerunning_finished_keys(tmp_path):
    grid, calls, execute, loader = _fake_grid(tmp_path)
    logs = []
    first = run_grid(grid, execute, logs.append, limit=3, workload_loader=loader)
    assert len(first) == len(calls) == 3
    second = run_grid(grid, execute, logs.append, workload_loader=loader)
    assert len(second) == 8 - 3 and len(calls) == 8 and len(set(calls)) == 8
    assert run_grid(grid, execute, logs.append, workload_loader=loader) == [] and len(calls) == 8
    records = read_records(grid.output)
    assert [r["key"] for r in records] == [s.key for s in expand_grid(grid)]
    for r in records:
        assert {"key", "workload", "method", "seed", "sparsity_target", "components", "wall_seconds",
                "finished_at", "config", "accuracy_dense", "train_examples", "test_examples", "source_digest"} <= set(r)
        assert r["seed"] == r["config"]["seed"] == 0 and r["wall_seconds"] >= 0
        assert r["train_examples"] == 128 and r["test_examples"] == 32
    assert "8 runs in the grid, 8 already" in logs[-1]


def test_torn_last_line_is_ignored_cut_off_and_rerun(tmp_path):
    grid, calls, execute, loader = _fake_grid(tmp_path)
    run_grid(grid, execute, lambda _: None, limit=2, workload_loader=loader)
    with open(grid.output, "a") as f:
        f.write('{"key": "lenet300/sqs/s=0.9')  # a crash mid-write
    assert len(read_records(grid.output)) == 2
    run_grid(grid, execute, lambda _: None, workload_loader=loader)
    assert len(calls) == 8 and len(read_records(grid.output)) == 8
    lines = grid.output.read_text().splitlines()
    assert len(lines) == 8 and all(line.endswith("}") for line in lines)


@pytest.mark.parametrize("bad", ['{"key": "a", "v": 1', '{"v": 1}', '[1, 2]'])
def test_a_malformed_record_line_names_the_file_and_line(tmp_path, bad):
    path = tmp_path / "r.jsonl"
    path.write_text(f'{{"key": "a"}}\n{bad}\n{{"key": "b"}}\n')
    with pytest.raises(SQSInputError, match=r"r\.jsonl, line 2: not"):
        read_records(path)
    path.write_text(f'{{"key": "a"}}\n{bad}\n')  # complete, though last: not a torn write either
    with pytest.raises(SQSInputError, match="line 2"):
        read_records(path)


def test_append_record_completes_a_whole_last_line_without_its_newline(tmp_path):
    path = tmp_path / "r.jsonl"
    path.write_text('{"key": "a"}')
    append_record(path, {"key": "b"})
    assert path.read_text() == '{"key": "a"}\n{"key": "b"}\n'


def test_append_record_writes_one_complete_line(tmp_path):
    path = tmp_path / "a" / "x.jsonl"
    append_record(path, {"key": "a", "v": 1.5})
    append_record(path, {"key": "b", "v": None})
    assert path.read_text() == '{"key": "a", "v": 1.5}\n{"key": "b", "v": null}\n'
    with pytest.raises(ValueError):
        append_record(path, {"key": "c", "v": float("nan")})  # never write invalid JSON
    assert len(read_records(path)) == 2


@pytest.mark.parametrize("method", ["sqs", "magnitude_uniform"])
def test_execute_run_measures_every_field(tmp_path, method):
    grid = parse_grid({**GRID, "workloads": ["lenet300"], "methods": [method], "seeds": [0], "sparsity": [0.75],
                       "components": [4], "config": {"epochs": 1.0, "batch_size": 32, "num_averaged": 2}}, tmp_path)
    spec = expand_grid(grid)[0]
    record = execute_run(spec, _tiny_workload())
    n = 10 * 16 + 16 * 3
    assert record["compressed_params"] == n and record["bits"] == 2
    assert 0.75 <= record["sparsity"] < 1
    assert record["cr_formula"] == pytest.approx(32 / ((1 - record["sparsity"]) * 2))
    assert record["bytes_fp32"] == 4 * (n + 16 + 3)
    assert record["file_ratio"] == pytest.approx(record["bytes_fp32"] / record["file_bytes"])
    assert record["packed_ratio"] == pytest.approx(record["bytes_fp32"] / record["bytes_packed"])
    assert 0 <= record["accuracy_greedy"] <= 1 and record["train_seconds"] > 0
    assert [l["name"] for l in record["layers"]] == ["0.weight", "2.weight"]
    assert 0 <= record["ece_greedy"] <= 1 and record["nll_greedy"] > 0 and 0 <= record["brier_greedy"] <= 2
    assert 0 <= record["accuracy_val_greedy"] <= 1  # the validation split is measured beside the test set
    if method == "sqs":
        assert record["num_averaged"] == 2 and 0 <= record["accuracy_averaged"] <= 1
        assert 0 <= record["accuracy_val_averaged"] <= 1  # the predictive on validation too: it may choose
        assert record["averaged_bytes_est"] == record["bytes_fp32"] + n // 8
        assert 0 <= record["ece_averaged"] <= 1 and record["nll_averaged"] > 0
        assert 0 < record["side_bytes"] <= 2 * (16 + 3)  # one fp16 scale per row that keeps a weight (group_size: rows)
    else:
        assert record["accuracy_averaged"] is None and record["accuracy_val_averaged"] is None
        assert record["side_bytes"] == 4 * (16 + 3)


def _record(method, seed, greedy, averaged=None, s=0.9):
    kind = "sqs" if method.startswith("sqs") else method
    return {"workload": "w", "method": method, "kind": kind, "sparsity_target": s, "components": 4, "seed": seed,
            "accuracy_greedy": greedy, "accuracy_averaged": averaged, "num_averaged": 10 if averaged else None,
            "accuracy_dense": 0.99, "sparsity": s + 0.001, "cr_formula": 160.0, "file_ratio": 50.0,
            "averaged_ratio_est": 1.0, "wall_seconds": 10.0}


def test_summaries_and_effects_report_means_spreads_and_signs():
    records = [_record("sqs", 0, 0.90, 0.92), _record("sqs", 1, 0.94, 0.93),
               _record("sqs_equal", 0, 0.91, 0.90), _record("sqs_equal", 1, 0.95, 0.90),
               _record("dgms", 0, 0.80), _record("dgms", 1, 0.82)]
    rows = {r["method"]: r for r in summarize(records)}
    assert set(rows) == {"sqs greedy", "sqs averaged M=10", "sqs_equal greedy", "sqs_equal averaged M=10", "dgms"}
    assert rows["sqs greedy"]["accuracy_mean"] == pytest.approx(0.92)
    assert rows["sqs greedy"]["accuracy_sd"] == pytest.approx(0.02 * 2 ** 0.5)
    assert rows["sqs averaged M=10"]["real_ratio"] == 1.0 and rows["dgms"]["real_ratio"] == 50.0
    assert rows["dgms"]["seeds"] == [0, 1]
    effects = {e["effect"]: e for e in ablation_effects(records)}
    avg = effects["Bayesian averaging vs greedy (sqs)"]
    assert avg["pairs"] == 2 and avg["mean_points"] == pytest.approx(0.5) and (avg["wins"], avg["losses"]) == (1, 1)
    win = effects["outlier-aware vs equal-count windows (greedy)"]
    assert win["mean_points"] == pytest.approx(-1.0) and win["losses"] == 2
    assert "spike-and-slab prior vs no prior KL (greedy)" not in effects  # no sqs_noprior runs


def test_cli_ablate_dry_run_lists_pending_runs(tmp_path, capsys):
    path = tmp_path / "g.yaml"
    path.write_text(yaml.safe_dump({**GRID, "seeds": [0]}))
    assert main(["ablate", str(path), "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "32 runs to do" in out and "lenet300/sqs_w3/s=0.9/K=16/seed=0/" in out
    assert main(["ablate", str(tmp_path / "missing.yaml")]) == 2
    assert not os.path.exists(tmp_path / "out")


def test_lenet_architectures_have_the_classic_sizes():
    assert sum(p.numel() for p in LeNet300().parameters()) == 266_610
    assert sum(p.numel() for p in LeNet5().parameters()) == 431_080
    assert LeNet5()(torch.zeros(2, 1, 28, 28)).shape == (2, 10)


@pytest.mark.parametrize("name", ["image_suite_standard", "image_suite_standard_k16", "image_suite_standard_ablations",
                                  "image_suite_standard_noprior"])
def test_the_recorded_standard_grid_keeps_its_keys(name):
    """A config field added later must not change the keys of recorded runs (else a rerun of the grid redoes
    them all and the report reads none of them): every run of the standard grid is in its results file."""
    from pathlib import Path

    grid = load_grid(Path(__file__).parents[1] / "benchmarks" / "configs" / f"{name}.yaml")
    recorded = {record["key"] for record in read_records(grid.output)}
    missing = [spec.key for spec in expand_grid(grid) if spec.key not in recorded]
    assert not missing, missing[:3]


@pytest.mark.parametrize("progress", [True, False])
def test_runner_progress_bar_counts_the_runs(tmp_path, capsys, progress):
    grid, calls, execute, loader = _fake_grid(tmp_path)
    logs = []
    run_grid(grid, execute, logs.append, limit=3, workload_loader=loader, progress=progress)
    err = capsys.readouterr().err
    assert ("ablate: 100%" in err and "3/3" in err) == progress
    assert len(logs) == 5  # a custom log keeps every line either way


def test_run_keys_stay_those_of_the_recorded_runs():
    """Keys pinned at d9aff61, before issue 37 removed config fields: recorded grids keep resuming (those
    recorded before issue 38's posterior phase say posterior_epochs: 0, before issue 39's exact sparsity
    sparsity_mode: median). Either is a new SQS run (a new key); a baseline never reads them (the same key)."""
    spec = {"output": "x.jsonl", "workloads": ["lenet300"], "methods": ["sqs", "magnitude_kmeans"],
            "sparsity": [0.9], "components": [4], "seeds": [1],
            "config": {"epochs": 2.0, "posterior_epochs": 0.0, "sparsity_mode": "median"}}
    recorded = ["lenet300/sqs/s=0.9/K=4/seed=1/d458576f5f", "lenet300/magnitude_kmeans/s=0.9/K=4/seed=1/bc5dbd3dfb"]
    assert [run.key for run in expand_grid(parse_grid(spec))] == recorded
    for config in ({"epochs": 2.0, "sparsity_mode": "median"}, {"epochs": 2.0, "posterior_epochs": 0.0}):
        now = [run.key for run in expand_grid(parse_grid({**spec, "config": config}))]
        assert now[0] != recorded[0] and now[1] == recorded[1]
