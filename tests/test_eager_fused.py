"""The fused kernels against SpikeGMM's own eager code, through the public SpikeGMM path.

``SQS_PYRO_KERNELS=0`` switches a new distribution object to the eager PyTorch code (the
only path on a GPU). N is large enough for every accumulation path of the kernels (blocks of
lanes flushed every 64 weights), at K = 4 and K = 16, with and without windows.
"""
import math

import pytest
import torch

from sqs_pyro.guides import Codebook, SpikeGMM, kernels
from sqs_pyro.guides.kl import component_kl, spike_gmm_kl
from sqs_pyro.models import SpikeSlabGMM

N = 4099  # not a multiple of the lane or flush sizes

pytestmark = pytest.mark.skipif(not kernels.available(torch.zeros(1), components=16),
                                reason="no C compiler: the fused kernels are not built here")


def parameters(k: int, windows: bool):
    g = torch.Generator().manual_seed(k)
    locs = torch.linspace(-0.5, 0.5, k) + 0.01 * torch.randn(k, generator=g)
    leaves = [torch.randn(N, generator=g) * 0.3, torch.randn(N, generator=g) * 2, locs,
              torch.full((k,), -3.0) + 0.3 * torch.randn(k, generator=g), torch.randn(k, generator=g)]
    leaves = [t.requires_grad_() for t in leaves]
    win = cw = None
    if windows:
        win = (torch.arange(N) % 3 == 0).to(torch.int8)
        cw = (torch.arange(k) >= k // 2).long()
    return leaves, win, cw


def distribution(leaves, win, cw, mode: str, fused: bool, monkeypatch) -> SpikeGMM:
    monkeypatch.setenv("SQS_PYRO_KERNELS", "1" if fused else "0")
    x, theta, locs, scale_raw, mix_logits = leaves
    log_mix = torch.log_softmax(mix_logits, -1)
    q = SpikeGMM(theta, x, Codebook(locs, torch.nn.functional.softplus(scale_raw) + 1e-6, log_mix, win, cw),
                 tau=0.7, gate_temperature=0.5, assign_temperature=0.5, mode=mode,
                 kl_prior=SpikeSlabGMM(0.05, torch.tensor([0.5, 0.5]), torch.tensor([-0.3, 0.3]),
                                       torch.tensor([0.2, 0.4]), batch_shape=(N,)))
    assert q.fused == fused
    return q


@pytest.mark.parametrize("k", [4, 16])
@pytest.mark.parametrize("windows", [False, True])
def test_expected_weights_kl_levels_and_gradients_agree(k, windows, monkeypatch):
    leaves, win, cw = parameters(k, windows)
    dw, dkl = torch.randn(N, generator=torch.Generator().manual_seed(9)), torch.rand(N)
    out = {}
    for fused in (True, False):
        q = distribution(leaves, win, cw, "expected", fused, monkeypatch)
        w = q.rsample()
        kl = spike_gmm_kl(q, q.kl_prior)
        grads = torch.autograd.grad((w * dw).sum() + (kl * dkl).sum(), leaves)
        out[fused] = (w.detach(), kl.detach(), q.most_probable_level(), q.responsibility_dot(q.locs.detach()), grads)
    (w1, kl1, lvl1, dot1, g1), (w0, kl0, lvl0, dot0, g0) = out[True], out[False]
    torch.testing.assert_close(w1, w0, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(kl1, kl0, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(dot1, dot0, rtol=1e-5, atol=1e-6)
    assert (lvl1 != lvl0).float().mean() < 1e-3  # argmax ties at round-off only
    for name, a, b in zip(("x", "theta", "locs", "scales", "mix"), g1, g0):
        torch.testing.assert_close(a, b, rtol=2e-4, atol=1e-4 * float(b.abs().max()), msg=name)


@pytest.mark.parametrize("k", [4, 16])
def test_sampled_weights_agree_in_distribution(k, monkeypatch):
    """Different noise (counter-based in C, torch's in eager), the same q: per-weight means of
    draws and the KL agree; the straight-through gradients agree on average."""
    leaves, win, cw = parameters(k, False)
    draws = 200
    torch.manual_seed(0)
    means, kls, grads = {}, {}, {}
    for fused in (True, False):
        q = distribution(leaves, win, cw, "sample", fused, monkeypatch)
        w = torch.stack([q.rsample() for _ in range(draws)])
        means[fused] = w.detach().mean(0)
        kls[fused] = spike_gmm_kl(q, q.kl_prior).detach()
        grads[fused] = torch.autograd.grad(w.mean(0).sum(), leaves[2])[0]  # d/dmu of the mean weight
        sd = w.detach().std(0)
    torch.testing.assert_close(kls[True], kls[False], rtol=1e-5, atol=1e-5)
    se = sd / math.sqrt(draws)
    diff = (means[True] - means[False]).abs() / (math.sqrt(2) * se.clamp_min(1e-6))
    assert float((diff > 4).float().mean()) < 0.01  # z-scores of two independent means
    exact = distribution(leaves, win, cw, "expected", False, monkeypatch).mean.detach()
    assert float(((means[True] - exact).abs() / se.clamp_min(1e-6) > 4).float().mean()) < 0.01
    torch.testing.assert_close(grads[True], grads[False], rtol=0.1, atol=0.02 * float(grads[False].abs().max()))


@pytest.mark.parametrize("k", [4, 16])
@pytest.mark.parametrize("gates", ["learned", "fixed"])
def test_hard_mode_draws_and_mode_kl_agree(k, gates, monkeypatch):
    """Hard mode's KL is that of the guide whose assignment is its mode ``k_j``: ``KL_Bern(g_j || lam) +
    g_j B_{k_j}``, against the same formula written with autograd on plain tensors, in value and in
    every gradient, on the fused and the eager path (learned and fixed gates). The responsibilities pass
    no gradient: the latent weights get none from the KL (the soft bound of the other modes gives them one)."""
    leaves, win, cw = parameters(k, False)
    dw, dkl = torch.randn(N, generator=torch.Generator().manual_seed(9)), torch.rand(N)
    fixed = (torch.arange(N) % 3 != 0).float() if gates == "fixed" else None
    out = {}
    for fused in (True, False):
        q = distribution(leaves, win, cw, "hard", fused, monkeypatch)
        q.gate_fixed = fixed
        torch.manual_seed(3)
        w = q.rsample()
        kl = spike_gmm_kl(q, q.kl_prior)
        grads = torch.autograd.grad((w * dw).sum() + (kl * dkl).sum(), leaves, allow_unused=True, retain_graph=True)
        out[fused] = (w.detach(), kl.detach(), grads, q.mode_codes)
        # the closed form on plain tensors, at the same codes
        x, theta, locs, scale_raw, mix_logits = leaves
        costs = component_kl(q, q.kl_prior)
        g = torch.sigmoid(theta) if fixed is None else fixed
        lam = q.kl_prior.inclusion
        bern = (torch.special.xlogy(g, g) - g * math.log(lam) + torch.special.xlogy(1 - g, 1 - g)
                - (1 - g) * math.log1p(-lam))
        eager = bern + g * costs[q.mode_codes.long()]
        expect = torch.autograd.grad((eager * dkl).sum(), leaves, allow_unused=True, retain_graph=True)
        kl_grads = torch.autograd.grad((kl * dkl).sum(), leaves, allow_unused=True)
        torch.testing.assert_close(kl.detach(), eager.detach(), rtol=1e-5, atol=1e-5)
        for name, a, b in zip(("x", "theta", "locs", "scales", "mix"), kl_grads, expect):
            if b is None:
                assert a is None or not a.any(), name
                continue
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6 * max(1.0, float(b.abs().max())), msg=name)
        assert kl_grads[0] is None or not kl_grads[0].any()  # no KL gradient to the latent weights
    (w1, kl1, g1, c1), (w0, kl0, g0, c0) = out[True], out[False]
    assert (c1 != c0).float().mean() < 1e-3 and (w1 != w0).float().mean() < 1e-3  # argmax ties at round-off only
    torch.testing.assert_close(kl1, kl0, rtol=1e-5, atol=1e-5)
    for name, a, b in zip(("x", "theta", "locs", "scales", "mix"), g1, g0):
        if b is None:
            assert a is None or not a.any(), name
            continue
        torch.testing.assert_close(a, b, rtol=2e-4, atol=1e-4 * float(b.abs().max()), msg=name)
    # negative control: the soft bound of the sampled guide at the same parameters is another KL, with a
    # gradient to the latent weights
    soft = distribution(leaves, win, cw, "sample", False, monkeypatch)
    soft.gate_fixed = fixed
    soft_kl = spike_gmm_kl(soft, soft.kl_prior)
    assert not torch.allclose(soft_kl.detach(), kl0, rtol=1e-3, atol=1e-4)
    assert torch.autograd.grad((soft_kl * dkl).sum(), leaves[0])[0].abs().max() > 0
