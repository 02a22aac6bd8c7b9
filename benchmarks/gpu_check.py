"""Device check (run where a CUDA GPU is present): the SVI driver, materialisation, the
averaged predictor and the file round trip on a GPU, against the same run on the CPU.

    python benchmarks/gpu_check.py
    python benchmarks/gpu_check.py --smoke     # CI: a shorter teacher fit and one SVI epoch

A teacher MLP labels random 8x8 inputs; a student trained on them is compressed at 50% /
K=4 on both devices (the fused kernels are CPU-only, so the GPU run takes the eager path).
Prints accuracies, seconds per step and where every variational parameter lives.
"""
import argparse
import tempfile
import time
from pathlib import Path

import torch
from torch import nn

from sqs_pyro import SQSConfig
from sqs_pyro.format.container import load_compressed, save_compressed
from sqs_pyro.infer import compress
from smoke import add_smoke_flag


def task(device: torch.device, fit_steps: int = 400):
    """A student MLP fitted for ``fit_steps`` Adam steps to a teacher's labels, and its train / test split."""
    torch.manual_seed(0)
    teacher = nn.Sequential(nn.Flatten(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 4))
    x = torch.randn(8192, 1, 8, 8)
    with torch.no_grad():
        y = teacher(x).argmax(1)
    student = nn.Sequential(nn.Flatten(), nn.Linear(64, 256), nn.ReLU(), nn.Linear(256, 4))
    opt = torch.optim.Adam(student.parameters(), lr=3e-3)
    for _ in range(fit_steps):
        idx = torch.randint(0, 6144, (256,))
        opt.zero_grad()
        nn.functional.cross_entropy(student(x[idx]), y[idx]).backward()
        opt.step()
    return student.to(device), (x[:6144].to(device), y[:6144].to(device)), (x[6144:].to(device), y[6144:].to(device))


def accuracy(net, data) -> float:
    with torch.no_grad():
        return float((net(data[0]).argmax(-1) == data[1]).float().mean())


def run(device: torch.device, smoke: bool = False) -> dict:
    fit_steps = 20 if smoke else 400
    net, train, test = task(device, fit_steps)
    config = SQSConfig(components=4, sparsity=0.5, epochs=1.0 if smoke else 8.0, batch_size=256)
    start = time.perf_counter()
    result = compress(net, train, config, progress=False)
    seconds = time.perf_counter() - start
    devices = {str(p.device) for p in result.guide.parameters()}
    greedy = result.greedy_module()
    with tempfile.TemporaryDirectory() as tmp:
        save_compressed(result, Path(tmp) / "m.sqs")
        loaded = load_compressed(Path(tmp) / "m.sqs", model=task(torch.device("cpu"), fit_steps)[0])
    same = torch.equal(loaded.state_dict()["1.weight"], greedy.state_dict()["1.weight"].cpu())
    return {"device": str(device), "dense": accuracy(net, test), "greedy": accuracy(greedy, test),
            "averaged": accuracy(result.averaged_module(), test), "sparsity": result.accounting()["sparsity"],
            "seconds_per_step": seconds / (config.epochs * len(train[0]) // config.batch_size),
            "guide_devices": sorted(devices), "file_round_trip_exact": same}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_smoke_flag(parser)
    args = parser.parse_args()
    torch.set_num_threads(1)
    for device in ["cpu"] + (["cuda"] if torch.cuda.is_available() else []):
        print(run(torch.device(device), args.smoke), flush=True)


if __name__ == "__main__":
    main()
