"""compress() on a user's data: DataLoaders and re-iterables of tuple or dict batches, several inputs, a custom
loss as the likelihood, label-free distillation, BatchNorm statistics, devices."""
import pyro
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from sqs_pyro import SQSConfig, SQSInputError, compress
from sqs_pyro.infer.batchnorm import recalibrate_batchnorm
from sqs_pyro.infer.data import Minibatches, TeacherTargets, DatasetBatches
from sqs_pyro.infer.devices import resolve_device
from sqs_pyro.models import CategoricalLikelihood, LossLikelihood

CONFIG = SQSConfig(epochs=1, batch_size=32, components=4, sparsity=0.5)
DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device"))]


class TwoInputs(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.a, self.b = nn.Linear(5, 3), nn.Linear(4, 3)

    def forward(self, u, v):
        return self.a(u) + self.b(v)


def bn_net():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(1, 6, 3, padding=1), nn.BatchNorm2d(6), nn.ReLU(),
                        nn.Conv2d(6, 6, 3, padding=1, groups=6), nn.Flatten(), nn.Linear(6 * 6 * 6, 3))
    with torch.no_grad():  # pretrained-looking statistics, far from those of the data
        net[1].running_mean.fill_(0.5)
        net[1].running_var.fill_(2.0)
    return net


def images(n=192, seed=1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 1, 6, 6, generator=g)
    return x, (x.mean((1, 2, 3)) > 0).long() + (x[:, 0, 0, 0] > 0).long()


def codes(result):
    return {layer.name: (layer.mask, layer.codes, layer.codebook) for layer in result.compressed().layers}


def assert_same_network(a, b):
    ca, cb = codes(a), codes(b)
    assert ca.keys() == cb.keys()
    for name in ca:
        for ta, tb in zip(ca[name], cb[name]):
            assert torch.equal(ta, tb), name


def first_epoch(x, y):
    """The batches the seeded tensor run draws in its one epoch, in order."""
    batches = Minibatches(TensorDataset(x, y), CONFIG.batch_size, CONFIG.seed).from_step(0)
    return [next(batches) for _ in range(len(x) // CONFIG.batch_size)]


def test_a_list_of_the_same_batches_learns_the_same_posterior():
    x, y = images()
    by_tensors = compress(bn_net(), (x, y), CONFIG, progress=False)
    by_batches = compress(bn_net(), [tuple(b) for b in first_epoch(x, y)], CONFIG, progress=False)
    assert_same_network(by_tensors, by_batches)
    loader = compress(bn_net(), DataLoader(TensorDataset(x, y), batch_size=32, shuffle=True), CONFIG, progress=False)
    assert loader.accounting()["sparsity"] == pytest.approx(0.5, abs=0.01)


def test_dict_batches_and_several_inputs():
    torch.manual_seed(0)
    u, v, y = torch.randn(128, 5), torch.randn(128, 4), torch.randint(0, 3, (128,))
    by_tensors = compress(TwoInputs(), (u, v, y), CONFIG, progress=False)  # net(u, v)
    order = Minibatches(TensorDataset(u, v, y), 32, CONFIG.seed).from_step(0)
    dicts = [dict(zip(("u", "v", "labels"), next(order))) for _ in range(4)]  # net(u=..., v=...)
    assert_same_network(by_tensors, compress(TwoInputs(), dicts, CONFIG, progress=False))


def test_loss_fn_becomes_the_likelihood_it_replaces():
    logits, y = torch.randn(8, 3), torch.randint(0, 3, (8,))
    cross_entropy = lambda out, t: nn.functional.cross_entropy(out, t, reduction="none")  # noqa: E731
    traced = [pyro.poutine.trace(lik).get_trace(logits, y).log_prob_sum()
              for lik in (LossLikelihood(100, cross_entropy), CategoricalLikelihood(100))]
    expected = -100 / 8 * nn.functional.cross_entropy(logits, y, reduction="sum")  # -(N/B) sum_i loss_i
    assert float(traced[0]) == pytest.approx(float(expected), rel=1e-6)
    assert float(traced[1]) == pytest.approx(float(expected), rel=1e-6)
    x, labels = images()
    assert_same_network(compress(bn_net(), (x, labels), CONFIG, progress=False),
                        compress(bn_net(), (x, labels), CONFIG, progress=False, loss_fn=cross_entropy))
    squared = compress(bn_net(), (x, labels), CONFIG, progress=False,  # a different loss: a different posterior
                       loss_fn=lambda out, t: 10 * (out - nn.functional.one_hot(t, 3)).pow(2).sum(-1))
    assert any(not torch.equal(a[1], b[1]) for a, b in zip(codes(squared).values(), codes(
        compress(bn_net(), (x, labels), CONFIG, progress=False)).values()))


def test_loss_fn_must_give_one_finite_loss_per_example():
    x, y = images()
    with pytest.raises(SQSInputError, match=r"one loss per example, shape \(2,\), got \(\)"):
        compress(bn_net(), (x, y), CONFIG, progress=False, loss_fn=nn.functional.cross_entropy)


def test_distill_targets_are_the_dense_predictive_distribution():
    x, _ = images()
    net = bn_net().eval()
    source = TeacherTargets(DatasetBatches(TensorDataset(x), 32, 0, "distill"), net)
    inputs, targets = next(source.from_step(0))
    with torch.no_grad():
        assert torch.allclose(targets, net(inputs).softmax(-1))
    result = compress(net, x, CONFIG, task="distill", progress=False)  # inputs only, no labels
    with torch.no_grad():
        dense, greedy = net(x).log_softmax(-1), result.greedy_module()(x).log_softmax(-1)
    kl = float((dense.exp() * (dense - greedy)).sum(-1).mean())
    assert 0 <= kl < 0.05
    with pytest.raises(SQSInputError, match="distill_weight applies to classification and lm tasks, not to a distill"):
        compress(net, x, SQSConfig(epochs=1, batch_size=32, distill_weight=0.5), task="distill", progress=False)


@pytest.mark.parametrize("mode", ["frozen", "recalibrate", "train"])
def test_batchnorm_statistics(mode):
    x, y = images()
    net = bn_net().train()  # a network left in train mode: frozen still keeps its statistics
    result = compress(net, (x, y), CONFIG, progress=False, batchnorm=mode)
    mean = result.compressed().state_dict()["1.running_mean"]
    if mode == "frozen":
        assert torch.equal(mean, torch.full((6,), 0.5))
        return
    assert not torch.allclose(mean, torch.full((6,), 0.5), atol=0.1)  # moved towards the data
    if mode == "recalibrate":  # the mean over the epoch's batches of the greedy network's batch means
        greedy = result.compressed().load_into(bn_net())
        with torch.no_grad():
            batch_means = [greedy[0](b[0]).mean((0, 2, 3)) for b in first_epoch(x, y)]
        assert torch.allclose(mean, torch.stack(batch_means).mean(0), atol=1e-5)


def test_recalibration_is_the_average_of_batch_statistics():
    bn = nn.BatchNorm1d(3)
    batches = [torch.randn(16, 3) * s + s for s in (1.0, 2.0, 3.0)]
    assert recalibrate_batchnorm(bn, batches) == 3
    assert torch.allclose(bn.running_mean, torch.stack([b.mean(0) for b in batches]).mean(0), atol=1e-6)
    assert torch.allclose(bn.running_var, torch.stack([b.var(0) for b in batches]).mean(0), atol=1e-5)
    assert not bn.training and bn.momentum == 0.1


@pytest.mark.parametrize("data, message", [
    ((b for b in []), "one-pass iterator"),
    ([], "train data is empty"),
    ([(torch.randn(4, 1, 6, 6), torch.zeros(4, dtype=torch.long)), (torch.randn(4, 1, 6, 6), torch.full((4,), 3))],
     r"labels out of range: found \[3, 3\]"),
    ([(torch.randn(4, 1, 6, 6), torch.zeros(4, dtype=torch.long)),
      (torch.full((4, 1, 6, 6), float("inf")), torch.zeros(4, dtype=torch.long))], "NaN or Inf"),
    ([{"x": torch.randn(4, 1, 6, 6)}], "target under 'labels'"),
    ([(torch.randn(4, 1, 6, 6), torch.zeros(3, dtype=torch.long))], r"batch 0: 4 inputs but targets of shape \(3,\)"),
])
def test_bad_batches_fail_before_training(data, message):
    with pytest.raises(SQSInputError, match=message):
        compress(bn_net(), data, CONFIG, progress=False)


@pytest.mark.parametrize("device", DEVICES)
def test_cpu_data_trains_a_network_on_the_device(device):
    x, y = images()
    result = compress(bn_net(), (x, y), CONFIG, progress=False, device=device)
    assert all(p.device.type == device for p in result.guide.parameters())
    loader = DataLoader(TensorDataset(x, y), batch_size=32)
    assert compress(bn_net().to(resolve_device(device)), loader, CONFIG, progress=False).accounting()["sparsity"] > 0.4


def test_device_names():
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    with pytest.raises(SQSInputError, match="device must be auto, cpu, cuda or cuda:N"):
        resolve_device("gpu0")
    if not torch.cuda.is_available():
        with pytest.raises(SQSInputError, match="CUDA is not available"):
            resolve_device("cuda:0")


@pytest.mark.parametrize("device", DEVICES)
def test_bf16_autocast_trains_close_to_float32(device):
    x, y = images()
    plain = compress(bn_net(), (x, y), CONFIG, progress=False, device=device)
    bf16 = compress(bn_net(), (x, y), CONFIG, progress=False, device=device, bf16=True)
    assert bf16.history[0]["nll"] != plain.history[0]["nll"]  # the forward pass did run in bfloat16
    assert bf16.history[0]["nll"] == pytest.approx(plain.history[0]["nll"], rel=0.05)
    assert bf16.accounting()["sparsity"] == pytest.approx(0.5, abs=0.01)


def test_an_iterable_dataset_is_batched_by_the_config():
    x, y = images()

    class Stream(torch.utils.data.IterableDataset):
        def __iter__(self):
            return iter(zip(x, y))

    result = compress(bn_net(), Stream(), CONFIG, progress=False)
    assert result.history[0]["step"] == 0 and len(x) // CONFIG.batch_size == 6
    assert result.accounting()["sparsity"] == pytest.approx(0.5, abs=0.01)
    # a DataLoader draws its base seed from torch's global generator, as the stream's did: the same run
    assert_same_network(result, compress(bn_net(), DataLoader(TensorDataset(x, y), batch_size=32), CONFIG,
                                         progress=False))
