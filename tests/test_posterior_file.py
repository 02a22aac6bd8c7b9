"""The posterior predictive served from a ``.sqs`` file, against the guide it summarises.

Tolerances: the file stores the slab scales in float16 (relative error at most 2^-11) and the
runner-up probabilities in ``prob_bits`` bits, and folds the third and later levels' mass onto the
greedy level. A trained posterior puts almost no mass there (about 1e-11 in all on the K=4 run
below: a latent weight sits between two neighbouring levels), so with ``threshold=0`` and 16 bits
the summary is the guide's posterior up to those roundings, and the members are the guide's draws
(the same generator calls): member weights agree to 2^-10 of the largest slab noise.
"""
import dataclasses

import numpy as np
import pytest
import torch
from torch import nn

from sqs_pyro import CompressedFileError, SQSConfig, SQSInputError, compress, load_compressed, save_compressed
from sqs_pyro.compressed.materialize import AveragedPredictor
from sqs_pyro.compressed.posterior import MixturePosterior, guide_runner_ups, runner_ups
from sqs_pyro.format.container import read_header
from sqs_pyro.format.posterior import PosteriorCoding, neighbours

EXACT = PosteriorCoding(threshold=0.0, prob_bits=16)


def mlp(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(12, 48), nn.ReLU(), nn.Linear(48, 4))


@pytest.fixture(scope="module")
def runs():
    """A trained K=2 and K=4 posterior (point phases, then the posterior phase) on a small MLP."""
    torch.set_num_threads(1)
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(256, 12, generator=gen)
    y = (x[:, :4] * 2 + 0.3 * torch.randn(256, 4, generator=gen)).argmax(1)
    return {k: compress(mlp(), (x, y), SQSConfig(components=k, sparsity=0.5, epochs=2, batch_size=32, seed=3),
                        progress=False) for k in (2, 4)}, x


def member_gap(a: AveragedPredictor, b: AveragedPredictor) -> float:
    """The largest difference of any weight of any member."""
    return max(float((wa[name] - wb[name]).abs().max())
               for wa, wb in zip(a.member_weights, b.member_weights) for name in wa)


def test_file_predictive_is_the_guides_posterior(runs, tmp_path):
    (results, x) = runs
    result = results[4]
    path = tmp_path / "k4.sqs"
    save_compressed(result, path, posterior=EXACT)
    predictor = load_compressed(path, mlp(seed=1), predictive=True, members=6, seed=11)
    guide_based = AveragedPredictor(result.guide, result.skeleton, result.compressed(), 6, seed=11).eval()
    largest_noise = max(float(layer.scales.detach().max()) for layer in result.guide.layers) * 6.0
    assert member_gap(predictor, guide_based) <= largest_noise * 2.0 ** -10
    with torch.no_grad():
        assert torch.allclose(predictor(x), guide_based(x), atol=1e-3)
    # negative control: one bit per probability (every small p_j read as sin^2(pi/16) = 0.038) is another posterior
    coarse = tmp_path / "coarse.sqs"
    save_compressed(result, coarse, posterior=PosteriorCoding(threshold=0.0, prob_bits=1))
    control = load_compressed(coarse, mlp(seed=1), predictive=True, members=6, seed=11)
    assert member_gap(control, guide_based) > 0.02  # a level flip: a gap between levels
    with torch.no_grad():
        assert not torch.allclose(control(x), guide_based(x), atol=1e-3)


def test_summary_responsibilities_match_the_guide(runs):
    """phi-hat differs from phi by the mass of the levels other than the greedy level and the
    runner-up (folded onto the greedy level), and by the rounding of the stored probability."""
    results, _ = runs
    for k, result in results.items():
        network = result.compressed()
        posterior = MixturePosterior(network, guide_runner_ups(result.guide, network, threshold=0.0))
        for layer, d in zip(network.layers, result.guide.distributions().values()):
            kept = layer.mask.reshape(-1)
            phi = d.phi.detach().double().reshape(-1, k)[kept]
            greedy = layer.codes.reshape(-1)[kept]
            runner = phi.scatter(1, greedy[:, None], -1.0).max(1)
            others = 1.0 - phi.gather(1, greedy[:, None]).squeeze(1) - runner.values
            error = (posterior.responsibilities(layer.name)[kept] - phi).abs().sum(-1)
            assert torch.all(error <= 2 * others + 1e-6), (k, layer.name, float((error - 2 * others).max()))


def test_threshold_and_neighbour_coding(runs, tmp_path):
    results, _ = runs
    result = results[4]
    sizes = {}
    for threshold in (0.0, 0.05, 0.2):
        path = tmp_path / f"t{threshold}.sqs"
        sizes[threshold] = save_compressed(result, path, posterior=PosteriorCoding(threshold, 3))
        header = read_header(path)
        network = result.compressed()
        for entry, layer, d in zip(header["posterior"]["layers"], network.layers,
                                   result.guide.distributions().values()):
            kept = layer.mask.reshape(-1)
            phi = d.phi.detach().double().reshape(-1, 4)[kept]
            second = phi.scatter(1, layer.codes.reshape(-1)[kept][:, None], -1.0).max(1).values
            assert entry["uncertain"] == int((second > threshold).sum())
    assert sizes[0.0] > sizes[0.05] > sizes[0.2]


def test_file_without_posterior_is_unchanged(runs, tmp_path):
    results, _ = runs
    result = results[4]
    plain, full = tmp_path / "plain.sqs", tmp_path / "full.sqs"
    save_compressed(result, plain)
    save_compressed(result, full, posterior=True)
    plain_header, full_header = read_header(plain), read_header(full)
    assert "posterior" not in plain_header and plain_header["format_version"] == 4
    assert full_header["format_version"] == 4 and full_header["posterior"]["threshold"] == PosteriorCoding().threshold
    for key in ("layers", "tensors", "config", "accounting", "architecture"):
        assert plain_header[key] == full_header[key], key
    a, b = load_compressed(plain, mlp(seed=5)).state_dict(), load_compressed(full, mlp(seed=6)).state_dict()
    assert all(torch.equal(a[name], b[name]) for name in a)
    assert all(torch.equal(a[name], v) for name, v in result.greedy_module().state_dict().items())
    with pytest.raises(CompressedFileError, match="no posterior section"):
        load_compressed(plain, mlp(), predictive=True)


def test_predictive_defaults_and_bad_input(runs, tmp_path):
    results, x = runs
    result = results[4]
    path = tmp_path / "full.sqs"
    save_compressed(result, path, posterior=True)
    predictor = load_compressed(path, mlp(), predictive=True)
    assert len(predictor.member_weights) == result.config.num_averaged
    again = load_compressed(path, mlp(), predictive=True, members=result.config.num_averaged, seed=result.config.seed)
    with torch.no_grad():
        assert torch.equal(predictor(x), again(x))
        assert torch.allclose(predictor(x).sum(-1), torch.ones(len(x)))
    with pytest.raises(SQSInputError, match="needs the model"):
        load_compressed(path, predictive=True)
    with pytest.raises(SQSInputError, match="needs the trained guide"):
        save_compressed(result.compressed(), tmp_path / "x.sqs", posterior=True)
    for bad in ((1.0, 3), (-0.1, 3), (0.05, 0), (0.05, 17)):
        with pytest.raises(SQSInputError):
            PosteriorCoding(*bad)
    merged = result.compressed()
    merged.layers[0] = dataclasses.replace(merged.layers[0], codebook=merged.layers[0].codebook[:2].clone())
    with pytest.raises(SQSInputError, match="not the guide's levels"):
        guide_runner_ups(result.guide, merged, 0.05)


def test_runner_ups_and_neighbours_planted():
    phi = torch.tensor([[0.7, 0.2, 0.1, 0.0], [0.01, 0.98, 0.01, 0.0], [0.3, 0.3, 0.4, 0.0]], dtype=torch.float64)
    summary = runner_ups(phi, torch.tensor([0, 1, 2]), torch.ones(4), threshold=0.05)
    assert summary.index.tolist() == [0, 2] and summary.level.tolist() == [1, 0]
    assert summary.prob.tolist() == pytest.approx([0.2, 0.3])
    down, up = neighbours(np.array([0.3, -0.1, 0.5, -0.6]), np.zeros(4, dtype=int))
    assert up.tolist() == [2, 0, -1, 1] and down.tolist() == [1, 3, 0, -1]
    down, up = neighbours(np.array([0.3, -0.1, 0.5, -0.6]), np.array([0, 1, 1, 0]))
    assert up.tolist() == [-1, 2, -1, 0] and down.tolist() == [3, -1, 1, -1]
    spec = PosteriorCoding(0.05, 2)
    p = np.array([0.0500001, 0.1, 0.2, 0.5, 0.9, 1.0])
    q = spec.quantise(p)
    assert q.tolist() == sorted(q.tolist()) and q[0] == 0 and q[-1] == 3
    width = (np.pi / 2 - np.arcsin(np.sqrt(0.05))) / 4
    assert np.all(np.abs(np.arcsin(np.sqrt(spec.dequantise(q))) - np.arcsin(np.sqrt(p))) <= width / 2 + 1e-12)
