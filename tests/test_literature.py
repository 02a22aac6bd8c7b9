"""The literature protocol's pieces: the papers' weight countings (closed forms on hand-made masks),
the literature recipe of the reference LeNets and its cache name, and the grid key it changes."""
import math

import pytest
import torch

from sqs_pyro.compressed.materialize import CompressedLayer, CompressedNetwork
from sqs_pyro.errors import SQSInputError
from sqs_pyro.experiments.ablation import expand_grid, parse_grid
from sqs_pyro.experiments.literature import (bc_layer_bits, dc_layer_bits, huffman_bits, huffman_lengths,
                                             paper_counts, relative_entries)
from sqs_pyro.experiments.workloads import LITERATURE, LeNet300, Recipe, train_reference


def layer(mask: torch.Tensor, components: int = 4, codes: torch.Tensor | None = None) -> CompressedLayer:
    codes = torch.zeros(mask.shape, dtype=torch.long) if codes is None else codes
    return CompressedLayer("w", tuple(mask.shape), mask, codes, torch.linspace(-1, 1, components),
                           torch.zeros(components, dtype=torch.long))


def test_huffman_lengths_closed_form():
    assert huffman_lengths({"a": 1, "b": 1, "c": 2}) == {"a": 2, "b": 2, "c": 1}
    assert huffman_lengths({"x": 7}) == {"x": 1}  # one symbol still takes a bit
    assert huffman_bits("aaaabbc") == 4 * 1 + 2 * 2 + 1 * 2
    # Kraft equality of a full binary tree, and never worse than the fixed width
    counts = {i: c for i, c in enumerate([50, 20, 10, 5, 5, 5, 3, 2])}
    lengths = huffman_lengths(counts)
    assert sum(2.0 ** -l for l in lengths.values()) == pytest.approx(1.0)
    assert sum(counts[s] * lengths[s] for s in counts) < 3 * sum(counts.values())


def test_relative_entries_bridge_long_gaps_with_fillers():
    mask = torch.zeros(30, dtype=torch.bool)
    mask[[0, 3, 20]] = True
    index, kept = relative_entries(mask, 3)  # a 3-bit index spans gaps up to 8
    assert index == [1, 3, 8, 8, 1] and kept == [1, 1, 0, 0, 1]
    assert sum(index) == 21  # the entries' gaps add up to the last kept position + 1
    index, kept = relative_entries(mask, 5)  # 32 spans every gap: no filler
    assert index == [1, 3, 17] and kept == [1, 1, 1]


def test_dc_fixed_width_bits_closed_form():
    mask = torch.zeros(64, dtype=torch.bool)
    mask[[5, 40]] = True  # gaps 6 and 35
    bits = dc_layer_bits(layer(mask), huffman=False)
    width = 3  # ceil(log2(4 + 1)): 4 levels and the fillers' zero
    per_r = {r: (2 + sum(math.ceil(g / 2 ** r) - 1 for g in (6, 35))) * (r + width) for r in range(1, 9)}
    assert bits == min(per_r.values()) + 32 * 4
    assert bits != per_r[5] + 32 * 4  # the chosen width beats Deep Compression's fixed 5 bits here


def test_dc_huffman_never_exceeds_fixed_width():
    torch.manual_seed(0)
    mask = torch.rand(40, 50) < 0.05
    codes = torch.randint(0, 4, mask.shape)
    lay = layer(mask, codes=codes)
    assert dc_layer_bits(lay, huffman=True) <= dc_layer_bits(lay, huffman=False)


def test_bc_count_drops_empty_rows_and_columns():
    mask = torch.zeros(6, 8, dtype=torch.bool)
    mask[1, 2] = mask[4, 2] = mask[4, 7] = True  # rows {1, 4}, columns {2, 7}: a 2 x 2 block survives
    assert bc_layer_bits(layer(mask)) == 2 * 2 * 3 + 32 * 4
    conv = torch.zeros(3, 2, 5, 5, dtype=torch.bool)  # as (A B, C D) = (6, 25)
    conv[0, 1, 2, 2] = True
    assert bc_layer_bits(layer(conv)) == 1 * 1 * 3 + 32 * 4


def test_paper_counts_ratio_and_monotone_in_sparsity():
    torch.manual_seed(0)
    dense = torch.ones(100, 100, dtype=torch.bool)
    sparse = torch.rand(100, 100) < 0.02
    full = paper_counts(CompressedNetwork([layer(dense)], {}, {}))
    assert full["cr_bc"] == pytest.approx(32 * 10_000 / (10_000 * 3 + 128))
    thin = paper_counts(CompressedNetwork([layer(sparse)], {}, {}))
    assert thin["cr_dc"] > 5 * full["cr_dc"] and thin["cr_dc_huffman"] >= thin["cr_dc"]


def test_recipe_tag_keeps_the_short_name_and_spells_the_literature_recipe():
    assert Recipe(4).tag() == "epochs4"  # the grids' caches keep their names
    tags = {Recipe(4).tag(), LITERATURE["lenet300"].tag(), LITERATURE["lenet5"].tag(),
            Recipe(40, cosine=True, weight_decay=1e-3).tag()}
    assert len(tags) == 4 and "cos" in LITERATURE["lenet5"].tag()


def test_literature_recipe_training_is_deterministic_per_seed():
    x, y = torch.randn(256, 1, 28, 28), torch.randint(0, 10, (256,))
    recipe = Recipe(1, lr=1e-2, batch_size=64, cosine=True, weight_decay=1e-4)
    nets = []
    for _ in range(2):
        torch.manual_seed(0)
        nets.append(train_reference(LeNet300(), (x, y), 0, seed=3, recipe=recipe))
    for a, b in zip(nets[0].state_dict().values(), nets[1].state_dict().values()):
        assert torch.equal(a, b)
    torch.manual_seed(0)
    other = train_reference(LeNet300(), (x, y), 0, seed=4, recipe=recipe)
    assert not torch.equal(other.state_dict()["net.1.weight"], nets[0].state_dict()["net.1.weight"])


def test_reference_recipe_changes_the_key_and_rejects_unknown():
    raw = {"output": "out.jsonl", "workloads": ["lenet300"], "methods": ["sqs"], "sparsity": [0.9],
           "components": [4], "seeds": [0]}
    short = expand_grid(parse_grid(raw))[0].key
    assert expand_grid(parse_grid({**raw, "reference_recipe": "short"}))[0].key == short
    assert expand_grid(parse_grid({**raw, "reference_recipe": "literature"}))[0].key != short
    with pytest.raises(SQSInputError, match="reference_recipe"):
        parse_grid({**raw, "reference_recipe": "long"})
