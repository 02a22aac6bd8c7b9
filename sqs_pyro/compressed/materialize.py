"""From the learned posterior to deterministic compressed networks.

* :func:`materialize` builds the greedy network: ``w_j = 0`` if pruned, else
  ``mu_{argmax_k phi_jk}``.
* :class:`AveragedPredictor` averages the predictions of M networks drawn from ``q`` (the
  posterior predictive), from the guide or from the summary a ``.sqs`` file can carry
  (:class:`~sqs_pyro.compressed.posterior.MixturePosterior`).
"""
from __future__ import annotations

import copy
import dataclasses
import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Sequence

import numpy as np
import torch
from torch import nn

from sqs_pyro.compressed.levels import merge_candidates
from sqs_pyro.guides.spike_gmm import SpikeGMMGuide
from sqs_pyro.models.group_scales import apply_group_scales

if TYPE_CHECKING:
    from sqs_pyro.compressed.posterior import MixturePosterior


def code_dtype(components: int) -> torch.dtype:
    """The smallest dtype that indexes ``components`` levels: uint8 up to 256, else int32."""
    return torch.uint8 if components <= 256 else torch.int32


@dataclass
class CompressedLayer:
    r"""A compressed weight tensor: sparsity mask, code of each kept weight and the codebook;
    optionally group scales and a few exact weights (dense-and-sparse).

    Viewing the weight as ``R = shape[0]`` rows of ``C = numel / R`` values, the weight is

    .. math::

        w_{rc} = \begin{cases} e_{rc} & (r, c) \in E \text{ (exact weights)} \\
                 \sigma_{r, \lfloor c / G \rfloor}\, \mu_{a_{rc}} & \text{kept by the mask} \\
                 0 & \text{otherwise} \end{cases}

    with one scale per group of ``G = group_size`` consecutive weights of a row (``scales`` of
    shape ``(R, ceil(C / G))``; ``group_size = 0``: no scales, ``sigma = 1``). Exact weights
    (``exact_index``: sorted flat positions, ``exact_values``) lie outside the mask.
    """

    name: str
    shape: tuple[int, ...]
    mask: torch.Tensor  # bool, shape
    codes: torch.Tensor  # integer (int64, or uint8 when K <= 256 to save memory), shape (0 where pruned)
    codebook: torch.Tensor  # (K,) float
    component_windows: torch.Tensor  # (K,) int64: window of each level
    group_size: int = 0
    scales: torch.Tensor | None = None  # (R, ceil(C / G)) when group_size > 0
    exact_index: torch.Tensor | None = None  # (n,) int64, sorted flat positions outside the mask
    exact_values: torch.Tensor | None = None  # (n,) float

    @property
    def numel(self) -> int:
        return self.mask.numel()

    @property
    def nnz(self) -> int:
        return int(torch.count_nonzero(self.mask))  # a bool sum would copy the mask to int64

    @property
    def num_exact(self) -> int:
        return 0 if self.exact_index is None else self.exact_index.numel()

    @property
    def components(self) -> int:
        return self.codebook.numel()

    @property
    def rows(self) -> int:
        return self.shape[0] if self.shape else 1

    def scaled(self, values: torch.Tensor) -> torch.Tensor:
        """``sigma * u`` for values ``u`` of this layer's shape (``u`` itself without group scales)."""
        return values if self.scales is None else apply_group_scales(values, self.scales, self.group_size)

    def weight(self) -> torch.Tensor:
        """The dense weight tensor (see the class docstring)."""
        levels = self.codebook[self.codes.int()]  # int32 indices: a uint8 index would be read as a mask
        w = self.scaled(torch.where(self.mask, levels, torch.zeros((), dtype=self.codebook.dtype)))
        if self.num_exact:
            w = w.reshape(-1).index_put((self.exact_index,), self.exact_values.to(w.dtype)).reshape(self.shape)
        return w

    @torch.no_grad()
    def used_levels(self, scales: torch.Tensor, separation: float = 2.0) -> "CompressedLayer":
        """The same layer on the fewest levels its posterior tells apart (its bits follow: ``ceil(log2 K')``).

        Levels that no kept weight uses are dropped. Then, within a window, the closest pair of
        neighbouring levels with ``|mu_k - mu_l| <= separation * sqrt((s_k^2 + s_l^2) / 2)``
        (:func:`~sqs_pyro.compressed.levels.merge_candidates`: two Gaussians of that pooled scale
        the data cannot tell apart) is merged into their usage-weighted mean level, with the
        pooled scale, until no pair qualifies. At least one level is kept.
        """
        counts = torch.bincount(self.codes[self.mask].reshape(-1).long(), minlength=self.components).double().cpu()
        locs, sc = self.codebook.detach().double().cpu(), scales.detach().double().cpu()
        win = self.component_windows.cpu()
        members = [[k] for k in range(self.components) if counts[k] > 0] or [[0]]
        level = {tuple(m): (float(locs[m[0]]), float(sc[m[0]]), float(counts[m[0]])) for m in members}
        while True:
            groups = list(level)
            mu = np.array([level[g][0] for g in groups])
            pairs = merge_candidates(mu, np.array([level[g][1] for g in groups]),
                                     np.array([int(win[g[0]]) for g in groups]), separation)
            if not pairs:
                break
            a, b = (groups[i] for i in min(pairs, key=lambda p: p["gap_in_scales"])["components"])
            (mu_a, s_a, n_a), (mu_b, s_b, n_b) = level.pop(a), level.pop(b)
            n = n_a + n_b
            level[a + b] = ((n_a * mu_a + n_b * mu_b) / max(n, 1e-300), math.sqrt((s_a ** 2 + s_b ** 2) / 2), n)
        groups = sorted(level, key=lambda g: (int(win[g[0]]), level[g][0]))
        remap = torch.zeros(self.components, dtype=torch.long)
        for new, g in enumerate(groups):
            remap[list(g)] = new
        codes = torch.where(self.mask, remap.to(self.codes.device)[self.codes.long()], 0)
        codebook = torch.tensor([level[g][0] for g in groups], dtype=self.codebook.dtype, device=self.codebook.device)
        windows = torch.tensor([int(win[g[0]]) for g in groups], dtype=self.component_windows.dtype,
                               device=self.component_windows.device)
        return dataclasses.replace(self, mask=self.mask.clone(), codes=codes, codebook=codebook,
                                   component_windows=windows)


@dataclass
class CompressedNetwork:
    """All compressed layers plus every other tensor of the network, stored as it is; ``tied``
    names state-dict entries that are a compressed layer under another name (``alias -> layer``,
    e.g. an LM head tied to compressed token embeddings)."""

    layers: list[CompressedLayer]
    dense_state: dict[str, torch.Tensor]
    config: dict[str, Any] = field(default_factory=dict)
    tied: dict[str, str] = field(default_factory=dict)

    def state_dict(self) -> dict[str, torch.Tensor]:
        state = dict(self.dense_state)
        for layer in self.layers:
            state[layer.name] = layer.weight()
        for alias, name in self.tied.items():
            state[alias] = state[name]
        return state

    def load_into(self, skeleton: nn.Module) -> nn.Module:
        """Fill ``skeleton`` (a module of the original architecture) in place and return it."""
        missing, unexpected = skeleton.load_state_dict(self.state_dict(), strict=False)
        expected = set(skeleton.state_dict())
        really_missing = [k for k in missing if k in expected]
        if really_missing or unexpected:
            raise ValueError(f"skeleton does not match: missing {really_missing}, unexpected {list(unexpected)}")
        return skeleton


@torch.no_grad()
def materialize(guide: SpikeGMMGuide, net: nn.Module, config: dict[str, Any] | None = None,
                group_scales: dict[str, torch.Tensor] | None = None) -> CompressedNetwork:
    """The greedy compressed network from a trained guide and the trained dense net.

    ``net`` holds the deterministic (uncompressed) tensors; its compressed weights are ignored.
    A guide over group-normalised weights (``guide.config.group_size > 0``) needs the model's
    ``group_scales`` (:meth:`SQSModel.group_scales <sqs_pyro.models.SQSModel.group_scales>`),
    which the layers store beside their codes.
    With ``config["adaptive_bits"]`` every layer keeps only the levels its posterior uses and
    tells apart (:meth:`CompressedLayer.used_levels`): mixed precision chosen by the posterior.
    """
    config = dict(config or {})
    size = guide.config.group_size
    missing = [layer.site_name for layer in guide.layers if size and layer.site_name not in (group_scales or {})]
    if missing:
        raise ValueError(f"the guide lives on group-normalised weights: pass the model's group_scales "
                         f"(missing for {missing[:3]})")
    layers = []
    for layer, d in zip(guide.layers, guide.distributions().values()):
        mask = layer.kept_mask()
        codes = torch.where(mask, layer.greedy_codes(d), torch.zeros((), dtype=torch.long))
        compressed = CompressedLayer(layer.site_name, tuple(mask.shape), mask, codes,
                                     layer.locs.detach().clone(), layer.comp_window.clone(), size,
                                     group_scales[layer.site_name].to(torch.float16).clone() if size else None)
        if config.get("adaptive_bits"):
            compressed = compressed.used_levels(layer.scales, config.get("merge_separation", 2.0))
        layers.append(compressed)
    return CompressedNetwork(layers, uncompressed_state(net, {layer.name for layer in layers}), config)


def _storage_key(tensor: torch.Tensor) -> tuple:
    return tensor.data_ptr(), tuple(tensor.shape), tensor.stride(), tensor.dtype


def uncompressed_state(net: nn.Module, compressed: set[str]) -> dict[str, torch.Tensor]:
    """Copies of every state-dict tensor of ``net`` not in ``compressed`` and not tied to a compressed
    one (:func:`tied_to_compressed`); tied tensors (e.g. embeddings and an LM head) stay one tensor."""
    clones: dict[tuple, torch.Tensor] = {}
    dense = {}
    skip = compressed | set(tied_to_compressed(net, compressed))
    for k, v in net.state_dict().items():
        if k not in skip:
            dense[k] = clones.setdefault(_storage_key(v), v.detach().clone())
    return dense


def tied_to_compressed(net: nn.Module, compressed: set[str]) -> dict[str, str]:
    """``alias -> name`` for every state-dict entry of ``net`` outside ``compressed`` that is the same
    tensor as the compressed weight ``name`` (a tied LM head when the embeddings are compressed)."""
    state = net.state_dict()
    owners = {_storage_key(state[name]): name for name in compressed if name in state}
    return {k: owners[_storage_key(v)] for k, v in state.items() if k not in compressed and _storage_key(v) in owners}


class AveragedPredictor(nn.Module):
    """The posterior predictive ``p(y | x, D) ~ (1/M) sum_m p(y | x, W_m)`` with ``W_m ~ q``.

    Each member is a whole network drawn by :meth:`SpikeGMMGuide.draw
    <sqs_pyro.guides.SpikeGMMGuide.draw>` (times the group scales of ``compressed``): gates (after training: the frozen mask), codes
    ``a_j ~ phi_j`` and slab noise ``s_{a_j} eps_j``; or by :meth:`MixturePosterior.draw
    <sqs_pyro.compressed.posterior.MixturePosterior.draw>` from a file's posterior summary.
    ``forward`` returns the mean of the members' softmax probabilities (``output="probs"``) or
    of their raw outputs (``"mean"``). It reproduces from the seed. With ``layers`` only those
    compressed layers are drawn, the others keep their greedy weights: the predictive of a
    partially stochastic network (the same draws of the named layers as with all layers drawn).
    """

    def __init__(self, guide: SpikeGMMGuide | MixturePosterior, skeleton: nn.Module, compressed: CompressedNetwork,
                 num_members: int = 10, seed: int = 0, output: str = "probs",
                 layers: Sequence[str] | None = None) -> None:
        super().__init__()
        if output not in ("probs", "mean"):
            raise ValueError(f"output must be 'probs' or 'mean', got {output!r}")
        if num_members < 1:
            raise ValueError(f"num_members must be >= 1, got {num_members}")
        self.net = compressed.load_into(copy.deepcopy(skeleton))
        self.output = output
        draws = guide.draw(num_members, torch.Generator().manual_seed(seed))
        unknown = sorted(set(layers or ()) - set(draws))
        if unknown:
            raise ValueError(f"layers {unknown} are not compressed layers; those are {sorted(draws)}")
        drawn = {layer.name: layer for layer in compressed.layers if layers is None or layer.name in layers}
        self.member_weights = [{name: drawn[name].scaled(d.weight[m]) for name, d in draws.items() if name in drawn}
                               for m in range(num_members)]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        total = None
        for weights in self.member_weights:
            out = torch.func.functional_call(self.net, weights, (x,), strict=False)
            out = torch.softmax(out, dim=-1) if self.output == "probs" else out
            total = out if total is None else total + out
        return total / len(self.member_weights)
