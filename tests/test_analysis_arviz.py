"""The ArviZ object: documented groups, variables and shapes, draws that follow q, netCDF round trips."""
import json

import numpy as np
import pytest
import torch
from torch import nn

from sqs_pyro.analysis.arviz_adapter import (DataTreeBackend, InferenceDataBackend, default_backend, load_posterior,
                                             phase_objectives, posterior_summary, save_posterior, scales_provenance,
                                             slug, to_inference_data)
from sqs_pyro.config import SQSConfig
from sqs_pyro.infer import compress

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def result():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(8, 32), nn.ReLU(), nn.Linear(32, 3))
    x = torch.randn(256, 8)
    y = (x[:, 0] > 0).long() + (x[:, 1] > 0).long()
    return compress(net, (x, y), SQSConfig(components=4, sparsity=0.5, epochs=2, batch_size=32, windows="outlier",
                                           log_every=3, mode="sample"), progress=False)


@pytest.fixture(scope="module")
def labels():
    return torch.arange(40) % 3


def test_groups_variables_and_shapes(result, labels):
    data = to_inference_data(result, num_samples=30, weights_per_layer=5, observed={"y": labels, "x": torch.zeros(50, 8)},
                             max_observed=100)
    assert isinstance(default_backend(), InferenceDataBackend)  # arviz 0.x here
    assert set(data.groups()) == {"posterior", "sample_stats", "observed_data"}
    post = data.posterior
    assert slug("0.weight") == "0_weight"
    expected = {f"{kind}_{s}" for s in ("0_weight", "2_weight") for kind in ("w", "gate", "code", "locs", "scales", "mix")}
    assert set(post.data_vars) == expected
    assert post["w_0_weight"].dims == ("chain", "draw", "0_weight_index")
    assert post["w_0_weight"].shape == (1, 30, 5) and post["code_2_weight"].shape == (1, 30, 5)
    assert post["locs_0_weight"].shape == (1, 30, 4) and post["locs_0_weight"].dims[-1] == "0_weight_level"
    idx = post["0_weight_index"].values
    assert idx.size == 5 and np.all(np.diff(idx) > 0) and idx.max() < 256
    assert json.loads(post.attrs["layers"]) == {"0_weight": {"site": "0.weight", "shape": [32, 8]},
                                                "2_weight": {"site": "2.weight", "shape": [3, 32]}}
    layer = result.guide.layers[0]
    np.testing.assert_allclose(post["locs_0_weight"].values[0, 7], layer.locs.detach().numpy(), rtol=1e-6)
    np.testing.assert_allclose(post["mix_0_weight"].values[0, 3], layer.log_mix().detach().exp().numpy(), rtol=1e-5)
    assert np.ptp(post["scales_0_weight"].values, axis=1).max() == 0.0  # point estimates: constant over draws
    stats = data.sample_stats
    rows = [r for r in result.history if "objective" in r]
    assert stats["step"].values.tolist() == [r["step"] for r in rows]
    np.testing.assert_allclose(stats["objective"].values, [r["objective"] for r in rows])
    np.testing.assert_allclose(stats["elbo"].values, [r["elbo"] for r in rows])  # a sampled run: a real ELBO
    assert stats.attrs["objective"] == ", ".join(sorted({r["objective_kind"] for r in rows}))
    phases = json.loads(stats.attrs["phase_objectives"])
    assert phases["posterior"] == ["elbo"] and list(phases) == list(dict.fromkeys(r["phase"] for r in rows))
    assert all(set(kinds) <= {"elbo", "tempered_elbo"} for kinds in phases.values())  # a sampled run
    assert post.attrs["objective_kind"] == result.objective_kind == "elbo+elbo"
    assert post.attrs["scales_and_mix"].startswith("learned from the data in the posterior phase (0.25 epochs")
    np.testing.assert_allclose(stats["data_term"].values, [-r["nll"] for r in rows])
    np.testing.assert_allclose(stats["kl"].values, [r["kl"] for r in rows])
    assert stats["phase"].values.tolist() == [r["phase"] for r in rows] and stats["phase"].values[-1] == "posterior"
    assert list(data.observed_data.data_vars) == ["y"]  # x has 400 values > max_observed
    np.testing.assert_array_equal(data.observed_data["y"].values, labels.numpy())


def test_draws_follow_the_variational_posterior(result):
    name = "0.weight"
    layer = result.guide.layers[0]
    mask = layer.mask.reshape(-1)
    kept, pruned = mask.nonzero().reshape(-1), (~mask).nonzero().reshape(-1)
    chosen = sorted([*kept[:3].tolist(), *pruned[:2].tolist()])
    data = to_inference_data(result, num_samples=4000, indices={name: chosen}, seed=3)
    post = data.posterior
    assert post["0_weight_index"].values.tolist() == chosen
    gate, code, w = (post[f"{k}_0_weight"].values[0] for k in ("gate", "code", "w"))
    # the mask is frozen after training: q's gates are the mask (the same sampler as the averaged predictor)
    np.testing.assert_array_equal(gate, np.broadcast_to(mask[chosen].numpy(), gate.shape))
    phi = result.guide.distributions()[name].phi.detach().reshape(-1, 4)[chosen].numpy()
    freq = np.stack([(code == k).mean(0) for k in range(4)], axis=1)
    assert np.all(np.abs(freq - phi) <= 4 * np.sqrt(phi * (1 - phi) / 4000) + 1e-3)
    assert np.all(w[gate == 0] == 0) and np.all(w[gate == 1] != 0)
    locs, scales = layer.locs.detach().numpy(), layer.scales.detach().numpy()
    z = (w[gate == 1] - locs[code[gate == 1]]) / scales[code[gate == 1]]
    assert abs(z.mean()) < 0.1 and abs(z.std() - 1) < 0.1
    again = to_inference_data(result, num_samples=4000, indices={name: chosen}, seed=3)
    np.testing.assert_array_equal(again.posterior["w_0_weight"].values, w[None])
    with pytest.raises(ValueError):
        to_inference_data(result, indices={name: [mask.numel()]})


@pytest.mark.parametrize("backend", [InferenceDataBackend(), DataTreeBackend()], ids=["InferenceData", "DataTree"])
def test_netcdf_round_trip(result, labels, tmp_path, backend):
    data = to_inference_data(result, num_samples=20, weights_per_layer=6, observed={"y": labels}, backend=backend)
    path = save_posterior(data, tmp_path / "posterior.nc", backend)
    assert path.is_file() and not list(tmp_path.glob(".posterior.nc.*"))  # no temp file left
    back = load_posterior(path, backend)
    assert sorted(backend.group_names(back)) == ["observed_data", "posterior", "sample_stats"]
    for group in ("posterior", "sample_stats", "observed_data"):
        a, b = backend.group(data, group), backend.group(back, group)
        assert a.equals(b), group
        assert a.attrs == b.attrs
    assert backend.group(back, "posterior")["gate_0_weight"].dtype == np.int8


def test_summary_has_statistics_but_no_chain_diagnostics(result):
    data = to_inference_data(result, num_samples=200, weights_per_layer=4)
    table = posterior_summary(data, ["w_2_weight", "locs_2_weight"])
    assert len(table) == 4 + 4
    assert {"mean", "sd"} <= set(table.columns) and "r_hat" not in table.columns
    locs = result.guide.layers[1].locs.detach().numpy()
    np.testing.assert_allclose(table.loc[[f"locs_2_weight[{k}]" for k in range(4)], "mean"], locs, atol=1e-3)
    assert (table.loc[[f"locs_2_weight[{k}]" for k in range(4)], "sd"] == 0).all()


def test_attrs_say_where_the_scales_come_from():
    assert scales_provenance(SQSConfig(posterior_epochs=0)).startswith("not fitted to the data")
    assert "tempered ELBO, beta = 0.1" in scales_provenance(SQSConfig(posterior_epochs=1, posterior_kl_weight=0.1))
    history = [{"phase": "warmup", "objective_kind": "surrogate"}, {"phase": "warmup"},
               {"phase": "prune", "objective_kind": "surrogate"}, {"phase": "posterior", "objective_kind": "elbo"},
               {"phase": "posterior", "objective_kind": "elbo"}]
    assert phase_objectives(history) == {"warmup": ["surrogate"], "prune": ["surrogate"], "posterior": ["elbo"]}
