"""The Pyro model: a network whose selected weights are spike-and-slab GMM sample sites."""
from __future__ import annotations

import copy
from typing import Any, Callable, Mapping, Sequence

import pyro
import torch
from pyro.nn import PyroModule
from torch import nn
from torch.func import functional_call

from sqs_pyro.config import SQSConfig
from sqs_pyro.models.block_checkpoints import checkpointed_blocks
from sqs_pyro.models.group_scales import apply_group_scales, group_absmax, recomputed_products
from sqs_pyro.models.priors import EmpiricalBayesPrior, SpikeSlabGMM, kl_weighting
from sqs_pyro.models.selection import CompressedSite


def network_arguments(inputs: Any) -> tuple[tuple[Any, ...], dict[str, Any]]:
    """``(args, kwargs)`` of the call ``net(*args, **kwargs)`` for a batch's inputs: a tensor is the one
    positional input, a tuple or list the positional inputs, a dict the keyword inputs."""
    if isinstance(inputs, dict):
        return (), inputs
    if isinstance(inputs, (tuple, list)):
        return tuple(inputs), {}
    return (inputs,), {}


class SQSModel(PyroModule):
    r"""``W_l ~ SpikeSlabGMM`` for each compressed weight tensor, then ``y ~ likelihood(net(x; W))``.

    Each compressed tensor is one ``pyro.sample`` site named by its parameter path (e.g.
    ``"classifier.0.weight"``) whose event shape is the weight's shape. All other
    parameters of ``net`` stay deterministic (``nn.Parameter``; trainable unless frozen).
    ``kl_weight`` (beta) scales the weight sites, so the ELBO is
    ``E_q[log p(D|W)] - beta * KL(q || p)``.

    The prior is the configured one (``prior_inclusion``, ``slab_*``) or, with
    ``config.empirical_bayes``, one :class:`~sqs_pyro.models.priors.EmpiricalBayesPrior` per
    site (``hyperpriors``, aligned with ``sites``) whose hyper-parameters are set from the
    guide by :meth:`update_hyperpriors` (variational EM).

    With ``config.group_size = G > 0`` the sites are the normalised weights ``u`` and the network
    gets ``w = sigma * u`` (:func:`~sqs_pyro.models.group_scales.apply_group_scales`): the group
    scales are deterministic parameters (``log sigma``, starting at ``max |w|`` per group of the
    pretrained weights, or at the given ``group_scales`` by site name), used rounded to fp16 as
    the file stores them (straight-through).

    ``blocks`` names modules of ``net`` (e.g. :func:`~sqs_pyro.models.block_checkpoints.repeated_blocks`)
    that keep only their inputs for the backward pass and run again in it (same values and gradients).
    """

    def __init__(self, net: nn.Module, sites: Sequence[CompressedSite], config: SQSConfig,
                 likelihood: Callable[[torch.Tensor, torch.Tensor | None], torch.Tensor],
                 group_scales: Mapping[str, torch.Tensor] | None = None, blocks: Sequence[str] = ()) -> None:
        super().__init__()
        self.group_size = config.group_size
        #: log sigma per site (shape ``(R, ceil(C / G))``), learned; ``None`` without group scales
        self.log_group_scales = None
        if self.group_size:
            given = group_scales or {}
            weights = [net.get_parameter(s.name) for s in sites]
            self.log_group_scales = nn.ParameterList(
                [nn.Parameter(torch.log((given[s.name] if s.name in given else group_absmax(w, self.group_size)).to(w.dtype)))
                 for s, w in zip(sites, weights)])
        self.net = copy.deepcopy(net)
        for site in sites:
            _weight_to_placeholder(self.net, site)
        self.sites = list(sites)
        self.blocks = list(blocks)
        self.config = config
        self.likelihood = likelihood
        self.kl_weight = float(config.kl_weight)
        self.hyperpriors = None
        if config.empirical_bayes:
            buffers = [self.net.get_buffer(site.name) for site in self.sites]
            self.hyperpriors = nn.ModuleList([EmpiricalBayesPrior(config.components, b.dtype, b.device)
                                              for b in buffers])

    @torch.no_grad()
    def update_hyperpriors(self, posteriors: Mapping[str, Any]) -> None:
        """Empirical Bayes M-step (:meth:`EmpiricalBayesPrior.maximise`) of every site, from its
        posterior by site name (``inclusion``, ``most_probable_level()``, ``locs``, ``scales``: a
        :class:`~sqs_pyro.guides.distributions.SpikeGMM`)."""
        if self.hyperpriors is None:
            raise ValueError("this model's prior is fixed (config.empirical_bayes is False)")
        for site, hyper in zip(self.sites, self.hyperpriors):
            q = posteriors[site.name]
            hyper.maximise(q.inclusion, q.most_probable_level(), q.locs, q.scales)

    def group_scales(self) -> dict[str, torch.Tensor]:
        """The fp16 group scales ``sigma`` of every site, by name (shape ``(R, ceil(C / G))``;
        empty without group scales)."""
        if not self.group_size:
            return {}
        return {site.name: torch.exp(p.detach()).to(torch.float16) for site, p in zip(self.sites, self.log_group_scales)}

    def prior(self, site: CompressedSite) -> SpikeSlabGMM:
        if self.hyperpriors is not None:
            return self.hyperpriors[self.sites.index(site)].distribution(site.shape)
        ref = self.net.get_buffer(site.name)
        return SpikeSlabGMM.from_config(self.config, site.shape, dtype=ref.dtype, device=ref.device)

    def priors(self) -> dict[str, SpikeSlabGMM]:
        """The prior of every compressed weight tensor, by site name."""
        return {site.name: self.prior(site) for site in self.sites}

    def sample_weights(self) -> dict[str, torch.Tensor]:
        """Draw (or, under a replayed guide trace, look up) every compressed weight tensor."""
        return {name: w for name, (w, _, _) in self._sample_sites().items()}

    def _sample_sites(self) -> dict[str, tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]]:
        """``(w, u, sigma)`` per site: the drawn ``u`` and, with group scales, ``w = sigma * u`` (else ``w = u``)."""
        sites = {}
        with kl_weighting(self.kl_weight):
            for i, site in enumerate(self.sites):
                u = pyro.sample(site.name, self.prior(site).to_event(len(site.shape)))
                if not self.group_size:
                    sites[site.name] = (u, u, None)
                    continue
                sigma = torch.exp(self.log_group_scales[i])
                sigma = sigma + (sigma.to(torch.float16).to(sigma.dtype) - sigma).detach()  # the file's fp16 values
                sites[site.name] = (apply_group_scales(u, sigma, self.group_size), u, sigma)
        return sites

    def forward(self, x: Any, y: torch.Tensor | None = None) -> torch.Tensor:
        """``likelihood(net(x; W), y)`` with ``W ~`` the prior; ``x`` is a tensor, a tuple of positional inputs or a
        dict of keyword inputs (:func:`network_arguments`)."""
        sites = self._sample_sites()
        products = [(w, u, sigma, self.group_size) for w, u, sigma in sites.values() if sigma is not None]
        blocks = [self.net.get_submodule(name) for name in self.blocks]
        # the network's matrix products save u, not sigma * u; checkpointed blocks save their inputs only
        with recomputed_products(products), checkpointed_blocks(blocks, products):
            out = functional_call(self.net, {name: w for name, (w, _, _) in sites.items()}, *network_arguments(x),
                                  strict=False)
        return self.likelihood(out, y)


def _weight_to_placeholder(net: nn.Module, site: CompressedSite) -> None:
    """Replace a compressed weight Parameter by a zero-storage buffer of the same shape.

    The forward pass always receives the sampled tensor through ``functional_call``; the
    placeholder keeps shapes visible without a second copy of the weights.
    """
    path, _, attr = site.name.rpartition(".")
    module = net.get_submodule(path)
    old = module._parameters.pop(attr)
    module.register_buffer(attr, torch.zeros((), dtype=old.dtype, device=old.device).expand(old.shape),
                           persistent=False)
