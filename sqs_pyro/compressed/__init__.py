"""The deterministic compressed network: materialised from the posterior (greedy or averaged),
and its size accounting."""
from sqs_pyro.compressed.accounting import accounting
from sqs_pyro.compressed.materialize import AveragedPredictor, CompressedLayer, CompressedNetwork, materialize

__all__ = ["AveragedPredictor", "CompressedLayer", "CompressedNetwork", "accounting", "materialize"]
