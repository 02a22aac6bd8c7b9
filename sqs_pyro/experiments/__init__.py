"""Experiments: classical baselines on SQS's representation, workloads, and the ablation runner."""
