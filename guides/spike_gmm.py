"""The mean-field spike-and-GMM guide over all compressed weight tensors of a network."""
from __future__ import annotations

import math
from enum import IntEnum
from typing import Mapping, Sequence

import pyro
import torch
import torch.nn.functional as F
from pyro.nn import PyroModule
from torch import nn

from sqs_pyro.config import SQSConfig
from sqs_pyro.guides.allocation import lamp_sparsities
from sqs_pyro.guides.distributions import Codebook, PosteriorDraw, SpikeGMM
from sqs_pyro.guides.initialization import StartCoding, codebook_from_codes, initial_codebook, scoped_kthvalues
from sqs_pyro.guides.kl import spike_gmm_kl
from sqs_pyro.models.group_scales import normalise
from sqs_pyro.models.priors import SpikeSlabGMM, kl_weighting
from sqs_pyro.models.selection import CompressedSite



class GateState(IntEnum):
    """What the inclusion gates of a layer do: ``OPEN`` (fixed at 1, warm-up), ``LEARN``
    (``g_j = sigmoid(theta_j)`` learns) or ``FROZEN`` (fixed at the 0/1 ``mask``, fine-tuning)."""

    OPEN = 0
    LEARN = 1
    FROZEN = 2

_SCALE_FLOOR = 1e-6


def _softplus_inverse(y: torch.Tensor) -> torch.Tensor:
    return y + torch.log(-torch.expm1(-y))


class LayerPosterior(PyroModule):
    """Variational parameters of one weight tensor.

    Started from the pretrained weight (k-means codebook, latent = weight) or from a given
    :class:`~sqs_pyro.guides.initialization.StartCoding` (its levels, latent = the coded level).
    Per weight: ``gate_logits`` (theta_j) and ``latent`` (x_j). Per layer: the K-level
    codebook ``locs`` (mu_k), ``scale_raw`` (s_k = softplus + 1e-6) and ``mix_logits``
    (pi_k, softmax within each window). Buffers: ``window_ids`` per weight,
    ``comp_window`` per level, the ``mask`` (a pruned start's, else all ones, until a freeze sets it)
    and ``gate_state`` (open/learn/frozen).
    """

    def __init__(self, site: CompressedSite, weight: torch.Tensor, config: SQSConfig,
                 gate_offset: torch.Tensor | None = None, start: StartCoding | None = None) -> None:
        super().__init__()
        self.site_name = site.name
        w = weight.detach()
        offset = torch.zeros_like(w) if gate_offset is None else gate_offset.to(w)
        fit = (offset >= 0).reshape(-1).cpu().numpy()  # the weights the gates start by keeping
        values = w.reshape(-1).double().cpu().numpy()
        if start is None:
            init = initial_codebook(values, config.components, config.windows, config.equal_windows,
                                    config.iqr_factor, fit=fit)
        else:
            kept = None if start.mask is None else start.mask.reshape(-1).cpu().numpy()
            init = codebook_from_codes(values, start.levels.double().cpu().numpy(), kept)
        as_t = lambda a: torch.as_tensor(a, dtype=w.dtype, device=w.device)  # noqa: E731
        self.gate_logits = nn.Parameter(config.gate_init + offset)
        # a given coding starts every kept latent weight on its level: the greedy network is that
        # coding; a weight it pruned starts at its own value, should its gate reopen
        self.latent = nn.Parameter(w.clone() if start is None else start.latents(w, as_t(init.locs)))
        self.locs = nn.Parameter(as_t(init.locs))
        self.scale_raw = nn.Parameter(_softplus_inverse(as_t(init.scales).clamp_min(2 * _SCALE_FLOOR) - _SCALE_FLOOR))
        self.mix_logits = nn.Parameter(torch.log(as_t(init.mix)))
        multi = int(init.component_windows.max()) > 0
        # int8: one byte per weight (windows < 128, checked by SQSConfig) keeps large layers lean
        self.register_buffer("window_ids", torch.as_tensor(init.window_ids, dtype=torch.int8, device=w.device)
                             .reshape(w.shape) if multi else None)
        self.register_buffer("comp_window", torch.as_tensor(init.component_windows, device=w.device))
        # the mask a freeze from open gates keeps: a pruned start's, else every weight
        self.register_buffer("mask", torch.ones_like(w, dtype=torch.bool) if start is None or start.mask is None
                             else start.mask.to(device=w.device, dtype=torch.bool).reshape(w.shape).clone())
        self.register_buffer("gate_state", torch.tensor(int(GateState.OPEN)))
        # the point phases' greedy codes, fixed when the posterior phase starts (then what the greedy network reads)
        self.register_buffer("point_codes", torch.zeros(w.shape, dtype=torch.uint8 if config.components <= 256
                                                        else torch.long, device=w.device))
        self.register_buffer("has_point_codes", torch.tensor(False))

    @property
    def scales(self) -> torch.Tensor:
        return F.softplus(self.scale_raw) + _SCALE_FLOOR

    def log_mix(self) -> torch.Tensor:
        """log pi_k normalised within each window."""
        logits = self.mix_logits
        if self.window_ids is None:
            return torch.log_softmax(logits, dim=-1)
        member = self.comp_window.unsqueeze(0) == self.comp_window.unsqueeze(1)  # (K, K)
        norm = torch.logsumexp(logits.unsqueeze(0).masked_fill(~member, float("-inf")), dim=-1)
        return logits - norm

    @property
    def state(self) -> GateState:
        return GateState(int(self.gate_state))

    def kept_mask(self) -> torch.Tensor:
        """The kept weights: the frozen mask, all weights while the gates are open, else ``g_j > 0.5``
        (the posterior median rule)."""
        if self.state == GateState.FROZEN:
            return self.mask.clone()
        if self.state == GateState.OPEN:
            return torch.ones_like(self.mask)
        return torch.sigmoid(self.gate_logits.detach()) > 0.5

    def distribution(self, gate_temperature: float, assign_temperature: float, mode: str,
                     kl_prior: SpikeSlabGMM | None = None, pooled: bool = False) -> SpikeGMM:
        gate_fixed = None
        state = self.state
        if state == GateState.FROZEN and not bool(self.mask.all()):
            gate_fixed = self.mask  # bool: the forward and the KL keep a reference, no float copy
        elif state != GateState.LEARN:  # open, or a mask that keeps all: ones without storage
            gate_fixed = torch.ones((), dtype=self.latent.dtype, device=self.latent.device).expand_as(self.latent)
        return SpikeGMM(self.gate_logits, self.latent, self.codebook(), gate_fixed, 1.0, gate_temperature,
                        assign_temperature, mode, kl_prior, pooled)

    def greedy_codes(self, d: SpikeGMM) -> torch.Tensor:
        """The greedy network's level per weight (long): the point phases' codes once the posterior phase fixed
        them (:meth:`SpikeGMMGuide.fix_point_codes`), else ``argmax_k phi_jk`` of this layer's distribution ``d``."""
        return self.point_codes.long() if bool(self.has_point_codes) else d.most_probable_level()

    def codebook(self) -> Codebook:
        """The current codebook (levels, scales, per-window log mixing weights, windows)."""
        return Codebook(self.locs, self.scales, self.log_mix(), self.window_ids, self.comp_window)


class SpikeGMMGuide(PyroModule):
    """Mean-field guide: one :class:`~sqs_pyro.guides.distributions.SpikeGMM` site per compressed tensor.

    Built from the pretrained weights: k-means codebooks per window, latent weights at their
    pretrained values, gate logits ``gate_init + clip(log(score_j / ref), -3, 3)`` with
    ``ref`` the score at the target-sparsity quantile of the weight's comparison group
    (``config.prune_scope``; with ``"lamp"`` its layer at the layer's LAMP budget,
    :attr:`layer_sparsity`); ``scores`` (e.g. a first-order saliency,
    :func:`~sqs_pyro.guides.gate_scores.first_order_saliency`) default to ``|w_j|``. The
    driver sets the temperatures, ``kl_weight`` and the gate states; a user's own SVI script
    can use it as it is. ``start`` optionally gives a layer's coding to start from
    (:class:`~sqs_pyro.guides.initialization.StartCoding`, by site name). With ``config.group_size > 0`` it is a posterior over the normalised
    weights ``u = w / sigma`` (the model's sites; :mod:`sqs_pyro.models.group_scales`), and the
    gates still start from the scores of the weights themselves.
    """

    def __init__(self, net: nn.Module, sites: Sequence[CompressedSite], config: SQSConfig,
                 scores: dict[str, torch.Tensor] | None = None, start: Mapping[str, StartCoding] | None = None) -> None:
        super().__init__()
        self.sites = list(sites)
        self.config = config
        #: per-layer target sparsities (``prune_scope="lamp"``: LAMP budgets of the pretrained weights)
        self.layer_sparsity = (lamp_sparsities([net.get_parameter(s.name) for s in self.sites], config.sparsity)
                               if config.prune_scope == "lamp" else None)
        offsets = _gate_offsets(net, self.sites, scores, config.sparsity, config.prune_scope, self.layer_sparsity)
        codings = [(start or {}).get(site.name) for site in self.sites]
        self.layers = PyroModule[nn.ModuleList](
            [LayerPosterior(site, self._start(net.get_parameter(site.name), coding), config, offsets[site.name], coding)
             for site, coding in zip(self.sites, codings)])
        self.kl_weight = float(config.kl_weight)
        self.mode = config.mode
        self.register_buffer("gate_temperature", torch.tensor(config.gate_temperature[0]))
        self.register_buffer("assign_temperature", torch.tensor(config.assign_temperature[0]))

    def _start(self, weight: torch.Tensor, start: StartCoding | None) -> torch.Tensor:
        """The values ``q`` lives on: the weights, or with group scales ``u = w / sigma`` (``sigma``
        the absmax scales, or those of the given coding)."""
        size = self.config.group_size
        if not size:
            return weight.detach()
        return normalise(weight.detach(), size, None if start is None else start.scales)[0]

    def distributions(self) -> dict[str, SpikeGMM]:
        """The current variational distribution of every compressed tensor, by site name.

        Each knows the configured prior (``kl_prior``), so that a fused draw also yields its KL bound.
        """
        tg, ta = float(self.gate_temperature), float(self.assign_temperature)
        return {layer.site_name: layer.distribution(tg, ta, self.mode, SpikeSlabGMM.from_config(
                    self.config, layer.latent.shape, dtype=layer.latent.dtype, device=layer.latent.device),
                    self.config.responsibility_scale == "pooled")
                for layer in self.layers}

    def kernel_path(self) -> str:
        """Which code computes the ``O(N K)`` terms of the layers: ``"fused"`` (the C kernels of
        :mod:`sqs_pyro.guides.kernels`) for every layer, ``"eager"`` (PyTorch, the same math, much slower
        on a CPU: no C compiler, not float32 on the CPU, or ``SQS_PYRO_KERNELS=0``) for every layer,
        else ``"mixed"``."""
        fused = [d.fused for d in self.distributions().values()]
        return "fused" if all(fused) else "eager" if not any(fused) else "mixed"

    def set_gate_state(self, state: GateState) -> None:
        for layer in self.layers:
            layer.gate_state.fill_(int(state))

    @torch.no_grad()
    def prune_to_quantile(self, sparsity: float, pruned_logit: float, scope: str = "global") -> None:
        """Reset the inclusion logits at or below the ``sparsity`` quantile to at most ``pruned_logit``
        (they may recover); the quantile is taken over all compressed weights (``scope="global"``),
        within each layer (``"layer"``), within each output row (``"row"``) or within each layer
        at its share ``s_l * sparsity / s`` of its LAMP budget ``s_l`` (``"lamp"``)."""
        for layer, threshold in zip(self.layers, self._gate_thresholds(sparsity, scope)):
            if threshold is not None:
                below = layer.gate_logits <= threshold
                layer.gate_logits.masked_fill_(below & (layer.gate_logits > pruned_logit), pruned_logit)

    def _gate_thresholds(self, sparsity: float, scope: str) -> list[torch.Tensor | None]:
        """Per layer, the gate logit at the ``sparsity`` quantile of ``scope`` (see :meth:`prune_to_quantile`);
        ``None`` where nothing is to go."""
        if sparsity <= 0:
            return [None] * len(self.layers)
        logits = [layer.gate_logits.detach() for layer in self.layers]
        if scope == "lamp":
            if self.layer_sparsity is None:
                raise ValueError("prune scope 'lamp' needs a guide built with prune_scope='lamp'")
            shares = [s_l * sparsity / self.config.sparsity for s_l in self.layer_sparsity]
            return [_kthvalue(t, share) for t, share in zip(logits, shares)]
        return scoped_kthvalues(logits, scope, lambda n: min(n, math.ceil(sparsity * n - 1e-9)))

    @torch.no_grad()
    def freeze_mask(self, sparsity: float | None = None) -> None:
        """Fix the mask of the layers whose gates learn, and stop every gate from learning.

        The mask keeps the weights above the ``sparsity`` quantile of the gate logits, so that
        exactly that fraction goes (up to ties): by default (``sparsity_mode="exact"``) ``s_f``
        within the prune scope; a given ``sparsity`` ranks all layers' gates together (the
        posterior's own allocation; ``"auto"``'s choice). Otherwise (``"median"``, or ``"auto"`` without
        a choice) the mask keeps ``g_j > 0.5`` (the posterior median rule). Gates that never learned (still open) leave the
        mask the guide started with: a pruned start's, else every weight; a frozen mask stays."""
        if sparsity is not None:
            thresholds = self._gate_thresholds(sparsity, "global")
        elif self.config.sparsity_mode == "exact":
            thresholds = self._gate_thresholds(self.config.sparsity, self.config.prune_scope)
        else:
            thresholds = None
        for i, layer in enumerate(self.layers):
            if layer.state != GateState.LEARN:
                continue
            if thresholds is None:
                layer.mask.copy_(layer.kept_mask())
            elif thresholds[i] is None:
                layer.mask.fill_(True)
            else:
                layer.mask.copy_(layer.gate_logits > thresholds[i])
        self.set_gate_state(GateState.FROZEN)

    @torch.no_grad()
    def fix_point_codes(self) -> None:
        """Keep every layer's ``argmax_k phi_jk`` as the greedy network's codes: the posterior phase then fits
        ``q`` around this point estimate (its widths and mixing weights may move the argmax; the greedy network stays)."""
        for layer, d in zip(self.layers, self.distributions().values()):
            layer.point_codes.copy_(d.most_probable_level())
            layer.has_point_codes.fill_(True)

    def measured_sparsity(self) -> float:
        """The fraction of compressed weights that :meth:`LayerPosterior.kept_mask` drops."""
        kept = sum(int(layer.kept_mask().sum()) for layer in self.layers)
        total = sum(layer.latent.numel() for layer in self.layers)
        return 1.0 - kept / total

    @torch.no_grad()
    def draw(self, num_samples: int, generator: torch.Generator | None = None,
             indices: Mapping[str, torch.Tensor] | None = None) -> dict[str, PosteriorDraw]:
        """Whole networks drawn from ``q`` as it stands (gates or the frozen mask, codes, slab
        noise), by site name: :meth:`SpikeGMM.draw` for every layer, in the guide's order, with
        one generator (``indices`` optionally restricts a layer to a flat subset of its weights)."""
        return {name: d.draw(num_samples, generator, (indices or {}).get(name))
                for name, d in self.distributions().items()}

    @torch.no_grad()
    def total_kl(self, priors: Mapping[str, SpikeSlabGMM]) -> float:
        """The (unweighted) KL bound ``sum_j KL(q(w_j) || p(w_j))`` over all compressed weights, in
        nats, against the prior of each site (by name)."""
        dists = self.distributions()
        return float(sum(spike_gmm_kl(dists[name], priors[name]).sum() for name in dists))

    def forward(self, *args, **kwargs) -> dict[str, torch.Tensor]:
        samples = {}
        with kl_weighting(self.kl_weight):
            for site, (name, d) in zip(self.sites, self.distributions().items()):
                samples[name] = pyro.sample(name, d.to_event(len(site.shape)))
        return samples


def _kthvalue(values: torch.Tensor, sparsity: float) -> torch.Tensor | None:
    """The ``ceil(sparsity n)``-th smallest of a tensor's ``n`` values (``None`` when that rank is 0)."""
    return scoped_kthvalues([values], "layer", lambda n: min(n, math.ceil(sparsity * n - 1e-9)))[0]


def _gate_offsets(net: nn.Module, sites: Sequence[CompressedSite], scores: dict[str, torch.Tensor] | None,
                  sparsity: float, scope: str = "global", layer_sparsity: Sequence[float] | None = None
                  ) -> dict[str, torch.Tensor]:
    """``clip(log(score / ref), -3, 3)`` per weight; ``ref`` is the score at the target-sparsity
    quantile over all compressed weights (``scope="global"``), within the weight's layer
    (``"layer"``), within its output row (``"row"``) or within its layer at the layer's own
    target ``layer_sparsity`` (``"lamp"``).

    Weights above the reference (kept at the target by their score) start at or above
    ``gate_init``, with distinct logits; ties from the clip occur only far below it, among
    weights the threshold prunes first.
    """
    if scores is None:
        scores = {s.name: net.get_parameter(s.name).detach().abs() for s in sites}
    q = sparsity if sparsity > 0 else 0.5
    if scope == "lamp":
        refs = [_kthvalue(scores[s.name], s_l if sparsity > 0 else q) for s, s_l in zip(sites, layer_sparsity)]
        refs = [ref if ref is not None else scores[s.name].min() for s, ref in zip(sites, refs)]
    else:
        refs = scoped_kthvalues([scores[s.name] for s in sites], scope, lambda n: max(1, math.ceil(q * n)))
    return {s.name: torch.log(scores[s.name] / ref.clamp_min(1e-30) + 1e-30).clamp(-3.0, 3.0)
            for s, ref in zip(sites, refs)}
