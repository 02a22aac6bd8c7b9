"""GPTQ error feedback onto group-scaled codebooks: closed forms, a planted correlated-input layer, files."""
import torch
from torch import nn

from sqs_pyro.compressed.error_feedback import feedback_quantize, group_scales, hessian_scores, input_hessians
from sqs_pyro.compressed.oneshot import quantize_layer, quantize_network
from sqs_pyro.format import load_compressed, save_compressed
from sqs_pyro.models import select_layers


def correlated_inputs(n: int, cols: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    mix = torch.eye(cols) + 0.3 * torch.randn(cols, cols, generator=g)
    return torch.randn(n, cols, generator=g) @ mix


def output_error(x: torch.Tensor, w: torch.Tensor, q: torch.Tensor) -> float:
    return float(((x @ (w - q).T) ** 2).mean())


def test_input_hessians_closed_form():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(5, 3), nn.Tanh(), nn.Linear(3, 2))
    batches = [torch.randn(7, 5), torch.randn(4, 5)]
    h = input_hessians(net, select_layers(net), batches)
    x = torch.cat(batches)
    torch.testing.assert_close(h["0.weight"], x.T @ x / 11, rtol=1e-5, atol=1e-6)
    hidden = torch.tanh(net[0](x)).detach()
    torch.testing.assert_close(h["2.weight"], hidden.T @ hidden / 11, rtol=1e-5, atol=1e-6)
    scores = hessian_scores(net, select_layers(net), h)  # Wanda's |W_ij| ||x_j||
    torch.testing.assert_close(scores["0.weight"], net[0].weight.detach().abs() * x.pow(2).mean(0).sqrt(),
                               rtol=1e-5, atol=1e-6)


def test_identity_hessian_is_plain_nearest_level_coding():
    w = torch.randn(12, 40, generator=torch.Generator().manual_seed(1))
    plain = quantize_layer("w", w, 8, 16, exact=3)
    fed = feedback_quantize(quantize_layer("w", w, 8, 16, exact=3), w, torch.eye(40), damp=0.0, shrink=(1.0,))
    assert torch.equal(plain.codes, fed.codes) and torch.equal(plain.scales, fed.scales)
    assert torch.equal(plain.exact_values, fed.exact_values)


def test_activation_order_with_a_diagonal_hessian_is_plain_coding_in_the_original_positions():
    """Nothing feeds forward when inputs are uncorrelated, whatever the order: the permutation is undone exactly."""
    w = torch.randn(10, 48, generator=torch.Generator().manual_seed(4))
    energy = torch.rand(48, generator=torch.Generator().manual_seed(5)) + 0.1
    plain = quantize_layer("w", w, 8, 16, exact=3)
    fed = feedback_quantize(quantize_layer("w", w, 8, 16, exact=3), w, torch.diag(energy), damp=0.0,
                            act_order=True, shrink=(1.0,))
    assert torch.equal(plain.codes, fed.codes) and torch.equal(plain.scales, fed.scales)
    assert torch.equal(plain.exact_values, fed.exact_values)


def test_group_scale_search_closed_form():
    """Levels +-0.5, +-1: the group (0.8, 0.8, 0.8, 1.0) costs 3 x 0.2^2 at sigma = max|w| = 1 and
    one 0.2^2 at sigma = 0.8; an excluded (exact) member neither sets nor scores the scale."""
    levels = torch.tensor([-1.0, -0.5, 0.5, 1.0])
    values = torch.tensor([[0.8, 0.8, 0.8, 1.0], [0.8, 0.8, 0.8, 9.0]])
    excluded = torch.tensor([[False] * 4, [False, False, False, True]])
    fp16_08 = float(torch.tensor(0.8).half())
    assert group_scales(values, excluded, levels).tolist() == [1.0, fp16_08]  # max |w| (the default grid: 1.0)
    assert group_scales(values, excluded, levels, shrink=(0.8, 1.0)).tolist() == [fp16_08, fp16_08]
    assert group_scales(values, excluded, levels, shrink=(1.0, 0.8)).tolist() == [fp16_08, fp16_08]


def test_two_columns_closed_form():
    """After coding column 0 to q0, column 1 is coded at w1 + (w0 - q0) H01 / H11 (the least-squares fix)."""
    w = torch.tensor([[0.30, 0.10], [-0.62, 0.44], [0.05, -0.90]])
    h = torch.tensor([[2.0, 0.8], [0.8, 1.0]])
    layer = quantize_layer("w", w, 4, 0)
    levels = layer.codebook
    fed = feedback_quantize(quantize_layer("w", w, 4, 0), w, h, damp=0.0, act_order=False)
    q0 = levels[torch.bucketize(w[:, 0], (levels[1:] + levels[:-1]) / 2)]
    target = w[:, 1] + (w[:, 0] - q0) * 0.8 / 1.0
    q1 = levels[torch.bucketize(target, (levels[1:] + levels[:-1]) / 2)]
    torch.testing.assert_close(fed.weight(), torch.stack([q0, q1], 1))


def test_feedback_lowers_the_output_error_on_correlated_inputs():
    x = correlated_inputs(3000, 64)
    w = torch.randn(32, 64, generator=torch.Generator().manual_seed(2))
    w[3, 5] = 9.0  # a super weight: kept exact, error-fed value stored
    h = x.T @ x / len(x)
    plain = quantize_layer("w", w, 8, 16, exact=2)
    fed = feedback_quantize(quantize_layer("w", w, 8, 16, exact=2), w, h)
    assert 3 * 64 + 5 in fed.exact_index.tolist() and not fed.mask.reshape(-1)[fed.exact_index].any()
    # negative control: plain nearest-level coding of the same codebook is clearly worse
    assert output_error(x, w, fed.weight()) < 0.7 * output_error(x, w, plain.weight())
    # but the weights themselves are further from w: the feedback trades weight error for output error
    assert (fed.weight() - w).pow(2).mean() > (plain.weight() - w).pow(2).mean()


def test_network_with_feedback_round_trips_through_a_file(tmp_path):
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(24, 16), nn.ReLU(), nn.Linear(16, 4))
    sites = select_layers(net)
    hessians = input_hessians(net, sites, correlated_inputs(256, 24).split(64))
    network = quantize_network(net, sites, 16, 8, exact=2, hessians=hessians)
    assert network.config["error_feedback"]
    path = tmp_path / "f.sqs"
    save_compressed(network, path, model=net)
    for a, b in zip(load_compressed(path).layers, network.layers):
        assert torch.equal(a.weight(), b.weight())


def test_pruning_with_an_identity_hessian_drops_the_smallest_weights_of_each_block():
    """With ``H = I`` the OBS saliency is ``w^2``: each block of columns loses exactly its
    ``round(s n)`` smallest non-exact weights, the rest are nearest-level coded."""
    w = torch.randn(8, 64, generator=torch.Generator().manual_seed(6))
    fed = feedback_quantize(quantize_layer("w", w, 8, 16, exact=2, sparsity=0.5), w, torch.eye(64), damp=0.0,
                            block=32, act_order=False, shrink=(1.0,), sparsity=0.5)
    exact = torch.zeros(8 * 64, dtype=torch.bool)
    exact[fed.exact_index] = True
    exact = exact.reshape(8, 64)
    for block in (slice(0, 32), slice(32, 64)):
        part, ex, kept = w[:, block], exact[:, block], fed.mask[:, block]
        candidates = part.abs()[~ex]
        assert int((~kept & ~ex).sum()) == round(0.5 * candidates.numel())
        assert part.abs()[kept].min() > part.abs()[~kept & ~ex].max()  # the smallest are the pruned ones
    assert not fed.mask.reshape(-1)[fed.exact_index].any()
    coded = fed.weight()
    assert (coded[~fed.mask & ~exact] == 0).all()
    plain = feedback_quantize(quantize_layer("w", w, 8, 16, exact=2, sparsity=0.5), w, torch.eye(64), damp=0.0,
                              block=32, act_order=False, shrink=(1.0,))
    assert torch.equal(coded[fed.mask], plain.weight()[fed.mask])  # kept weights: the nearest levels


def test_sparse_feedback_lowers_the_output_error_of_a_pruned_layer():
    """SparseGPT-style, on a planted layer whose inputs come in near-copies (input j + 32 is input j
    plus 5% noise): pruning with error feedback moves a pruned weight onto its twin. The same
    sparsity by largest ``|w| ||x||`` (Wanda), coded on the same kind of codebook without feedback,
    is the negative control: clearly worse."""
    g = torch.Generator().manual_seed(0)
    base = correlated_inputs(3000, 32)
    x = torch.cat([base, base + 0.05 * torch.randn(3000, 32, generator=g)], 1)
    w = torch.randn(32, 64, generator=torch.Generator().manual_seed(3))
    h = x.T @ x / len(x)
    scores = w.abs() * h.diagonal().sqrt()
    plain = quantize_layer("w", w, 16, 16, scores=scores, sparsity=0.5)
    fed = feedback_quantize(quantize_layer("w", w, 16, 16, scores=scores, sparsity=0.5), w, h, sparsity=0.5)
    assert 1 - fed.nnz / fed.numel == 0.5 and 1 - plain.nnz / plain.numel == 0.5
    assert output_error(x, w, fed.weight()) < 0.8 * output_error(x, w, plain.weight())


def test_sensitivity_weighted_codebook_follows_the_busy_inputs():
    """With the input energy on the first half of the columns only, the weighted codebook is the
    k-means of those columns' values alone (planted: they sit on 4 values), unlike the plain one."""
    g = torch.Generator().manual_seed(4)
    busy = torch.tensor([-0.9, -0.3, 0.4, 0.8])[torch.randint(0, 4, (32, 16), generator=g)]
    w = torch.cat([busy, torch.rand(32, 16, generator=g) * 2 - 1], dim=1)
    energy = torch.cat([torch.ones(16), torch.zeros(16)])
    weighted = quantize_layer("w", w, 4, 0, input_energy=energy)
    torch.testing.assert_close(weighted.codebook, torch.tensor([-0.9, -0.3, 0.4, 0.8]))
    assert not torch.allclose(quantize_layer("w", w, 4, 0).codebook, weighted.codebook, atol=1e-2)
