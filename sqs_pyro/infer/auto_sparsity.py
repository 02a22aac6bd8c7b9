"""``sparsity_mode="auto"``: the pruning ramp climbs a ladder of sparsities and stops where the ELBO does.

The ramp runs towards :data:`AUTO_MAX`. Each time it reaches a rung, the mask of that rung (the top
``1 - s`` gate logits of the prune scope; ``"lamp"``: at budgets from the latent weights) is scored by the negative ELBO

    L(s) = -E_q[log p(D | W)] + beta KL(q || p),    beta = the run's kl_weight,

on a few training minibatches, with the network as trained up to then. The prior prices every kept
weight (``-log lam`` for its inclusion plus its code's KL), the data its fit: a two-part code length.
At the first rung that scores worse than the one before, the ramp stops: the gate logits go back to
the best rung's and the ramp holds there; the mask freezes at the best rung when pruning ends.
"""
from __future__ import annotations

from typing import Any

import torch

#: the rungs the ramp is scored at (those above the run's floor ``s_f``), and the ramp's end
AUTO_SPARSITIES = (0.5, 0.75, 0.85, 0.9, 0.93, 0.95, 0.97, 0.98, 0.99, 0.995)
AUTO_MAX = AUTO_SPARSITIES[-1]
#: training minibatches that score each rung
AUTO_BATCHES = 4


class AutoSparsity:
    """The ladder's state in one run: the rungs scored, the best one and its gate logits, whether the
    ramp has stopped. A plain-data :meth:`state_dict` goes into the trainer's checkpoints."""

    def __init__(self, floor: float) -> None:
        self.floor = floor
        self.scores: dict[float, float] = {}
        self.best: float = floor
        self.best_logits: list[torch.Tensor] | None = None
        self.stopped = False

    def target(self, ramp: float) -> float:
        """The pruning target at a step whose ramp value (towards :data:`AUTO_MAX`) is ``ramp``."""
        return self.best if self.stopped else ramp

    def due(self, target: float) -> float | None:
        """The rung to score now: the highest unscored one at or below ``target`` (the floor first)."""
        if self.stopped:
            return None
        if not self.scores:
            return self.floor
        rungs = [r for r in AUTO_SPARSITIES if max(self.scores) < r <= target]
        return rungs[-1] if rungs else None

    def record(self, rung: float, score: float, logits: list[torch.Tensor]) -> bool:
        """Record ``rung``'s score; True when it is worse than the best so far (the ramp then stops)."""
        worse = bool(self.scores) and score > self.scores[self.best]
        self.scores[rung] = score
        if worse:
            self.stopped = True
        else:
            self.best, self.best_logits = rung, [t.detach().clone() for t in logits]
        return worse

    def state_dict(self) -> dict[str, Any]:
        return {"floor": self.floor, "scores": [[k, v] for k, v in self.scores.items()], "best": self.best,
                "best_logits": self.best_logits, "stopped": self.stopped}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.floor, self.best, self.stopped = float(state["floor"]), float(state["best"]), bool(state["stopped"])
        self.scores = {float(k): float(v) for k, v in state["scores"]}
        self.best_logits = state["best_logits"]

    def summary(self) -> dict[str, Any]:
        """For the history: every rung's score, the choice and whether the ramp stopped early."""
        return {"phase": "auto_sparsity", "chosen": self.best, "stopped": self.stopped,
                "negative_elbo": {f"{k:g}": v for k, v in self.scores.items()}}
