"""sqs-pyro: Bayesian compression of neural networks with spike-and-slab GMM priors (SQS) in Pyro."""
from sqs_pyro.config import SQSConfig
from sqs_pyro.errors import CompressedFileError, SQSInputError

__all__ = ["CompressedFileError", "SQSConfig", "SQSInputError"]
__version__ = "0.1.0"
