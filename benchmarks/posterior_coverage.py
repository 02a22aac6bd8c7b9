"""Coverage of the learned posterior on the planted linear-Gaussian problem of
tests/test_posterior_coverage.py, over seeds: how often the central 90% intervals of q, and of the exact
posterior, cover the true weights, and the mean interval widths.

    python benchmarks/posterior_coverage.py --seeds 10 --out benchmarks/results/posterior_coverage.json
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from test_posterior_coverage import CONFIG, D, draws, fitted  # noqa: E402

from sqs_pyro.analysis import interval_coverage  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seeds", type=int, default=10)
    p.add_argument("--smoke", action="store_true", help="one seed, short schedule")
    p.add_argument("--out", default=None)
    a = p.parse_args()
    torch.set_num_threads(1)
    config = CONFIG.replace(epochs=2.0, posterior_epochs=2.0) if a.smoke else CONFIG
    rows = []
    for seed in range(1 if a.smoke else a.seeds):
        start = time.perf_counter()
        result, w, mean, cov = fitted(seed, config)
        exact = mean + cov.diagonal().sqrt() * torch.randn(4000, D, generator=torch.Generator().manual_seed(0))
        q_cov, q_width = interval_coverage(draws(result), w)
        e_cov, e_width = interval_coverage(exact, w)
        rows.append({"seed": seed, "coverage_q": q_cov, "coverage_exact": e_cov, "width_q": q_width,
                     "width_exact": e_width, "seconds": time.perf_counter() - start})
        print(json.dumps(rows[-1]))
    summary = {k: (statistics.mean(r[k] for r in rows), statistics.pstdev(r[k] for r in rows))
               for k in ("coverage_q", "coverage_exact", "width_q", "width_exact")}
    print(json.dumps({"mean_sd": summary}))
    if a.out:
        Path(a.out).write_text(json.dumps({"config": config.to_dict(), "rows": rows, "mean_sd": summary}, indent=1))


if __name__ == "__main__":
    main()
