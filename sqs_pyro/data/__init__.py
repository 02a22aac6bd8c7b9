"""Data: offline image and text readers, and evaluation metrics."""
from sqs_pyro.data.images import load_mnist, load_mnist_cnn
from sqs_pyro.data.metrics import accuracy, calibration, predictive_probs
from sqs_pyro.data.text import austen_novels, labelled_sentences, movie_reviews

__all__ = ["accuracy", "austen_novels", "calibration", "labelled_sentences", "load_mnist", "load_mnist_cnn",
           "movie_reviews", "predictive_probs"]
