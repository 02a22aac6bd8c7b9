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
SPARSITY_MODES = ("exact", "auto", "median")
GATE_RULES = ("adam", "sign")
ROW_GROUP = 1 << 30  # a group_size at least any row's length: one scale per row (per output channel)


@dataclass(frozen=True)
class SQSConfig:
    """Settings of one SQS run, validated on construction: ``SQSConfig(sparsity=0.9, components=4)``.

    Each field's comment says what it does, its unit and default, and which code reads it
    (``--hf``: the transformer defaults of :data:`sqs_pyro.cli.compress_hf.HF_DEFAULTS`;
    presets: :data:`sqs_pyro.experiments.ablation.PRESETS`). The math is in ``docs/method.md``,
    how the defaults were chosen in ``docs/history/``.
    """

    # --- prior: p(w) = (1 - lam) delta_0 + lam N(0, slab_scale^2) per weight (models/priors.py) ---
    prior_inclusion: float = 0.01  # lam, the prior probability that a weight is kept, in (0, 1)
    slab_scale: float = 3.0  # std of the prior's Gaussian slab, in the units of the weights q lives on
    empirical_bayes: bool = False  # set lam and a K-level slab per layer by variational EM every step (preset sqs_eb)
    kl_weight: float = 1.0  # beta, the KL term's weight in the objective (preset sqs_noprior: 0; --hf: 1e-3)
    kl_warmup_fraction: float = 0.2  # fraction of the steps over which beta ramps up linearly (infer/schedules.py)

    # --- guide: q(w_j) = (1 - g_j) delta_0 + g_j sum_k phi_jk N(mu_k, s_k^2) (guides/) ---
    components: int = 16  # K, codebook levels per layer; codes take ceil(log2 K) bits (CLI -K)
    windows: str = "outlier"  # windows of levels: "none", "equal" (preset sqs_equal), "outlier" tails (CLI --windows)
    equal_windows: int = 2  # number of equal-count windows when windows="equal" (guides/windows.py)
    iqr_factor: float = 5.0  # c of the Tukey fences Q1 - c IQR, Q3 + c IQR of the "outlier" windows' tails
    group_size: int = ROW_GROUP  # G weights per learned fp16 scale, w = sigma u (ROW_GROUP: one per row; 0, --hf: none)
    responsibility_scale: str = "pooled"  # phi_jk weighs levels by the layer's "pooled" scale or their "own" (--hf)
    mode: str = "hard"  # forward: "hard" (greedy level), "sample" (exact draws from q) or "expected" (--hf; CLI --mode)
    gate_temperature: tuple[float, float] = (1.0, 0.05)  # relaxed-Bernoulli temperature, geometric from start to end
    assign_temperature: tuple[float, float] = (1.0, 0.05)  # relaxed one-hot temperature of level draws (mode="sample", DGMS)
    gate_init: float = 1.0  # start logit at the sparsity threshold, plus clip(log(score / ref), -3, 3) (--hf: 3)
    gate_score: str = "magnitude"  # what ranks the initial gates: "magnitude" |w|, "saliency" (--hf) or "activation"
    saliency_batches: int = 8  # minibatches whose gradients make the "saliency" score (--hf: 2)
    include_types: tuple[str, ...] = ("linear", "conv")  # module types whose weights are compressed (--hf adds more)
    include: tuple[str, ...] = ()  # regexes of module paths to compress (empty: every module of include_types; --include)
    exclude: tuple[str, ...] = ()  # regexes of module paths never to compress (benchmarks/minilm.py)

    # --- schedule: warm-up (gates open), cubic pruning ramp, fine-tuning with the mask frozen, posterior phase ---
    sparsity: float = 0.75  # s_f, the target fraction of pruned weights in [0, 1) (CLI --sparsity)
    sparsity_mode: str = "exact"  # mask: "exact" 1 - s_f kept; "auto" the ELBO's choice (--sparsity auto); "median" g_j > 0.5
    initial_sparsity: float = 0.0  # sparsity the ramp starts from (--hf: the target, pruning at once)
    prune_scope: str = "lamp"  # where the threshold is taken: "global", per "layer", per "row", or "lamp" layer budgets
    pruned_logit: float = -6.0  # gate logit a pruning step resets the weights below the threshold to (at most)
    epochs: float = 3.0  # passes over the training data (CLI --epochs; the default job: 3)
    warmup_fraction: float = 0.0  # fraction of the steps with the gates fixed open (presets' baselines: 0.1)
    prune_fraction: float = 0.3  # fraction of the steps of the cubic sparsity ramp; fine-tuning takes the rest
    posterior_epochs: float = 0.25  # then the posterior phase: passes of the sampled ELBO, greedy network fixed (0: none)
    lr_posterior: float = 0.1  # Adam rate of the slab scales s_k and mixing logits there (cosine to 5%); others: 0
    posterior_kl_weight: float = 1.0  # beta of that phase: 1 the ELBO, other values a tempered ELBO (objective_kind)

    # --- optimisation: Adam on the guide's parameters and the uncompressed tensors (infer/trainer.py) ---
    batch_size: int = 128  # examples per step, all ranks together (CLI --batch-size; the default job: 256)
    lr_weights: float = 1e-2  # Adam rate of the latent weights x_j (--hf: 2e-5; preset sqs_sampled: 1e-3)
    lr_weights_relative: float = 0.08  # cap on that rate, times the layer's RMS weight (0: no cap)
    lr_codebook: float = 3e-3  # Adam rate of the levels mu_k and the group scales (--hf: 1e-4)
    slab_scale_rate: float = 0.1  # the levels' scales s_k learn at this times lr_codebook (--hf: 1)
    lr_gates: float = 1e-2  # rate of the gate logits theta_j
    gate_rule: str = "adam"  # gate steps: "adam", or "sign" (theta -= lr_gates sign(grad), no Adam state; --hf)
    lr_dense: float = 1e-3  # Adam rate of the uncompressed tensors (biases, norms; --hf: 2e-5)
    distill_weight: float = 0.0  # lambda, the pretrained network's softmax mixed into each target (0: labels only)

    # --- read-out: the networks a trained posterior gives (compressed/materialize.py, infer/result.py) ---
    num_averaged: int = 10  # M, networks drawn from q for the averaged predictor (CLI --num-averaged)
    adaptive_bits: bool = False  # store each layer with the levels it uses and tells apart (CLI --adaptive-bits)
    merge_separation: float = 2.0  # adaptive_bits merges neighbouring levels closer than this many pooled scales

    # --- runtime ---
    seed: int = 0  # seeds the guide's draws, minibatch order and the averaged members, in [0, 2^32) (CLI --seed)
    log_every: int = 20  # steps between the history's records of the objective (--hf: 4)

    def __post_init__(self) -> None:
        _check_types(self)
        _check(self.components >= 2, f"components (K) must be an integer >= 2, got {self.components!r}")
        _check(0.0 <= self.sparsity < 1.0, f"sparsity must lie in [0, 1), got {self.sparsity!r}")
        _check(0.0 <= self.initial_sparsity <= self.sparsity,
               f"initial_sparsity must lie in [0, sparsity], got {self.initial_sparsity!r}")
        _check(self.windows in WINDOW_MODES, f"windows must be one of {WINDOW_MODES}, got {self.windows!r}")
        _check(1 <= self.equal_windows <= min(self.components, 127),
               f"equal_windows must lie in [1, min(components, 127)], got {self.equal_windows!r}")
        _check(self.group_size >= 0, f"group_size must be an integer >= 0, got {self.group_size!r}")
        _check(self.iqr_factor > 0, f"iqr_factor must be > 0, got {self.iqr_factor!r}")
        _check(0.0 < self.prior_inclusion < 1.0,
               f"prior_inclusion must lie in (0, 1), got {self.prior_inclusion!r}")
        _check(self.slab_scale > 0, f"slab_scale must be > 0, got {self.slab_scale!r}")
        _check(self.slab_scale_rate >= 0, f"slab_scale_rate must be >= 0, got {self.slab_scale_rate!r}")
        _check(self.kl_weight >= 0, f"kl_weight must be >= 0, got {self.kl_weight!r}")
        _check(self.posterior_epochs >= 0, f"posterior_epochs must be >= 0, got {self.posterior_epochs!r}")
        _check(self.lr_posterior >= 0 and math.isfinite(self.lr_posterior), "lr_posterior must be >= 0")
        _check(self.posterior_kl_weight > 0, f"posterior_kl_weight must be > 0, got {self.posterior_kl_weight!r}")
        _check(0.0 <= self.distill_weight <= 1.0, f"distill_weight must lie in [0, 1], got {self.distill_weight!r}")
        _check(self.mode in SAMPLING_MODES, f"mode must be one of {SAMPLING_MODES}, got {self.mode!r}")
        _check(self.gate_rule in GATE_RULES, f"gate_rule must be one of {GATE_RULES}, got {self.gate_rule!r}")
        _check(self.sparsity_mode in SPARSITY_MODES,
               f"sparsity_mode must be one of {SPARSITY_MODES}, got {self.sparsity_mode!r}")
        _check(self.prune_scope in PRUNE_SCOPES, f"prune_scope must be one of {PRUNE_SCOPES}, got {self.prune_scope!r}")
        _check(self.gate_score in ("saliency", "magnitude", "activation"),
               f"gate_score must be 'saliency', 'magnitude' or 'activation', got {self.gate_score!r}")
        _check(self.saliency_batches >= 1, "saliency_batches must be >= 1")
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
        for name in ("include", "exclude"):
            for pattern in getattr(self, name):
                try:
                    re.compile(pattern)
                except re.error as exc:
                    raise SQSInputError(f"{name} pattern {pattern!r} is not a valid regular expression: {exc}") from exc
        _check(self.num_averaged >= 1, "num_averaged must be >= 1")
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
