"""``SQSMeanFieldELBO``: Pyro's ``TraceMeanField_ELBO`` without unused log-densities.

``TraceMeanField_ELBO`` evaluates every site's log-density before it looks for an analytic
KL; for a spike-and-GMM weight site that costs ``O(N K)`` work whose result is never used
once the registered KL bound applies. This subclass computes log-densities only for
observed sites and for latent sites *without* a registered KL, so the loss (and its
gradients) are identical to ``TraceMeanField_ELBO``'s, at less cost.
"""
from __future__ import annotations

from pyro import poutine
from pyro.distributions import Independent
from pyro.distributions.score_parts import ScoreParts
from pyro.infer import TraceMeanField_ELBO
from pyro.infer.util import is_validation_enabled
from pyro.poutine.util import prune_subsample_sites
from pyro.util import check_model_guide_match
from torch.distributions.kl import _dispatch_kl

from sqs_pyro.guides.spike_gmm import SpikeGMMGuide

_UNUSED = float("nan")


def has_analytic_kl(q, p) -> bool:
    """Whether ``kl_divergence(q, p)`` is registered (through matching ``Independent`` wrappers)."""
    while isinstance(q, Independent) and isinstance(p, Independent):
        if q.reinterpreted_batch_ndims != p.reinterpreted_batch_ndims:
            return False
        q, p = q.base_dist, p.base_dist
    return _dispatch_kl(type(q), type(p)) is not NotImplemented


class SQSMeanFieldELBO(TraceMeanField_ELBO):
    """``TraceMeanField_ELBO`` that skips log-densities of sites whose KL is analytic."""

    def _get_trace(self, model, guide, args, kwargs):
        guide_trace = poutine.trace(guide, graph_type="flat").get_trace(*args, **kwargs)
        model_trace = poutine.trace(poutine.replay(model, trace=guide_trace), graph_type="flat").get_trace(
            *args, **kwargs)
        if is_validation_enabled():
            check_model_guide_match(model_trace, guide_trace, self.max_plate_nesting)
        guide_trace = prune_subsample_sites(guide_trace)
        model_trace = prune_subsample_sites(model_trace)
        analytic = {
            name for name, site in model_trace.nodes.items()
            if site["type"] == "sample" and not site["is_observed"]
            and has_analytic_kl(guide_trace.nodes[name]["fn"], site["fn"])
        }
        model_trace.compute_log_prob(site_filter=lambda name, site: name not in analytic)
        skipped = {name: guide_trace.nodes.pop(name) for name in analytic}
        guide_trace.compute_score_parts()
        for name, site in skipped.items():
            # Never read for analytic-KL sites except by Pyro's reparameterisation check, which
            # needs a non-zero entropy term and a zero score function; NaN would poison any other use.
            site["score_parts"] = ScoreParts(log_prob=_UNUSED, score_function=0, entropy_term=_UNUSED)
            guide_trace.add_node(name, **site)
        return model_trace, guide_trace


def log_record(guide: SpikeGMMGuide, step: int, phase: str, loss: float, kl: float, beta: float,
               num_data: int) -> dict[str, float]:
    """Data term and KL term of the objective (both at the parameters the loss was computed at), per example.

    ``loss = -(data term - beta KL)``. ``objective = -loss / N`` is what SVI maximises: an ELBO
    (beta-weighted during KL warm-up) when the forward pass samples ``W ~ q``
    (``mode="sample"``), and a surrogate without a bound otherwise (``objective_kind``):
    ``log p(D | E_q W) - beta KL`` in ``mode="expected"``, ``E_z log p(D | z * mu_argmax) -
    beta KL`` in ``mode="hard"``; a sampled step with ``beta != 1`` (KL warm-up, or a ``kl_weight``
    other than 1) is a tempered ELBO (``"tempered_elbo"``). The ELBO itself, ``(data term - KL) / N``, is
    logged as ``elbo`` for sampled steps only.
    """
    data_term = -loss + beta * kl
    sampled = guide.mode == "sample"
    record = {"step": step, "phase": phase, "objective": -loss / num_data,
              "objective_kind": objective_kind(guide.mode, beta), "nll": -data_term / num_data,
              "kl_per_datum": kl / num_data, "kl": kl, "beta": beta, "sparsity": guide.measured_sparsity(),
              "gate_temperature": float(guide.gate_temperature),
              "assign_temperature": float(guide.assign_temperature)}
    if sampled:
        record["elbo"] = (data_term - kl) / num_data
    return record


def objective_kind(mode: str, beta: float) -> str:
    """What a step with forward ``mode`` and KL weight ``beta`` optimises: ``"elbo"`` (``W ~ q``, ``beta = 1``),
    ``"tempered_elbo"`` (``W ~ q``, ``E_q log p(D|W) - beta KL``) or ``"surrogate"`` (hard or expected forward)."""
    if mode != "sample":
        return "surrogate"
    return "elbo" if beta == 1.0 else "tempered_elbo"
