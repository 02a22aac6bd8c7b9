"""The one-shot quantiser's memory-lean paths give the values of their plain forms: GPTQ against a
column-by-column reference, with the error update in chunks of rows and the exact weights' values
written where their column is reached; the group peaks without a copy of |w|; the coding in chunks."""
import pytest
import torch

import sqs_pyro.compressed.error_feedback as error_feedback
import sqs_pyro.compressed.oneshot as oneshot
from sqs_pyro.compressed.error_feedback import feedback_quantize
from sqs_pyro.compressed.oneshot import quantize_layer
from sqs_pyro.models.group_scales import group_absmax


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
