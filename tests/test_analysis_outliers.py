"""Tail outliers: the IQR-fence detector on planted outliers, tail/bulk errors, the window ablation."""
import numpy as np
import pytest
import torch
from torch import nn

from sqs_pyro.analysis.outliers import (error_stats, layer_outliers, outlier_mask, outlier_summary,
                                        quantize_initial, window_ablation)
from sqs_pyro.config import SQSConfig
from sqs_pyro.guides.windows import plan_windows
from sqs_pyro.infer import compress

torch.set_num_threads(1)

PLANTED = {17: 4.0, 503: 5.0, 640: -6.0, 901: -3.5}


def _layer(seed=0):
    """1000 bulk weights within +-0.3 (fences at about +-0.75 for c = 5) and four planted outliers."""
    x = np.clip(np.random.default_rng(seed).normal(0.0, 0.1, 1000), -0.3, 0.3)
    for i, v in PLANTED.items():
        x[i] = v
    return x


def test_detector_finds_exactly_the_planted_outliers():
    x = _layer()
    assert np.flatnonzero(outlier_mask(x, 5.0)).tolist() == sorted(PLANTED)
    plan = plan_windows(x, 16, "outlier", iqr_factor=5.0)  # the same rule as the outlier-aware windows
    bulk_window = np.bincount(plan.window_ids).argmax()
    assert np.flatnonzero(plan.window_ids != bulk_window).tolist() == sorted(PLANTED)
    assert not outlier_mask(np.clip(x, -0.3, 0.3), 5.0).any()


def test_layer_outliers_counts_kept_and_errors_by_hand():
    x = _layer()
    mask = np.ones(x.size, bool)
    mask[[17, 5]] = False  # one tail and one bulk weight pruned
    q = x.copy()
    q[503] += 0.5
    q[640] -= 1.0
    q[10] += 0.1
    g = np.linspace(0.0, 1.0, x.size)
    r = layer_outliers(x, np.where(mask, q, 0.0), mask, g, iqr_factor=5.0, max_listed=3)
    assert (r["n_low"], r["n_high"], r["n_tail"], r["tail_kept"]) == (2, 2, 4, 3)
    assert r["tail_kept_fraction"] == pytest.approx(3 / 4)
    assert r["bulk_kept_fraction"] == pytest.approx(995 / 996)
    te = r["tail_error"]  # kept tails 503, 640, 901 with errors 0.5, -1.0, 0
    assert te["count"] == 3 and te["mean_abs"] == pytest.approx(0.5) and te["rms"] == pytest.approx(np.sqrt(1.25 / 3))
    assert te["rel_rms"] == pytest.approx(np.sqrt(1.25 / 3) / np.sqrt((25 + 36 + 3.5 ** 2) / 3))
    be = r["bulk_error"]
    assert be["count"] == 995 and be["rms"] == pytest.approx(np.sqrt(0.01 / 995))
    assert [t["index"] for t in r["listed"]] == [640, 503, 17]  # largest |w| first
    assert [t["kept"] for t in r["listed"]] == [True, True, False]
    assert r["listed"][0]["quantized"] == pytest.approx(-7.0) and r["listed"][0]["g"] == pytest.approx(g[640])
    assert r["fences"][0] < -0.3 and r["fences"][1] > 0.3


def test_error_stats_empty_and_simple():
    assert error_stats(np.array([]), np.array([]))["rms"] is None
    e = error_stats(np.array([1.0, -2.0]), np.array([1.5, -2.0]))
    assert (e["count"], e["mean_abs"], e["rms"]) == (2, 0.25, pytest.approx(np.sqrt(0.125)))


def test_window_ablation_with_and_without_outlier_windows():
    x = np.clip(np.random.default_rng(0).normal(0.0, 0.1, 1000), -0.3, 0.3)
    x[17], x[503] = 4.0, 5.0
    a = window_ablation(x, 8, 5.0)
    assert a["n_tail"] == 2
    # outlier windows: the high tail {4, 5} gets two levels (its k-means error drops by 0.5,
    # more than the bulk's for an 8th level), so both tail weights are exact
    assert a["outlier"]["tail_error"]["rms"] == pytest.approx(0.0) and a["outlier"]["tail_error"]["count"] == 2
    # one window: plain k-means gives the two tail weights one shared level between them
    q_none = quantize_initial(x, 8, "none")
    assert q_none[17] == q_none[503] == pytest.approx(4.5)
    tails = outlier_mask(x, 5.0)
    for mode in ("none", "outlier"):
        q = quantize_initial(x, 8, mode)
        assert a[mode]["tail_error"] == error_stats(x[tails], q[tails])
        assert a[mode]["bulk_error"] == error_stats(x[~tails], q[~tails])
    assert np.all(np.abs(quantize_initial(x, 8, "outlier")[~tails]) <= 0.3 + 1e-12)  # no tail level for the bulk


def test_summary_of_a_trained_result_finds_planted_outliers_and_reports_their_treatment(planted_outlier_problem):
    """Found from the pretrained weights; their treatment read from the trained result: each planted
    tail is reported kept, with ``g > 0.5`` and the trained network's compressed value, which its
    level puts within 0.05 of it. Control: the same result with those weights pruned
    afterwards must be reported as pruned."""
    net, x, y = planted_outlier_problem()  # tails at flat indices 0, 1, 2
    result = compress(net, (x, y), SQSConfig(group_size=0, components=8, sparsity=0.5, epochs=2, batch_size=32,
                                             windows="outlier"), progress=False)
    s = outlier_summary(result)
    l0 = s["layers"][0]
    assert (l0["name"], l0["n_low"], l0["n_high"]) == ("0.weight", 1, 2)
    assert [t["index"] for t in l0["listed"]] == [2, 1, 0]  # by |w|
    assert [t["value"] for t in l0["listed"]] == pytest.approx([6.0, -5.0, 4.0])
    assert s["overall"]["n_tail"] == sum(r["n_tail"] for r in s["layers"])
    assert s["windows"] == "outlier" and s["iqr_factor"] == 5.0
    assert set(l0["window_ablation"]) == {"n_tail", "none", "outlier"}
    weight = result.compressed().layers[0].weight().reshape(-1)
    g = torch.sigmoid(result.guide.layers[0].gate_logits.detach()).reshape(-1)
    for t in l0["listed"]:
        assert t["kept"] and t["g"] == pytest.approx(float(g[t["index"]])) and t["g"] > 0.5
        assert t["quantized"] == pytest.approx(float(weight[t["index"]])) and abs(t["quantized"] - t["value"]) < 0.05
    assert l0["tail_kept"] == 3 and l0["tail_error"]["count"] == 3 and l0["tail_error"]["rms"] < 0.05

    result.guide.layers[0].mask.view(-1)[:3] = False  # negative control: the tails pruned
    l0 = outlier_summary(result)["layers"][0]
    assert l0["tail_kept"] == 0 and l0["tail_error"]["count"] == 0
    assert not any(t["kept"] for t in l0["listed"]) and all(t["quantized"] == 0.0 for t in l0["listed"])


def test_pooled_report_pools_rms_by_counts():
    from sqs_pyro.analysis.outliers import pooled_report

    def layer(numel, n_tail, tail, bulk):
        ablation = {"n_tail": n_tail, "none": {"tail_error": tail, "bulk_error": bulk},
                    "outlier": {"tail_error": {"count": 0, "rms": 0.0}, "bulk_error": bulk}}
        return {"numel": numel, "n_tail": n_tail, "window_ablation": ablation}

    report = {"overall": {}, "layers": [layer(100, 1, {"count": 1, "rms": 3.0}, {"count": 99, "rms": 1.0}),
                                        layer(50, 0, {"count": 3, "rms": 1.0}, {"count": 50, "rms": 2.0})]}
    pooled = pooled_report(report)
    assert pooled["matrices"] == 2 and pooled["matrices_with_tails"] == 1 and pooled["tail_weights"] == 1
    assert pooled["window_ablation"]["none"]["tail_rms"] == pytest.approx(((9 + 3) / 4) ** 0.5)
    assert pooled["window_ablation"]["none"]["bulk_rms"] == pytest.approx(((99 + 200) / 149) ** 0.5)
    assert pooled["window_ablation"]["outlier"]["tail_rms"] is None
