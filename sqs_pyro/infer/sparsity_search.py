"""``--max-error``: the sparsest run on a ladder whose validation error meets a bound (a bisection of runs)."""
from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Callable

from sqs_pyro.config import SQSConfig
from sqs_pyro.errors import SQSInputError
from sqs_pyro.infer.result import SQSResult

#: the sparsities a search may pick from, in increasing order
SPARSITY_LADDER = (0.5, 0.75, 0.9, 0.95, 0.98, 0.99)


@dataclass(frozen=True)
class Trial:
    """One run of a search: its sparsity, validation error, packed bytes and wall seconds."""

    sparsity: float
    error: float
    bytes_packed: int
    seconds: float

    def to_dict(self) -> dict[str, float]:
        return {"sparsity": self.sparsity, "error": self.error, "bytes_packed": self.bytes_packed,
                "seconds": self.seconds}


def check_max_error(max_error: float) -> None:
    """:class:`SQSInputError` unless the bound is an error rate in (0, 1) (checked before any run or load)."""
    if not 0.0 < max_error < 1.0:
        raise SQSInputError(f"--max-error must lie in (0, 1), got {max_error}")


def search_sparsity(run: Callable[[SQSConfig], SQSResult], error: Callable[[SQSResult], float], config: SQSConfig,
                    max_error: float, ladder: tuple[float, ...] = SPARSITY_LADDER
                    ) -> tuple[SQSResult, list[Trial], bool]:
    """The run of ``config`` at the largest sparsity ``s`` of ``ladder`` with ``error(result) <= max_error``
    (exact sparsity; the smallest file at the run's K), found by bisection: the error is taken to grow with
    ``s``, so ``ceil(log2(len(ladder) + 1))`` runs suffice. Returns that result, every trial, and whether the
    bound was met; when no rung meets it, the run at the lowest rung tried (the most accurate) is returned."""
    check_max_error(max_error)
    if config.sparsity_mode != "exact":
        raise SQSInputError("--max-error picks the sparsity itself: it needs sparsity_mode 'exact'")
    lo, hi = 0, len(ladder) - 1  # the answer's index lies in [lo - 1, hi]
    trials: list[Trial] = []
    best: SQSResult | None = None
    fallback: tuple[float, SQSResult] | None = None
    while lo <= hi:
        mid = (lo + hi) // 2
        started = time.perf_counter()
        result = run(config.replace(sparsity=ladder[mid]))
        trial = Trial(ladder[mid], float(error(result)), int(result.accounting()["bytes_packed"]),
                      time.perf_counter() - started)
        trials.append(trial)
        if trial.error <= max_error:
            best, lo = result, mid + 1
        else:
            hi = mid - 1
            if fallback is None or trial.sparsity < fallback[0]:
                fallback = (trial.sparsity, result)
    if best is not None:
        return best, trials, True
    return fallback[1], trials, False
