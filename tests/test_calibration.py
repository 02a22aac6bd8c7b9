"""Calibration tools (temperature, OOD AUROC, last-layer Laplace), shifted MNIST, idx files and the
calibration benchmark's smoke run."""
import gzip
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from sqs_pyro.data.uncertainty import (LastLayerLaplace, auroc, fit_temperature, ood_auroc, predictive_entropy,
                                       temperature_scaled)
from sqs_pyro.data.images import MNIST_MEAN, MNIST_STD
from sqs_pyro.data.shift import (blur, contrast, gaussian_noise, load_fashion_mnist, read_idx, rotate,
                                 shifted_sets)
from sqs_pyro.errors import SQSInputError

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def _one_thread():
    torch.set_num_threads(1)


def _planted_logits(n: int, temperature: float, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Labels drawn from softmax(z); the model reports z * temperature (over-confident when > 1)."""
    g = torch.Generator().manual_seed(seed)
    z = 2.0 * torch.randn(n, 10, generator=g, dtype=torch.float64)
    y = torch.multinomial(torch.softmax(z, -1), 1, generator=g).squeeze(1)
    return z * temperature, y


def test_temperature_recovers_planted_overconfidence():
    logits, y = _planted_logits(40000, 2.5)
    t = fit_temperature(logits, y)
    assert abs(t - 2.5) < 0.05
    assert fit_temperature(*_planted_logits(40000, 1.0, seed=1)) == pytest.approx(1.0, abs=0.03)
    # the fitted T is the NLL's minimum: both neighbours are worse
    nll = lambda temp: float(nn.functional.cross_entropy(logits / temp, y))  # noqa: E731
    assert nll(t) < nll(t * 1.01) and nll(t) < nll(t / 1.01)
    assert temperature_scaled(logits, t).sum(-1).allclose(torch.ones(len(y), dtype=torch.float64))
    # negative control: labels unrelated to the logits call for a far higher temperature
    shuffled = y[torch.randperm(len(y), generator=torch.Generator().manual_seed(3))]
    assert fit_temperature(logits, shuffled) > 10.0


def test_temperature_rejects_bad_input():
    with pytest.raises(SQSInputError):
        fit_temperature(torch.zeros(3, 2), torch.zeros(4, dtype=torch.long))
    with pytest.raises(SQSInputError):
        fit_temperature(torch.zeros(3, 2), torch.zeros(3, dtype=torch.long), bounds=(2.0, 1.0))


def test_auroc_equals_pairwise_count_with_ties():
    g = torch.Generator().manual_seed(0)
    neg = torch.randint(0, 6, (300,), generator=g).double()  # many ties
    pos = torch.randint(2, 9, (200,), generator=g).double()
    pairs = (pos[:, None] > neg[None, :]).double() + 0.5 * (pos[:, None] == neg[None, :]).double()
    assert auroc(neg, pos) == pytest.approx(float(pairs.mean()), abs=1e-12)
    assert auroc(torch.zeros(5), torch.ones(3)) == 1.0
    assert auroc(torch.ones(5), torch.zeros(3)) == 0.0
    assert auroc(torch.ones(5), torch.ones(3)) == 0.5


def test_auroc_closed_form_for_gaussian_scores():
    """Scores N(0, 1) against N(mu, 1): AUROC = Phi(mu / sqrt 2)."""
    g = torch.Generator().manual_seed(1)
    mu = 1.0
    neg, pos = torch.randn(20000, generator=g), mu + torch.randn(20000, generator=g)
    exact = 0.5 * (1 + math.erf(mu / 2))  # Phi(mu / sqrt(2)) = (1 + erf(mu / 2)) / 2
    assert auroc(neg, pos) == pytest.approx(exact, abs=0.01)


def test_ood_auroc_by_entropy():
    confident = torch.tensor([[0.98, 0.01, 0.01]] * 4, dtype=torch.float64)
    uniform = torch.full((3, 3), 1 / 3, dtype=torch.float64)
    assert predictive_entropy(uniform) == pytest.approx([math.log(3)] * 3)
    assert predictive_entropy(torch.tensor([[1.0, 0.0]])).item() == 0.0
    assert ood_auroc(confident, uniform) == 1.0
    assert ood_auroc(uniform, confident) == 0.0


def _head_problem(classes: int, n: int = 400, d: int = 3, seed: int = 0):
    """A linear classifier (identity features) fitted by a few steps, and its data."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=g)
    w_true = 2.0 * torch.randn(classes, d, generator=g)
    y = torch.multinomial(torch.softmax(x @ w_true.T, -1), 1, generator=g).squeeze(1)
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Identity(), nn.Linear(d, classes))
    opt = torch.optim.LBFGS(model.parameters(), max_iter=50)

    def closure():
        opt.zero_grad()
        loss = nn.functional.cross_entropy(model(x), y) + 1e-3 * sum((p ** 2).sum() for p in model.parameters())
        loss.backward()
        return loss
    opt.step(closure)
    return model.eval(), x, y


def test_laplace_binary_covariance_is_logistic_regression_by_hand():
    """Two softmax classes: H = [[1, -1], [-1, 1]] (x) X~' diag(p (1 - p)) X~, Sigma = (H + delta I)^-1."""
    model, x, y = _head_problem(2)
    delta = 0.7
    la = LastLayerLaplace(model, prior_precision=delta).fit(x, y, batch_size=128)
    xt = torch.cat([x, torch.ones(len(x), 1)], 1).double()
    with torch.no_grad():
        logits = model(x).double()
    p = torch.sigmoid(logits[:, 1] - logits[:, 0])
    a = xt.T @ ((p * (1 - p))[:, None] * xt)
    sign = torch.tensor([[1.0, -1.0], [-1.0, 1.0]], dtype=torch.float64)
    expected = torch.linalg.inv(torch.kron(sign, a) + delta * torch.eye(2 * xt.shape[1], dtype=torch.float64))
    assert torch.allclose(la.posterior_covariance(), expected, rtol=1e-8, atol=1e-10)
    # negative control: the weights p instead of p (1 - p) give another covariance
    wrong = torch.linalg.inv(torch.kron(sign, xt.T @ (p[:, None] * xt)) + delta * torch.eye(2 * xt.shape[1],
                                                                                          dtype=torch.float64))
    assert not torch.allclose(la.posterior_covariance(), wrong, rtol=1e-2)


def test_laplace_ggn_is_the_exact_last_layer_hessian():
    """Logits linear in [W b]: the GGN equals autograd's Hessian of the summed cross-entropy."""
    model, x, y = _head_problem(4, n=300, d=3, seed=2)
    la = LastLayerLaplace(model, prior_precision=1e-3).fit(x, y, batch_size=64)
    w0 = torch.cat([model[1].weight, model[1].bias[:, None]], 1).detach().double()
    xt = torch.cat([x, torch.ones(len(x), 1)], 1).double()
    loss = lambda theta: nn.functional.cross_entropy(xt @ theta.view(4, -1).T, y, reduction="sum")  # noqa: E731
    hessian = torch.autograd.functional.hessian(loss, w0.flatten())
    ggn = (la.eigenvectors * la.eigenvalues) @ la.eigenvectors.T
    assert torch.allclose(ggn, hessian, rtol=1e-5, atol=1e-5)  # float32 logits in, float64 sums


def test_laplace_predictive_limits_and_tuning():
    model, x, y = _head_problem(3, seed=4)
    la = LastLayerLaplace(model).fit(x, y)
    with torch.no_grad():
        softmax = torch.softmax(model(x).double(), -1)
    la.prior_precision = 1e12  # no posterior spread: the MAP's softmax
    assert torch.allclose(la(x), softmax, atol=1e-8)
    la.prior_precision = 1e-2  # wide posterior: predictions pulled towards uniform
    assert (predictive_entropy(la(x)) > predictive_entropy(softmax)).all()
    grid = tuple(10.0 ** k for k in range(-4, 5))
    shuffled = y[torch.randperm(len(y), generator=torch.Generator().manual_seed(5))]
    for labels in (y, shuffled):  # labels unrelated to the inputs call for the widest posterior
        best = la.tune_prior_precision(x, labels, grid=grid, batch_size=100)
        nlls = []
        for delta in grid:
            la.prior_precision = delta
            nlls.append(float(-torch.log(la(x).gather(1, labels[:, None])).mean()))
        assert best == grid[nlls.index(min(nlls))]
    assert best == grid[0]


def test_laplace_needs_logits_from_last_linear():
    model = nn.Sequential(nn.Linear(3, 2), nn.Softmax(-1))
    with pytest.raises(SQSInputError, match="last nn.Linear"):
        LastLayerLaplace(model).fit(torch.randn(5, 3), torch.zeros(5, dtype=torch.long))
    with pytest.raises(SQSInputError, match="no nn.Linear"):
        LastLayerLaplace(nn.Sequential(nn.ReLU()))


def _unit(x):
    return x * MNIST_STD + MNIST_MEAN


def test_shifts_act_on_unit_images():
    g = torch.Generator().manual_seed(0)
    u = torch.rand(6, 1, 28, 28, generator=g)
    x = (u - MNIST_MEAN) / MNIST_STD
    assert torch.allclose(rotate(x, 0.0), x, atol=1e-5)
    # a quarter turn of a square image is an exact pixel permutation
    quarter = _unit(rotate(x, 90.0))
    assert torch.allclose(quarter, torch.rot90(u, 1, (-2, -1)), atol=1e-5) or \
        torch.allclose(quarter, torch.rot90(u, -1, (-2, -1)), atol=1e-5)
    assert not torch.allclose(_unit(rotate(x, 45.0)), u, atol=1e-2)
    noisy = _unit(gaussian_noise(x, seed=1))
    assert noisy.min() >= -1e-6 and noisy.max() <= 1 + 1e-6
    assert torch.equal(gaussian_noise(x, seed=1), gaussian_noise(x, seed=1))
    flat = torch.full((1, 1, 28, 28), 0.5)
    inner = _unit(blur((flat - MNIST_MEAN) / MNIST_STD))[..., 4:-4, 4:-4]
    assert torch.allclose(inner, torch.full_like(inner, 0.5), atol=1e-6)  # a blur keeps constant regions
    c = _unit(contrast(x, 0.3))
    assert torch.allclose(c.mean((-2, -1)), u.mean((-2, -1)), atol=1e-5)
    assert torch.allclose(c.std((-2, -1)), 0.3 * u.std((-2, -1)), atol=1e-5)
    assert sorted(shifted_sets(x)) == sorted(["rot15", "rot30", "rot45", "rot60", "rot90", "noise", "blur",
                                              "contrast"])


def _write_idx(path: Path, array: torch.Tensor, gz: bool = True) -> None:
    header = bytes([0, 0, 0x08, array.dim()]) + b"".join(int(s).to_bytes(4, "big") for s in array.shape)
    data = header + array.to(torch.uint8).numpy().tobytes()
    path.write_bytes(gzip.compress(data) if gz else data)


def test_idx_round_trip_and_fashion_loader(tmp_path):
    images = torch.randint(0, 256, (7, 28, 28), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    _write_idx(tmp_path / "raw.idx", images, gz=False)
    assert torch.equal(read_idx(tmp_path / "raw.idx"), images)
    nested = tmp_path / "usr" / "share"
    nested.mkdir(parents=True)
    _write_idx(nested / "t10k-images-idx3-ubyte.gz", images)
    x = load_fashion_mnist(tmp_path, limit=5)
    assert x.shape == (5, 1, 28, 28)
    assert torch.allclose(_unit(x) * 255, images[:5, None].float(), atol=1e-3)
    with pytest.raises(SQSInputError, match="assets-fashion"):
        load_fashion_mnist(tmp_path / "missing")
    (tmp_path / "bad.idx").write_bytes(b"\x01\x02\x03\x04")
    with pytest.raises(SQSInputError, match="not an idx file"):
        read_idx(tmp_path / "bad.idx")


def test_benchmark_smoke(tmp_path):
    """The benchmark end to end on a few hundred images (a synthetic Fashion-MNIST folder)."""
    fashion = tmp_path / "fashion"
    fashion.mkdir()
    _write_idx(fashion / "t10k-images-idx3-ubyte.gz",
               torch.randint(0, 256, (300, 28, 28), dtype=torch.uint8, generator=torch.Generator().manual_seed(0)))
    out = tmp_path / "out"
    subprocess.run([sys.executable, str(ROOT / "benchmarks" / "calibration.py"), "--smoke", "--fashion", str(fashion),
                    "--output", str(out), "--cells", "95:4"], check=True, cwd=ROOT, timeout=300)
    rows = [json.loads(line) for line in (out / "calibration.jsonl").read_text().splitlines()]
    methods = {r["method"] for r in rows}
    assert methods == {"greedy", "greedy_temperature", "laplace_last_layer", "sqs_averaged"}
    splits = {r["split"] for r in rows}
    assert {"test", "rot15", "rot90", "noise", "blur", "contrast"} <= splits
    for r in rows:
        if r["split"] == "fashion_ood":
            assert 0 <= r["ood_auroc"] <= 1
        else:
            assert r["seconds"] >= 0 and 0 <= r["accuracy"] <= 1 and r["nll"] > 0
    assert (out / "calibration.md").read_text().count("|") > 20
    assert list(out.glob("*reliability*.png")) and list(out.glob("*rotation*.png"))
    # a run split into pieces merges back into the same tables (here: one piece, so the tables are equal)
    merged = tmp_path / "merged"
    subprocess.run([sys.executable, str(ROOT / "benchmarks" / "calibration.py"), "--merge",
                    str(out / "calibration.jsonl"), "--output", str(merged)], check=True, cwd=ROOT, timeout=120)
    tables = lambda folder: (folder / "calibration.md").read_text().split("\n## ", 1)[1]  # noqa: E731
    assert tables(merged) == tables(out) and list(merged.glob("*rotation*.png"))


@pytest.mark.parametrize("extra, message", [(["--set", "no_such_key=1"], "unknown config keys"),
                                            (["--set", "mode=bogus"], "mode must be one of"),
                                            (["--set", "sparsity=0.9"], "with --cells"), ([], "assets-fashion")])
def test_benchmark_rejects_bad_input_before_work(tmp_path, extra, message):
    fashion = tmp_path / "fashion"
    if extra:
        fashion.mkdir()
        _write_idx(fashion / "t10k-images-idx3-ubyte.gz", torch.zeros(3, 28, 28, dtype=torch.uint8))
    run = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "calibration.py"), "--smoke", "--fashion",
                          str(fashion), "--output", str(tmp_path / "out"), *extra],
                         cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert run.returncode != 0 and message in run.stderr
    assert not (tmp_path / "out").exists()
