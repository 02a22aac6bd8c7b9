"""Planted truth: a sparse, quantized teacher generates data; SQS recovers support and codebook."""
import torch
from torch import nn

from sqs_pyro import SQSConfig
from sqs_pyro.infer import compress

LEVELS = torch.tensor([-1.0, 0.5, 1.2])  # three levels for K = 4 (2-bit codes)


def teacher_weights(out_dim=4, in_dim=24, density=0.25, seed=0):
    gen = torch.Generator().manual_seed(seed)
    n = out_dim * in_dim
    w = torch.zeros(n)
    support = torch.randperm(n, generator=gen)[: int(density * n)]
    w[support] = LEVELS[torch.arange(len(support)) % len(LEVELS)]  # every level used equally often
    return w.reshape(out_dim, in_dim)


def planted_problem():
    w_true = teacher_weights()
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(2048, w_true.shape[1], generator=gen)
    y = x @ w_true.T + 0.1 * torch.randn(2048, w_true.shape[0], generator=gen)
    # the "pretrained" student: least squares on the same data (dense, full precision)
    student = nn.Linear(w_true.shape[1], w_true.shape[0], bias=False)
    with torch.no_grad():
        student.weight.copy_(torch.linalg.lstsq(x, y).solution.T)
    return w_true, student, x, y


def fit(student, x, y, sparsity, **overrides):
    config = SQSConfig(components=4, sparsity=sparsity, windows="none", epochs=12, batch_size=128,
                       lr_weights=3e-3, lr_codebook=3e-3, seed=0, **overrides)
    result = compress(student, (x, y), config, task="regression", noise_scale=0.1, progress=False)
    return result.compressed().layers[0]


def test_sqs_recovers_teacher_support_and_codebook():
    w_true, student, x, y = planted_problem()
    layer = fit(student, x, y, sparsity=0.75)

    kept, truth = layer.mask, w_true != 0
    precision = (kept & truth).sum() / kept.sum()
    recall = (kept & truth).sum() / truth.sum()
    assert precision >= 0.9 and recall >= 0.9, (precision, recall)
    used = layer.codebook[torch.unique(layer.codes[layer.mask])]
    for level in LEVELS:
        assert (used - level).abs().min() < 0.05, (level, layer.codebook)
    # and the compressed weights are the teacher's on the recovered support
    torch.testing.assert_close(layer.weight()[kept & truth], w_true[kept & truth], atol=0.05, rtol=0)


def test_posterior_prunes_to_the_planted_sparsity_beyond_a_lower_schedule_target():
    """The schedule only forces 50% sparsity; the spike-and-slab posterior (g > 0.5) finds the true 75%.

    Gates start below the keep rule (``g = 0.27``) for the weight at the target quantile
    (``gate_init = -1``, magnitude scores), so the start does not decide which of the weights
    above it are kept: the data and the spike-and-slab prior do.
    """
    w_true, student, x, y = planted_problem()
    layer = fit(student, x, y, sparsity=0.5, gate_init=-1.0, gate_score="magnitude")
    assert torch.equal(layer.mask, w_true != 0)
