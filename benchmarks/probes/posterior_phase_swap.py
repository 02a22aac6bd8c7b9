"""Probe (issue 38 item 6): is the gap between examples/svi_script.py and the driver in the posterior phase or in the
point estimate it starts from? One driver point estimate (``posterior_epochs=0``), then the script's stock-SVI
posterior phase on it (with batch orders seeded ``--orders``), against the driver's own full run (the same point
phases, then its posterior phase). Greedy must be equal in all rows; only the averaged network can differ.

    python benchmarks/probes/posterior_phase_swap.py --sparsity 0.95 --components 4 --seed 0
"""
import argparse
import copy
import sys
from pathlib import Path

import pyro
import torch

from sqs_pyro import SQSConfig, compress
from sqs_pyro.data import load_mnist, load_mnist_cnn
from sqs_pyro.data.metrics import calibration, predictive_probs
from sqs_pyro.infer.schedules import Schedule

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "examples"))
from svi_script import epoch_batches, posterior_phase  # noqa: E402

parser = argparse.ArgumentParser()
parser.add_argument("--sparsity", type=float, default=0.95)
parser.add_argument("--components", type=int, default=4)
parser.add_argument("--seed", type=int, default=0)
parser.add_argument("--orders", type=int, nargs="+", default=[100, 101])
parser.add_argument("--steps", type=int, nargs="+", help="posterior steps of the script's phase (default the driver's)")
parser.add_argument("--particles", type=int, default=1, help="draws of W per step in the script's phase")
parser.add_argument("--no-full", action="store_true", help="skip the driver's full run")
args = parser.parse_args()
torch.set_num_threads(1)
x, y = load_mnist("train", 10000)
x_test, y_test = load_mnist("test")
config = SQSConfig(sparsity=args.sparsity, components=args.components, epochs=2.0, batch_size=128, seed=args.seed)
steps = Schedule.from_config(config, len(x) // config.batch_size).posterior_steps  # the driver's: 20


def report(name: str, result) -> None:
    greedy = calibration(predictive_probs(result.greedy_module(), x_test), y_test)
    averaged = calibration(predictive_probs(result.averaged_module(), x_test, outputs="probs"), y_test)
    print(f"{name:32s} greedy {greedy['accuracy']:.4f} / {greedy['nll']:.4f}   averaged {averaged['accuracy']:.4f} / "
          f"NLL {averaged['nll']:.4f} / ECE {averaged['ece']:.4f}", flush=True)


if not args.no_full:
    report("driver (point + its posterior)", compress(load_mnist_cnn(), (x, y), config, progress=False))
point = compress(load_mnist_cnn(), (x, y), config.replace(posterior_epochs=0.0), progress=False)
start = copy.deepcopy(point.guide.state_dict())
for phase_steps in args.steps or [steps]:
    for order in args.orders:
        point.guide.load_state_dict(start)
        pyro.set_rng_seed(order)
        pyro.clear_param_store()
        order_batches = epoch_batches(len(x), config.batch_size, torch.Generator().manual_seed(order))
        posterior_phase(point.model, point.guide, point.config, order_batches, phase_steps, (x, y), args.particles)
        report(f"script posterior, {phase_steps} steps x {args.particles} ({order})", point)
