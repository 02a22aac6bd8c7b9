"""The one frozen configuration object passed explicitly through a compression run."""
from __future__ import annotations

import dataclasses
import math
import re
import typing
from dataclasses import dataclass
from typing import Any, Mapping

from sqs_pyro.errors import SQSInputError

WINDOW_MODES = ("none", "equal", "outlier")
SAMPLING_MODES = ("sample", "expected", "hard")
RESPONSIBILITY_SCALES = ("own", "pooled")
PRUNE_SCOPES = ("global", "layer", "row", "lamp")
GATE_RULES = ("adam", "sign")
ROW_GROUP = 1 << 30  # a group_size at least any row's length: one scale per row (per output channel)


@dataclass(frozen=True)
class SQSConfig:
    """Settings of one SQS run.

    Prior: ``p(w) = (1 - prior_inclusion) delta_0 + prior_inclusion * sum_m a_m N(m_m, s_m^2)``
    with the slab mixture given by ``slab_weights`` / ``slab_locs`` / ``slab_scales``
    (default: one component ``N(0, 3^2)``, the paper's setting). With ``empirical_bayes`` the
    prior's inclusion and a K-component slab are set per layer by variational EM instead
    (after every step, the values that maximise the ELBO given the guide: the mean inclusion,
    and the codebook with the levels' usage as mixing weights), so the KL is the code length
    of the compressed network.

    Guide: ``q(w_j) = (1 - g_j) delta_0 + g_j sum_k phi_jk N(mu_k, s_k^2)`` with ``K =
    components`` levels per layer, split over windows by ``windows``; the initial codebooks
    are fitted to the weights magnitude pruning would keep at ``sparsity``
    (``codebook_fit="kept"``) or to all weights (``"all"``, the SQS authors' choice), by plain
    k-means or, with ``forced_extremes`` (the authors' choice), with each window's outermost
    levels moved onto its extreme values (outlier-aware windows never force them).

    Group scales: with ``group_size = G > 0`` a weight viewed as rows is ``w = sigma_g u`` with one
    fp16 scale ``sigma_g`` per group of ``G`` consecutive weights of a row (``G`` at least the
    row length: one scale per row), starting at ``max |w|`` of the pretrained weights and learned
    in log space at ``lr_codebook``; prior, guide and codebook live on the normalised values
    ``u`` (the levels are shared, the scales are stored beside them). ``0``: no scales, one
    codebook over the raw weights. Default ``ROW_GROUP``: one scale per row (output channel),
    chosen on validation on the image networks; the transformer presets set their own.

    Responsibilities: ``phi_jk`` weighs the levels by ``N(x_j; mu_k, s_k^2)`` with each level's own
    scale (``responsibility_scale="own"``) or with the layer's pooled ``sqrt(mean_k s_k^2)``
    (``"pooled"``: the nearest level up to ``log pi_k``; with own scales a latent weight far from
    every level goes to the widest one, not the nearest). Default ``"pooled"``, chosen on validation
    with ``lr_codebook=3e-3`` on the image networks (issue 13, seventh round).

    Gates start at ``gate_init + clip(log(score / ref), -3, 3)``, ``ref`` the score at the
    target-sparsity quantile (``gate_init=1``: ``g = 0.73`` at the threshold, chosen on validation
    with ``warmup_fraction=0``), with the score ``|w|`` (``gate_score="magnitude"``, chosen on
    validation with the mode KL), a first-order saliency ``rms_b(w dL_b/dw)`` over
    ``saliency_batches`` minibatches (``"saliency"``, the transformer default) or ``|w_ij| ||x_j||``
    of Linear layers (``"activation"``, Wanda). ``prune_scope="global"`` takes that quantile, and the
    pruning threshold on the inclusion logits, over all compressed weights (layers get
    different sparsities); ``"layer"`` within each layer; ``"row"`` within each output row
    (Wanda's comparison group); ``"lamp"`` within each layer at a per-layer sparsity fixed from
    the pretrained weights' LAMP scores (:mod:`sqs_pyro.guides.allocation`).

    Likelihood (classification, lm): with ``distill_weight = lambda > 0`` each training label enters as
    the target distribution ``t_i = (1 - lambda) onehot(y_i) + lambda softmax(f(x_i; W_0))``, ``W_0``
    the pretrained network's weights (its predictions computed once, before training), and the
    data term is ``E_q sum_i sum_c t_ic log p(c | x_i, W)``: the expected log-likelihood of a label
    drawn from ``t_i`` (distillation at temperature 1, Hinton et al. 2015). ``0``: the labels alone.
    Language models: the same mixture per token, the teacher's distribution kept on its 32 most
    probable tokens (renormalised there) so that the targets stay small.

    Read-out: ``adaptive_bits`` stores every layer with the levels its posterior uses and tells
    apart (unused levels dropped, neighbours closer than ``merge_separation`` pooled scales
    merged), so each layer gets its own ``ceil(log2 K')`` bits.

    Schedule (fractions of the total number of steps): ``warmup_fraction`` with gates fixed
    open (default ``0``: the gates learn from the first step), then ``prune_fraction`` with a
    cubic sparsity ramp from ``initial_sparsity`` to ``sparsity``, then fine-tuning with the mask
    frozen.

    Posterior phase: after the point phases, ``posterior_epochs`` more epochs (``0``: none) fit the
    posterior around the mask they froze by the sampled ELBO (``W ~ q`` in the forward pass: gates fixed,
    codes drawn from ``phi``, slab noise ``s_k eps``), so that the data term reaches the responsibilities
    (latent weights, levels, scales, mixing weights); the slab scales and mixing logits learn at
    ``lr_posterior`` (cosine to 5%); everything else (the point estimate: mask, latent weights, levels,
    the greedy codes) stays as the point phases left it. The phase maximises the ELBO (``posterior_kl_weight
    = 1``) or a tempered one, ``E_q log p(D|W) - beta KL`` with ``beta = posterior_kl_weight``.

    Rates: Adam with ``min(lr_weights, lr_weights_relative * RMS(w_l))`` on the latent weights
    of layer ``l`` (a step never more than that fraction of the layer's weight scale; ``0``: plain
    ``lr_weights``; 0.08 chosen on validation, it leaves the MNIST CNN at ``lr_weights`` and slows
    the small-scale LeNet layers), ``lr_codebook`` (the levels and the group scales; 3e-3 chosen on
    validation), ``lr_gates`` and ``lr_dense``. The levels' slab scales ``s_k`` learn at
    ``slab_scale_rate * lr_codebook``: in hard mode only the KL moves them (towards the prior's scale),
    and the posterior predictive samples that width (0.1 chosen on validation: at 1 the averaged
    network falls 5 points below the greedy one on the MNIST CNN, at 0.1 0.34 at most). The gate logits
    step with Adam (``gate_rule="adam"``) or with the stateless ``theta <- theta - lr_gates sign(dL/dtheta)``
    (``"sign"``: Adam's first step without its moments, 8 bytes per weight less while the gates learn).
    """

    components: int = 16
    sparsity: float = 0.75
    initial_sparsity: float = 0.0
    windows: str = "outlier"
    codebook_fit: str = "kept"
    equal_windows: int = 2
    iqr_factor: float = 5.0
    forced_extremes: bool = False
    group_size: int = ROW_GROUP
    prior_inclusion: float = 0.01
    slab_weights: tuple[float, ...] = (1.0,)
    slab_locs: tuple[float, ...] = (0.0,)
    slab_scales: tuple[float, ...] = (3.0,)
    empirical_bayes: bool = False
    kl_weight: float = 1.0
    kl_warmup_fraction: float = 0.2
    distill_weight: float = 0.0
    mode: str = "hard"
    responsibility_temperature: float = 1.0
    responsibility_scale: str = "pooled"
    gate_temperature: tuple[float, float] = (1.0, 0.05)
    assign_temperature: tuple[float, float] = (1.0, 0.05)
    gate_init: float = 1.0
    gate_score: str = "magnitude"
    prune_scope: str = "lamp"
    saliency_batches: int = 8
    pruned_logit: float = -6.0
    epochs: float = 3.0
    batch_size: int = 128
    warmup_fraction: float = 0.0
    prune_fraction: float = 0.3
    lr_weights: float = 1e-2
    lr_weights_relative: float = 0.08
    lr_codebook: float = 3e-3
    slab_scale_rate: float = 0.1
    lr_gates: float = 1e-2
    gate_rule: str = "adam"
    lr_dense: float = 1e-3
    weight_decay: float = 0.0
    include_types: tuple[str, ...] = ("linear", "conv")
    include: tuple[str, ...] = ()
    exclude: tuple[str, ...] = ()
    num_averaged: int = 10
    posterior_epochs: float = 0.25
    lr_posterior: float = 0.1
    posterior_kl_weight: float = 1.0
    adaptive_bits: bool = False
    merge_separation: float = 2.0
    seed: int = 0
    log_every: int = 20

    def __post_init__(self) -> None:
        _check_types(self)
        _check(self.components >= 2, f"components (K) must be an integer >= 2, got {self.components!r}")
        _check(0.0 <= self.sparsity < 1.0, f"sparsity must lie in [0, 1), got {self.sparsity!r}")
        _check(0.0 <= self.initial_sparsity <= self.sparsity,
               f"initial_sparsity must lie in [0, sparsity], got {self.initial_sparsity!r}")
        _check(self.windows in WINDOW_MODES, f"windows must be one of {WINDOW_MODES}, got {self.windows!r}")
        _check(self.codebook_fit in ("kept", "all"),
               f"codebook_fit must be 'kept' or 'all', got {self.codebook_fit!r}")
        _check(1 <= self.equal_windows <= min(self.components, 127),
               f"equal_windows must lie in [1, min(components, 127)], got {self.equal_windows!r}")
        _check(self.group_size >= 0, f"group_size must be an integer >= 0, got {self.group_size!r}")
        _check(self.iqr_factor > 0, f"iqr_factor must be > 0, got {self.iqr_factor!r}")
        _check(0.0 < self.prior_inclusion < 1.0,
               f"prior_inclusion must lie in (0, 1), got {self.prior_inclusion!r}")
        n = len(self.slab_weights)
        _check(n >= 1 and len(self.slab_locs) == n and len(self.slab_scales) == n,
               "slab_weights, slab_locs and slab_scales must have the same non-zero length")
        _check(all(w > 0 for w in self.slab_weights) and abs(sum(self.slab_weights) - 1.0) < 1e-6,
               f"slab_weights must be positive and sum to 1, got {self.slab_weights!r}")
        _check(all(s > 0 for s in self.slab_scales), f"slab_scales must be > 0, got {self.slab_scales!r}")
        _check(self.slab_scale_rate >= 0, f"slab_scale_rate must be >= 0, got {self.slab_scale_rate!r}")
        _check(self.kl_weight >= 0, f"kl_weight must be >= 0, got {self.kl_weight!r}")
        _check(0.0 <= self.distill_weight <= 1.0, f"distill_weight must lie in [0, 1], got {self.distill_weight!r}")
        _check(self.mode in SAMPLING_MODES, f"mode must be one of {SAMPLING_MODES}, got {self.mode!r}")
        _check(self.gate_rule in GATE_RULES, f"gate_rule must be one of {GATE_RULES}, got {self.gate_rule!r}")
        _check(self.prune_scope in PRUNE_SCOPES, f"prune_scope must be one of {PRUNE_SCOPES}, got {self.prune_scope!r}")
        _check(self.gate_score in ("saliency", "magnitude", "activation"),
               f"gate_score must be 'saliency', 'magnitude' or 'activation', got {self.gate_score!r}")
        _check(self.saliency_batches >= 1, "saliency_batches must be >= 1")
        _check(self.responsibility_temperature > 0, "responsibility_temperature must be > 0")
        _check(self.responsibility_scale in RESPONSIBILITY_SCALES,
               f"responsibility_scale must be one of {RESPONSIBILITY_SCALES}, got {self.responsibility_scale!r}")
        for name in ("gate_temperature", "assign_temperature"):
            pair = getattr(self, name)
            _check(len(pair) == 2 and all(t > 0 for t in pair), f"{name} must be two positive numbers")
        _check(self.epochs > 0, f"epochs must be > 0, got {self.epochs!r}")
        _check(self.batch_size >= 1, f"batch_size must be a positive integer, got {self.batch_size!r}")
        for name in ("warmup_fraction", "prune_fraction", "kl_warmup_fraction"):
            _check(0.0 <= getattr(self, name) <= 1.0, f"{name} must lie in [0, 1]")
        _check(self.warmup_fraction + self.prune_fraction <= 1.0,
               "warmup_fraction + prune_fraction must be <= 1")
        for name in ("lr_weights", "lr_weights_relative", "lr_codebook", "lr_gates", "lr_dense"):
            _check(getattr(self, name) >= 0 and math.isfinite(getattr(self, name)), f"{name} must be >= 0")
        _check(all(t in ("linear", "conv", "conv1d_hf", "embedding") for t in self.include_types),
               "include_types entries must be 'linear', 'conv', 'conv1d_hf' or 'embedding', "
               f"got {self.include_types!r}")
        _check(self.weight_decay >= 0, f"weight_decay must be >= 0, got {self.weight_decay!r}")
        for name in ("include", "exclude"):
            for pattern in getattr(self, name):
                try:
                    re.compile(pattern)
                except re.error as exc:
                    raise SQSInputError(f"{name} pattern {pattern!r} is not a valid regular expression: {exc}") from exc
        _check(self.num_averaged >= 1, "num_averaged must be >= 1")
        _check(self.posterior_epochs >= 0, f"posterior_epochs must be >= 0, got {self.posterior_epochs!r}")
        _check(self.lr_posterior >= 0 and math.isfinite(self.lr_posterior), "lr_posterior must be >= 0")
        _check(self.posterior_kl_weight > 0, f"posterior_kl_weight must be > 0, got {self.posterior_kl_weight!r}")
        _check(self.merge_separation >= 0, f"merge_separation must be >= 0, got {self.merge_separation!r}")
        _check(self.log_every >= 1, "log_every must be >= 1")
        _check(0 <= self.seed < 2**32, f"seed must lie in [0, 2**32), got {self.seed!r}")

    @property
    def bits(self) -> int:
        """Bits per kept weight: ceil(log2 K)."""
        return max(1, math.ceil(math.log2(self.components)))

    def replace(self, **changes: Any) -> "SQSConfig":
        """A copy with some fields changed (validated again)."""
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> "SQSConfig":
        """Build from a plain mapping (e.g. JSON), rejecting unknown keys, wrong types and bad values.

        JSON lists become tuples and integers given for float fields become floats.
        """
        _check(isinstance(values, Mapping),
               f"a config must be a mapping of keys to values, got {type(values).__name__}")
        known = _field_types()
        unknown = sorted(set(values) - set(known))
        _check(not unknown, f"unknown config keys: {unknown}; known keys: {sorted(known)}")
        converted = {}
        for key, value in values.items():
            if isinstance(value, list):
                value = tuple(value)
            if known[key] is float and isinstance(value, int) and not isinstance(value, bool):
                value = float(value)
            converted[key] = value
        return cls(**converted)


def _field_types() -> dict[str, Any]:
    hints = typing.get_type_hints(SQSConfig)
    return {f.name: hints[f.name] for f in dataclasses.fields(SQSConfig)}


def _is_instance(value: Any, kind: type) -> bool:
    """``isinstance`` for the config's scalar types: no bools as numbers, ints accepted as floats, floats finite."""
    if isinstance(value, bool):
        return kind is bool
    if kind is float:
        return isinstance(value, (int, float)) and math.isfinite(value)
    return isinstance(value, kind)


_TYPE_WORDS = {bool: ("true or false", "booleans"), int: ("an integer", "integers"),
               float: ("a finite number", "finite numbers"), str: ("a string", "strings")}


def _words(kind: Any) -> tuple[str, str]:
    return _TYPE_WORDS.get(kind, (f"of type {kind}", f"values of type {kind}"))


def _check_types(config: SQSConfig) -> None:
    """Every field has its annotated type (tuples element by element), before any range check."""
    for name, hint in _field_types().items():
        value = getattr(config, name)
        if typing.get_origin(hint) is tuple:
            args = typing.get_args(hint)
            kind = args[0]
            _check(isinstance(value, tuple) and all(_is_instance(v, kind) for v in value),
                   f"config key {name!r} must be a tuple (JSON: a list) of {_words(kind)[1]}, got {value!r}")
            _check(args[-1] is Ellipsis or len(value) == len(args),
                   f"config key {name!r} must have {len(args)} entries, got {value!r}")
        else:
            _check(_is_instance(value, hint), f"config key {name!r} must be {_words(hint)[0]}, got {value!r}")


def _check(ok: bool, message: str) -> None:
    if not ok:
        raise SQSInputError(message)
