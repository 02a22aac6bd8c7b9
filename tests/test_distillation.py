"""Distillation likelihood: soft targets as the expected categorical log-likelihood, the teacher's
targets, and a run whose data term reads them (and, at weight 1, nothing of the labels)."""
import pytest
import torch
from pyro import poutine
from torch import nn
from torch.utils.data import Dataset

from sqs_pyro import SQSConfig
from sqs_pyro.errors import SQSInputError
from sqs_pyro.infer import compress
from sqs_pyro.infer.data import distillation_targets
from sqs_pyro.models import CategoricalLikelihood

N = 1000  # the plate's size: every log-density is scaled by N / B


def log_density(logits, y):
    lik = CategoricalLikelihood(N)
    return float(poutine.trace(lambda: lik(logits, y)).get_trace().log_prob_sum())


def test_one_hot_soft_targets_equal_the_categorical_likelihood():
    torch.manual_seed(0)
    logits, y = torch.randn(16, 5), torch.randint(0, 5, (16,))
    hard = log_density(logits, y)
    assert hard == pytest.approx(N / 16 * float(torch.distributions.Categorical(logits=logits).log_prob(y).sum()))
    assert log_density(logits, nn.functional.one_hot(y, 5).float()) == pytest.approx(hard, rel=1e-6)
    uniform = torch.full((16, 5), 0.2)  # control: another target gives the closed form of its own
    expected = N / 16 * float((0.2 * logits.log_softmax(-1)).sum())
    assert log_density(logits, uniform) == pytest.approx(expected, rel=1e-6)
    assert abs(expected - hard) > 1.0


def test_distillation_targets_mix_labels_and_the_teachers_predictions():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(4, 8), nn.Dropout(0.5), nn.Linear(8, 3)).train()
    x, y = torch.randn(300, 4), torch.randint(0, 3, (300,))
    with torch.no_grad():
        probs = net.eval()(x).softmax(-1)
    net.train()
    for weight in (0.0, 0.3, 1.0):
        t = distillation_targets(net, torch.utils.data.TensorDataset(x, y), weight, batch_size=64).tensors[1]
        torch.testing.assert_close(t, (1 - weight) * nn.functional.one_hot(y, 3).float() + weight * probs)
        torch.testing.assert_close(t.sum(-1), torch.ones(300))
    assert net.training  # its mode restored; eval mode inside (dropout off: the targets are deterministic)


def run(labels, weight):
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(6, 16), nn.ReLU(), nn.Linear(16, 3))
    x = torch.randn(256, 6)
    config = SQSConfig(group_size=0, components=4, sparsity=0.5, epochs=2.0, batch_size=64, distill_weight=weight)
    return compress(net, (x, labels(x)), config, progress=False).compressed()


def same_codes(a, b):
    return all(torch.equal(u.codes, v.codes) for u, v in zip(a.layers, b.layers))


def test_at_weight_one_the_run_reads_the_teacher_not_the_labels():
    true = lambda x: (x[:, 0] > 0).long() + (x[:, 1] > 0).long()  # noqa: E731
    flipped = lambda x: 2 - true(x)  # noqa: E731
    assert same_codes(run(true, 1.0), run(flipped, 1.0))
    assert not same_codes(run(true, 0.5), run(flipped, 0.5))  # control: with the labels in the target they differ


class _Pairs(Dataset):
    def __len__(self):
        return 8

    def __getitem__(self, i):
        return torch.zeros(6), torch.tensor(0)


def test_distillation_needs_label_tensors():
    net = nn.Linear(6, 3)
    config = SQSConfig(group_size=0, components=4, epochs=1.0, batch_size=4, distill_weight=0.5)
    with pytest.raises(SQSInputError, match="regression"):
        compress(net, (torch.randn(8, 6), torch.randn(8, 3)), config, task="regression", progress=False)
    with pytest.raises(SQSInputError, match="tensors"):
        compress(net, _Pairs(), config, progress=False)
    with pytest.raises(SQSInputError, match="distill_weight"):
        SQSConfig(group_size=0, distill_weight=1.5)
