"""Materialisation, averaging, accounting and determinism."""
import math

import pytest

import torch
from torch import nn

from sqs_pyro import SQSConfig
from sqs_pyro.compressed import CompressedLayer, CompressedNetwork, materialize
from sqs_pyro.compressed.accounting import accounting, binary_entropy
from sqs_pyro.infer import compress


def tiny_problem(seed=0):
    torch.manual_seed(seed)
    net = nn.Sequential(nn.Linear(12, 16), nn.ReLU(), nn.Linear(16, 3))
    x = torch.randn(256, 12)
    y = (x[:, :3] * torch.tensor([1.0, -1.0, 0.5])).argmax(-1)
    return net, x, y


def run(seed=0, **kw):
    net, x, y = tiny_problem()
    config = SQSConfig(group_size=0, components=4, sparsity=0.5, epochs=3, batch_size=32, seed=seed, **kw)
    return compress(net, (x, y), config, progress=False), x


def test_greedy_forward_equals_hand_computation():
    result, x = run()
    cn = result.compressed()
    module = result.greedy_module()
    h = x
    for i, layer in enumerate(cn.layers):
        w = torch.zeros(layer.shape)
        for r in range(layer.shape[0]):
            for c in range(layer.shape[1]):
                if layer.mask[r, c]:
                    w[r, c] = layer.codebook[layer.codes[r, c]]
        h = h @ w.T + cn.dense_state[f"{2 * i}.bias"]
        if i == 0:
            h = torch.relu(h)
    torch.testing.assert_close(module(x), h)
    # every kept weight is one of the layer's K levels, every pruned one exactly zero
    for layer in cn.layers:
        weight = layer.weight()
        assert torch.all(weight[~layer.mask] == 0)
        assert torch.isin(weight[layer.mask], layer.codebook).all()


def test_averaged_predictor_averages_networks_drawn_by_the_guide_sampler():
    result, x = run()
    averaged = result.averaged_module(num_members=3)
    draws = result.guide.draw(3, torch.Generator().manual_seed(result.config.seed))
    expected = sum(torch.softmax(torch.func.functional_call(result.greedy_module(), {n: d.weight[m] for n, d in
                                                                                   draws.items()}, (x,)), -1)
                   for m in range(3)) / 3
    torch.testing.assert_close(averaged(x), expected)
    for layer in result.compressed().layers:  # frozen mask, slab noise around the levels
        member = averaged.member_weights[0][layer.name]
        assert torch.equal(member != 0, layer.mask)
        assert not torch.isin(member[layer.mask], layer.codebook).any()


def test_same_seed_same_weights_bit_identical():
    a, _ = run(seed=3)
    b, _ = run(seed=3)
    c, _ = run(seed=4)
    sa, sb, sc = (r.compressed().state_dict() for r in (a, b, c))
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert not all(torch.equal(sa[k], sc[k]) for k in sa)


def test_accounting_matches_hand_counts():
    result, _ = run()
    cn = result.compressed()
    acc = accounting(cn)
    n = sum(layer.numel for layer in cn.layers)
    nnz = sum(layer.nnz for layer in cn.layers)
    s = 1 - nnz / n
    assert acc["sparsity"] == s
    assert acc["bits"] == 2
    assert acc["cr_formula"] == 32 / ((1 - s) * 2)
    other = sum(v.numel() for v in cn.dense_state.values())
    assert acc["bytes_fp32"] == 4 * (n + other)
    packed = sum(math.ceil(l.numel / 8) + math.ceil(l.nnz * 2 / 8) + 4 * 4 for l in cn.layers) + 4 * other
    assert acc["bytes_packed"] == packed
    first = cn.layers[0]
    usage = torch.bincount(first.codes[first.mask], minlength=4).double() / first.nnz
    h = -sum(float(p * math.log2(p)) for p in usage if p > 0)
    bound = (first.numel * binary_entropy(first.nnz / first.numel) + first.nnz * h) / 8
    assert acc["layers"][0]["entropy_bound_bytes"] == bound


@pytest.mark.parametrize("mode", ["hard", "sample"])
def test_objective_is_called_an_elbo_only_for_exact_draws(mode):
    result, _ = run(mode=mode)
    point = [h for h in result.history if "objective" in h and h["phase"] != "posterior"][-1]
    assert point["objective_kind"] == ("elbo" if mode == "sample" else "surrogate")
    assert ("elbo" in point) == (mode == "sample")
    posterior = [h for h in result.history if h.get("phase") == "posterior"][-1]  # the sampled ELBO phase
    assert posterior["objective_kind"] == "elbo" and "elbo" in posterior


def test_expected_mode_and_windows_run_and_report_measured_sparsity():
    result, _ = run(mode="expected", windows="equal", equal_windows=2)
    acc = result.accounting()
    assert 0.5 <= acc["sparsity"] < 1.0
    assert [h["phase"] for h in result.history][0] == "prune"  # gates learn from step 0 (warmup_fraction=0)
    record = [h for h in result.history if h["phase"] not in ("posterior", "final")][-1]  # the last point step
    assert {"nll", "kl", "objective", "beta", "sparsity"} <= set(record)
    assert "elbo" not in record and record["objective_kind"] == "surrogate"  # log p(D | E_q W) - KL is no ELBO
    assert all(math.isfinite(record[k]) for k in ("nll", "kl", "objective"))


def test_cubic_ramp_reaches_the_target_even_with_one_pruning_step():
    from sqs_pyro.infer.schedules import Schedule

    one = Schedule(total_steps=4, prune_start=1, prune_end=2, config=SQSConfig(group_size=0, sparsity=0.8))
    assert one.target_sparsity(1) == 0.8
    many = Schedule(total_steps=20, prune_start=2, prune_end=12, config=SQSConfig(group_size=0, sparsity=0.8))
    assert many.target_sparsity(2) == 0.0 and many.target_sparsity(11) == 0.8
    assert many.target_sparsity(7) == pytest.approx(0.8 * (1 - (1 - 5 / 9) ** 3))


def test_calibration_metrics_on_hand_made_predictions():
    from sqs_pyro.data.metrics import calibration

    probs = torch.tensor([[0.95, 0.05], [0.65, 0.35], [0.25, 0.75], [0.85, 0.15]], dtype=torch.float64)
    y = torch.tensor([0, 1, 1, 0])
    m = calibration(probs, y, bins=10)
    assert m["accuracy"] == pytest.approx(0.75)
    assert m["nll"] == pytest.approx(-(math.log(0.95) + math.log(0.35) + math.log(0.75) + math.log(0.85)) / 4)
    assert m["brier"] == pytest.approx(2 * (0.0025 + 0.4225 + 0.0625 + 0.0225) / 4)
    # one example per bin: |acc - conf| = 0.05 (right), 0.65 (wrong), 0.25 (right), 0.15 (right)
    assert m["ece"] == pytest.approx((0.05 + 0.65 + 0.25 + 0.15) / 4)
    assert m["bins"]["count"] == [0, 0, 0, 0, 0, 0, 1, 1, 1, 1]
    assert m["bins"]["accuracy"][6] == 0.0 and m["bins"]["confidence"][9] == pytest.approx(0.95)
    assert m["bins"]["accuracy"][0] is None
    perfect = calibration(torch.eye(3)[[0, 1, 2]], torch.tensor([0, 1, 2]))
    assert perfect["ece"] == 0 and perfect["brier"] == 0 and perfect["nll"] == pytest.approx(0, abs=1e-12)


def test_used_levels_drop_unused_and_merge_indistinguishable_levels():
    from sqs_pyro.compressed import CompressedLayer

    codebook = torch.tensor([-1.0, -0.98, 0.5, 2.0, 0.9])
    mask = torch.tensor([True, True, True, True, True, False])
    codes = torch.tensor([0, 0, 1, 2, 4, 3])  # level 3 only under a pruned weight: unused
    layer = CompressedLayer("w", (6,), mask, codes, codebook, torch.zeros(5, dtype=torch.long))
    scales = torch.tensor([0.05, 0.05, 0.05, 0.05, 0.05])
    reduced = layer.used_levels(scales)
    # -1 and -0.98 are 0.4 pooled scales apart: merged at their usage-weighted mean (2:1)
    torch.testing.assert_close(reduced.codebook, torch.tensor([-(2 * 1.0 + 0.98) / 3, 0.5, 0.9]))
    torch.testing.assert_close(reduced.weight(), torch.tensor([-0.9933, -0.9933, -0.9933, 0.5, 0.9, 0.0]),
                               atol=1e-4, rtol=0)
    assert accounting(CompressedNetwork([reduced], {}))["layers"][0]["bits"] == 2  # 3 levels: 2 bits, not 3
    # with no separation nothing merges, only the unused level goes
    kept = layer.used_levels(scales, separation=0.0)
    assert kept.components == 4 and torch.equal(kept.weight(), layer.weight())
    # windows are never merged across
    windows = CompressedLayer("w", (6,), mask, codes, codebook, torch.tensor([0, 1, 1, 1, 1]))
    assert windows.used_levels(scales).components == 4


def test_adaptive_bits_materialise_fewer_levels_and_round_trip(tmp_path):
    from sqs_pyro.format import load_compressed, read_header, save_compressed

    result, x = run()
    plain = result.compressed()
    adaptive = materialize(result.guide, result.model.net, {"adaptive_bits": True, "merge_separation": 4.0})
    for a, b in zip(adaptive.layers, plain.layers):
        assert torch.equal(a.mask, b.mask) and a.components <= b.components
        assert a.components == int(torch.unique(a.codes[a.mask]).numel())  # every stored level is used
        assert torch.isin(a.weight()[a.mask], a.codebook).all()
    size = save_compressed(adaptive, tmp_path / "a.sqs")
    assert [len(e["windows"]) for e in read_header(tmp_path / "a.sqs")["layers"]] == [l.components for l in
                                                                                       adaptive.layers]
    loaded = load_compressed(tmp_path / "a.sqs")
    for a, b in zip(loaded.layers, adaptive.layers):
        assert torch.equal(a.weight(), b.weight())
    assert size <= save_compressed(plain, tmp_path / "p.sqs")


def _layer(name, shape, kept, levels, seed=0):
    """A hand-made layer: the first ``kept`` weights kept, codes cycling over ``levels`` levels."""
    n = math.prod(shape)
    mask = (torch.arange(n) < kept).reshape(shape)
    codes = torch.where(mask, torch.arange(n).reshape(shape) % levels, 0)
    codebook = torch.linspace(-1.0, 1.0, levels) if levels > 1 else torch.tensor([0.5])
    return CompressedLayer(name, shape, mask, codes, codebook, torch.zeros(levels, dtype=torch.long))


def test_a_one_level_layer_costs_no_code_bits_in_the_accounting_as_in_the_file(tmp_path):
    from sqs_pyro.format import read_header, save_compressed
    from sqs_pyro.format.container import layer_table

    network = CompressedNetwork([_layer("one", (8, 10), 30, 1), _layer("four", (8, 10), 40, 4)], {})
    acc = accounting(network)
    save_compressed(network, tmp_path / "n.sqs")
    header = read_header(tmp_path / "n.sqs")
    file_layers = layer_table(header)
    assert [l["bits"] for l in acc["layers"]] == [f["bits"] for f in file_layers] == [0, 2]
    assert header["layers"][0]["codes"]["bytes"] == 0  # the file stores no codes for one level
    assert acc["layers"][0]["bytes_packed"] == math.ceil(80 / 8) + 0 + 4 * 1  # mask, no codes, codebook
    assert acc["layers"][0]["code_entropy_bits"] == 0.0
    # the CR formula of both: 32 N over the kept weights' code bits, 32 * 160 / (30 * 0 + 40 * 2)
    assert acc["cr_formula"] == pytest.approx(32 * 160 / 80) and header["accounting"]["cr_formula"] == pytest.approx(64.0)


def test_the_cr_formula_weighs_each_layers_bits_by_its_kept_weights():
    """Layers of 2 and 16 levels (1 and 4 bits, as ``adaptive_bits`` leaves them): the formula's
    ``b`` is the kept weights' mean width ``(60 * 1 + 20 * 4) / 80``, not the widest layer's 4."""
    network = CompressedNetwork([_layer("two", (10, 10), 60, 2), _layer("sixteen", (10, 10), 20, 16)], {})
    acc = accounting(network)
    assert [l["bits"] for l in acc["layers"]] == [1, 4] and acc["bits"] == 4
    assert acc["cr_formula"] == pytest.approx(32 * 200 / 140)  # = 32 / ((1 - s) * mean_bits), s = 0.6
    assert acc["mean_bits"] == pytest.approx(140 / 80)


def test_averaged_module_refuses_zero_members():
    result, _ = run()
    with pytest.raises(ValueError, match="num_members must be >= 1, got 0"):
        result.averaged_module(num_members=0)
    assert len(result.averaged_module().member_weights) == result.config.num_averaged


def test_partially_stochastic_predictive_draws_only_the_named_layers():
    """``layers`` draws the named layers as the full predictive does (same draws) and keeps the rest greedy:
    none drawn is the greedy network's softmax; all named is the default predictive."""
    result, x = run()
    greedy, full = result.greedy_module(), result.averaged_module(num_members=3)
    first, last = (layer.name for layer in result.compressed().layers)
    torch.testing.assert_close(result.averaged_module(3, layers=[])(x), torch.softmax(greedy(x), -1))
    torch.testing.assert_close(result.averaged_module(3, layers=[first, last])(x), full(x))
    partial = result.averaged_module(3, layers=[last])
    assert all(list(w) == [last] and torch.equal(w[last], f[last])
               for w, f in zip(partial.member_weights, full.member_weights))
    assert not torch.allclose(partial(x), full(x)) and not torch.allclose(partial(x), torch.softmax(greedy(x), -1))
    with pytest.raises(ValueError, match="not compressed layers"):
        result.averaged_module(3, layers=["nope.weight"])
