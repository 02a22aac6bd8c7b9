"""The one-shot quantiser's memory-lean paths give the values of their plain forms: GPTQ against a
column-by-column reference, with the error update in chunks of rows and the exact weights' values
written where their column is reached; the group peaks without a copy of |w|; the coding in chunks;
the chunked top-k against torch.topk among ties; the k-means without full-size copies against today's
centres; and the file of one-shot layers over every path against today's bytes (SHA-256 planted from
main 85c3d49, before the chunked top-k, normalising and k-means)."""
import hashlib
import tracemalloc

import numpy as np
import pytest
import torch

import sqs_pyro.compressed.error_feedback as error_feedback
import sqs_pyro.compressed.oneshot as oneshot
import sqs_pyro.compressed.topk as topk
import sqs_pyro.guides.kmeans as kmeans
from sqs_pyro.compressed.error_feedback import feedback_quantize
from sqs_pyro.compressed.materialize import CompressedNetwork
from sqs_pyro.compressed.oneshot import quantize_layer
from sqs_pyro.compressed.topk import top_indices
from sqs_pyro.format.container import encode_file
from sqs_pyro.guides.kmeans import kmeans_1d, kmeans_codebook
from sqs_pyro.models.group_scales import group_absmax
from test_format_memory import _hash

# main 85c3d49: the sha256 of encode_file of planted_layers(), and of the float64 bytes of the k-means
# centres of kmeans_inputs()
PLANTED_FILE = "fc1af7e97ce42b4ef682eb6830f21e3b3edfb738849748eac2ed9a1743e35779"
PLANTED_CENTRES = "492eaf76a22f3a202beae84c811a0d2f2cd002d97202baafd9fd01f5980b0c16"


def reference_gptq(w: torch.Tensor, h: torch.Tensor, levels: torch.Tensor, exact: torch.Tensor, damp: float):
    """Column by column GPTQ on one codebook, no scales, natural order: ``(codes, coded values)``."""
    h = h.double() + damp * h.diagonal().mean() * torch.eye(len(h), dtype=torch.float64)
    u = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(h)), upper=True)
    w = w.double().clone()
    codes = torch.zeros(w.shape, dtype=torch.long)
    coded = torch.zeros_like(w)
    for c in range(w.shape[1]):
        code = torch.bucketize(w[:, c].float(), (levels[1:] + levels[:-1]) / 2)
        q = torch.where(exact[:, c], w[:, c].half().double(), levels[code].double())
        codes[:, c], coded[:, c] = code, q
        w[:, c:] -= ((w[:, c] - q) / u[c, c])[:, None] * u[c, c:][None, :]
    return codes, coded


@pytest.mark.parametrize("row_chunk", [2, 4096])
def test_feedback_matches_column_by_column_gptq_with_exact_weights(monkeypatch, row_chunk):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(400, 12, generator=g) @ (torch.eye(12) + 0.4 * torch.randn(12, 12, generator=g))
    h = x.T @ x / 400
    w = torch.randn(7, 12, generator=g)
    monkeypatch.setattr(error_feedback, "ROW_CHUNK", row_chunk)
    layer = feedback_quantize(quantize_layer("w", w, 6, 0, exact=5), w, h, damp=0.01, block=4, act_order=False)
    exact = ~layer.mask
    assert int(exact.sum()) == 5
    codes, coded = reference_gptq(w, h, layer.codebook, exact, 0.01)
    assert torch.equal(layer.codes[layer.mask], codes[layer.mask])
    # the exact weights hold their error-fed values (not the given ones), at their sorted positions
    torch.testing.assert_close(layer.exact_values.float(), coded.reshape(-1)[layer.exact_index].float(),
                               rtol=0, atol=2e-3)
    assert not torch.allclose(layer.exact_values.float(), w.reshape(-1)[layer.exact_index], atol=1e-2)
    torch.testing.assert_close(layer.weight().double(), coded, rtol=0, atol=2e-3)


def test_group_peaks_without_a_copy_equal_group_absmax():
    w = torch.randn(6, 32, generator=torch.Generator().manual_seed(1))
    w[2, :8] = 0.0  # an all-zero group: the smallest normal fp16 value
    w[3, 8:16] = -torch.arange(8.0)  # a group whose peak is negative
    assert torch.equal(oneshot._group_absmax(w, 8), group_absmax(w, 8))
    assert oneshot._group_absmax(w, 8)[3, 1] == 7.0
    odd = torch.randn(4, 30, generator=torch.Generator().manual_seed(2))  # groups do not tile: the general path
    assert torch.equal(oneshot._group_absmax(odd, 8), group_absmax(odd, 8))


@pytest.mark.parametrize("weighted", [False, True])
def test_chunked_coding_is_nearest_level_coding(monkeypatch, weighted):
    w = torch.randn(16, 64, generator=torch.Generator().manual_seed(3))
    energy = torch.rand(64, generator=torch.Generator().manual_seed(4)) + 0.1 if weighted else None
    monkeypatch.setattr(oneshot, "CHUNK", 100)
    layer = quantize_layer("w", w, 8, 16, exact=4, input_energy=energy)
    u = w / layer.scales.float().repeat_interleave(16, 1)
    levels = layer.codebook
    nearest = torch.bucketize(u, (levels[1:] + levels[:-1]) / 2)
    assert torch.equal(layer.codes[layer.mask].long(), nearest[layer.mask])
    assert (layer.codes[~layer.mask] == 0).all() and int((~layer.mask).sum()) == 4
    monkeypatch.setattr(oneshot, "CHUNK", 1 << 20)
    assert torch.equal(quantize_layer("w", w, 8, 16, exact=4, input_energy=energy).codes, layer.codes)


def lowest_index_ties(x: torch.Tensor, k: int) -> torch.Tensor:
    """The k largest, ties at the k-th value broken by the lowest index (not torch.topk's rule)."""
    least = torch.topk(x, k).values[-1]
    above, tied = (x > least).nonzero().squeeze(1), (x == least).nonzero().squeeze(1)
    return torch.cat([above, tied[:k - above.numel()]])


def tied_scores(seed: int) -> torch.Tensor:
    """3000 scores on 4 values, 10 larger ones late (each evicts one of many tied values) and a NaN."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(0, 3, (3000,), generator=g).float()
    x[torch.randint(16, 3000, (10,), generator=g)] = 3.0
    x[torch.randint(0, 3000, (2,), generator=g)] = -3.0
    if seed % 2:
        x[int(torch.randint(0, 3000, (1,), generator=g))] = float("nan")
    return x


@pytest.mark.parametrize("chunk", [97, 1000])
def test_chunked_top_k_picks_torch_topks_indices_among_ties(monkeypatch, chunk):
    monkeypatch.setattr(topk, "TOPK_CHUNK", chunk)
    differs = 0
    for seed in range(40):
        x = tied_scores(seed)
        assert torch.equal(top_indices(x, 16, lambda v: v), torch.topk(x, 16).indices)
        assert torch.equal(top_indices(x, 16), torch.topk(x.abs(), 16).indices)  # |x|: the -3s join the ties
        assert torch.equal(top_indices(x, 60), torch.topk(x.abs(), 60).indices)  # 60 * 64 > n: torch.topk itself
        differs += set(lowest_index_ties(x, 16).tolist()) != set(torch.topk(x, 16).indices.tolist())
    assert differs == 40  # negative control: the plain tie rule picks other indices on these inputs


def kmeans_inputs() -> list:
    """Float32 values with ties, a NaN-free spread over 6 orders of magnitude and few distinct values, and
    weights for one of them (SplitMix64's finaliser: no RNG)."""
    h = _hash(50_000, 11).astype(np.int64)
    ties = ((h % 201) - 100).astype(np.float32) / 37
    spread = ((h % 1_000_003).astype(np.float32) / 1e6 - 0.5) ** 5
    few = (h % 3).astype(np.float32)
    weights = (h % 17).astype(np.float64) + 0.5
    return [(ties, 16, None), (spread, 32, None), (few, 8, None), (ties, 8, weights), (spread[:777], 4, None)]


def centres_sha(overwrite: bool) -> str:
    books = [kmeans_codebook(torch.from_numpy(x.copy()), k, None if w is None else torch.from_numpy(w), overwrite)
             for x, k, w in kmeans_inputs()]
    return hashlib.sha256(b"".join(b.double().numpy().tobytes() for b in books)).hexdigest()


@pytest.mark.parametrize("chunk", [1000, 1 << 20])
def test_kmeans_without_full_size_copies_gives_todays_centres(monkeypatch, chunk):
    monkeypatch.setattr(kmeans, "CHUNK", chunk)
    assert centres_sha(False) == PLANTED_CENTRES and centres_sha(True) == PLANTED_CENTRES
    x = np.sort(kmeans_inputs()[0][0])
    v = np.array([-3.0, x[5], x[5] + 1e-9, 0.0, 1 / 37, 9.0])  # float64 between and on the float32 values
    assert np.array_equal(kmeans._searchsorted(x, v), np.searchsorted(x, v))
    monkeypatch.setattr(kmeans, "_moments", lambda x, h, a, b: (float(b - a), float(x[a:b].sum()), 0.0))
    assert centres_sha(False) != PLANTED_CENTRES  # negative control: float32 sums change the centres


def test_kmeans_sorts_in_place_and_compares_in_chunks(monkeypatch):
    monkeypatch.setattr(kmeans, "CHUNK", 1 << 16)
    x = np.random.default_rng(0).standard_normal(1 << 21).astype(np.float32)

    h = np.random.default_rng(1).random(x.size).astype(np.float32) + 0.1

    def peak(values: np.ndarray, overwrite: bool, weights: np.ndarray | None = None) -> int:
        tracemalloc.start()
        kmeans_1d(values, 16, weights=weights, overwrite=overwrite)
        out = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
        return out
    fixed = peak(np.sort(x[:5000]), False)  # the dynamic programme on 512 bins (~11 MB), whatever the size
    weighted_copies = peak(x.copy(), False, h.astype(np.float64))
    weighted = peak(x.copy(), True, h)
    copy, in_place = peak(x.copy(), False), peak(x, True)
    assert np.all(x[1:] >= x[:-1])  # sorted in place
    assert copy - fixed > 3 * x.size  # negative control: a sorted copy (4 bytes a value)
    assert in_place - fixed < x.size  # the float64 of one cluster at a time; no copy of x, nor of it in float64
    # weighted: the int64 order and the float32 weights in order (main 85c3d49: 23 bytes a value)
    assert weighted_copies - fixed > 12 * x.size  # negative control: float64 weights and a sorted copy of x
    assert weighted - fixed < 10 * x.size


def _weight(rows: int, cols: int, salt: int, levels: int = 1000) -> torch.Tensor:
    """A weight on ``2 levels + 1`` values (many ties in ``|w|``, the largest included), from SplitMix64's
    finaliser (no RNG: the planted hashes never drift)."""
    h = _hash(rows * cols, salt).astype(np.int64)
    return torch.from_numpy(((h % (2 * levels + 1)) - levels).astype(np.float32) * (0.05 / levels)).reshape(rows, cols)


def _moments(cols: int, salt: int) -> torch.Tensor:
    """An input second moment ``X^T X / n`` of a made-up ``X`` (200 x cols)."""
    x = torch.from_numpy((_hash(200 * cols, salt) % 1000).astype(np.float32) / 500 - 1).reshape(200, cols)
    return x.T @ x / 200


def planted_layers() -> list:
    """One-shot layers over every path of ``quantize_layer``: exact weights among ties (partial-sort and
    nth-element top-k), tiling and ragged groups, no scales, given scores with pruning, the weighted
    k-means, few distinct values, and GPTQ error feedback (the token table's path)."""
    table, odd = _weight(300, 64, 1), _weight(50, 90, 2, levels=20)
    energy64, energy90 = _moments(64, 3).diagonal(), _moments(90, 4).diagonal()
    few = torch.from_numpy((_hash(40 * 30, 5) % 3).astype(np.float32) - 1).reshape(40, 30)
    return [quantize_layer("ties", table, 16, 64, exact=16),
            quantize_layer("weighted", table, 8, 16, exact=8, input_energy=energy64),
            quantize_layer("ragged", odd, 8, 32, exact=5, input_energy=energy90),
            quantize_layer("ragged_plain", odd, 8, 32, exact=5),
            quantize_layer("no_scales", odd, 4, 0, exact=3),
            quantize_layer("pruned", table, 16, 64, exact=4, scores=table.abs() * energy64, sparsity=0.3),
            quantize_layer("many_exact", table, 16, 64, exact=400),
            quantize_layer("few_values", few, 8, 0, exact=2),
            feedback_quantize(quantize_layer("fed", table, 16, 64, exact=16), table, _moments(64, 3))]


def planted_sha() -> str:
    return hashlib.sha256(encode_file(CompressedNetwork(planted_layers(), {}, {}, {}), compact=False)).hexdigest()


@pytest.mark.parametrize("chunk", [97, 1000, 1 << 20])
def test_one_shot_layers_write_todays_bytes(monkeypatch, chunk):
    for module in (oneshot, kmeans):
        monkeypatch.setattr(module, "CHUNK", chunk)
    monkeypatch.setattr(topk, "TOPK_CHUNK", chunk)
    assert planted_sha() == PLANTED_FILE


def test_the_planted_bytes_see_the_tie_rule(monkeypatch):
    monkeypatch.setattr(topk, "TOPK_CHUNK", 97)
    monkeypatch.setattr(oneshot, "top_indices", lambda x, k, score=torch.abs: lowest_index_ties(score(x), k))
    assert planted_sha() != PLANTED_FILE  # negative control: other tied exact weights, other bytes
