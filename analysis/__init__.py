"""Posterior analysis: inclusion probabilities, tail outliers, codebooks, ArviZ, plots, reports."""
