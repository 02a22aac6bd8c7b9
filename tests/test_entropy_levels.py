"""Entropy-constrained levels (ECSQ): the rule, the Lloyd design and their use in the one-shot quantiser."""
import math

import pytest
import torch

from sqs_pyro.compressed.accounting import code_entropy, usage_entropy
from sqs_pyro.compressed.entropy_levels import (assign, code_lengths, decisions, entropy_constrained_levels,
                                                histogram, matrix_sensitivity, sensitivity_lambdas)
from sqs_pyro.compressed.error_feedback import feedback_quantize
from sqs_pyro.compressed.oneshot import quantize_layer


def _brute(values, levels, penalty):
    return ((values[:, None] - levels[None, :]) ** 2 + penalty[None, :]).argmin(1)


def test_without_a_penalty_the_rule_is_the_nearest_level_and_with_one_the_brute_force_argmin():
    gen = torch.Generator().manual_seed(0)
    levels = torch.sort(torch.randn(16, generator=gen)).values
    values = torch.randn(20000, generator=gen)
    nearest = torch.bucketize(values, (levels[1:] + levels[:-1]) / 2)
    assert torch.equal(assign(values, decisions(levels)), nearest)
    assert torch.equal(assign(values, decisions(levels, torch.zeros(16))), nearest)
    penalty = torch.rand(16, generator=gen) * 0.5
    penalty[[3, 9]] = math.inf  # unused levels never win
    rule = decisions(levels, penalty)
    assert torch.equal(assign(values, rule), _brute(values, levels, penalty))
    assert 3 not in rule[1].tolist() and 9 not in rule[1].tolist()
    assert not torch.equal(assign(values, rule), nearest)  # negative control: the penalty moves codes


def test_an_equal_level_with_the_larger_penalty_never_wins():
    levels, penalty = torch.tensor([-1.0, 0.0, 0.0, 1.0]), torch.tensor([0.0, 0.3, 0.1, 0.0])
    thresholds, index = decisions(levels, penalty)
    assert index.tolist() == [0, 2, 3]
    torch.testing.assert_close(thresholds, torch.tensor([-0.45, 0.45]))  # -1/2 + (0.1 - 0) / 2, 1/2 - 0.1 / 2
    with pytest.raises(ValueError, match="sorted"):
        decisions(torch.tensor([1.0, 0.0]), torch.zeros(2))


def test_code_lengths_are_minus_log2_of_the_usage():
    torch.testing.assert_close(code_lengths(torch.tensor([2, 1, 1, 0])),
                               torch.tensor([1.0, 2.0, 2.0, math.inf], dtype=torch.float64))


def test_on_a_planted_source_the_rate_falls_with_lambda_and_lambda_zero_is_lloyd():
    """A Laplace source on 16 k-means levels: as lambda grows, entropy-constrained Lloyd trades error for rate
    (entropy strictly falls, squared error rises); at lambda = 0 it is Lloyd itself: from its own fixed point
    the levels barely move."""
    torch.manual_seed(0)
    values = torch.distributions.Laplace(0.0, 0.3).sample((100000,)).clamp(-1, 1)
    start = torch.linspace(-0.9, 0.9, 16)  # Lloyd's start, then polished at lambda = 0
    moments = histogram(values)
    kmeans, _ = entropy_constrained_levels(moments, start, 0.0, iterations=200)
    again, _ = entropy_constrained_levels(moments, kmeans, 0.0)
    torch.testing.assert_close(again, kmeans, atol=2e-3, rtol=0)
    rates, errors = [], []
    for lam in (0.0, 0.002, 0.005, 0.01, 0.02):
        levels, lengths = entropy_constrained_levels(moments, kmeans, lam)
        codes = assign(values, decisions(levels, lam * lengths))
        rates.append(usage_entropy(torch.bincount(codes, minlength=16)))
        errors.append(float((values - levels[codes]).pow(2).mean()))
    assert all(a > b for a, b in zip(rates, rates[1:])) and rates[0] > 3.7 and rates[-1] < 2.5
    assert all(a < b for a, b in zip(errors, errors[1:]))


def test_quantize_layer_at_lambda_zero_is_the_plain_layer_and_the_rate_falls_with_lambda():
    gen = torch.Generator().manual_seed(1)
    w = torch.randn(64, 128, generator=gen)
    plain = quantize_layer("w", w, 16, 32, 4)
    same = quantize_layer("w", w, 16, 32, 4, entropy_lambda=0.0)
    assert torch.equal(plain.codes, same.codes) and torch.equal(plain.codebook, same.codebook)
    rates = [code_entropy(quantize_layer("w", w, 16, 32, 4, entropy_lambda=lam)) for lam in (0.0, 0.004, 0.01)]
    assert rates[0] > rates[1] > rates[2]


def test_feedback_with_entropy_levels_falls_in_rate_and_rate_importance_puts_it_where_the_loss_is():
    """GPTQ error feedback with the rule: the codes' entropy falls with lambda; weighing each weight's error by
    its loss share gives a lower loss at the same lambda-driven rate than the plain rule on inputs of very
    unequal energy (the loss-weighted rule spends the codes on the busy inputs)."""
    gen = torch.Generator().manual_seed(2)
    w = torch.randn(128, 128, generator=gen)
    x = torch.randn(2000, 128, generator=gen) * torch.logspace(-1, 0.5, 128)
    hessian = x.T @ x / 2000

    def coded(lam, importance=False):
        layer = quantize_layer("w", w, 16, 64, 0, entropy_lambda=lam)
        layer = feedback_quantize(layer, w, hessian, entropy_lambda=lam, rate_importance=importance)
        q = layer.scales.float().repeat_interleave(64, 1) * layer.codebook[layer.codes.long()]
        return code_entropy(layer), float(torch.trace((w - q) @ hessian @ (w - q).T) / torch.trace(w @ hessian @ w.T))

    rates = [coded(lam)[0] for lam in (0.0, 0.004, 0.01)]
    assert rates[0] > rates[1] > rates[2]
    plain, weighted = coded(0.008), coded(0.0065, importance=True)
    assert weighted[0] <= plain[0] + 0.02 and weighted[1] < 0.95 * plain[1]
    with pytest.raises(ValueError, match="entropy_lambda"):
        feedback_quantize(quantize_layer("w", w, 16, 64), w, hessian, rate_importance=True)


def test_matrix_sensitivity_is_the_mean_of_h_cc_w_squared():
    w, h = torch.tensor([[1.0, 2.0], [3.0, 4.0]]), torch.tensor([[2.0, 0.7], [0.7, 5.0]])
    assert matrix_sensitivity(w, h) == pytest.approx((2 * (1 + 9) / 2 + 5 * (4 + 16) / 2) / 2)  # 30


def test_sensitivity_lambdas_scale_by_the_inverse_sensitivity_around_its_geometric_mean():
    s = {"a": 1.0, "b": 100.0, "dead": 0.0}
    full = sensitivity_lambdas(s, 0.01, 1.0)  # G = 10
    assert full["a"] == pytest.approx(0.1) and full["b"] == pytest.approx(0.001) and full["dead"] == full["a"]
    half = sensitivity_lambdas(s, 0.01, 0.5)
    assert half["a"] == pytest.approx(0.01 * 10 ** 0.5) and half["b"] == pytest.approx(0.01 / 10 ** 0.5)
    assert sensitivity_lambdas(s, 0.01, 0.0) == {"a": 0.01, "b": 0.01, "dead": 0.01}  # negative control
    with pytest.raises(ValueError, match="alpha"):
        sensitivity_lambdas(s, 0.01, 1.5)
