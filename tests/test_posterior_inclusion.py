"""Posterior inclusion probabilities on a planted sparse regression with weak but real weights.

``y = X w* + N(0, 1)``, 64 correlated features (AR(1), rho = 0.8), 16 true weights of +-0.3, 400 rows; the
"pretrained" network is least squares. With the gates learning for the whole run (sparsity 0: no pruning
resets, prune_fraction 1; the median rule ``g_j > 0.5``, since the exact mask at sparsity 0 keeps every gate
open), the learned ``g_j`` must rank the true weights above the null ones better than the
starting magnitudes do (AUROC), on every seed. Negative control: gates that never learn (``lr_gates = 0``)
keep the magnitude ranking, clipped, and fail the same check.
"""
import torch
from torch import nn

from sqs_pyro import SQSConfig, compress
from sqs_pyro.analysis import ranking_auroc

SEEDS = (0, 1, 2, 3)
CONFIG = SQSConfig(sparsity=0.0, sparsity_mode="median", components=4, group_size=0, windows="none", batch_size=50,
                   epochs=80.0, prune_fraction=1.0, posterior_epochs=0.0)


def planted(seed, n=400, d=64, k=16, rho=0.8, amplitude=0.3):
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(n, d, generator=g)
    x = z.clone()
    for j in range(1, d):
        x[:, j] = rho * x[:, j - 1] + (1 - rho**2) ** 0.5 * z[:, j]
    truth = torch.zeros(d)
    truth[torch.randperm(d, generator=g)[:k]] = amplitude * torch.sign(torch.randn(k, generator=g))
    y = x @ truth + torch.randn(n, generator=g)
    return x, y[:, None], truth != 0


def aurocs(config):
    """(inclusion AUROC, magnitude AUROC) per seed."""
    out = []
    for seed in SEEDS:
        x, y, real = planted(seed)
        net = nn.Linear(x.shape[1], 1, bias=False)
        with torch.no_grad():
            net.weight.copy_(torch.linalg.lstsq(x, y).solution.T)
        result = compress(net, (x, y), config, task="regression", progress=False)
        inclusion = torch.sigmoid(result.guide.layers[0].gate_logits.detach()).reshape(-1)
        out.append((ranking_auroc(inclusion, real), ranking_auroc(net.weight.detach().abs().reshape(-1), real)))
    return out


def better_than_magnitude(pairs):
    return all(g > m for g, m in pairs) and sum(g for g, _ in pairs) / len(pairs) >= 0.95


def test_inclusion_probabilities_rank_the_true_weights_better_than_magnitude():
    pairs = aurocs(CONFIG)
    assert better_than_magnitude(pairs), pairs


def test_gates_that_do_not_learn_fail_the_same_check():
    pairs = aurocs(CONFIG.replace(lr_gates=0.0))
    assert not better_than_magnitude(pairs), pairs
