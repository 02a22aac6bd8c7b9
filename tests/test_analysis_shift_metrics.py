"""The report's shift record: closed forms for a predictor that ignores its input, and planted OOD separation."""
import math

import pytest
import torch
from torch import nn

from sqs_pyro.analysis.shift_metrics import ENTROPY_BINS, shift_evaluation
from sqs_pyro.errors import SQSInputError

torch.set_num_threads(1)


class Constant(nn.Module):
    """Logits ``log p`` (or probabilities ``p``) for every input; ``sharp`` scales the logits of bright inputs."""

    def __init__(self, p: torch.Tensor, probs: bool = False, sharp: float = 1.0) -> None:
        super().__init__()
        self.logp, self.probs, self.sharp = p.log(), probs, sharp

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        bright = (x.mean(dim=(1, 2, 3)) > 1.0).double()[:, None]
        z = self.logp[None] * (1 + (self.sharp - 1) * (1 - bright))  # dark (MNIST-like) inputs: sharper
        return torch.softmax(z, -1) if self.probs else z


def test_a_constant_predictor_has_closed_form_metrics_at_every_angle():
    p = torch.tensor([0.7, 0.2, 0.1], dtype=torch.float64)
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(40, 1, 28, 28, generator=gen) * 0.1
    y = torch.tensor([0] * 30 + [1] * 6 + [2] * 4)
    shift = shift_evaluation(Constant(p), Constant(p, probs=True), (x, y), (x, y), fashion=x + 5.0)
    assert shift["images"] == 40 and shift["rotations"] == [0, 15, 30, 45, 60, 90]
    # T* on constant logits: softmax(log p / T) matches the label frequencies (0.75, 0.15, 0.10) in NLL
    nll = -(30 * math.log(0.7) + 6 * math.log(0.2) + 4 * math.log(0.1)) / 40
    for name in ("greedy", "averaged"):
        m = shift["predictors"][name]
        assert m["accuracy"] == [0.75] * 6
        assert m["nll"] == pytest.approx([nll] * 6, rel=1e-9)
        assert m["ece"] == pytest.approx([0.05] * 6, abs=1e-9)  # one bin: |0.75 - 0.7|
    assert shift["predictors"]["greedy_temperature"]["nll"][0] < nll  # the fitted T lowers the NLL on its own data
    ood = shift["ood"]
    assert ood["auroc"] == {"greedy": 0.5, "averaged": 0.5}  # same entropy in and out: a coin flip
    entropy = float(-(p * p.log()).sum())
    expected_bin = int(entropy / math.log(10.0) * ENTROPY_BINS)
    for side in ("mnist", "fashion"):
        counts = ood[side]["greedy"]
        assert sum(counts) == 40 and counts[expected_bin] == 40


def test_ood_auroc_is_one_when_mnist_is_sharper_and_none_without_fashion():
    p = torch.tensor([0.5, 0.3, 0.2], dtype=torch.float64)
    x = torch.zeros(20, 1, 28, 28)
    y = torch.zeros(20, dtype=torch.long)
    sharp = Constant(p, sharp=5.0), Constant(p, probs=True, sharp=5.0)
    shift = shift_evaluation(*sharp, (x, y), (x, y), fashion=torch.full((30, 1, 28, 28), 3.0), images=10)
    assert shift["images"] == 10 and shift["ood"]["images"] == 10
    assert shift["ood"]["auroc"] == {"greedy": 1.0, "averaged": 1.0}
    both = shift_evaluation(*sharp, (x, y), (x, y), fashion=torch.full((30, 1, 28, 28), 3.0))
    assert both["images"] == 20 == both["val_images"] and both["ood"]["images"] == 20  # as many Fashion-MNIST images as MNIST ones
    assert shift_evaluation(*sharp, (x, y), (x, y))["ood"] is None
    with pytest.raises(SQSInputError):
        shift_evaluation(*sharp, (x, y), (x, y), images=0)
