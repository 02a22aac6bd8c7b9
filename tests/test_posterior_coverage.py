"""The learned posterior against an exact one: linear-Gaussian regression on a fixed support.

With ``y = X w* + N(0, sigma^2)`` and the prior's slab ``N(0, 3^2)`` on every kept weight, the exact posterior
is ``N(m, S)``, ``S = (X'X / sigma^2 + I / 9)^-1``, ``m = S X'y / sigma^2``. The run keeps every weight
(sparsity 0, no pruning steps), fits K = 16 levels in hard mode, then the posterior phase fits the
widths by the sampled ELBO. Its central 90% intervals must cover the true weights about as often as
the exact posterior's; shrinking the learned scales 10x, or skipping the posterior phase (widths the
data never taught), must fail the same check.
"""
import torch
from torch import nn

from sqs_pyro import SQSConfig, compress
from sqs_pyro.analysis import interval_coverage

N, D, SIGMA = 256, 32, 4.0
CONFIG = SQSConfig(sparsity=0.0, components=16, group_size=0, windows="none", prune_fraction=0.0, batch_size=32,
                   epochs=20.0, posterior_epochs=20.0)
SEEDS = (0, 1, 2)
MIN_COVERAGE = 0.6  # mean over SEEDS; nominal 0.9. benchmarks/posterior_coverage.py: 0.81 +- 0.15 over ten seeds,
#                     the exact posterior 0.90 +- 0.04 (the sampled phase is chaotic: reruns differ by ~0.05)


def planted(seed):
    g = torch.Generator().manual_seed(seed)
    x, w = torch.randn(N, D, generator=g), torch.randn(D, generator=g)
    y = x @ w + SIGMA * torch.randn(N, generator=g)
    cov = torch.linalg.inv(x.T @ x / SIGMA**2 + torch.eye(D) / 9.0)
    return x, y[:, None], w, cov @ x.T @ y / SIGMA**2, cov


def fitted(seed, config=CONFIG):
    x, y, w, mean, cov = planted(seed)
    net = nn.Linear(D, 1, bias=False)
    with torch.no_grad():
        net.weight.copy_(torch.linalg.lstsq(x, y).solution.T)  # the "pretrained" network: least squares
    result = compress(net, (x, y), config, task="regression", noise_scale=SIGMA, progress=False)
    return result, w, mean, cov


def draws(result, n=4000):
    return result.guide.draw(n, torch.Generator().manual_seed(0))["weight"].weight.reshape(n, -1)


def test_exact_posterior_covers_as_a_reference():
    for seed in SEEDS:
        _, _, w, mean, cov = planted(seed)
        exact = mean + cov.diagonal().sqrt() * torch.randn(4000, D, generator=torch.Generator().manual_seed(0))
        assert interval_coverage(exact, w)[0] >= 0.85


def test_learned_intervals_cover_the_truth_and_shrunk_scales_do_not():
    learned, shrunk, ratios = [], [], []
    for seed in SEEDS:
        result, w, mean, cov = fitted(seed)
        coverage, width = interval_coverage(draws(result), w)
        learned.append(coverage)
        ratios.append(width / (2 * 1.645 * float(cov.diagonal().sqrt().mean())))
        layer = result.guide.layers[0]
        with torch.no_grad():  # negative control: the same posterior, scales shrunk 10x
            layer.scale_raw.copy_(torch.log(torch.expm1(layer.scales / 10)))
        shrunk.append(interval_coverage(draws(result), w)[0])
    assert sum(learned) / len(SEEDS) >= MIN_COVERAGE, learned
    assert all(0.5 < r < 2.0 for r in ratios), ratios  # the data taught the widths: near the exact ones
    assert sum(shrunk) / len(SEEDS) < MIN_COVERAGE, shrunk  # the same check fails


def test_without_the_posterior_phase_the_widths_are_not_learned():
    coverage = [interval_coverage(draws(r), w)[0]
                for r, w, _, _ in (fitted(seed, CONFIG.replace(posterior_epochs=0.0)) for seed in SEEDS)]
    assert sum(coverage) / len(SEEDS) < MIN_COVERAGE, coverage  # the same check fails
