r"""MNIST under distribution shift, and Fashion-MNIST as out-of-distribution inputs (all offline).

Every shift acts on the unnormalised images ``u = x * 0.3081 + 0.1307`` in ``[0, 1]`` and
normalises the result again, so a network sees shifted images through its usual input pipeline:

* rotation by ``theta`` degrees about the image centre (bilinear, zero background), for
  ``theta`` in :data:`ROTATIONS`;
* ``noise``: ``clip(u + 0.3 eps, 0, 1)`` with ``eps ~ N(0, 1)`` per pixel (seeded);
* ``blur``: a Gaussian blur, ``sigma = 1.5`` pixels (7x7 kernel, zero padding);
* ``contrast``: ``m + 0.3 (u - m)`` with ``m`` the image's mean intensity.

Fashion-MNIST is read from the idx files of Debian's ``dataset-fashion-mnist`` package
(``make assets-fashion``) with :func:`read_idx`; it is normalised with the MNIST statistics.
"""
from __future__ import annotations

import gzip
import math
import os
from pathlib import Path

import torch

from sqs_pyro.data.images import MNIST_MEAN, MNIST_STD
from sqs_pyro.errors import SQSInputError

ROTATIONS = (15, 30, 45, 60, 90)
NOISE_STD, BLUR_SIGMA, CONTRAST = 0.3, 1.5, 0.3
CORRUPTIONS = ("noise", "blur", "contrast")
FASHION_TEST = "t10k-images-idx3-ubyte"
_IDX_TYPES = {0x08: torch.uint8, 0x09: torch.int8, 0x0B: torch.int16, 0x0C: torch.int32, 0x0D: torch.float32,
              0x0E: torch.float64}


def _unit(x: torch.Tensor) -> torch.Tensor:
    return x * MNIST_STD + MNIST_MEAN


def _normalised(u: torch.Tensor) -> torch.Tensor:
    return (u - MNIST_MEAN) / MNIST_STD


def rotate(x: torch.Tensor, degrees: float) -> torch.Tensor:
    """Normalised images ``(N, 1, H, W)`` rotated by ``degrees`` about the centre (zero background)."""
    theta = math.radians(degrees)
    c, s = math.cos(theta), math.sin(theta)
    # affine_grid maps output to input coordinates: the inverse rotation
    matrix = torch.tensor([[c, s, 0.0], [-s, c, 0.0]], dtype=x.dtype).expand(len(x), 2, 3)
    grid = torch.nn.functional.affine_grid(matrix, list(x.shape), align_corners=False)
    u = torch.nn.functional.grid_sample(_unit(x), grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    return _normalised(u)


def gaussian_noise(x: torch.Tensor, std: float = NOISE_STD, seed: int = 0) -> torch.Tensor:
    """``clip(u + std eps, 0, 1)``, normalised again; ``eps`` from a generator seeded with ``seed``."""
    eps = torch.randn(x.shape, generator=torch.Generator().manual_seed(seed), dtype=x.dtype)
    return _normalised((_unit(x) + std * eps).clamp(0.0, 1.0))


def blur(x: torch.Tensor, sigma: float = BLUR_SIGMA) -> torch.Tensor:
    """A separable Gaussian blur with standard deviation ``sigma`` pixels (radius ``ceil(2 sigma)``)."""
    radius = math.ceil(2 * sigma)
    offsets = torch.arange(-radius, radius + 1, dtype=x.dtype)
    kernel = torch.exp(-offsets ** 2 / (2 * sigma ** 2))
    kernel = kernel / kernel.sum()
    u = torch.nn.functional.conv2d(_unit(x), kernel.view(1, 1, 1, -1), padding=(0, radius))
    u = torch.nn.functional.conv2d(u, kernel.view(1, 1, -1, 1), padding=(radius, 0))
    return _normalised(u)


def contrast(x: torch.Tensor, factor: float = CONTRAST) -> torch.Tensor:
    """``m + factor (u - m)`` with ``m`` each image's mean intensity."""
    u = _unit(x)
    m = u.mean(dim=(-2, -1), keepdim=True)
    return _normalised(m + factor * (u - m))


def shifted_sets(x: torch.Tensor, seed: int = 0) -> dict[str, torch.Tensor]:
    """Every shift of normalised MNIST images ``x``: ``rot15`` ... ``rot90``, ``noise``, ``blur``, ``contrast``."""
    sets = {f"rot{angle}": rotate(x, angle) for angle in ROTATIONS}
    sets.update(noise=gaussian_noise(x, seed=seed), blur=blur(x), contrast=contrast(x))
    return sets


def read_idx(path: str | os.PathLike) -> torch.Tensor:
    """The array of an idx file (``.gz`` or raw): magic ``0 0 type ndim``, ``ndim`` big-endian
    int32 sizes, then the data in big-endian order."""
    path = Path(path)
    if not path.is_file():
        raise SQSInputError(f"no idx file at {path}")
    raw = (gzip.open if path.suffix == ".gz" else open)(path, "rb").read()
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] not in _IDX_TYPES:
        raise SQSInputError(f"{path} is not an idx file (bad magic number {raw[:4].hex()})")
    dtype, ndim = _IDX_TYPES[raw[2]], raw[3]
    shape = [int.from_bytes(raw[4 + 4 * i:8 + 4 * i], "big") for i in range(ndim)]
    start = 4 + 4 * ndim
    itemsize = torch.empty((), dtype=dtype).element_size()
    if len(raw) != start + math.prod(shape) * itemsize:
        raise SQSInputError(f"{path}: {len(raw) - start} data bytes, but the header says shape {shape}")
    data = torch.frombuffer(bytearray(raw[start:]), dtype=dtype)
    if itemsize > 1:  # idx is big-endian
        data = data.view(torch.uint8).view(-1, itemsize).flip(-1).reshape(-1).view(dtype)
    return data.reshape(shape)


def load_fashion_mnist(directory: str | os.PathLike, limit: int | None = None) -> torch.Tensor:
    """The Fashion-MNIST test images ``(N, 1, 28, 28)`` under ``directory`` (searched recursively for
    ``t10k-images-idx3-ubyte[.gz]``), scaled to [0, 1] and normalised with the MNIST statistics."""
    directory = Path(directory)
    found = sorted(p for name in (FASHION_TEST, FASHION_TEST + ".gz") for p in directory.rglob(name)) \
        if directory.is_dir() else []
    if not found:
        raise SQSInputError(f"no Fashion-MNIST test images ({FASHION_TEST}[.gz]) under {directory}; run "
                            "`make assets-fashion` (Debian's dataset-fashion-mnist package) and pass its folder")
    images = read_idx(found[0])
    if images.dim() != 3 or tuple(images.shape[1:]) != (28, 28):
        raise SQSInputError(f"{found[0]}: expected (N, 28, 28) images, got shape {tuple(images.shape)}")
    return _normalised(images[:limit].float().unsqueeze(1) / 255.0)
