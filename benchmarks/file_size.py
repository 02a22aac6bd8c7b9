"""File size and speed of the ``.sqs`` format (numbers quoted in README).

1. Compress the pretrained ccexam MNIST CNN at 95% sparsity / K=4 and 75% / K=16, save the
   ``.sqs`` file and compare its bytes with the fp32 safetensors file of the dense model and
   with the entropy lower bound ``N H2(density) + nnz H(code usage)`` of the compressed
   layers; check that the loaded module's outputs equal the materialised network's bit for
   bit, and measure the effect of fp16 codebooks.
2. Save and load a synthetic 10 M-parameter network at both settings and report seconds
   per 10 M parameters.

    python benchmarks/file_size.py               # 3 epochs per setting: about 20 minutes on 2 vCPUs
    python benchmarks/file_size.py --epochs 0.1 --train-limit 5000 --speed-params 1000000   # quicker look
    python benchmarks/file_size.py --smoke       # CI: four steps per setting (batch 256), 256 test images, 65k-parameter speed test
"""
from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import safetensors.torch
import torch
from torch import nn

from sqs_pyro import SQSConfig
from sqs_pyro.data import accuracy, load_mnist, load_mnist_cnn
from sqs_pyro.format.container import layer_table, load_compressed, read_header, save_compressed
from sqs_pyro.compressed.materialize import CompressedLayer, CompressedNetwork
from sqs_pyro.infer import compress
from smoke import add_smoke_flag

SETTINGS = ((0.95, 4), (0.75, 16))


def mnist_rows(args: argparse.Namespace, folder: Path) -> tuple[list[tuple], list[tuple]]:
    net = load_mnist_cnn()
    dense_bytes = len(safetensors.torch.save(net.state_dict()))
    x_train, y_train = load_mnist("train", args.train_limit)
    x_test, y_test = load_mnist("test", args.test_limit)
    sizes, fp16 = [], []
    for sparsity, k in SETTINGS:
        config = SQSConfig(components=k, sparsity=sparsity, epochs=args.epochs, batch_size=256, seed=args.seed)
        result = compress(net, (x_train, y_train), config, progress=False)
        path = folder / f"mnist_{sparsity}_{k}.sqs"
        file_bytes = save_compressed(result, path)
        rows = layer_table(read_header(path))
        layer_bytes, bound = sum(r["bytes"] for r in rows), sum(r["bound_bytes"] for r in rows)
        greedy = result.greedy_module()
        loaded = load_compressed(path, load_mnist_cnn())
        with torch.no_grad():
            exact = torch.equal(loaded(x_test), greedy(x_test))
        achieved = 1 - sum(r["nnz"] for r in rows) / sum(r["numel"] for r in rows)
        sizes.append((f"{sparsity:.2f} / K={k}", f"{achieved:.4f}", f"{accuracy(greedy, x_test, y_test):.4f}",
                      f"{dense_bytes:,}", f"{file_bytes:,}", f"{dense_bytes / file_bytes:.1f}x",
                      f"{layer_bytes:,}", f"{bound:,.0f}", f"{layer_bytes / bound:.3f}", str(exact)))

        half_path = folder / f"mnist_{sparsity}_{k}_fp16.sqs"
        half_bytes = save_compressed(result, half_path, codebook_dtype="float16")
        half = load_compressed(half_path, load_mnist_cnn())
        weights, half_weights = greedy.state_dict(), half.state_dict()
        dw = max(float((weights[n] - half_weights[n]).abs().max()) for n in weights)
        with torch.no_grad():
            dlogit = float((half(x_test) - greedy(x_test)).abs().max())
        fp16.append((f"{sparsity:.2f} / K={k}", f"{file_bytes:,}", f"{half_bytes:,}", f"{dw:.2e}", f"{dlogit:.2e}",
                     f"{accuracy(half, x_test, y_test):.4f}"))
    return sizes, fp16


def synthetic(numel: int, sparsity: float, k: int, seed: int) -> tuple[CompressedNetwork, nn.Module]:
    """Four equal linear layers, magnitude-pruned Gaussian weights quantised to K uniform levels."""
    gen = torch.Generator().manual_seed(seed)
    rows, cols = 2048, numel // (4 * 2048)
    skeleton = nn.Sequential(*(nn.Linear(cols, rows, bias=False) for _ in range(4)))
    layers = []
    for i in range(4):
        w = torch.randn(rows, cols, generator=gen)
        mask = w.abs() > w.abs().flatten().kthvalue(int(sparsity * w.numel())).values
        levels = torch.linspace(float(w.min()), float(w.max()), k)
        codes = torch.where(mask, torch.bucketize(w, levels).clamp(max=k - 1), 0)
        layers.append(CompressedLayer(f"{i}.weight", (rows, cols), mask, codes, levels, torch.zeros(k, dtype=torch.long)))
    return CompressedNetwork(layers, {}), skeleton


def speed_rows(args: argparse.Namespace, folder: Path) -> list[tuple]:
    out = []
    for sparsity, k in SETTINGS:
        network, skeleton = synthetic(args.speed_params, sparsity, k, args.seed)
        params = sum(layer.numel for layer in network.layers)
        path = folder / f"synthetic_{sparsity}_{k}.sqs"
        saves, loads = [], []
        for _ in range(args.repeats):
            start = time.perf_counter()
            file_bytes = save_compressed(network, path)
            saves.append(time.perf_counter() - start)
            start = time.perf_counter()
            load_compressed(path, skeleton)
            loads.append(time.perf_counter() - start)
        per = 1e7 / params
        out.append((f"{sparsity:.2f} / K={k}", f"{params:,}", f"{file_bytes:,}",
                    f"{np.median(saves) * per:.2f}", f"{np.median(loads) * per:.2f}"))
    return out


def print_table(title: str, header: tuple, rows: list[tuple]) -> None:
    table = [header, *rows]
    widths = [max(len(r[i]) for r in table) for i in range(len(header))]
    print(f"\n{title}")
    for r in table:
        print("  ".join(c.rjust(w) for c, w in zip(r, widths)))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--epochs", type=float, default=3.0, help="SVI epochs per setting (default 3, as sqs-pyro compress)")
    parser.add_argument("--train-limit", type=int, help="use only the first N training images")
    parser.add_argument("--test-limit", type=int, help="evaluate on the first N test images")
    parser.add_argument("--speed-params", type=int, default=10_000_000, help="parameters of the speed test")
    parser.add_argument("--repeats", type=int, default=3, help="timed repeats (median reported)")
    parser.add_argument("--seed", type=int, default=0)
    add_smoke_flag(parser)
    args = parser.parse_args()
    torch.set_num_threads(1)
    if args.smoke:
        args.epochs, args.train_limit, args.test_limit, args.speed_params, args.repeats = 1.0, 1024, 256, 65536, 1
    with tempfile.TemporaryDirectory() as tmp:
        sizes, fp16 = mnist_rows(args, Path(tmp))
        speed = speed_rows(args, Path(tmp))
    print_table(f"ccexam MNIST CNN, {args.epochs} epochs: .sqs file vs fp32 safetensors and the entropy bound",
                ("setting", "sparsity", "acc", "fp32 st bytes", "file bytes", "ratio", "layer bytes",
                 "bound bytes", "layers/bound", "exact"), sizes)
    print_table("fp16 codebooks (max differences against the fp32-codebook network)",
                ("setting", "fp32-cb bytes", "fp16-cb bytes", "max |dw|", "max |dlogit|", "acc"), fp16)
    print_table("save / load seconds per 10 M parameters (synthetic linear layers, median)",
                ("setting", "params", "file bytes", "save s", "load s"), speed)


if __name__ == "__main__":
    main()
