"""The fused CPU kernels against the eager PyTorch code, fed the kernels' own noise."""
import numpy as np
import pytest
import torch

from sqs_pyro.guides import kernels
from sqs_pyro.guides.distributions import _FLOOR, Codebook, SpikeGMM, relaxed_one_hot
from sqs_pyro.guides.kl import bernoulli_kl, component_kl, spike_gmm_kl
from sqs_pyro.models import SpikeSlabGMM

pytestmark = pytest.mark.skipif(not kernels.available(torch.zeros(1), components=2),
                                reason="fused kernels unavailable (no C compiler?)")

N, K, LAM, SEED = 41, 5, 0.05, 987654321
T_GATE, T_ASSIGN, TAU = 0.3, 0.4, 0.8


def random_bits(seed: int, counters: np.ndarray) -> np.ndarray:
    """SplitMix64 finaliser of ``seed + (counter + 1) * golden`` (the kernels' generator)."""
    with np.errstate(over="ignore"):
        z = np.uint64(seed) + (counters.astype(np.uint64) + np.uint64(1)) * np.uint64(0x9E3779B97F4A7C15)
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return z ^ (z >> np.uint64(31))


def to_uniform(bits23: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(((bits23.astype(np.float64) + 0.5) / 2.0 ** 23).astype(np.float32))


def assignment_uniforms(n: int, k: int) -> torch.Tensor:
    half = (k + 1) // 2
    bits = random_bits(SEED, np.arange(n * half)).reshape(n, half)
    high, low = to_uniform(bits >> np.uint64(41)), to_uniform((bits >> np.uint64(9)) & np.uint64(0x7FFFFF))
    return torch.stack([high, low], -1).reshape(n, 2 * half)[:, :k]


def gate_uniforms(n: int, k: int) -> torch.Tensor:
    return to_uniform(random_bits(SEED, n * ((k + 1) // 2) + np.arange(n)) >> np.uint64(41))


def parameters():
    torch.manual_seed(0)
    x = (torch.randn(N) * 0.5).requires_grad_()
    theta = (torch.randn(N) * 3).requires_grad_()
    mu = torch.linspace(-1, 1, K).requires_grad_()
    s = (torch.rand(K) * 0.3 + 0.1).requires_grad_()
    log_mix = torch.log_softmax(torch.randn(K), 0).detach().requires_grad_()
    return x, theta, mu, s, log_mix


def prior():
    return SpikeSlabGMM(LAM, torch.tensor([0.6, 0.4]), torch.tensor([0.0, 1.0]), torch.tensor([2.0, 0.5]), (N,))


@pytest.mark.parametrize("windows", [False, True])
@pytest.mark.parametrize("learned", [True, False])
@pytest.mark.parametrize("mode", ["sample", "expected"])
def test_fused_layer_matches_eager_draw_kl_and_gradients(mode, learned, windows):
    x, theta, mu, s, log_mix = params = parameters()
    win = torch.randint(0, 2, (N,)) if windows else None
    cw = torch.tensor([0, 0, 1, 1, 1]) if windows else None
    gate_fixed = None if learned else (torch.rand(N) > 0.3).float()
    q = SpikeGMM(theta, x, Codebook(mu, s, log_mix, win, cw), gate_fixed, tau=TAU, gate_temperature=T_GATE,
                 assign_temperature=T_ASSIGN, mode=mode)
    c, a = q.codebook_terms
    b = component_kl(q, prior())
    eps = torch.randn(N) if mode == "sample" else None
    w, kl = kernels.fused_layer(x, theta if learned else None, c, a, mu, s, b, gate_fixed=gate_fixed, eps=eps,
                                window_ids=win, comp_window=cw, assign_temperature=T_ASSIGN,
                                gate_temperature=T_GATE, prior_inclusion=LAM, seed=SEED)
    # the eager code on the same noise
    if mode == "expected":
        w_ref = q.inclusion * (q.phi @ mu)
    else:
        if learned:
            u = gate_uniforms(N, K).clamp(1e-6, 1 - 1e-6)
            soft = torch.sigmoid(((theta + torch.log(u) - torch.log1p(-u)) / T_GATE).clamp(_FLOOR, -_FLOOR))
            gate = (soft > 0.5).float() + soft - soft.detach()
        else:
            gate = gate_fixed
        index, delta = relaxed_one_hot(q.log_phi, assignment_uniforms(N, K), T_ASSIGN)
        w_ref = gate * (mu[index] + s[index] * eps + delta @ mu + eps * (delta @ s))
    kl_ref = bernoulli_kl(q, LAM) + q.inclusion * (q.phi @ b)
    torch.testing.assert_close(w, w_ref, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(kl, kl_ref, rtol=1e-5, atol=1e-5)
    wanted = [p for p in params if learned or p is not theta]
    dw, dkl = torch.randn(N), torch.randn(N)
    grads = torch.autograd.grad((w * dw).sum() + (kl * dkl).sum(), wanted, retain_graph=True)
    grads_ref = torch.autograd.grad((w_ref * dw).sum() + (kl_ref * dkl).sum(), wanted)
    for got, expected in zip(grads, grads_ref):
        torch.testing.assert_close(got, expected, rtol=1e-4, atol=2e-5)


def test_draws_with_a_sample_shape_match_eager_per_element():
    x, theta, mu, s, log_mix = parameters()
    q = SpikeGMM(theta, x, Codebook(mu, s, log_mix), tau=TAU, gate_fixed=torch.ones(N), assign_temperature=T_ASSIGN)
    c, a = q.codebook_terms
    eps = torch.randn(3, N)
    w, _ = kernels.fused_layer(x, None, c, a, mu, s, None, gate_fixed=torch.ones(N), eps=eps,
                               assign_temperature=T_ASSIGN, seed=SEED)
    index, delta = relaxed_one_hot(q.log_phi.expand(3, N, K), assignment_uniforms(3 * N, K).reshape(3, N, K),
                                   T_ASSIGN)
    w_ref = mu[index] + s[index] * eps + delta @ mu + eps * (delta @ s)
    torch.testing.assert_close(w, w_ref, rtol=1e-5, atol=1e-6)
    g, g_ref = (torch.autograd.grad(v.pow(2).sum(), [x, mu, s], retain_graph=True) for v in (w, w_ref))
    for got, expected in zip(g, g_ref):
        torch.testing.assert_close(got, expected, rtol=1e-4, atol=2e-5)


@pytest.mark.parametrize("windows", [False, True])
def test_phi_dot_and_argmax_match_eager(windows):
    x, _, mu, s, log_mix = parameters()
    win = torch.randint(0, 2, (N,)) if windows else None
    cw = torch.tensor([0, 0, 1, 1, 1]) if windows else None
    q = SpikeGMM(torch.zeros(N), x, Codebook(mu, s, log_mix, win, cw), tau=TAU)
    c, a = q.codebook_terms
    v = torch.randn(K, requires_grad=True)
    out, ref = kernels.phi_dot(x, c, a, mu, v, win, cw), q.phi @ v
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-6)
    g, g_ref = (torch.autograd.grad(o.sin().sum(), [x, mu, s, log_mix, v], retain_graph=True) for o in (out, ref))
    for got, expected in zip(g, g_ref):
        torch.testing.assert_close(got, expected, rtol=1e-4, atol=2e-5)
    assert torch.equal(q.most_probable_level(), q.log_phi.argmax(-1))


def test_a_fused_draw_carries_its_kl_and_is_reproducible():
    x, theta, mu, s, log_mix = parameters()
    p = prior()

    def draw():
        torch.manual_seed(3)
        q = SpikeGMM(theta, x, Codebook(mu, s, log_mix), tau=TAU, kl_prior=p)
        return q, q.rsample()

    (q1, w1), (q2, w2) = draw(), draw()
    assert torch.equal(w1, w2)
    assert q1.fused_kl is not None and spike_gmm_kl(q1, prior()) is q1.fused_kl  # an equal prior: reused
    eager = bernoulli_kl(q1, LAM) + q1.inclusion * (q1.phi @ component_kl(q1, p))
    torch.testing.assert_close(q1.fused_kl, eager, rtol=1e-5, atol=1e-5)
    other = SpikeSlabGMM(0.2, p.slab_weights, p.slab_locs, p.slab_scales, (N,))
    assert spike_gmm_kl(q1, other) is not q1.fused_kl  # another prior: computed afresh


def test_switch_off_falls_back_to_eager(monkeypatch):
    x, theta, mu, s, log_mix = parameters()
    monkeypatch.setenv("SQS_PYRO_KERNELS", "0")
    q = SpikeGMM(theta, x, Codebook(mu, s, log_mix))
    assert not q.fused and q.rsample().shape == (N,)
    assert not SpikeGMM(theta.double(), x.double(), Codebook(mu.double(), s.double(), log_mix.double())).fused
