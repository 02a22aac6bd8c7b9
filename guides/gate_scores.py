r"""Scores that rank the weights of a pretrained network before any SVI step: they place the
initial inclusion logits (``theta_j = gate_init + clip(log(score_j / ref), -3, 3)``).

* :func:`first_order_saliency`: ``sqrt(mean_b (w_j dL_b/dw_j)^2)`` (nats);
* :func:`activation_scores`: Wanda's ``|W_ij| ||x_j||``;
* magnitudes ``|w_j|`` (the guide's default when no scores are given).
"""
from __future__ import annotations

from typing import Callable, Iterable, Sequence

import torch
from torch import nn

from sqs_pyro.models.likelihoods import sparse_token_log_likelihood
from sqs_pyro.models.network import network_arguments
from sqs_pyro.models.selection import CompressedSite


def task_loss(task: str) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """The mean negative log-likelihood of a task (up to constants), for saliency scores; ``distill``'s
    targets are the teacher's probabilities, for which ``cross_entropy`` is the soft-target loss."""
    if task in ("classification", "distill"):
        return torch.nn.functional.cross_entropy
    if task == "lm":
        return _token_loss
    return torch.nn.functional.mse_loss


def _token_loss(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Mean token cross-entropy against labels or packed soft targets (distillation)."""
    if y.is_floating_point():
        return -sparse_token_log_likelihood(logits, y).mean()
    return torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1))


def gate_scores(net: nn.Module, sites: Sequence[CompressedSite], batches: Sequence[Sequence[torch.Tensor]],
                task: str, gate_score: str,
                loss: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
    """The scores that place the initial gates (:class:`~sqs_pyro.guides.SpikeGMMGuide`; it
    scores magnitudes itself): first-order saliencies (``gate_score="saliency"``) of ``loss`` (a
    minibatch's mean loss; default the task's, :func:`task_loss`) or activation-aware scores
    (``"activation"``) on the given minibatches."""
    if gate_score == "activation":
        return activation_scores(net, sites, batches)
    return first_order_saliency(net, [s.name for s in sites], batches, loss or task_loss(task))


def first_order_saliency(net: torch.nn.Module, names: Sequence[str],
                         batches: Iterable[tuple[torch.Tensor, torch.Tensor]],
                         loss: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]) -> dict[str, torch.Tensor]:
    r"""Per-weight saliency ``sqrt(mean_b (w_j dL_b/dw_j)^2)`` over the given minibatches.

    ``w_j dL/dw_j`` is the first-order change of the minibatch loss when ``w_j`` is removed
    (set to zero); its root mean square over batches compares weights across layers in the
    same unit (nats), which a magnitude does not.
    """
    weights = {n: net.get_parameter(n).detach().clone().requires_grad_() for n in names}
    total = {n: torch.zeros_like(w) for n, w in weights.items()}
    count = 0
    for x, y in batches:
        out = torch.func.functional_call(net, weights, *network_arguments(x), strict=False)
        grads = torch.autograd.grad(loss(out, y), list(weights.values()))
        for (n, w), g in zip(weights.items(), grads):
            total[n] += (w.detach() * g) ** 2
        count += 1
    if count == 0:
        raise ValueError("first_order_saliency needs at least one batch")
    return {n: (t / count).sqrt() for n, t in total.items()}


@torch.no_grad()
def activation_scores(net: torch.nn.Module, sites: Sequence, batches: Iterable[tuple[torch.Tensor, torch.Tensor]]
                      ) -> dict[str, torch.Tensor]:
    r"""Activation-aware scores ``|W_ij| * ||x_j||_2`` (Wanda, Sun et al. 2023) of Linear weights.

    ``||x_j||`` is the root mean square of input feature ``j`` over every token / example of
    the batches (collected with forward pre-hooks); other layer types score ``|w|``. Compared
    within an output row (``prune_scope="row"``), this removes the weights whose product
    with typical inputs is smallest.
    """
    modules = {s.name: net.get_submodule(s.name.rsplit(".", 1)[0]) if "." in s.name else net for s in sites}
    sums: dict[str, torch.Tensor] = {}
    counts: dict[str, int] = {}

    def hook(name):
        def record(module, args):
            x = args[0].detach().reshape(-1, args[0].shape[-1]).double()
            sums[name] = sums.get(name, 0) + (x * x).sum(0)
            counts[name] = counts.get(name, 0) + x.shape[0]
        return record

    handles = [modules[s.name].register_forward_pre_hook(hook(s.name)) for s in sites if s.layer_type == "linear"]
    try:
        for x, _ in batches:
            args, kwargs = network_arguments(x)
            net(*args, **kwargs)
    finally:
        for h in handles:
            h.remove()
    scores = {}
    for s in sites:
        w = net.get_parameter(s.name).detach().abs()
        if s.name in sums:
            w = w * (sums[s.name] / counts[s.name]).sqrt().to(w.dtype)
        scores[s.name] = w
    return scores
