"""Baselines: magnitude pruning, k-means weight sharing, uniform per-channel quantisation, DGMS."""
import math

import pytest
import torch
from torch import nn

from sqs_pyro.experiments.baselines import (BASELINES, ChannelScaledLayer, baseline_accounting, compress_dgms,
                                compress_magnitude_kmeans, compress_magnitude_uniform, file_network,
                                magnitude_masks)
from sqs_pyro.experiments.baselines.deep_compression import nearest_codes
from sqs_pyro.guides.kmeans import kmeans_codebook
from sqs_pyro.experiments.baselines.dgms import GMMLayer, init_mixture
from sqs_pyro.experiments.baselines.uniform import dequantize, quantize_codes, row_scales, uniform_grid
from sqs_pyro.config import SQSConfig
from sqs_pyro.experiments.ablation import BASELINE_RECIPE
from sqs_pyro.format.container import load_compressed, save_compressed
from sqs_pyro.infer.schedules import Schedule


def _mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(12, 24), nn.ReLU(), nn.Linear(24, 3))


def _data(n: int = 192) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    x = torch.randn(n, 12, generator=g)
    teacher = torch.randn(12, 3, generator=g)
    return x, (x @ teacher).argmax(-1)


CONFIG = SQSConfig(sparsity=0.8, components=4, epochs=2.0, batch_size=32, seed=0, log_every=1,
                   **BASELINE_RECIPE)  # the baselines' recipe: a dense warm-up phase


def test_magnitude_masks_keep_exactly_the_largest_magnitudes():
    g = torch.Generator().manual_seed(0)
    weights = {"a": torch.randn(7, 9, generator=g), "b": torch.randn(40, generator=g) * 3}
    masks = magnitude_masks(weights, 0.7)
    n = 63 + 40
    kept = n - math.ceil(0.7 * n)
    flat = torch.cat([weights["a"].reshape(-1), weights["b"]]).abs()
    top = set(flat.topk(kept).indices.tolist())
    chosen = set(torch.cat([masks["a"].reshape(-1), masks["b"]]).nonzero().reshape(-1).tolist())
    assert chosen == top
    assert all(m.all() for m in magnitude_masks(weights, 0.0).values())


@pytest.mark.parametrize("compress_fn", [compress_magnitude_kmeans, compress_magnitude_uniform, compress_dgms])
def test_baselines_reach_the_target_and_materialise_k_levels(compress_fn):
    net, data = _mlp(), _data()
    before = {k: v.clone() for k, v in net.state_dict().items()}
    result = compress_fn(net, data, CONFIG)
    assert all(torch.equal(before[k], v) for k, v in net.state_dict().items())  # input untouched
    acc = result.accounting()
    n = 12 * 24 + 24 * 3
    assert acc["compressed_params"] == n and acc["bits"] == 2
    assert n - sum(l.nnz for l in result.compressed().layers) == math.ceil(0.8 * n)
    assert acc["cr_formula"] == pytest.approx(32 / ((1 - acc["sparsity"]) * 2))
    module = result.greedy_module()
    for layer in result.compressed().layers:
        w = module.get_parameter(layer.name)
        assert torch.equal(w, layer.weight()) and (w[~layer.mask] == 0).all()
        assert layer.codes[layer.mask].unique().numel() <= 4
        if isinstance(layer, ChannelScaledLayer):  # K levels per row
            assert all(row[row != 0].unique().numel() <= 4 for row in w)
        else:
            assert w[layer.mask].unique().numel() <= 4
    steps = Schedule.from_config(CONFIG, 192 // 32).total_steps
    assert result.history[-1]["step"] == steps - 1
    assert {h["phase"] for h in result.history} == {"warmup", "prune", "finetune"}


def test_registry_names_the_four_baselines():
    assert set(BASELINES) == {"magnitude_kmeans", "magnitude_uniform", "dgms", "soft_weight_sharing"}


def test_kmeans_codebook_is_the_cluster_means_and_codes_the_nearest_level():
    values = torch.tensor([-2.0, -1.8, -0.3, -0.1, 0.4, 0.6, 3.0, 3.2, 3.4])
    book = kmeans_codebook(values, 4)
    assert torch.allclose(book, torch.tensor([-1.9, -0.2, 0.5, 3.2]))
    assert nearest_codes(values, book).tolist() == [0, 0, 1, 1, 2, 2, 3, 3, 3]
    assert kmeans_codebook(torch.tensor([1.0, 1.0, 2.0]), 4).tolist() == [1.0, 2.0, 2.0, 2.0]
    assert kmeans_codebook(torch.zeros(0), 4).tolist() == [0.0] * 4


def test_kmeans_baseline_without_finetuning_keeps_the_kmeans_levels():
    net, data = _mlp(), _data()
    config = CONFIG.replace(warmup_fraction=0.2, prune_fraction=0.8)  # no fine-tuning step
    result = compress_magnitude_kmeans(net, data, config)
    for layer in result.compressed().layers:
        kept = layer.weight()[layer.mask]
        assert torch.allclose(layer.codebook, kmeans_codebook(kept, 4))


def test_uniform_quantiser_round_trips_integer_grids_exactly():
    levels = 8
    grid = uniform_grid(levels)
    assert grid.tolist() == [-3.5, -2.5, -1.5, -0.5, 0.5, 1.5, 2.5, 3.5]
    g = torch.Generator().manual_seed(0)
    scale = torch.tensor([0.5, 0.125, 2.0])
    codes = torch.randint(0, levels, (3, 10), generator=g)
    codes[:, 0] = 0  # every row holds the extreme level, so absmax recovers its scale
    w = grid[codes] * scale[:, None]
    mask = torch.ones_like(w, dtype=torch.bool)
    assert torch.equal(row_scales(w, mask, levels), scale)
    assert torch.equal(quantize_codes(w, scale, levels), codes)
    assert torch.equal(dequantize(codes, scale, levels), w)
    off_grid = w + 0.2 * scale[:, None]  # less than half a step: rounds back
    assert torch.equal(quantize_codes(off_grid, scale, levels), codes)
    assert quantize_codes(torch.full((1, 2), 1e3), torch.ones(1), levels).max() == levels - 1


def test_uniform_layer_accounting_and_file_pay_for_scales(tmp_path):
    result = compress_magnitude_uniform(_mlp(), _data(), CONFIG)
    net = result.compressed()
    acc = baseline_accounting(net)
    assert acc["side_bytes"] == 4 * (24 + 3)
    stored = file_network(net)
    path = tmp_path / "u.sqs"
    size = save_compressed(stored, path)
    assert size == path.stat().st_size
    back = load_compressed(path)
    for layer, loaded in zip(net.layers, back.layers):
        assert torch.equal(back.dense_state[f"{layer.name}.row_scale"], layer.row_scale)
        assert torch.equal(loaded.mask, layer.mask) and torch.equal(loaded.codes[loaded.mask], layer.codes[layer.mask])
        rebuilt = ChannelScaledLayer(loaded.name, loaded.shape, loaded.mask, loaded.codes, loaded.codebook,
                                     loaded.component_windows, row_scale=back.dense_state[f"{layer.name}.row_scale"])
        assert torch.equal(rebuilt.weight(), layer.weight())


def test_dgms_zero_component_yields_zeros():
    g = torch.Generator().manual_seed(0)
    weight = torch.cat([torch.randn(200, generator=g) * 0.01, torch.randn(100, generator=g) * 0.3 + 1.0,
                        torch.randn(100, generator=g) * 0.3 - 1.0]).reshape(20, 20)
    locs, scales, mix = init_mixture(weight, 2)
    assert locs[0] == 0 and locs.numel() == 3 and (scales > 0).all()
    assert mix.sum().item() == pytest.approx(1.0)
    layer = GMMLayer(weight, 2)
    with torch.no_grad():
        layer.latent.zero_()
        assert torch.equal(layer.soft_weight(0.01, nonzero_only=False), torch.zeros(20, 20))
        nonzero = layer.soft_weight(0.01, nonzero_only=True)
    assert (nonzero != 0).all() and set(nonzero.unique().tolist()) <= set(layer.locs.tolist())


def test_baselines_and_sqs_train_on_the_same_minibatches(monkeypatch):
    """One training loop's batching: the SQS trainer and every baseline fetch the same example
    indices, step by step, for the same seed (magnitude gate scores: no saliency batches)."""
    import sqs_pyro.infer.data as data_module
    from sqs_pyro.infer import compress

    fetched: list[list[int]] = []
    original = data_module.fetch

    def recording_fetch(dataset, indices):
        fetched.append(indices.tolist())
        return original(dataset, indices)

    monkeypatch.setattr(data_module, "fetch", recording_fetch)
    config = CONFIG.replace(gate_score="magnitude", epochs=1.5, posterior_epochs=0.0)  # the point phases only
    steps = Schedule.from_config(config, 192 // 32).total_steps
    runs = {}
    for name, fn in [("sqs", lambda n, d, c: compress(n, d, c, progress=False)), *BASELINES.items()]:
        fetched.clear()
        fn(_mlp(), _data(), config)
        runs[name] = list(fetched)
    assert len(runs["sqs"]) == steps
    assert all(run == runs["sqs"] for run in runs.values())
    epoch0, epoch1 = runs["sqs"][:6], runs["sqs"][6:]
    assert sorted(i for b in epoch0 for i in b) == list(range(192))  # each epoch a permutation
    assert epoch0[:len(epoch1)] != epoch1  # and a new one every epoch
    fetched.clear()
    compress(_mlp(), _data(), config.replace(seed=1), progress=False)
    assert fetched != runs["sqs"]  # the order follows the seed
