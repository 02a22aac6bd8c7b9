"""Codebooks: usage entropy, merge/drop candidates and histogram data, by hand and on a trained result."""
import math

import numpy as np
import pytest
import torch
from torch import nn

from sqs_pyro.analysis.codebooks import (codebook_stats, codebook_summary, layer_distributions, merge_candidates,
                                         mixture_bin_counts, usage_entropy)
from sqs_pyro.config import SQSConfig
from sqs_pyro.infer import compress

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def result(planted_outlier_problem):
    net, x, y = planted_outlier_problem()
    return compress(net, (x, y), SQSConfig(group_size=0, components=8, sparsity=0.5, epochs=2, batch_size=32, windows="outlier"),
                    progress=False)


def test_usage_entropy():
    assert usage_entropy(np.array([5, 5, 0, 0])) == pytest.approx(1.0)
    assert usage_entropy(np.array([1, 1, 1, 1])) == pytest.approx(2.0)
    assert usage_entropy(np.array([3, 1])) == pytest.approx(-(0.75 * math.log2(0.75) + 0.25 * math.log2(0.25)))
    assert usage_entropy(np.zeros(3)) == 0.0


def test_merge_candidates_by_hand():
    locs = np.array([0.0, 0.1, 1.0, 1.05, 5.0])
    scales = np.array([0.1, 0.1, 0.1, 0.01, 0.1])
    pairs = merge_candidates(locs, scales, np.array([0, 0, 0, 1, 1]))
    # window 0: gaps 0.1 (<= 2 * 0.1: merge) and 0.9 (no); window 1: 1.05 vs 5.0 (no); 1.0 and 1.05 differ in window
    assert [p["components"] for p in pairs] == [[0, 1]]
    assert pairs[0]["gap_in_scales"] == pytest.approx(1.0)
    assert merge_candidates(locs, scales, np.zeros(5, int))[1]["components"] == [2, 3]  # one window: 1.0 / 1.05
    assert merge_candidates(locs, scales, np.array([0, 0, 0, 1, 1]), separation=0.5) == []


def test_codebook_stats_by_hand():
    codes = np.array([0, 0, 1, 3, 3, 3, 2, 0])
    mask = np.array([1, 1, 1, 1, 1, 1, 0, 0], bool)
    s = codebook_stats(np.array([-1.0, -0.5, 0.5, 1.0]), np.full(4, 0.01), np.array([0.6, 0.4, 0.5, 0.5]),
                       np.array([0, 0, 1, 1]), codes, mask, np.array([0, 0, 0, 1, 1, 1, 1, 0]))
    assert (s["components"], s["bits"], s["codes_used"]) == (4, 2, 3)
    assert s["drop"] == [2]  # level 2 is used only by a pruned weight
    assert s["entropy_bits"] == pytest.approx(usage_entropy(np.array([2, 1, 0, 3])))
    w0, w1 = s["windows"]
    assert w0["counts"] == [2, 1] and w0["weights"] == 4 and w0["kept"] == 3
    assert w0["entropy_bits"] == pytest.approx(usage_entropy(np.array([2, 1])))
    assert w1["counts"] == [0, 3] and w1["codes_used"] == 1 and w1["entropy_bits"] == 0.0
    assert w1["locs"] == [0.5, 1.0] and w1["mix"] == [0.5, 0.5]


def test_mixture_bin_counts_integrate_to_the_layer_size():
    edges = np.linspace(-10, 10, 401)
    counts = mixture_bin_counts(edges, np.array([-1.0, 1.0, 5.0]), np.array([0.2, 0.3, 0.1]),
                                np.array([0.25, 0.75, 1.0]), np.array([0, 0, 1]), np.array([90, 10]))
    assert counts.sum() == pytest.approx(100.0, rel=1e-9)
    assert counts[(edges[:-1] >= 4) & (edges[1:] <= 6)].sum() == pytest.approx(10.0, rel=1e-6)
    below_zero = 90 * 0.25 + 90 * 0.75 * 0.5 * (1 + math.erf(-1.0 / 0.3 / math.sqrt(2)))
    assert counts[edges[1:] <= 0].sum() == pytest.approx(below_zero, rel=1e-6)


def test_summary_agrees_with_accounting_and_guide(result):
    books = codebook_summary(result)["layers"]
    acc = result.accounting()["layers"]
    for book, a, layer in zip(books, acc, result.guide.layers):
        assert book["name"] == a["name"]
        assert book["codes_used"] == a["codes_used"]
        assert book["entropy_bits"] == pytest.approx(a["code_entropy_bits"])
        assert sum(sum(w["counts"]) for w in book["windows"]) == a["nnz"]
        locs = np.concatenate([w["locs"] for w in book["windows"]])
        np.testing.assert_allclose(locs, layer.locs.detach().numpy(), rtol=1e-6)
        for w in book["windows"]:
            assert sum(w["mix"]) == pytest.approx(1.0, abs=1e-5)
    assert len(books[0]["windows"]) == 3  # outlier windows of the planted layer: low, bulk, high


def test_layer_distributions_count_every_weight(result):
    for d, layer in zip(layer_distributions(result)["layers"], result.guide.layers):
        n = layer.latent.numel()
        assert sum(d["latent_counts"]) == n and sum(d["pretrained_counts"]) == n
        assert sum(d["level_counts"]) + d["pruned"] == n
        assert len(d["edges"]) == len(d["latent_counts"]) + 1 == int(np.clip(2 * np.sqrt(n), 20, 200)) + 1
        assert sum(d["mixture_counts"]) == pytest.approx(n, rel=0.01)  # the bins cover mu_k +- 3 s_k
