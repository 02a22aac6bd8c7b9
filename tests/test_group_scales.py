"""Group-scaled codebooks and exact (dense-and-sparse) weights: closed forms, file round trips, accounting."""
import pytest
import torch
from torch import nn

from sqs_pyro.cli import main
from sqs_pyro.compressed import CompressedLayer, CompressedNetwork, accounting
from sqs_pyro.compressed.oneshot import quantize_layer, quantize_network
from sqs_pyro.models.group_scales import group_absmax
from sqs_pyro.errors import CompressedFileError, SQSInputError
from sqs_pyro.format import load_compressed, read_header, save_compressed
from sqs_pyro.models import select_layers


def planted_weight() -> torch.Tensor:
    """Rows of 8 values on a 4-level grid times a per-group scale (G = 4), plus two huge outliers."""
    g = torch.Generator().manual_seed(0)
    levels = torch.tensor([-1.0, -0.25, 0.25, 1.0])
    scales = torch.tensor([[0.5, 2.0], [0.125, 1.0], [4.0, 0.25]])
    codes = torch.randint(0, 4, (3, 8), generator=g)
    codes[:, 0], codes[:, 4] = 0, 3  # every group reaches +-1: its absmax is its scale
    w = levels[codes] * scales.repeat_interleave(4, dim=1)
    w[1, 2], w[2, 7] = 60.0, -45.0  # super weights
    return w


def test_group_absmax_closed_form():
    w = torch.tensor([[1.0, -3.0, 2.0, 0.5, 0.0], [0.0, 0.0, 0.0, -7.0, 1.0]])
    torch.testing.assert_close(group_absmax(w, 2).float(),
                               torch.tensor([[3.0, 2.0, 0.0], [0.0, 7.0, 1.0]]).clamp_min(
                                   torch.finfo(torch.float16).tiny))


def test_planted_grid_is_recovered_exactly_with_scales_and_exact_outliers():
    w = planted_weight()
    layer = quantize_layer("w", w, components=4, group_size=4, exact=2)
    torch.testing.assert_close(layer.weight(), w.to(torch.float16).float(), atol=1e-6, rtol=0)
    assert layer.exact_index.tolist() == [1 * 8 + 2, 2 * 8 + 7] and not layer.mask.reshape(-1)[layer.exact_index].any()
    # negative controls: without the exact weights or without group scales the grid is lost
    assert (quantize_layer("w", w, 4, 4, exact=0).weight() - w).abs().max() > 1.0
    assert (quantize_layer("w", w, 4, 0, exact=2).weight() - w).abs().max() > 0.1
    acc = accounting(CompressedNetwork([layer], {}))
    entry = acc["layers"][0]
    assert entry["exact"] == 2 and entry["nnz"] == 22 and entry["density"] == 1.0
    assert entry["side_bytes"] == 2 * 6 + 2 * 6  # 6 fp16 scales, 2 x (u32 position + fp16 value)
    assert entry["side_bits_per_weight"] == pytest.approx(8 * 24 / 24)


def test_file_round_trip_is_exact_and_inspect_shows_the_side_data(tmp_path, capsys):
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(40, 24), nn.ReLU(), nn.Linear(24, 6))
    network = quantize_network(net, select_layers(net), components=16, group_size=16, exact=3)
    path = tmp_path / "g.sqs"
    size = save_compressed(network, path, model=net)
    header = read_header(path)
    assert header["format_version"] == 4
    save_compressed(network, tmp_path / "old.sqs", model=net, compact=False)
    assert read_header(tmp_path / "old.sqs")["format_version"] == 2
    assert [(e["group_size"], e["exact"]) for e in header["layers"]] == [(16, 3), (16, 3)]
    back = load_compressed(path)
    for a, b in zip(back.layers, network.layers):
        assert torch.equal(a.weight(), b.weight())
        assert torch.equal(a.scales, b.scales) and torch.equal(a.exact_index, b.exact_index)
    filled = load_compressed(path, model=nn.Sequential(nn.Linear(40, 24), nn.ReLU(), nn.Linear(24, 6)))
    assert torch.equal(filled[0].weight, network.layers[0].weight())
    # an ordinary file stays version 1
    plain = CompressedNetwork([CompressedLayer("w", (4,), torch.ones(4, dtype=torch.bool), torch.zeros(4, dtype=torch.long),
                                               torch.ones(2), torch.zeros(2, dtype=torch.long))], {})
    save_compressed(plain, tmp_path / "p.sqs", compact=False)
    assert read_header(tmp_path / "p.sqs")["format_version"] == 1
    assert main(["inspect", str(path)]) == 0
    out = capsys.readouterr().out
    assert "exact" in out and "group" in out
    assert size == path.stat().st_size
    rows = quantize_network(net, select_layers(net), components=16, group_size=1 << 30, exact=0)
    save_compressed(rows, tmp_path / "rows.sqs", model=net)
    assert main(["inspect", str(tmp_path / "rows.sqs")]) == 0
    table = [line.split() for line in capsys.readouterr().out.splitlines() if line.startswith(("0.weight", "2.weight"))]
    assert [line[9] for line in table] == ["row", "row"]  # one scale per output row, shown as such
    assert [line[9] for line in (l.split() for l in out.splitlines() if l.startswith("0.weight"))] == ["16"]


def test_bad_side_data_is_refused(tmp_path):
    w = planted_weight()
    layer = quantize_layer("w", w, components=4, group_size=4, exact=2)
    layer.scales = layer.scales.float()
    with pytest.raises(SQSInputError, match="float16 scales"):
        save_compressed(CompressedNetwork([layer], {}), tmp_path / "x.sqs")
    layer = quantize_layer("w", w, components=4, group_size=4, exact=2)
    layer.mask.reshape(-1)[layer.exact_index[0]] = True
    with pytest.raises(SQSInputError, match="outside the mask"):
        save_compressed(CompressedNetwork([layer], {}), tmp_path / "x.sqs")
    good = quantize_layer("w", w, components=4, group_size=4, exact=2)
    path = tmp_path / "g.sqs"
    save_compressed(CompressedNetwork([good], {}), path)
    data = bytearray(path.read_bytes())
    data[-5] ^= 0xFF  # inside the exact values: the payload checksum catches it
    path.write_bytes(bytes(data))
    with pytest.raises(CompressedFileError, match="checksum"):
        load_compressed(path)


def sparse_grouped_network() -> CompressedNetwork:
    """A (6, 10) layer, G = 4 (3 groups per row, the last of 2 values): rows 1 and 4 empty, group 1 of row 0
    empty, and two exact weights in empty groups (they need no scale)."""
    g = torch.Generator().manual_seed(3)
    mask = torch.rand(6, 10, generator=g) < 0.6
    mask[1], mask[4], mask[0, 4:8] = False, False, False
    mask[2] = True  # occupied groups everywhere else
    codes = torch.where(mask, torch.randint(0, 4, (6, 10), generator=g), 0)
    scales = (torch.rand(6, 3, generator=g) + 0.5).half()
    layer = CompressedLayer("w", (6, 10), mask, codes, torch.tensor([-1.0, -0.3, 0.2, 1.0]),
                            torch.zeros(4, dtype=torch.long), 4, scales, torch.tensor([12, 45]),
                            torch.tensor([3.0, -2.5]).half())
    return CompressedNetwork([layer], {"b": torch.ones(6)})


def test_compact_file_stores_only_the_scales_of_occupied_groups(tmp_path, monkeypatch):
    from sqs_pyro.format import container
    from sqs_pyro.models.group_scales import occupied_groups
    network = sparse_grouped_network()
    layer = network.layers[0]
    occupied = occupied_groups(layer.mask.reshape(-1).numpy(), 6, 4)
    by_hand = torch.stack([layer.mask[:, 0:4].any(1), layer.mask[:, 4:8].any(1), layer.mask[:, 8:10].any(1)], 1)
    assert torch.equal(torch.from_numpy(occupied), by_hand) and int(by_hand.sum()) == 18 - 7
    compact, plain = tmp_path / "c.sqs", tmp_path / "p.sqs"
    save_compressed(network, compact)
    save_compressed(network, plain, compact=False)
    entry = read_header(compact)["layers"][0]
    assert entry["scaled_groups"] == 11 and "scaled_groups" not in read_header(plain)["layers"][0]
    assert read_header(compact)["payload_bytes"] == read_header(plain)["payload_bytes"] - 2 * 7
    back = load_compressed(compact).layers[0]
    assert torch.equal(back.weight(), layer.weight())  # the same weights, exact weights included
    assert torch.equal(back.scales[by_hand], layer.scales[by_hand]) 
    assert (back.scales[~by_hand] == torch.finfo(torch.float16).tiny).all()  # as group_absmax gives a zero group
    # negative control: a writer that drops one occupied group's scale is caught against the decoded mask
    real = container.occupied_groups

    def one_short(mask, rows, group_size):
        out = real(mask, rows, group_size)
        out[2, 0] = False
        return out
    monkeypatch.setattr(container, "occupied_groups", one_short)
    save_compressed(network, tmp_path / "bad.sqs")
    monkeypatch.setattr(container, "occupied_groups", real)
    with pytest.raises(CompressedFileError, match="10 scales stored, but the mask occupies 11 groups"):
        load_compressed(tmp_path / "bad.sqs")
