"""Classical baselines for SQS, trained with the same layer selection, data, schedule and
epochs, each returning the same :class:`~sqs_pyro.compressed.materialize.CompressedNetwork` type.

* ``magnitude_kmeans``: magnitude pruning + per-layer k-means codebook (Deep Compression style);
* ``magnitude_uniform``: magnitude pruning + per-channel uniform b-bit quantisation;
* ``dgms``: a differentiable GMM quantiser with a zero component, no prior, no KL;
* ``soft_weight_sharing``: retraining under a learned GMM prior with a zero component, then each
  weight to its most responsible component's mean (Ullrich et al., 2017).
"""
from typing import Any, Callable

from torch import nn

from sqs_pyro.experiments.baselines.common import BaselineResult, baseline_accounting
from sqs_pyro.experiments.baselines.deep_compression import compress_magnitude_kmeans
from sqs_pyro.experiments.baselines.dgms import compress_dgms
from sqs_pyro.experiments.baselines.magnitude import magnitude_masks
from sqs_pyro.experiments.baselines.soft_weight_sharing import compress_soft_weight_sharing
from sqs_pyro.experiments.baselines.uniform import ChannelScaledLayer, compress_magnitude_uniform, file_network
from sqs_pyro.config import SQSConfig

BASELINES: dict[str, Callable[[nn.Module, Any, SQSConfig], BaselineResult]] = {
    "magnitude_kmeans": compress_magnitude_kmeans,
    "magnitude_uniform": compress_magnitude_uniform,
    "dgms": compress_dgms,
    "soft_weight_sharing": compress_soft_weight_sharing,
}

__all__ = ["BASELINES", "BaselineResult", "ChannelScaledLayer", "baseline_accounting", "compress_dgms",
           "compress_magnitude_kmeans", "compress_magnitude_uniform", "compress_soft_weight_sharing", "file_network",
           "magnitude_masks"]
