"""Which variational parameters the data teach: the gradient of the data term alone.

With the KL weight at 0 the loss is ``-E_q[log p(D | W)]`` (Pyro's N/B-scaled likelihood), so a guide
parameter whose gradient is zero there learns only from the prior, or from nothing.
"""
from __future__ import annotations

import pyro
import torch

from sqs_pyro.guides.spike_gmm import SpikeGMMGuide
from sqs_pyro.infer.elbo import SQSMeanFieldELBO
from sqs_pyro.models.network import SQSModel


def data_term_gradients(model: SQSModel, guide: SpikeGMMGuide, *batch: torch.Tensor) -> dict[str, float]:
    """``||d(-E_q log p(D|W)) / d psi||_2`` for every parameter ``psi`` of ``guide``, by name (0.0: no gradient).

    One Monte-Carlo draw of the data term at the guide's current mode and gate states, with the KL weight
    set to 0 for the call (restored after); gradients the parameters held before are restored too.
    """
    params = dict(guide.named_parameters())
    saved = {name: p.grad for name, p in params.items()}
    weights = model.kl_weight, guide.kl_weight
    try:
        model.kl_weight = guide.kl_weight = 0.0
        for p in params.values():
            p.grad = None
        with pyro.validation_enabled(False):
            SQSMeanFieldELBO()(model, guide)(*batch).backward()
        return {name: 0.0 if p.grad is None else float(p.grad.norm()) for name, p in params.items()}
    finally:
        model.kl_weight, guide.kl_weight = weights
        for name, p in params.items():
            p.grad = saved[name]


def untaught(gradients: dict[str, float]) -> list[str]:
    """The parameters whose data-term gradient is zero (or not finite)."""
    return sorted(name for name, norm in gradients.items() if not (norm > 0.0 and norm < float("inf")))
