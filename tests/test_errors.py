"""Bad input gets a clear error before any work."""
import json

import pytest
import torch
from torch import nn

from sqs_pyro import SQSConfig, SQSInputError
from sqs_pyro.svi import compress


def net_and_data():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3)), torch.randn(64, 4), torch.randint(0, 3, (64,))


@pytest.mark.parametrize("kwargs, message", [
    ({"components": 1}, "components"),
    ({"sparsity": 1.0}, "sparsity"),
    ({"sparsity": -0.1}, "sparsity"),
    ({"windows": "bogus"}, "windows"),
    ({"prior_inclusion": 0.0}, "prior_inclusion"),
    ({"slab_weights": (0.5, 0.6), "slab_locs": (0, 0), "slab_scales": (1, 1)}, "slab_weights"),
    ({"warmup_fraction": 0.8, "prune_fraction": 0.5}, "warmup_fraction"),
])
def test_bad_config_values(kwargs, message):
    with pytest.raises(SQSInputError, match=message):
        SQSConfig(**kwargs)


def test_config_from_dict_rejects_unknown_keys_and_wrong_types():
    with pytest.raises(SQSInputError, match="unknown config keys"):
        SQSConfig.from_dict({"sparsity": 0.5, "sparsty": 0.5})
    with pytest.raises(SQSInputError, match="must be an integer"):
        SQSConfig.from_dict({"components": "16"})
    assert SQSConfig.from_dict(json.loads('{"slab_scales": [2.0]}')).slab_scales == (2.0,)


def test_no_selectable_layers():
    _, x, y = net_and_data()
    with pytest.raises(SQSInputError, match="no selectable layers"):
        compress(nn.Sequential(nn.Flatten()), (x, y), progress=False)
    net, _, _ = net_and_data()
    with pytest.raises(SQSInputError, match="no selectable layers"):
        compress(net, (x, y), SQSConfig(exclude=(".*",)), progress=False)


def test_nan_or_inf_weights():
    net, x, y = net_and_data()
    with torch.no_grad():
        net[2].weight[0, 0] = float("nan")
    with pytest.raises(SQSInputError, match="NaN or Inf"):
        compress(net, (x, y), progress=False)
    net, x, y = net_and_data()
    with torch.no_grad():
        net[0].bias[0] = float("inf")
    with pytest.raises(SQSInputError, match="0.bias contains NaN or Inf"):
        compress(net, (x, y), progress=False)


def test_labels_out_of_range_and_wrong_types():
    net, x, y = net_and_data()
    with pytest.raises(SQSInputError, match="labels out of range"):
        compress(net, (x, y + 1), progress=False)
    with pytest.raises(SQSInputError, match="labels out of range"):
        compress(net, (x, y - 1), progress=False)
    with pytest.raises(SQSInputError, match="integer labels"):
        compress(net, (x, y.float()), progress=False)


def test_bad_data():
    net, x, y = net_and_data()
    with pytest.raises(SQSInputError, match="differ in length"):
        compress(net, (x, y[:10]), progress=False)
    with pytest.raises(SQSInputError, match="empty"):
        compress(net, (x[:0], y[:0]), progress=False)
    bad = x.clone()
    bad[3, 1] = float("nan")
    with pytest.raises(SQSInputError, match="NaN or Inf"):
        compress(net, (bad, y), progress=False)
    with pytest.raises(SQSInputError, match="cannot process"):
        compress(net, (torch.randn(64, 5), y), progress=False)
    with pytest.raises(SQSInputError, match="batch_size"):
        compress(net, (x, y), SQSConfig(batch_size=1000), progress=False)
    with pytest.raises(SQSInputError, match="task"):
        compress(net, (x, y), task="ranking", progress=False)
