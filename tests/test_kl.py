"""The KL bound: closed forms, Monte-Carlo agreement, bound direction, finite gradients."""
import math

import pytest
import torch
from torch.distributions import Normal, kl_divergence

from sqs_pyro.guides import Codebook, SpikeGMM
from sqs_pyro.guides.kl import bernoulli_kl, component_kl, gaussian_vs_mixture_kl_bound, spike_gmm_kl
from sqs_pyro.models import SpikeSlabGMM

LAM = 0.05


def make_q(n=6, gate_logits=None, scales=(0.3, 0.5, 0.2)):
    torch.manual_seed(0)
    locs = torch.tensor([-1.0, 0.2, 1.5])
    scales = torch.tensor(scales)
    log_mix = torch.log(torch.tensor([0.3, 0.5, 0.2]))
    theta = torch.linspace(-2, 2, n) if gate_logits is None else gate_logits
    latent = torch.linspace(-1.2, 1.6, n)
    return SpikeGMM(theta, latent, Codebook(locs, scales, log_mix), tau=1.0)


def prior(weights=(1.0,), locs=(0.0,), scales=(3.0,), n=6):
    t = lambda v: torch.tensor(v)  # noqa: E731
    return SpikeSlabGMM(LAM, t(weights), t(locs), t(scales), (n,))


def test_single_gaussian_slab_component_kl_is_exact_closed_form():
    q, p = make_q(), prior()
    expected = kl_divergence(Normal(q.locs, q.scales), Normal(0.0, 3.0))
    torch.testing.assert_close(component_kl(q, p), expected)


def test_bernoulli_kl_closed_form():
    q = make_q()
    g = torch.sigmoid(q.gate_logits)
    expected = g * torch.log(g / LAM) + (1 - g) * torch.log((1 - g) / (1 - LAM))
    torch.testing.assert_close(bernoulli_kl(q, LAM), expected)


@pytest.mark.parametrize("lam", [LAM, torch.tensor(0.3, dtype=torch.float64)])
def test_bernoulli_kl_of_a_fixed_mask_is_minus_log_prior_odds(lam):
    """A bool mask (the frozen gates): -log lam where kept, -log(1 - lam) where pruned, bit-equal to the float
    formula with 0 log 0 = 0, in the latent weights' dtype; the hard-mode KL adds the same terms."""
    q = make_q()
    mask = torch.tensor([True, False, False, True, True, False])
    fixed = SpikeGMM(q.gate_logits, q.latent, q.codebook, gate_fixed=mask)
    kept, pruned = -math.log(float(lam)), -math.log1p(-float(lam))
    expected = torch.where(mask, torch.tensor(kept), torch.tensor(pruned))
    torch.testing.assert_close(bernoulli_kl(fixed, lam), expected)
    as_float = SpikeGMM(q.gate_logits, q.latent, q.codebook, gate_fixed=mask.float())
    assert torch.equal(bernoulli_kl(fixed, lam), bernoulli_kl(as_float, lam))
    costs = torch.tensor([0.5, 1.0, 2.0])
    hard = SpikeGMM(q.gate_logits, q.latent, q.codebook, gate_fixed=mask, mode="hard")
    hard_float = SpikeGMM(q.gate_logits, q.latent, q.codebook, gate_fixed=mask.float(), mode="hard")
    assert torch.equal(hard.mode_kl(lam, costs), hard_float.mode_kl(lam, costs))
    torch.testing.assert_close(hard.mode_kl(lam, costs), expected + mask * costs[hard.mode_codes.long()])


def test_bound_agrees_with_monte_carlo_estimate_of_the_same_bound():
    """KL_Bern exact + g * sum_k phi_k * MC[log N_k(w) - log slab(w)], w ~ N_k."""
    q, p = make_q(), prior(weights=(0.6, 0.4), locs=(0.0, 1.0), scales=(2.0, 0.5))
    torch.manual_seed(1)
    w = q.locs + q.scales * torch.randn(200_000, 3)
    mc_comp = (Normal(q.locs, q.scales).log_prob(w) - p.slab_log_prob(w)).mean(0)  # exact KL(N_k || GMM), MC
    mc_bound = bernoulli_kl(q, LAM) + q.inclusion * (q.phi @ mc_comp)
    bound = spike_gmm_kl(q, p)
    assert torch.all(bound >= mc_bound - 0.01)  # Jensen bound on KL(N_k || GMM) is above the MC truth
    # and for a single-Gaussian slab, where the component bound is exact, they agree within MC error
    p1 = prior()
    mc_comp1 = (Normal(q.locs, q.scales).log_prob(w) - p1.slab_log_prob(w)).mean(0)
    torch.testing.assert_close(spike_gmm_kl(q, p1), bernoulli_kl(q, LAM) + q.inclusion * (q.phi @ mc_comp1),
                               atol=0.01, rtol=0.0)


def test_bound_is_above_monte_carlo_kl_of_the_true_mixture():
    """E_q[log q(w) - log p(w)] with w from the full spike-and-GMM q (densities w.r.t. delta_0 + Lebesgue)."""
    q, p = make_q(scales=(0.6, 0.8, 0.5)), prior(weights=(0.5, 0.5), locs=(-0.5, 0.5), scales=(1.0, 1.0))
    torch.manual_seed(2)
    q_mc = SpikeGMM(q.gate_logits, q.latent, q.codebook, tau=1.0,
                    gate_temperature=1e-3, assign_temperature=1e-3)
    w = q_mc.sample((100_000,))
    terms = q.log_prob(w) - p.log_prob(w)
    mc, se = terms.mean(0), terms.std(0) / math.sqrt(w.shape[0])
    bound = spike_gmm_kl(q, p)
    assert torch.all(bound >= mc - 4 * se)
    assert torch.all(bound - mc < 1.0)  # a bound, but not a vacuous one


@pytest.mark.parametrize("fused", [True, False], ids=["fused", "eager"])
def test_hard_samples_follow_gate_and_assignment_probabilities(fused, monkeypatch):
    """Straight-through samples: a weight is kept with probability ``g_j`` and, when kept, sits on
    level ``k`` with probability ``phi_jk``. Slab scales of 0.01 put each draw within 0.05 of its
    level, so the level is read off the sample; ``tau = 1e4`` keeps ``phi`` far from one-hot, so
    a sampler that always took the most probable level (or ignored ``phi``) fails."""
    monkeypatch.setenv("SQS_PYRO_KERNELS", "1" if fused else "0")
    locs = torch.tensor([-1.0, 0.2, 1.5])
    codebook = Codebook(locs, torch.full((3,), 0.01), torch.log(torch.tensor([0.3, 0.5, 0.2])))
    q = SpikeGMM(torch.linspace(-2, 2, 4), torch.linspace(-1.2, 1.6, 4), codebook, tau=1e4)
    assert q.phi.max(-1).values.max() < 0.75
    torch.manual_seed(3)
    w = q.sample((50_000,))
    kept = w != 0
    torch.testing.assert_close(kept.float().mean(0), q.inclusion, atol=0.01, rtol=0)
    level = (w.unsqueeze(-1) - locs).abs().argmin(-1)
    assert (w[kept] - locs[level[kept]]).abs().max() < 0.1
    frequency = torch.stack([((level == k) & kept).sum(0) / kept.sum(0) for k in range(3)], -1)
    torch.testing.assert_close(frequency, q.phi, atol=0.02, rtol=0)


@pytest.mark.parametrize("theta", [-40.0, -15.0, 15.0, 40.0])
def test_gradients_finite_at_edges(theta):
    locs = torch.tensor([-0.1, 0.0, 0.1], requires_grad=True)
    scale_raw = torch.tensor([1e-7, 1e-6, 1e-5], requires_grad=True)
    gates = torch.full((5,), theta, requires_grad=True)
    latent = torch.linspace(-0.1, 0.1, 5).requires_grad_()
    q = SpikeGMM(gates, latent, Codebook(locs, scale_raw, torch.log(torch.full((3,), 1 / 3))))
    kl = spike_gmm_kl(q, prior(n=5)).sum()
    kl.backward()
    for t in (locs, scale_raw, gates, latent):
        assert torch.isfinite(t.grad).all()
    assert torch.isfinite(kl)


def test_mixture_bound_reduces_to_exact_kl_for_one_component():
    loc, scale = torch.tensor([0.3]), torch.tensor([0.7])
    b = gaussian_vs_mixture_kl_bound(loc, scale, torch.tensor([1.0]), torch.tensor([0.1]), torch.tensor([2.0]))
    torch.testing.assert_close(b, kl_divergence(Normal(0.3, 0.7), Normal(0.1, 2.0)).reshape(1))


def test_registered_kl_is_used_through_independent():
    q, p = make_q(), prior()
    total = kl_divergence(q.to_event(1), p.to_event(1))
    torch.testing.assert_close(total, spike_gmm_kl(q, p).sum())
