"""sqs-pyro: Bayesian compression of neural networks with spike-and-slab GMM priors (SQS) in Pyro."""
from sqs_pyro.config import SQSConfig
from sqs_pyro.errors import CompressedFileError, SQSDivergenceError, SQSInputError

__all__ = ["CompressedFileError", "SQSConfig", "SQSDivergenceError", "SQSInputError", "load_compressed",
           "save_compressed"]
__version__ = "0.1.0"


def __getattr__(name: str):
    """``save_compressed`` / ``load_compressed`` import torch lazily, keeping ``import sqs_pyro`` light."""
    if name in ("save_compressed", "load_compressed"):
        from sqs_pyro import fileformat

        return getattr(fileformat, name)
    raise AttributeError(f"module 'sqs_pyro' has no attribute {name!r}")
