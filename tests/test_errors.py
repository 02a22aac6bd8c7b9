"""Bad input gets a clear error before any work; the config reads as a reference."""
import dataclasses
import inspect
import json
import re

import pytest
import torch
from torch import nn

from sqs_pyro import SQSConfig, SQSInputError
from sqs_pyro.infer import compress


def net_and_data():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3)), torch.randn(64, 4), torch.randint(0, 3, (64,))


@pytest.mark.parametrize("kwargs, message", [
    ({"components": 1}, "components"),
    ({"sparsity": 1.0}, "sparsity"),
    ({"sparsity": -0.1}, "sparsity"),
    ({"windows": "bogus"}, "windows"),
    ({"prior_inclusion": 0.0}, "prior_inclusion"),
    ({"slab_scale": 0.0}, "slab_scale must be > 0"),
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
    assert SQSConfig.from_dict(json.loads('{"gate_temperature": [2.0, 1]}')).gate_temperature == (2.0, 1.0)
    assert SQSConfig.from_dict(json.loads('{"slab_scale": 2}')).slab_scale == 2.0


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


@pytest.mark.parametrize("values, message", [
    ({"epochs": float("inf")}, "'epochs' must be a finite number"),
    ({"kl_weight": float("nan")}, "'kl_weight' must be a finite number"),
    ({"sparsity": True}, "'sparsity' must be a finite number"),
    ({"gate_temperature": ["wide", 1.0]}, "'gate_temperature' must be a tuple .* of finite numbers"),
    ({"include_types": "linear"}, "'include_types' must be a tuple"),
    ({"gate_temperature": [1.0]}, "'gate_temperature' must have 2 entries"),
    ({"include": ["conv("]}, "include pattern 'conv\\(' is not a valid regular expression"),
    ({"seed": -1}, "seed must lie in"),
    ({"slab_scale": "wide"}, "'slab_scale' must be a finite number"),
    ({"batch_size": 0}, "batch_size must be a positive integer"),
])
def test_config_values_of_wrong_type_or_out_of_range(values, message):
    with pytest.raises(SQSInputError, match=message):
        SQSConfig.from_dict(values)


def test_config_must_be_a_mapping_or_sqsconfig():
    with pytest.raises(SQSInputError, match="must be a mapping"):
        SQSConfig.from_dict([("sparsity", 0.5)])
    net, x, y = net_and_data()
    with pytest.raises(SQSInputError, match="config must be an SQSConfig"):
        compress(net, (x, y), {"sparsity": 0.5}, progress=False)


@pytest.mark.parametrize("text, message", [
    (None, "cannot read config file"),
    ("{'sparsity': 0.5}", "is not valid JSON"),
    ('[["sparsity", 0.5]]', "must hold a JSON object"),
    ('{"sparsty": 0.5}', "unknown config keys: \\['sparsty'\\]"),
    ('{"components": "16"}', "'components' must be an integer"),
    ('{"sparsity": 1.5}', "sparsity must lie in \\[0, 1\\)"),  # not hidden by the --sparsity default
    ('{"epochs": NaN}', "'epochs' must be a finite number"),
])
def test_cli_config_file_errors(tmp_path, capsys, text, message):
    from sqs_pyro.cli import main

    path = tmp_path / "config.json"
    if text is not None:
        path.write_text(text)
    assert main(["compress", "--config", str(path), "--out", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("sqs-pyro: error:") and err.count("\n") == 1
    assert re.search(message, err)


def test_cli_config_file_values_are_used_and_options_win(tmp_path):
    from sqs_pyro.cli import build_parser
    from sqs_pyro.cli.compress import config_from_args

    path = tmp_path / "config.json"
    path.write_text('{"sparsity": 0.9, "components": 4, "lr_gates": 0.02}')
    config = config_from_args(build_parser().parse_args(["compress", "--config", str(path), "-K", "8"]))
    assert (config.sparsity, config.components, config.lr_gates, config.epochs) == (0.9, 8, 0.02, 3.0)


@pytest.mark.parametrize("argv, message", [
    (["--train-limit", "-5"], "--train-limit: must be a positive integer"),
    (["--test-limit", "0"], "--test-limit: must be a positive integer"),
    (["--checkpoint-every", "-1"], "--checkpoint-every: must be an integer >= 0"),
    (["--epochs", "three"], "--epochs: invalid float value"),
    (["--windows", "bogus"], "--windows: invalid choice"),
])
def test_cli_argument_errors(capsys, argv, message):
    from sqs_pyro.cli import main

    with pytest.raises(SystemExit) as exc:
        main(["compress", *argv])
    assert exc.value.code == 2 and message in capsys.readouterr().err


def test_cli_output_and_resume_errors_before_loading_anything(tmp_path, capsys):
    from sqs_pyro.cli import main

    not_a_folder = tmp_path / "file"
    not_a_folder.write_text("x")
    assert main(["compress", "--out", str(not_a_folder)]) == 2
    assert "exists and is not a folder" in capsys.readouterr().err
    assert main(["compress", "--resume", "--out", str(tmp_path / "empty")]) == 2
    assert "--resume: no checkpoint at" in capsys.readouterr().err


def test_target_shapes_and_example_types():
    net, x, y = net_and_data()
    with pytest.raises(SQSInputError, match=r"targets of shape \(64, 1\) do not match the network's logits"):
        compress(net, (x, y[:, None]), progress=False)
    with pytest.raises(SQSInputError, match=r"regression targets of shape \(64,\) do not match .* \(2, 3\)"):
        compress(net, (x, torch.randn(64)), task="regression", progress=False)

    class Triples(torch.utils.data.Dataset):
        def __len__(self):
            return 64

        def __getitem__(self, i):
            return x[i], y[i], i

    # (inputs..., target): the network is asked to take two inputs (x, y) and cannot
    with pytest.raises(SQSInputError, match=r"cannot process the train inputs of shapes \(1, 4\), \(1,\)"):
        compress(net, Triples(), progress=False)


def test_only_unsupported_layers():
    class Recurrent(nn.Module):
        def __init__(self):
            super().__init__()
            self.embed, self.rnn = nn.Embedding(10, 4), nn.GRU(4, 4, batch_first=True)

        def forward(self, tokens):
            return self.rnn(self.embed(tokens))[0][:, -1]

    with pytest.raises(SQSInputError, match="no selectable layers in Recurrent"):
        compress(Recurrent(), (torch.randint(0, 10, (64, 5)), torch.randint(0, 4, (64,))), progress=False)


def test_tied_weights():
    class TiedLM(nn.Module):
        def __init__(self):
            super().__init__()
            self.embed, self.head = nn.Embedding(3, 4), nn.Linear(4, 3, bias=False)
            self.head.weight = self.embed.weight

        def forward(self, tokens):
            return self.head(self.embed(tokens))

    tokens, labels = torch.randint(0, 3, (64,)), torch.randint(0, 3, (64,))
    with pytest.raises(SQSInputError, match=r"head.weight is shared with embed.weight \(tied weights\)"):
        compress(TiedLM(), (tokens, labels), progress=False)
    shared = nn.Linear(4, 4)
    net = nn.Sequential(nn.Linear(4, 4), shared, nn.ReLU(), shared, nn.Linear(4, 3))
    _, x, y = net_and_data()
    with pytest.raises(SQSInputError, match=r"1.weight is shared with 3.weight"):
        compress(net, (x, y), progress=False)


def test_frozen_parameters():
    net, x, y = net_and_data()
    net[2].weight.requires_grad_(False)
    with pytest.raises(SQSInputError, match=r"weight 2.weight is frozen \(requires_grad=False\)"):
        compress(net, (x, y), progress=False)
    # frozen tensors that are not compressed (here a bias) stay frozen and unchanged
    net, x, y = net_and_data()
    net[0].bias.requires_grad_(False)
    config = SQSConfig(components=4, sparsity=0.5, epochs=2, batch_size=32, lr_dense=1e-2)
    state = compress(net, (x, y), config, progress=False).compressed().state_dict()
    assert torch.equal(state["0.bias"], net[0].bias) and not torch.equal(state["2.bias"], net[2].bias)


def test_bad_run_options(tmp_path):
    net, x, y = net_and_data()
    with pytest.raises(SQSInputError, match="checkpoint_every must be an integer >= 0"):
        compress(net, (x, y), progress=False, checkpoint_every=-1)
    with pytest.raises(SQSInputError, match="max_rollbacks"):
        compress(net, (x, y), progress=False, max_rollbacks=1.5)
    (tmp_path / "file").write_text("x")
    with pytest.raises(SQSInputError, match="is not a folder"):
        compress(net, (x, y), progress=False, checkpoint_dir=tmp_path / "file")
    with pytest.raises(SQSInputError, match="must be a torch.nn.Module"):
        compress(lambda t: t, (x, y), progress=False)


def test_every_config_field_is_documented_in_one_line_under_its_heading():
    """``SQSConfig`` reads as a reference: each field one line with its comment, grouped under the
    headings prior, guide, schedule, optimisation, read-out and runtime."""
    source = inspect.getsource(SQSConfig).splitlines()
    headings = [line.split("---")[1].split(":")[0].strip() for line in source if line.strip().startswith("# ---")]
    assert headings == ["prior", "guide", "schedule", "optimisation", "read-out", "runtime"]
    for field in dataclasses.fields(SQSConfig):
        line = next(line for line in source if line.startswith(f"    {field.name}: "))
        assert "  # " in line and len(line.split("  # ")[1]) > 20, field.name
