"""Schedules of an SQS run: phases, cubic sparsity ramp, temperature annealing, KL warm-up, cosine LR."""
from __future__ import annotations

import math
from dataclasses import dataclass

from sqs_pyro.config import SQSConfig

WARMUP, PRUNE, FINETUNE, POSTERIOR = "warmup", "prune", "finetune", "posterior"


@dataclass(frozen=True)
class Schedule:
    """Step-indexed schedule for ``total_steps`` optimiser steps.

    Phases: ``[0, prune_start)`` warm-up with gates open, ``[prune_start, prune_end)``
    pruning with a cubic ramp, ``[prune_end, total_steps)`` fine-tuning with a frozen mask (these
    three learn in ``config.mode``), then ``[total_steps, end)`` the posterior phase: ``posterior_steps``
    steps of the sampled ELBO with the mask frozen (``config.posterior_epochs``). The learning-rate,
    temperature and KL schedules run over the first ``total_steps`` and hold their last values after.
    """

    total_steps: int
    prune_start: int
    prune_end: int
    config: SQSConfig
    posterior_steps: int = 0

    @classmethod
    def from_config(cls, config: SQSConfig, steps_per_epoch: int) -> "Schedule":
        total = max(1, math.ceil(config.epochs * steps_per_epoch))
        start = round(config.warmup_fraction * total)
        end = min(total, start + round(config.prune_fraction * total))
        return cls(total, start, end, config, math.ceil(config.posterior_epochs * steps_per_epoch))

    @property
    def end(self) -> int:
        """The number of optimiser steps of the run: the point phases' and the posterior phase's."""
        return self.total_steps + self.posterior_steps

    def phase(self, step: int) -> str:
        if step < self.prune_start:
            return WARMUP
        if step < self.prune_end:
            return PRUNE
        if step < self.total_steps:
            return FINETUNE
        return POSTERIOR

    def posterior_lr_factor(self, step: int) -> float:
        """Cosine decay from 1 to 0.05 over the posterior phase (1 before it)."""
        frac = min(1.0, max(0, step - self.total_steps) / max(1, self.posterior_steps))
        return 0.05 + 0.95 * 0.5 * (1.0 + math.cos(math.pi * frac))

    def target_sparsity(self, step: int, final: float | None = None) -> float:
        """Cubic ramp ``s_t = s_f + (s_i - s_f) (1 - (t - t0)/(t1 - t0))^3`` (Zhu & Gupta, 2017); ``s_f`` is
        ``final`` when given (``sparsity_mode="auto"``'s ladder), else the config's sparsity."""
        s_i, s_f = self.config.initial_sparsity, self.config.sparsity if final is None else final
        if step < self.prune_start:
            return s_i
        span = self.prune_end - self.prune_start - 1  # the last pruning step reaches s_f
        frac = 1.0 if span <= 0 else min(1.0, (step - self.prune_start) / span)
        return s_f + (s_i - s_f) * (1.0 - frac) ** 3

    def _anneal(self, pair: tuple[float, float], step: int) -> float:
        start, end = pair
        frac = min(1.0, step / max(1, self.total_steps - 1))
        return start * (end / start) ** frac

    def gate_temperature(self, step: int) -> float:
        """Geometric annealing from the first to the second value of ``gate_temperature``."""
        return self._anneal(self.config.gate_temperature, step)

    def assign_temperature(self, step: int) -> float:
        return self._anneal(self.config.assign_temperature, step)

    def kl_weight(self, step: int) -> float:
        """Linear KL warm-up to ``kl_weight`` over ``kl_warmup_fraction`` of the steps (never exactly 0)."""
        warm = round(self.config.kl_warmup_fraction * self.total_steps)
        if warm <= 0:
            return self.config.kl_weight
        return self.config.kl_weight * min(1.0, (step + 1) / warm)

    def lr_factor(self, step: int) -> float:
        """Cosine decay from 1 to 0.05 over the run."""
        frac = min(1.0, step / max(1, self.total_steps))
        return 0.05 + 0.95 * 0.5 * (1.0 + math.cos(math.pi * frac))
