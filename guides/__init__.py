"""Variational families: the mean-field spike-and-GMM guide, its KL bound and initialisation."""
from sqs_pyro.guides import kl as _kl  # noqa: F401  (registers the KL bound with torch)
from sqs_pyro.guides.distributions import Codebook, SpikeGMM
from sqs_pyro.guides.kl import spike_gmm_kl
from sqs_pyro.guides.kmeans import kmeans_1d
from sqs_pyro.guides.spike_gmm import GateState, LayerPosterior, SpikeGMMGuide
from sqs_pyro.guides.windows import WindowPlan, iqr_fences, plan_windows

__all__ = ["Codebook", "GateState", "LayerPosterior", "SpikeGMM", "SpikeGMMGuide",
           "WindowPlan", "iqr_fences", "kmeans_1d", "plan_windows", "spike_gmm_kl"]
