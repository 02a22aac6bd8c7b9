"""Pyro models: spike-and-slab GMM priors over a network's weights, and likelihoods."""
from sqs_pyro.models.likelihoods import (CategoricalLikelihood, GaussianLikelihood, LossLikelihood,
                                         TokenCategoricalLikelihood)
from sqs_pyro.models.network import SQSModel
from sqs_pyro.models.priors import SpikeSlabGMM
from sqs_pyro.models.selection import CompressedSite, select_layers, transformer_include

__all__ = ["CategoricalLikelihood", "CompressedSite", "GaussianLikelihood", "LossLikelihood", "SQSModel", "SpikeSlabGMM",
           "TokenCategoricalLikelihood", "select_layers", "transformer_include"]
