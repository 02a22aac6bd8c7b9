"""Posterior analysis: inclusion probabilities, tail outliers, codebooks, ArviZ, plots, reports."""
from sqs_pyro.analysis.arviz_adapter import (DataTreeBackend, InferenceDataBackend, PosteriorBackend,
                                             default_backend, load_posterior, posterior_summary, save_posterior,
                                             to_inference_data)
from sqs_pyro.analysis.coverage import interval_coverage, ranking_auroc
from sqs_pyro.analysis.codebooks import codebook_summary, layer_distributions, merge_candidates, usage_entropy
from sqs_pyro.analysis.inclusion import inclusion_probabilities, inclusion_stats, inclusion_summary, magnitude_mask
from sqs_pyro.analysis.outliers import layer_outliers, outlier_mask, outlier_summary, window_ablation
from sqs_pyro.analysis.plots import (plot_accuracy_vs_compression, plot_elbo_trace, plot_forest,
                                     plot_inclusion_histograms, plot_sparsity_bits, plot_weight_histogram)
from sqs_pyro.analysis.report import build_report
from sqs_pyro.analysis.summary import analyze, write_analysis

__all__ = [
    "DataTreeBackend", "InferenceDataBackend", "PosteriorBackend", "analyze", "build_report", "codebook_summary",
    "default_backend", "inclusion_probabilities", "interval_coverage", "inclusion_stats", "inclusion_summary", "layer_distributions",
    "layer_outliers", "load_posterior", "magnitude_mask", "merge_candidates", "outlier_mask", "outlier_summary",
    "plot_accuracy_vs_compression", "plot_elbo_trace", "plot_forest", "plot_inclusion_histograms",
    "plot_sparsity_bits", "plot_weight_histogram", "posterior_summary", "ranking_auroc", "save_posterior", "to_inference_data",
    "usage_entropy", "window_ablation", "write_analysis",
]
