"""sqs-pyro: Bayesian compression of neural networks with spike-and-slab GMM priors (SQS) in Pyro.

The Bayesian workflow: :mod:`sqs_pyro.models` (priors, likelihoods) -> :mod:`sqs_pyro.guides`
(variational families, KL) -> :mod:`sqs_pyro.infer` (SVI) -> :mod:`sqs_pyro.analysis` ->
:mod:`sqs_pyro.compressed` (the deterministic network) -> :mod:`sqs_pyro.format` (``.sqs`` files).
"""
from sqs_pyro.config import SQSConfig
from sqs_pyro.errors import CompressedFileError, SQSDivergenceError, SQSInputError
from sqs_pyro.format.container import load_compressed, save_compressed
from sqs_pyro.infer import SQSResult, compress

__all__ = ["CompressedFileError", "SQSConfig", "SQSDivergenceError", "SQSInputError", "SQSResult", "compress",
           "load_compressed", "save_compressed"]
__version__ = "0.1.0"
