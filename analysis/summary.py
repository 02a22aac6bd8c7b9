"""All analysis tables of a trained result, and the files a run folder keeps for its report.

``analysis.json`` holds :func:`analyze`'s tables (inclusion, tail outliers, codebooks, weight
histograms); ``posterior.nc`` holds :func:`~sqs_pyro.analysis.arviz_adapter.to_inference_data`'s
ArviZ object. Both are written atomically (temp file in the same folder, then rename).
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Mapping

from sqs_pyro.analysis.arviz_adapter import save_posterior, to_inference_data
from sqs_pyro.format.atomic import write_text_atomic
from sqs_pyro.analysis.codebooks import codebook_summary, layer_distributions
from sqs_pyro.analysis.inclusion import inclusion_summary
from sqs_pyro.analysis.outliers import outlier_summary

ANALYSIS_FILE, POSTERIOR_FILE = "analysis.json", "posterior.nc"
FORMAT_VERSION = 1


def analyze(result: Any, max_bins: int = 200) -> dict[str, Any]:
    """Inclusion, outlier and codebook tables plus weight histograms of a trained result (JSON-able)."""
    return {
        "format": FORMAT_VERSION,
        "config": result.config.to_dict(),
        "inclusion": inclusion_summary(result),
        "outliers": outlier_summary(result),
        "codebooks": codebook_summary(result),
        "distributions": layer_distributions(result, max_bins),
    }


def write_analysis(out: str | os.PathLike, result: Any, num_samples: int = 200, weights_per_layer: int = 32,
                   observed: Mapping[str, Any] | None = None) -> dict[str, Path]:
    """Write ``analysis.json`` and ``posterior.nc`` into the run folder ``out``; return their paths."""
    out = Path(out)
    analysis_path = out / ANALYSIS_FILE
    write_text_atomic(analysis_path, json.dumps(analyze(result), indent=1))
    data = to_inference_data(result, num_samples=num_samples, weights_per_layer=weights_per_layer,
                             observed=observed, seed=result.config.seed)
    return {"analysis": analysis_path, "posterior": save_posterior(data, out / POSTERIOR_FILE)}
