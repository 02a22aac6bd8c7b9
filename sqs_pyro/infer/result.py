"""What an SQS run returns: the trained posterior and its read-outs (greedy network, averaged
predictor, compressed network, accounting)."""
from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

from torch import nn

from sqs_pyro.compressed.accounting import accounting
from sqs_pyro.compressed.materialize import AveragedPredictor, CompressedNetwork, materialize
from sqs_pyro.config import SQSConfig
from sqs_pyro.guides.spike_gmm import SpikeGMMGuide
from sqs_pyro.infer.elbo import objective_kind
from sqs_pyro.models.network import SQSModel


@dataclass
class SQSResult:
    """A trained SQS posterior and everything needed to materialise it."""

    config: SQSConfig
    skeleton: nn.Module
    model: SQSModel
    guide: SpikeGMMGuide
    history: list[dict[str, float]] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def objective_kind(self) -> str:
        """What the run optimised, phase by phase: the point phases' objective (:func:`~sqs_pyro.infer.elbo.objective_kind`
        of ``config.mode`` at ``config.kl_weight``), then, with a posterior phase, ``"+elbo"`` (or ``"+tempered_elbo"`` for ``posterior_kl_weight != 1``)."""
        c = self.config
        kind = objective_kind(c.mode, c.kl_weight)
        return kind + ("+" + objective_kind("sample", c.posterior_kl_weight) if c.posterior_epochs > 0 else "")

    def compressed(self) -> CompressedNetwork:
        """The greedy compressed network (mask, codes, codebooks, other tensors)."""
        return materialize(self.guide, self.model.net, self.config.to_dict(), self.model.group_scales())

    def greedy_module(self) -> nn.Module:
        """A plain module of the original architecture with the greedy compressed weights."""
        return self.compressed().load_into(copy.deepcopy(self.skeleton)).eval()

    def averaged_module(self, num_members: int | None = None, output: str = "probs",
                        layers: Sequence[str] | None = None) -> AveragedPredictor:
        """The posterior predictive over ``num_members`` (default ``config.num_averaged``) networks drawn
        from ``q`` (only the compressed ``layers`` named, if given; the rest greedy); ``ValueError`` unless
        ``num_members >= 1``."""
        members = self.config.num_averaged if num_members is None else num_members
        return AveragedPredictor(self.guide, self.skeleton, self.compressed(), members, seed=self.config.seed,
                                 output=output, layers=layers).eval()

    def accounting(self) -> dict[str, Any]:
        return accounting(self.compressed())

    def evaluate(self, eval_fn: Callable[[nn.Module], dict[str, float]] | None, step: int, when: str) -> None:
        """Append ``eval_fn(greedy module)`` to the history (nothing without ``eval_fn``)."""
        if eval_fn is None:
            return
        metrics = eval_fn(self.greedy_module())
        self.history.append({"step": step, "phase": when, **{f"eval_{k}": v for k, v in metrics.items()}})
