r"""The posterior of a frozen-mask network, summarised for the ``.sqs`` file, and drawn from it.

After training, a kept weight's posterior is a mixture over the K levels (times its group scale)

.. math::

    q(w_j) = \sum_k \phi_{jk}\, \mathcal N(\mu_k, s_k^2).

The summary keeps, per layer, the scales ``s_k`` and, for the kept weights whose assignment is
not certain (some level other than the greedy level ``c_j`` has ``phi_jk`` above a threshold
``eps``), the runner-up level ``r_j = argmax_{k != c_j} phi_jk`` and its probability ``p_j``
(after a posterior phase ``c_j``, the point phases' mode, may be the less probable of the two).
Every other level's mass goes to ``c_j``:

.. math::

    \hat q(w_j) = (1 - p_j)\, \mathcal N(\mu_{c_j}, s_{c_j}^2) + p_j\, \mathcal N(\mu_{r_j}, s_{r_j}^2)

(``p_j = 0`` for a certain weight). :class:`MixturePosterior` draws whole networks from it
exactly as :meth:`SpikeGMMGuide.draw <sqs_pyro.guides.SpikeGMMGuide.draw>` draws from ``q``
(the same generator calls in the same order), so that with ``eps = 0``, ``K = 2`` and unrounded
probabilities the two predictives agree draw for draw.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping

import torch

from sqs_pyro.compressed.materialize import CompressedNetwork
from sqs_pyro.errors import SQSInputError
from sqs_pyro.guides.distributions import PosteriorDraw
from sqs_pyro.guides.spike_gmm import SpikeGMMGuide


@dataclass(frozen=True)
class RunnerUps:
    """One layer's posterior summary: the K slab ``scales``; for the uncertain kept weights their
    ``index`` among the kept weights (increasing, row-major order of the kept weights), their
    runner-up ``level`` and its probability ``prob`` (float64)."""

    scales: torch.Tensor
    index: torch.Tensor
    level: torch.Tensor
    prob: torch.Tensor


def runner_ups(phi: torch.Tensor, codes: torch.Tensor, scales: torch.Tensor, threshold: float) -> RunnerUps:
    """The summary of the responsibilities ``phi`` (``(nnz, K)``) of the kept weights whose greedy
    levels are ``codes`` (``(nnz,)``): the weights with runner-up probability above ``threshold``."""
    phi = phi.detach().double().cpu()
    codes = codes.detach().long().cpu()
    rest = phi.scatter(1, codes[:, None], -1.0)  # the greedy level out of the race
    prob, level = rest.max(1) if len(phi) else (torch.zeros(0, dtype=phi.dtype), torch.zeros(0, dtype=torch.long))
    index = torch.nonzero(prob > threshold).reshape(-1)
    return RunnerUps(scales.detach().cpu().clone(), index, level[index], prob[index])


def guide_runner_ups(guide: SpikeGMMGuide, network: CompressedNetwork, threshold: float) -> dict[str, RunnerUps]:
    """:func:`runner_ups` of every layer of a trained guide whose greedy network is ``network``
    (its layers must keep the guide's levels, i.e. no ``adaptive_bits`` merging)."""
    summaries = {}
    for posterior, d, layer in zip(guide.layers, guide.distributions().values(), network.layers):
        if layer.components != posterior.locs.numel() or not torch.equal(layer.codebook, posterior.locs.detach()):
            raise SQSInputError(f"layer {layer.name}: its codebook is not the guide's levels (adaptive_bits merged "
                                "them); the posterior can be stored only for the guide's own levels")
        kept = layer.mask.reshape(-1)
        phi = d.phi.detach().reshape(-1, layer.components)[kept]
        summaries[layer.name] = runner_ups(phi, layer.codes.reshape(-1)[kept], posterior.scales, threshold)
    return summaries


class MixturePosterior:
    """The summarised posterior of a compressed network (:class:`RunnerUps` by layer name), with
    :meth:`draw` as :meth:`SpikeGMMGuide.draw <sqs_pyro.guides.SpikeGMMGuide.draw>`."""

    def __init__(self, network: CompressedNetwork, summaries: Mapping[str, RunnerUps]) -> None:
        missing = [layer.name for layer in network.layers if layer.name not in summaries]
        if missing:
            raise SQSInputError(f"no posterior summary for the layers {missing[:3]}")
        self.network = network
        self.summaries = dict(summaries)

    def responsibilities(self, name: str) -> torch.Tensor:
        """``phi-hat`` of every weight of a layer, ``(numel, K)`` float64; a pruned weight's row is one-hot at 0."""
        layer = next(layer for layer in self.network.layers if layer.name == name)
        summary = self.summaries[name]
        mask = layer.mask.reshape(-1).cpu()
        codes = torch.where(mask, layer.codes.reshape(-1).cpu(), 0)
        phi = torch.zeros(mask.numel(), layer.components, dtype=torch.float64)
        phi[torch.arange(mask.numel()), codes] = 1.0
        rows = torch.nonzero(mask).reshape(-1)[summary.index]
        phi[rows, codes[rows]] -= summary.prob
        phi[rows, summary.level] += summary.prob
        return phi

    @torch.no_grad()
    def draw(self, num_samples: int, generator: torch.Generator | None = None) -> dict[str, PosteriorDraw]:
        """``num_samples`` networks: ``z_j`` the mask, ``a_j ~ Categorical(phi-hat_j)``,
        ``w_j = z_j (mu_{a_j} + s_{a_j} eps_j)``, by layer name (normalised weights with group scales)."""
        draws = {}
        for layer in self.network.layers:
            shape = (num_samples,) + tuple(layer.shape)
            gate = torch.bernoulli(layer.mask.double().cpu().expand(shape), generator=generator)
            phi = self.responsibilities(layer.name)
            code = (torch.multinomial(phi, num_samples, replacement=True, generator=generator).T.reshape(shape)
                    if len(phi) else torch.zeros(shape, dtype=torch.long))
            eps = torch.randn(shape, generator=generator, dtype=torch.float64)
            locs = layer.codebook.detach().double().cpu()
            scales = self.summaries[layer.name].scales.double()
            weight = gate * (locs[code] + scales[code] * eps)
            draws[layer.name] = PosteriorDraw(weight.to(layer.codebook.dtype), gate.bool(), code)
        return draws
