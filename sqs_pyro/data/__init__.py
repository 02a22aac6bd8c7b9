"""Data: offline image and text readers, shifted and out-of-distribution images, evaluation metrics and
the calibration baselines (temperature scaling, last-layer Laplace)."""
from sqs_pyro.data.images import load_mnist, load_mnist_cnn
from sqs_pyro.data.metrics import accuracy, calibration, predictive_probs
from sqs_pyro.data.shift import load_fashion_mnist, read_idx, shifted_sets
from sqs_pyro.data.text import austen_novels, labelled_sentences, movie_reviews
from sqs_pyro.data.uncertainty import LastLayerLaplace, fit_temperature, ood_auroc

__all__ = ["LastLayerLaplace", "accuracy", "austen_novels", "calibration", "fit_temperature", "labelled_sentences",
           "load_fashion_mnist", "load_mnist", "load_mnist_cnn", "movie_reviews", "ood_auroc", "predictive_probs",
           "read_idx", "shifted_sets"]
