"""Inclusion summaries against hand computations on a small, hand-set guide."""
import copy
import math

import numpy as np
import pytest
import torch
from torch import nn

from sqs_pyro.analysis.inclusion import (final_masks, inclusion_probabilities, inclusion_stats, inclusion_summary,
                                         magnitude_mask, pretrained_weights)
from sqs_pyro.config import SQSConfig
from sqs_pyro.guides.spike_gmm import GateState, SpikeGMMGuide
from sqs_pyro.models.likelihoods import CategoricalLikelihood
from sqs_pyro.models.network import SQSModel
from sqs_pyro.models.selection import select_layers
from sqs_pyro.infer import SQSResult

torch.set_num_threads(1)

W0 = [[0.1, -0.5, 0.3], [0.9, -0.05, 0.2]]
W1 = [[1.0, -2.0], [0.5, 0.01]]
G0 = [0.05, 0.25, 0.65, 0.95, 0.45, 0.85]
G1 = [0.99, 0.01, 0.7, 0.3]


def _logit(p):
    return math.log(p / (1 - p))


@pytest.fixture(scope="module")
def result():
    net = nn.Sequential(nn.Linear(3, 2, bias=False), nn.Linear(2, 2, bias=False))
    with torch.no_grad():
        net[0].weight.copy_(torch.tensor(W0))
        net[1].weight.copy_(torch.tensor(W1))
    config = SQSConfig(components=2, windows="none")
    sites = select_layers(net)
    guide = SpikeGMMGuide(net, sites, config)
    with torch.no_grad():
        for layer, g in zip(guide.layers, (G0, G1)):
            layer.gate_logits.copy_(torch.tensor([_logit(p) for p in g]).reshape(layer.gate_logits.shape))
            layer.latent.mul_(1.5)  # the latent moves away from the pretrained weights
    guide.set_gate_state(GateState.LEARN)
    model = SQSModel(net, sites, config, CategoricalLikelihood(10))
    return SQSResult(config, copy.deepcopy(net), model, guide)


def test_probabilities_masks_and_pretrained_weights(result):
    g = inclusion_probabilities(result)
    np.testing.assert_allclose(g["0.weight"], G0, atol=1e-6)
    np.testing.assert_allclose(g["1.weight"], G1, atol=1e-6)
    masks = final_masks(result)
    assert masks["0.weight"].tolist() == [False, False, True, True, False, True]
    assert masks["1.weight"].tolist() == [True, False, True, False]
    np.testing.assert_allclose(pretrained_weights(result)["0.weight"], np.ravel(W0), atol=1e-7)  # not the latent


def test_layer_summaries_match_hand_computation(result):
    s = inclusion_summary(result, bins=10)
    l0, l1 = s["layers"]
    assert (l0["name"], l0["numel"], l0["kept"]) == ("0.weight", 6, 3)
    assert l0["expected_sparsity"] == pytest.approx(2.8 / 6, abs=1e-6)
    assert l0["thresholded_sparsity"] == pytest.approx(0.5)
    assert l0["uncertain_fraction"] == pytest.approx(4 / 6)  # 0.25, 0.65, 0.45, 0.85
    # |w| = .1 .5 .3 .9 .05 .2: magnitude keeps {1, 2, 3}; SQS keeps {2, 3, 5}
    assert l0["magnitude_overlap"] == pytest.approx(2 / 3)
    assert l0["magnitude_jaccard"] == pytest.approx(2 / 4)
    assert l0["histogram"]["counts"] == [1, 0, 1, 0, 1, 0, 1, 0, 1, 1]
    assert l0["mean_g"] == pytest.approx(sum(G0) / 6, abs=1e-6)
    assert l0["quantiles"]["q50"] == pytest.approx(np.median(G0), abs=1e-6)
    assert l1["expected_sparsity"] == pytest.approx(0.5, abs=1e-6)
    assert l1["uncertain_fraction"] == pytest.approx(0.5)
    assert l1["magnitude_overlap"] == pytest.approx(1 / 2)  # magnitude {0, 1}, SQS {0, 2}
    assert l1["magnitude_jaccard"] == pytest.approx(1 / 3)


def test_overall_uses_a_global_magnitude_threshold(result):
    o = inclusion_summary(result)["overall"]
    assert (o["numel"], o["kept"]) == (10, 5)
    assert o["expected_sparsity"] == pytest.approx(4.8 / 10, abs=1e-6)
    assert o["uncertain_fraction"] == pytest.approx(6 / 10)
    # global |w| top 5: 2.0 (7), 1.0 (6), 0.9 (3), 0.5 (1), 0.5 (8); SQS keeps {2, 3, 5, 6, 8}
    assert o["magnitude_overlap"] == pytest.approx(3 / 5)
    assert o["magnitude_jaccard"] == pytest.approx(3 / 7)


def test_magnitude_mask_and_degenerate_cases():
    assert magnitude_mask(np.array([0.3, -2.0, 0.1, 1.0]), 2).tolist() == [False, True, False, True]
    assert not magnitude_mask(np.ones(3), 0).any()
    s = inclusion_stats(np.array([0.01, 0.02]), np.array([False, False]), np.array([1.0, 2.0]))
    assert s["thresholded_sparsity"] == 1.0 and s["magnitude_overlap"] is None and s["magnitude_jaccard"] is None
    assert s["expected_sparsity"] == pytest.approx(0.985)
