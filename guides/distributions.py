r"""The mean-field spike-and-GMM variational distribution of one weight tensor.

.. math::

    q(w_j) = (1 - g_j)\,\delta_0(w_j) + g_j \sum_k \phi_{jk}\,\mathcal N(w_j; \mu_k, s_k^2)

* ``g_j = sigmoid(theta_j)`` is the inclusion probability (or a fixed 0/1 mask).
* ``phi_j = softmax_k((log pi_k + log N(x_j; mu_k, s_k^2)) / tau)`` are the temperature-sharpened
  GMM responsibilities of the latent full-precision weight ``x_j``, restricted to the
  components of ``x_j``'s window; computed in log space.
* ``rsample`` draws ``z_j ~ RelaxedBernoulli(g_j, t_g)`` and ``a_j ~ RelaxedOneHot(phi_j, t_a)``,
  both straight-through (hard 0/1 values forward, relaxed gradients backward), and returns
  ``w_j = z_j * (mu_{a_j} + s_{a_j} eps_j)``: an exact draw from ``q`` (``mode="sample"``).
  In ``"hard"`` mode the gate is drawn the same way but the assignment is the mode
  ``argmax_k phi_jk`` with a straight-through gradient to ``x_j``; in ``"expected"`` mode it
  returns the deterministic ``g_j * sum_k phi_jk mu_k`` (the SQS authors' forward pass). Both
  make the data term a surrogate, not an ELBO term.
* In ``"hard"`` mode the assignment the forward pass uses is the mode ``k_j``, the
  zero-temperature limit of ``phi_j``; the KL is taken for that guide (:meth:`SpikeGMM.mode_kl`):
  ``KL_Bern(g_j || lam) + g_j B_{k_j}``, with no gradient through the responsibilities.

Densities are with respect to ``delta_0 + Lebesgue`` (as for the prior).
"""
from __future__ import annotations

import math
from typing import NamedTuple

import torch
import torch.nn.functional as F
from pyro.distributions import TorchDistribution
from torch.distributions import constraints
from torch.distributions.utils import lazy_property

from sqs_pyro.guides import kernels
from sqs_pyro.guides.gaussian_kl import component_kl
from sqs_pyro.models.priors import log_inclusion

# Logits are shifted so that their maximum is 0 and clipped at _FLOOR before any softmax:
# exp() of arguments below about -87 is ~25x slower on CPU, and exp(-80) ~ 1e-35 is zero
# at fp32 resolution next to the maximum's exp(0) = 1, so the clip changes nothing that
# the arithmetic can represent. Components outside a weight's window sit at the floor.
_FLOOR = -80.0


def _shift_clip(logits: torch.Tensor) -> torch.Tensor:
    """``logits - max(logits)`` clipped below at ``_FLOOR`` (same softmax up to ~1e-35)."""
    return (logits - logits.detach().amax(-1, keepdim=True)).clamp_min(_FLOOR)


def relaxed_one_hot(log_phi: torch.Tensor, uniforms: torch.Tensor,
                    temperature: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Straight-through relaxed one-hot draw from ``Categorical(exp(log_phi))`` as ``(index, delta)``.

    With Gumbel noise ``G = -log(-log U)``: ``index = argmax(log_phi + G)`` (Gumbel-max, an
    exact draw) and ``delta = soft - stop_grad(soft)``, ``soft = softmax((log_phi + G) / t)``:
    zero forward, the Concrete relaxation's gradient backward, so that ``one_hot(index) +
    delta`` is the usual straight-through sample without building it.
    """
    perturbed = log_phi - uniforms.log().neg_().log_()
    index = perturbed.detach().argmax(-1)
    soft = torch.softmax(_shift_clip(perturbed / temperature), dim=-1)
    return index, soft - soft.detach()


def _levels_at(values: torch.Tensor, codes: torch.Tensor) -> torch.Tensor:
    """``values[codes]`` for a K-vector ``values`` and integer codes of any shape (uint8 or int64): one
    ``index_select``, several times faster on CPU than advanced indexing for the same values."""
    index = codes.long()
    return torch.index_select(values, 0, index.reshape(-1)).view(index.shape)


class _GatedLevel(torch.autograd.Function):
    """``z_j mu_{k_j}`` forward for 0/1 gate values ``z_j``; backward the straight-through gradients of
    ``z_j (mu_{k_j} + x_j - stop_grad(x_j))``: ``dx_j = z_j g_j``, ``dmu_k = sum_{j: k_j = k} z_j g_j``,
    ``dz_j = mu_{k_j} g_j``. Saves a byte per weight for the codes (K <= 256) and one for the gate,
    not the level values."""

    @staticmethod
    def forward(ctx, latent: torch.Tensor, locs: torch.Tensor, codes: torch.Tensor, gate: torch.Tensor):
        ctx.save_for_backward(locs, codes, gate if gate.dtype == torch.bool else gate != 0)  # codes: uint8 or int64
        return gate * _levels_at(locs, codes)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad: torch.Tensor):
        locs, codes, kept = ctx.saved_tensors
        gated = grad.masked_fill(~kept, 0.0)
        if gated.dim() > codes.dim():  # several draws of the gates: the latent's gradient sums them
            gated = gated.sum(tuple(range(gated.dim() - codes.dim())))
        index = codes.long()
        dlocs = (torch.zeros_like(locs).scatter_add_(0, index.reshape(-1), gated.reshape(-1))
                 if ctx.needs_input_grad[1] else None)
        dgate = grad * _levels_at(locs, index) if ctx.needs_input_grad[3] else None
        return gated if ctx.needs_input_grad[0] else None, dlocs, None, dgate


def _generator_state(device: torch.device) -> torch.Tensor | None:
    """The default generator's state on ``device`` (CPU or CUDA; ``None`` elsewhere)."""
    if device.type == "cpu":
        return torch.get_rng_state()
    if device.type == "cuda":
        return torch.cuda.get_rng_state(device)
    return None


def _gate_uniforms(theta: torch.Tensor, shape: torch.Size) -> torch.Tensor:
    return torch.rand(shape, dtype=theta.dtype, device=theta.device).clamp_(1e-6, 1 - 1e-6)


def _relaxed_gate(theta: torch.Tensor, uniforms: torch.Tensor, temperature: float) -> torch.Tensor:
    noisy = (theta + torch.log(uniforms) - torch.log1p(-uniforms)) / temperature
    return torch.sigmoid(noisy.clamp_(_FLOOR, -_FLOOR))


class _RelaxedGate(torch.autograd.Function):
    """The straight-through relaxed Bernoulli gate ``1[s > 1/2]`` with ``s = sigmoid((theta +
    logit(U)) / t)``, ``U`` uniform draws of ``shape``: forward the 0/1 value, backward ``dtheta = g s (1 - s) / t``
    (the relaxation's gradient). Saves nothing weight-sized on CPU and CUDA: the backward pass draws the
    same ``U`` again from the generator state the forward pass started from (elsewhere it saves ``s``)."""

    @staticmethod
    def forward(ctx, theta: torch.Tensor, shape: torch.Size, temperature: float):
        ctx.rng, ctx.shape, ctx.temperature = _generator_state(theta.device), shape, temperature
        soft = _relaxed_gate(theta, _gate_uniforms(theta, shape), temperature)
        ctx.save_for_backward(soft if ctx.rng is None else theta)
        return (soft > 0.5).to(soft.dtype)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad: torch.Tensor):
        (saved,) = ctx.saved_tensors
        if ctx.rng is None:
            soft = saved
        else:
            cuda = saved.device.type == "cuda"
            with torch.random.fork_rng(devices=[saved.device] if cuda else []):
                if cuda:
                    torch.cuda.set_rng_state(ctx.rng, saved.device)
                else:
                    torch.set_rng_state(ctx.rng)
                soft = _relaxed_gate(saved, _gate_uniforms(saved, ctx.shape), ctx.temperature)
        dtheta = grad * soft * (1 - soft) / ctx.temperature
        return dtheta, None, None


def fixed_bernoulli_kl(g: torch.Tensor, log_lam, log_not_lam, dtype: torch.dtype | None = None) -> torch.Tensor:
    """``KL(Bern(g) || Bern(lam))`` per weight for given inclusions ``g`` (e.g. a fixed 0/1 mask), with
    ``0 log 0 = 0``; ``log_lam``, ``log_not_lam`` from :func:`~sqs_pyro.models.priors.log_inclusion`.

    A bool mask ``g`` gives the same values in one pass, in ``dtype``: ``-log lam`` where kept and
    ``-log(1 - lam)`` where pruned."""
    if g.dtype == torch.bool:
        kept = torch.as_tensor(log_lam, dtype=dtype, device=g.device).neg()
        return torch.where(g, kept, torch.as_tensor(log_not_lam, dtype=kept.dtype, device=g.device).neg())
    return torch.special.xlogy(g, g) - g * log_lam + torch.special.xlogy(1 - g, 1 - g) - (1 - g) * log_not_lam


class _ModeKL(torch.autograd.Function):
    """Per-weight ``KL_Bern(g_j || lam) + g_j B_{k_j}`` with ``g = sigmoid(theta)`` (or fixed gates, constant
    in theta): backward ``dtheta_j = g_j (1 - g_j) (theta_j - logit lam + B_{k_j})`` and ``dB_k = sum_{j: k_j =
    k} g_j``, times the incoming gradient. Saves the logits (a reference), a byte per weight for the codes
    (K <= 256) and ``B``; ``lam`` is a constant (an empirical-Bayes prior is set by its M-step)."""

    @staticmethod
    def forward(ctx, costs: torch.Tensor, codes: torch.Tensor, theta: torch.Tensor | None,
                gate_fixed: torch.Tensor | None, log_lam, log_not_lam):
        logit_lam = log_lam - log_not_lam
        out = _levels_at(costs, codes)
        if theta is not None:  # KL_Bern = g (theta - logit lam) - softplus(theta) - log(1 - lam), in place
            out.add_(theta).sub_(logit_lam).mul_(torch.sigmoid(theta)).sub_(F.softplus(theta)).sub_(log_not_lam)
        else:
            out.mul_(gate_fixed).add_(fixed_bernoulli_kl(gate_fixed, log_lam, log_not_lam, out.dtype))
        ctx.save_for_backward(costs, codes, theta if theta is not None else gate_fixed)  # codes: uint8 or int64
        ctx.learned = theta is not None
        ctx.logit_lam = logit_lam
        return out

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad: torch.Tensor):
        costs, codes, gates = ctx.saved_tensors
        index = codes.long()
        g = torch.sigmoid(gates) if ctx.learned else gates
        dcosts = (torch.zeros_like(costs).scatter_add_(0, index.reshape(-1), (grad * g).reshape(-1))
                  if ctx.needs_input_grad[0] else None)
        dtheta = None
        if ctx.learned and ctx.needs_input_grad[2]:
            dtheta = grad * g * (1 - g) * (gates - ctx.logit_lam + _levels_at(costs, index))
        return dcosts, None, dtheta, None, None, None


def normal_log_density(x: torch.Tensor, locs: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """``log N(x[..., None]; locs, scales^2)`` broadcast over a trailing component axis."""
    z = (x.unsqueeze(-1) - locs) / scales
    return -0.5 * z * z - torch.log(scales) - 0.5 * math.log(2 * math.pi)


class Codebook(NamedTuple):
    """One layer's K-level codebook: levels ``mu`` (``locs``), scales ``s`` (> 0), log mixing
    weights ``log pi`` normalised within each window, and the windows: ``window_ids`` of each
    weight (shape S, int) with ``comp_window`` of each level (K,), or ``None`` for one window."""

    locs: torch.Tensor
    scales: torch.Tensor
    log_mix: torch.Tensor
    window_ids: torch.Tensor | None = None
    comp_window: torch.Tensor | None = None


class PosteriorDraw(NamedTuple):
    """Draws of whole weight tensors from ``q``: the weights, their 0/1 gates ``z`` and level indices ``a``."""

    weight: torch.Tensor
    gate: torch.Tensor
    code: torch.Tensor


class SpikeGMM(TorchDistribution):
    """Elementwise spike-and-GMM guide distribution (batch shape = the weight's shape).

    Args:
        gate_logits: ``theta`` of the inclusion probabilities, shape S.
        latent: the latent full-precision weights ``x``, shape S.
        codebook: the layer's :class:`Codebook` (levels, scales, mixing weights, windows).
        gate_fixed: optional fixed 0/1 inclusion (shape S, float or bool: a bool mask is kept as it is, one
            byte per weight) replacing the learned gates.
        kl_prior: optional prior that ``kl_divergence(q, p)`` will be taken against; with the
            fused kernels, :meth:`rsample` then computes the KL bound in the same pass and
            :func:`~sqs_pyro.guides.kl.spike_gmm_kl` reuses it for an equal prior.
        tau: responsibility sharpening temperature.
        pooled: responsibilities with the pooled scale ``sqrt(mean_k s_k^2)`` in place of each
            ``s_k`` (the nearest level up to ``log pi_k``); the levels keep their own scales.
        gate_temperature, assign_temperature: Concrete temperatures for sampling.
        mode: ``"sample"`` or ``"expected"``.
    """

    arg_constraints: dict = {}
    support = constraints.real
    has_rsample = True

    def __init__(self, gate_logits: torch.Tensor, latent: torch.Tensor, codebook: "Codebook",
                 gate_fixed: torch.Tensor | None = None, tau: float = 1.0, gate_temperature: float = 0.5,
                 assign_temperature: float = 0.5, mode: str = "sample", kl_prior=None, pooled: bool = False) -> None:
        self.gate_logits = gate_logits
        self.latent = latent
        self.codebook = codebook
        self.locs, self.scales, self.log_mix = codebook.locs, codebook.scales, codebook.log_mix
        self.window_ids = codebook.window_ids
        self.comp_window = codebook.comp_window if codebook.window_ids is not None else None
        self.gate_fixed = gate_fixed
        self.tau = float(tau)
        self.gate_temperature = float(gate_temperature)
        self.assign_temperature = float(assign_temperature)
        self.sampling = mode
        self.kl_prior = kl_prior
        self.pooled = pooled
        self.fused_kl: torch.Tensor | None = None
        super().__init__(latent.shape, torch.Size(), validate_args=False)

    # --- parameters derived once per distribution object -------------------------------
    @lazy_property
    def codebook_terms(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``(c, a)`` with ``c_k = (log pi_k - log s_k) / tau`` and ``a_k = 1 / (s_k sqrt(tau))``, so that
        the responsibility logits are ``c_k - z_jk^2 / 2`` with ``z_jk = (x_j - mu_k) a_k`` (``s_k`` the
        pooled scale for every ``k`` when ``pooled``)."""
        s = self.scales.pow(2).mean().sqrt().expand_as(self.scales) if self.pooled else self.scales
        return (self.log_mix - torch.log(s)) / self.tau, 1.0 / (s * math.sqrt(self.tau))

    @lazy_property
    def fused(self) -> bool:
        """Whether the fused CPU kernels of :mod:`sqs_pyro.guides.kernels` compute the O(N K) terms."""
        return kernels.available(self.latent, self.locs, self.scales, self.log_mix,
                                 components=self.locs.shape[-1])

    @lazy_property
    def log_phi(self) -> torch.Tensor:
        """Log assignment probabilities, shape ``S + (K,)``: ``log_softmax_k(c_k - z_jk^2 / 2)``,
        components outside the weight's window at the clip floor."""
        const, a = self.codebook_terms
        z = (self.latent.unsqueeze(-1) - self.locs) * a
        logits = torch.addcmul(const, z, z, value=-0.5)
        if self.window_ids is not None:
            logits = logits.masked_fill(self.window_ids.unsqueeze(-1) != self.comp_window, -float("inf"))
        return torch.log_softmax(_shift_clip(logits), dim=-1)

    @lazy_property
    def phi(self) -> torch.Tensor:
        return self.log_phi.exp()

    @lazy_property
    def inclusion(self) -> torch.Tensor:
        """``g_j``: the probability that weight j is kept."""
        if self.gate_fixed is not None:
            return self.gate_fixed.to(self.latent.dtype)
        return torch.sigmoid(self.gate_logits)

    def log_inclusion(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``(log g, log(1 - g))``, computed stably from the logits."""
        if self.gate_fixed is not None:
            g = self.inclusion
            return torch.log(g), torch.log1p(-g)
        return F.logsigmoid(self.gate_logits), F.logsigmoid(-self.gate_logits)

    def responsibility_dot(self, values: torch.Tensor) -> torch.Tensor:
        """``sum_k phi_jk v_k`` for a K-vector ``v`` (shape S), without an ``S x K`` tensor when fused."""
        if self.fused:
            const, a = self.codebook_terms
            return kernels.phi_dot(self.latent, const, a, self.locs, values, self.window_ids, self.comp_window)
        return self.phi @ values

    def most_probable_level(self) -> torch.Tensor:
        """``argmax_k phi_jk`` (long, shape S), without an ``S x K`` tensor when fused."""
        if self.fused:
            const, a = self.codebook_terms
            return kernels.phi_argmax(self.latent, const.detach(), a.detach(), self.locs, self.window_ids,
                                      self.comp_window)
        return self.log_phi.argmax(-1)

    @lazy_property
    def mode_codes(self) -> torch.Tensor:
        """The assignment of ``"hard"`` mode, ``k_j = argmax_k phi_jk``, computed once per distribution object;
        one byte per weight for K <= 256 (the object lives until the backward pass)."""
        codes = self.most_probable_level()
        return codes.to(torch.uint8) if self.locs.shape[-1] <= 256 else codes

    def mode_kl(self, inclusion: float | torch.Tensor, costs: torch.Tensor) -> torch.Tensor:
        """Per-weight KL of the guide whose assignment is its mode ``k_j`` (``"hard"`` mode):
        ``KL_Bern(g_j || lam) + g_j B_{k_j}`` with ``B_k`` the per-level bound ``costs``; the
        responsibilities pass no gradient (only the gates and ``B``, i.e. the levels and their scales, get one)."""
        log_lam, log_not_lam = log_inclusion(inclusion)
        learned = self.gate_fixed is None
        return _ModeKL.apply(costs, self.mode_codes, self.gate_logits if learned else None,
                             None if learned else self.gate_fixed, log_lam, log_not_lam)

    # --- sampling ----------------------------------------------------------------------
    @property
    def mean(self) -> torch.Tensor:
        return self.inclusion * self.responsibility_dot(self.locs)

    def _sample_gate(self, shape: torch.Size) -> torch.Tensor:
        if self.gate_fixed is not None:
            return self.gate_fixed.expand(shape)
        return _RelaxedGate.apply(self.gate_logits, shape, self.gate_temperature)

    def _sample_value(self, shape: torch.Size) -> torch.Tensor:
        """``sum_k a_k (mu_k + s_k eps)`` for a straight-through relaxed one-hot ``a`` drawn from ``phi``."""
        eps = torch.randn(shape, dtype=self.latent.dtype, device=self.latent.device)
        if self.fused:
            const, a = self.codebook_terms
            return kernels.straight_through_sample(self.latent, const, a, self.locs, self.scales, eps,
                                                   self.assign_temperature, self.window_ids, self.comp_window)
        log_phi = self.log_phi.expand(shape + self.log_phi.shape[-1:])
        # U clamped away from 0 and 1 (torch's exponential_ is ~15x slower on CPU than rand + log)
        index, delta = relaxed_one_hot(log_phi, torch.rand_like(log_phi).clamp_(1e-20, 1.0 - 1e-7),
                                       self.assign_temperature)
        # a = one_hot(index) + delta
        return self.locs[index] + self.scales[index] * eps + delta @ self.locs + eps * (delta @ self.scales)

    def rsample(self, sample_shape=torch.Size()) -> torch.Tensor:
        shape = self._extended_shape(sample_shape)
        if self.sampling == "hard":
            return self._hard_rsample(shape)
        if self.fused:
            return self._fused_rsample(shape)
        if self.sampling == "expected":
            return self.mean.expand(shape)
        return self._sample_gate(shape) * self._sample_value(shape)

    def _hard_rsample(self, shape: torch.Size) -> torch.Tensor:
        """``z_j (mu_{k_j} + x_j - stop_grad(x_j))`` with ``k_j = argmax_k phi_jk``: the greedy level
        forward (the posterior mode of the assignment), a straight-through (identity) gradient to the
        latent weight ``x_j``, each level ``mu_k`` the summed gradient of its weights; the gate
        ``z_j`` a straight-through relaxed Bernoulli draw (or the fixed mask)."""
        return _GatedLevel.apply(self.latent, self.locs, self.mode_codes, self._sample_gate(shape))

    def _fused_rsample(self, shape: torch.Size) -> torch.Tensor:
        """:meth:`rsample` in one kernel pass; for a single draw with ``kl_prior`` set, also the KL bound
        (kept in :attr:`fused_kl`)."""
        const, a = self.codebook_terms
        with_kl = self.kl_prior is not None and shape == self.batch_shape
        eps = None
        if self.sampling == "sample":
            eps = torch.randn(shape, dtype=self.latent.dtype, device=self.latent.device)
        learned = self.gate_fixed is None
        w, kl = kernels.fused_layer(
            self.latent, self.gate_logits if learned else None, const, a, self.locs, self.scales,
            component_kl(self, self.kl_prior) if with_kl else None, gate_fixed=None if learned else self.inclusion,
            eps=eps, window_ids=self.window_ids, comp_window=self.comp_window,
            assign_temperature=self.assign_temperature, gate_temperature=self.gate_temperature,
            prior_inclusion=self.kl_prior.inclusion if with_kl else 0.5)
        if with_kl:
            self.fused_kl = kl
        return w.expand(shape)

    def kl_for(self, prior) -> torch.Tensor | None:
        """The KL bound computed by :meth:`rsample` if it was taken against a prior equal to ``prior``."""
        mine = self.kl_prior
        if self.fused_kl is None or not (mine is prior or (
                type(mine) is type(prior) and mine.inclusion == prior.inclusion
                and mine.batch_shape == prior.batch_shape
                and all(torch.equal(getattr(mine, k), getattr(prior, k))
                        for k in ("slab_weights", "slab_locs", "slab_scales")))):
            return None
        return self.fused_kl

    def sample(self, sample_shape=torch.Size()) -> torch.Tensor:
        with torch.no_grad():
            return self.rsample(sample_shape)

    @torch.no_grad()
    def draw(self, num_samples: int, generator: torch.Generator | None = None,
             indices: torch.Tensor | None = None) -> "PosteriorDraw":
        """``num_samples`` exact draws from ``q`` as it stands, whatever the training mode:
        ``z_j ~ Bernoulli(g_j)`` (the fixed 0/1 gate when given), ``a_j ~ Categorical(phi_j)`` and
        ``w_j = z_j (mu_{a_j} + s_{a_j} eps_j)`` with ``eps_j ~ N(0, 1)``.

        Shapes ``(num_samples,) + S``, or ``(num_samples, len(indices))`` for the flat ``indices``
        of a subset of the weights. Drawn on the CPU with ``generator`` (seeded: reproducible),
        returned on the latent weights' device.
        """
        select = (lambda t: t.reshape(-1)[indices]) if indices is not None else (lambda t: t)
        shape = (num_samples,) + tuple(select(self.latent).shape)
        g = select(self.inclusion.detach()).double().cpu()
        phi = self.phi.detach().reshape(-1, self.locs.shape[-1])
        phi = (phi[indices] if indices is not None else phi).double().cpu()
        gate = torch.bernoulli(g.expand(shape), generator=generator)
        if phi.shape[0]:
            code = torch.multinomial(phi, num_samples, replacement=True, generator=generator).T.reshape(shape)
        else:
            code = torch.zeros(shape, dtype=torch.long)
        eps = torch.randn(shape, generator=generator, dtype=torch.float64)
        locs, scales = self.locs.detach().double().cpu(), self.scales.detach().double().cpu()
        weight = gate * (locs[code] + scales[code] * eps)
        device, dtype = self.latent.device, self.latent.dtype
        return PosteriorDraw(weight.to(device, dtype), gate.to(device, torch.bool), code.to(device))

    # --- density -----------------------------------------------------------------------
    def log_prob(self, value: torch.Tensor) -> torch.Tensor:
        log_g, log_not_g = self.log_inclusion()
        slab = torch.logsumexp(self.log_phi + normal_log_density(value, self.locs, self.scales), dim=-1)
        return torch.where(value == 0, log_not_g, log_g + slab)
