"""The one posterior sampler: exact draws from q (gates, codes, slab noise) against g, phi and the mean."""
import math

import torch

from sqs_pyro.guides import Codebook, SpikeGMM

N, K, S = 30, 4, 20_000


def layer_q(gate_fixed=None, mode="sample") -> SpikeGMM:
    g = torch.Generator().manual_seed(0)
    locs = torch.tensor([-0.6, -0.1, 0.2, 0.7])
    scales = torch.tensor([0.05, 0.1, 0.08, 0.2])
    log_mix = torch.log_softmax(torch.randn(K, generator=g), -1)
    latent = torch.empty(N).uniform_(-0.8, 0.8, generator=g)
    theta = torch.randn(N, generator=g) * 2
    return SpikeGMM(theta, latent, Codebook(locs, scales, log_mix), gate_fixed=gate_fixed, tau=0.5, mode=mode)


def within(freq: torch.Tensor, p: torch.Tensor, n: int, z: float = 5.0) -> bool:
    se = (p * (1 - p) / n).sqrt().clamp_min(1.0 / n)
    return bool(((freq - p).abs() <= z * se).all())


def test_gate_and_code_frequencies_match_g_and_phi():
    q = layer_q(mode="expected")  # the training mode does not change what q is
    draws = q.draw(S, torch.Generator().manual_seed(1))
    assert draws.weight.shape == draws.gate.shape == draws.code.shape == (S, N)
    assert within(draws.gate.double().mean(0), q.inclusion.double(), S)
    freq = torch.stack([(draws.code == k).double().mean(0) for k in range(K)], -1)
    assert within(freq, q.phi.double(), S)
    assert torch.all(draws.weight[~draws.gate] == 0)


def test_mean_of_the_draws_is_g_times_phi_dot_mu():
    q = layer_q()
    w = q.draw(S, torch.Generator().manual_seed(2)).weight.double()
    mean = q.inclusion * (q.phi @ q.locs)  # g_j sum_k phi_jk mu_k
    se = w.std(0) / math.sqrt(S)
    assert torch.all((w.mean(0) - mean).abs() <= 5 * se + 1e-9)
    torch.testing.assert_close(mean, q.mean)
    # slab noise: the kept weights spread around their level with its scale, not at it
    draws = q.draw(S, torch.Generator().manual_seed(3))
    kept = draws.gate
    resid = draws.weight[kept] - q.locs[draws.code[kept]]
    assert abs(float(resid.pow(2).mean()) - float(q.scales[draws.code[kept]].pow(2).mean())) < 0.05 * 0.0110


def test_a_frozen_mask_fixes_the_gates_and_draws_are_seeded():
    mask = (torch.arange(N) % 3 == 0).float()
    q = layer_q(gate_fixed=mask)
    a = q.draw(50, torch.Generator().manual_seed(4))
    b = q.draw(50, torch.Generator().manual_seed(4))
    assert torch.equal(a.gate, mask.bool().expand(50, N))
    assert torch.equal(a.weight, b.weight) and torch.equal(a.code, b.code)
    sub = q.draw(50, torch.Generator().manual_seed(4), indices=torch.tensor([0, 5, 9]))
    assert sub.weight.shape == (50, 3)


def test_a_sampler_that_ignores_phi_fails_the_frequency_check():
    """Negative control for the frequency check: uniform codes are not phi."""
    q = layer_q()
    codes = torch.randint(0, K, (S, N), generator=torch.Generator().manual_seed(5))
    freq = torch.stack([(codes == k).double().mean(0) for k in range(K)], -1)
    assert not within(freq, q.phi.double(), S)


def test_hard_mode_forward_is_the_greedy_level_with_a_straight_through_gradient():
    mask = (torch.arange(N) % 2 == 0).float()
    q = layer_q(gate_fixed=mask, mode="hard")
    q.latent.requires_grad_(True)
    q.locs.requires_grad_(True)
    w = q.rsample()
    level = q.log_phi.argmax(-1)
    torch.testing.assert_close(w.detach(), mask * q.locs.detach()[level])  # the greedy network's weights
    upstream = torch.randn(N, generator=torch.Generator().manual_seed(6))
    d_latent, d_locs = torch.autograd.grad((w * upstream).sum(), [q.latent, q.locs])
    torch.testing.assert_close(d_latent, mask * upstream)  # identity through the kept weights
    expected = torch.zeros(K).index_add_(0, level, mask * upstream)  # each level: its weights' gradients
    torch.testing.assert_close(d_locs, expected)


def test_hard_mode_with_learned_gates_matches_the_straight_through_formula():
    """Learned gates, two draws: the forward and every gradient (latent, levels, gate logits) are
    those of ``z (mu_k + x - stop_grad(x))`` with the same relaxed-Bernoulli gate draws."""
    q = layer_q(mode="hard")
    for t in (q.latent, q.locs, q.gate_logits):
        t.requires_grad_(True)
    upstream = torch.randn(2, N, generator=torch.Generator().manual_seed(7))
    torch.manual_seed(8)
    w = q.rsample((2,))
    torch.manual_seed(8)
    gate = q._sample_gate(torch.Size((2, N)))
    reference = gate * (q.locs[q.log_phi.argmax(-1)] + q.latent - q.latent.detach())
    torch.testing.assert_close(w, reference)
    ours = torch.autograd.grad((w * upstream).sum(), [q.latent, q.locs, q.gate_logits])
    theirs = torch.autograd.grad((reference * upstream).sum(), [q.latent, q.locs, q.gate_logits])
    for a, b in zip(ours, theirs):
        torch.testing.assert_close(a, b)
    assert ours[2].abs().sum() > 0  # the gates do learn


def test_learned_gates_replay_their_uniforms_in_the_backward_pass():
    """The gate's backward pass draws its uniforms again: ``dtheta = dz s (1 - s) / t`` with ``s`` from the
    forward's own ``U`` (closed form), the caller's random stream is left as if nothing had been drawn again, and
    nothing weight-sized is saved (the logits are a reference)."""
    q = layer_q(mode="hard")
    q.gate_logits.requires_grad_(True)
    upstream = torch.randn(N, generator=torch.Generator().manual_seed(9))
    torch.manual_seed(10)
    u = torch.rand(N).clamp_(1e-6, 1 - 1e-6)
    after_draw = torch.rand(3)
    s = torch.sigmoid((q.gate_logits.detach() + u.log() - (-u).log1p()) / q.gate_temperature)
    torch.manual_seed(10)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        z = q._sample_gate(torch.Size((N,)))
    torch.testing.assert_close(z, (s > 0.5).float())
    (d_theta,) = torch.autograd.grad((z * upstream).sum(), [q.gate_logits])
    torch.testing.assert_close(d_theta, upstream * s * (1 - s) / q.gate_temperature)
    torch.testing.assert_close(torch.rand(3), after_draw)  # the backward's redraw did not move the stream
    assert all(t is q.gate_logits for t in saved)
    torch.manual_seed(11)  # negative control: other uniforms, another gradient
    (other,) = torch.autograd.grad((q._sample_gate(torch.Size((N,))) * upstream).sum(), [q.gate_logits])
    assert not torch.allclose(other, d_theta)


def test_a_bool_mask_gives_the_float_masks_draws_kl_and_gradients():
    """A frozen mask passed as bool (one byte per weight, no float copy) is the float mask's guide."""
    mask = torch.arange(N) % 3 != 0
    results = []
    for gates in (mask, mask.float()):
        q = layer_q(gate_fixed=gates, mode="hard")
        q.latent.requires_grad_(True)
        q.locs.requires_grad_(True)
        costs = torch.linspace(0.5, 2.0, K, requires_grad=True)
        w = q.rsample()
        kl = q.mode_kl(0.3, costs)
        loss = (w * torch.arange(N)).sum() + kl.sum()
        results.append((w, kl, *torch.autograd.grad(loss, [q.latent, q.locs, costs]), q.inclusion, q.mean))
    for a, b in zip(*results):
        torch.testing.assert_close(a, b)
    assert results[0][0].dtype == torch.float32 and bool((results[0][0][~mask] == 0).all())
