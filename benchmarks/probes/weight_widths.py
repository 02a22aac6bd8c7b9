"""Probe (issue 38): are one slab width per level and layer too coarse for the posterior predictive?

The driver's posterior phase learns ``s_k`` (one width per level per layer) and the mixing weights around the
fixed point estimate. This probe trains one ccexam cell's point phases (``posterior_epochs=0``), then runs the
same phase in eager PyTorch three ways, from the same point estimate, on the same minibatches:

* ``shared``: ``q(u_j) = sum_k phi_jk N(mu_k, s_k^2)`` on the kept weights (the driver's family);
* ``row``: ``N(mu_k, s_k^2 r_i^2)`` with a learned ``log r_i`` per output row ``i``;
* ``weight``: ``N(mu_k, s_k^2 r_j^2)`` with a learned ``log r_j`` per weight;
* ``weight_hard``: ``N(mu_{k_j}, s_{k_j}^2 r_j^2)`` at the greedy code ``k_j`` (no code flips: how much of the
  predictive's spread comes from the assignments).

Each minimises ``N E_q[CE] + KL`` (the ELBO; the KL is the guide's bound, ``sum_j sum_k phi_jk B(mu_k, s_k r_j)``
against the run's prior), Adam at ``lr_posterior`` with the driver's cosine, straight-through relaxed
assignments at the run's final temperature. Metrics on the validation split only (see posterior_phase.py).

    python benchmarks/probes/weight_widths.py --epochs 0.5 --out benchmarks/results/history/weight_widths.jsonl
"""
from __future__ import annotations

import copy
import math
import time

import torch
import torch.nn.functional as F

from posterior_phase import FIT, add_mean_nll, emit, fit_temperature, held_out_views, probe_parser, summary, train_cell
from sqs_pyro.data import load_mnist
from sqs_pyro.data.metrics import predictive_probs
from sqs_pyro.guides.distributions import Codebook, SpikeGMM, relaxed_one_hot
from sqs_pyro.guides.gaussian_kl import gaussian_vs_mixture_kl_bound

FAMILIES = ("shared", "row", "weight", "weight_hard")


class Widths(torch.nn.Module):
    """The phase's variational parameters for one family: per layer the raw slab scales, the mixing logits and
    the log width multipliers (none, per row, or per weight)."""

    def __init__(self, guide, family: str) -> None:
        super().__init__()
        self.family = family
        self.hard = family.endswith("_hard")
        self.codes = [d.most_probable_level() for d in guide.distributions().values()] if self.hard else None
        self.scale_raw = torch.nn.ParameterList([torch.nn.Parameter(l.scale_raw.detach().clone()) for l in guide.layers])
        self.mix_logits = torch.nn.ParameterList([torch.nn.Parameter(l.mix_logits.detach().clone()) for l in guide.layers])
        shapes = [l.latent.shape for l in guide.layers]
        self.log_r = torch.nn.ParameterList(
            [torch.nn.Parameter(torch.zeros(s if family == "weight" else (s[0],) + (1,) * (len(s) - 1)))
             for s in shapes] if family != "shared" else [])
        self.family = family.removesuffix("_hard")

    def codebook(self, i: int, layer) -> Codebook:
        logits = self.mix_logits[i]
        if layer.window_ids is None:
            log_mix = torch.log_softmax(logits, -1)
        else:
            member = layer.comp_window.unsqueeze(0) == layer.comp_window.unsqueeze(1)
            log_mix = logits - torch.logsumexp(logits.unsqueeze(0).masked_fill(~member, float("-inf")), -1)
        return Codebook(layer.locs.detach(), F.softplus(self.scale_raw[i]) + 1e-6, log_mix, layer.window_ids,
                        layer.comp_window)

    def multiplier(self, i: int) -> torch.Tensor | float:
        return 1.0 if self.family == "shared" else self.log_r[i].exp()


def layer_terms(widths: Widths, i: int, layer, prior, temperature: float | None, generator=None):
    """One draw of the layer's normalised weights ``u`` and its KL bound; ``temperature=None``: an exact draw."""
    cb = widths.codebook(i, layer)
    d = SpikeGMM(layer.gate_logits.detach(), layer.latent.detach(), cb, layer.mask, mode="sample", pooled=True)
    log_phi = d.log_phi
    if widths.hard:  # the greedy code with probability 1
        log_phi = torch.full_like(log_phi, -80.0).scatter_(-1, widths.codes[i].unsqueeze(-1), 0.0).log_softmax(-1)
    mask = layer.mask.to(log_phi.dtype)
    r = widths.multiplier(i)
    eps = torch.randn(layer.latent.shape, generator=generator)
    if temperature is None:
        code = torch.multinomial(log_phi.detach().exp().reshape(-1, log_phi.shape[-1]), 1, generator=generator)
        code = code.reshape(layer.latent.shape)
        return mask * (cb.locs[code] + cb.scales[code] * r * eps), None
    uniforms = torch.rand(log_phi.shape).clamp_(1e-20, 1.0 - 1e-7)
    index, delta = relaxed_one_hot(log_phi, uniforms, temperature)
    level = cb.locs[index] + delta @ cb.locs
    scale = cb.scales[index] + delta @ cb.scales
    u = mask * (level + scale * r * eps)
    width = cb.scales * (r.unsqueeze(-1) if torch.is_tensor(r) else r)  # (..., K) or (K,)
    bound = gaussian_vs_mixture_kl_bound(cb.locs.expand_as(width) if torch.is_tensor(r) else cb.locs, width,
                                         prior.slab_weights, prior.slab_locs, prior.slab_scales)
    kl = (mask * (log_phi.exp() * bound).sum(-1)).sum()
    return u, kl


def fit(result, family: str, x: torch.Tensor, y: torch.Tensor, steps: int, seed: int) -> tuple[Widths, float]:
    guide, config = result.guide, result.config
    compressed = result.compressed()
    layers_c = {l.name: l for l in compressed.layers}
    net = compressed.load_into(copy.deepcopy(result.skeleton)).eval()
    priors = result.model.priors()
    widths = Widths(guide, family)
    opt = torch.optim.Adam(widths.parameters(), lr=config.lr_posterior)
    temperature = float(guide.assign_temperature)
    g = torch.Generator().manual_seed(seed)
    n = len(x)
    start = time.perf_counter()
    torch.manual_seed(seed)
    for step in range(steps):
        frac = step / max(1, steps)
        for group in opt.param_groups:
            group["lr"] = config.lr_posterior * (0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * frac)))
        idx = torch.randint(0, n, (config.batch_size,), generator=g)
        weights, kl = {}, 0.0
        for i, layer in enumerate(guide.layers):
            u, k = layer_terms(widths, i, layer, priors[layer.site_name], temperature)
            weights[layer.site_name] = layers_c[layer.site_name].scaled(u)
            kl = kl + k
        out = torch.func.functional_call(net, weights, (x[idx],), strict=False)
        loss = (F.cross_entropy(out, y[idx], reduction="mean") * n + kl) / n
        opt.zero_grad()
        loss.backward()
        opt.step()
    return widths, time.perf_counter() - start


@torch.no_grad()
def predictive(result, widths: Widths, members: int, seed: int):
    guide = result.guide
    compressed = result.compressed()
    layers_c = {l.name: l for l in compressed.layers}
    net = compressed.load_into(copy.deepcopy(result.skeleton)).eval()
    priors = result.model.priors()
    g = torch.Generator().manual_seed(seed)
    draws = [{l.site_name: layers_c[l.site_name].scaled(layer_terms(widths, i, l, priors[l.site_name], None, g)[0])
              for i, l in enumerate(guide.layers)} for _ in range(members)]

    @torch.no_grad()
    def probs(x: torch.Tensor) -> torch.Tensor:
        return sum(torch.softmax(torch.func.functional_call(net, w, (x,), strict=False), -1) for w in draws) / members
    return probs


def main() -> None:
    p = probe_parser(epochs=0.5, members=10)
    p.add_argument("--families", nargs="*", default=list(FAMILIES))
    p.add_argument("--phase-epochs", type=float, default=0.25)
    a = p.parse_args()
    a.set = list(a.set) + ["posterior_epochs=0"]
    overrides, config, result, seconds = train_cell(a)
    x, y = load_mnist("train", a.train_limit)
    steps = math.ceil(a.phase_epochs * math.ceil(len(x) / config.batch_size))
    xv, yv = load_mnist("val")
    greedy = result.greedy_module()
    T = fit_temperature(predictive_probs(greedy, xv[FIT]).log().float(), yv[FIT])
    views = held_out_views(xv, yv)
    row = {"probe": "weight_widths", "sparsity": a.sparsity, "components": a.components, "epochs": a.epochs,
           "seed": a.seed, "phase_steps": steps, "members": a.members, "temperature": T, "point_seconds": round(seconds, 1)}
    for deg, (xs, ys) in views.items():
        gp = predictive_probs(greedy, xs)
        row[f"greedy_{deg}"] = summary(gp, ys)
        row[f"ts_{deg}"] = summary(torch.softmax(gp.log() / T, -1), ys)
    for family in a.families:
        widths, secs = fit(result, family, x, y, steps, a.seed)
        probs = predictive(result, widths, a.members, a.seed)
        for deg, (xs, ys) in views.items():
            row[f"{family}_{deg}"] = summary(torch.cat([probs(xs[i:i + 1000]) for i in range(0, len(xs), 1000)]), ys)
        row[f"{family}_seconds"] = round(secs, 1)
        row[f"{family}_scales"] = [[round(float(s), 4) for s in F.softplus(r) + 1e-6] for r in widths.scale_raw]
        if family != "shared":
            row[f"{family}_log_r"] = [[round(float(t.mean()), 3), round(float(t.std()), 3),
                                       round(float(t.min()), 3), round(float(t.max()), 3)] for t in widths.log_r]
    add_mean_nll(row)
    emit(row, a.out)


if __name__ == "__main__":
    main()
