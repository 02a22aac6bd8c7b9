"""Inference: SVI on the SQS model and guide, with its schedule, data, checkpoints and processes.

``compress`` (:mod:`.driver`) is the entry point; :class:`~.trainer.Trainer` runs the loop;
:mod:`.elbo` holds the ELBO, :mod:`.schedules` the phases and annealing, :mod:`.data` the
seeded minibatches, :mod:`.checkpoint` and :mod:`.distributed` long and parallel runs.
"""
from sqs_pyro.infer.driver import compress
from sqs_pyro.infer.result import SQSResult
from sqs_pyro.infer.trainer import Trainer

__all__ = ["SQSResult", "Trainer", "compress"]
