"""Probe (issue 38 item 6): the driver on the budget of examples/svi_script.py (10k MNIST images, 2 epochs,
batch 128), for comparison with the script's stock-SVI run at the same sparsity and K.

    python examples/svi_script.py --sparsity 0.95 --components 4
    python benchmarks/probes/svi_script_vs_driver.py --sparsity 0.95 --components 4
"""
import argparse

import torch

from sqs_pyro import SQSConfig, compress
from sqs_pyro.data import load_mnist, load_mnist_cnn
from sqs_pyro.data.metrics import calibration, predictive_probs

parser = argparse.ArgumentParser()
parser.add_argument("--sparsity", type=float, default=0.95)
parser.add_argument("--components", type=int, default=4)
parser.add_argument("--seed", type=int, default=0)
args = parser.parse_args()
torch.set_num_threads(1)
x, y = load_mnist("train", 10000)
x_test, y_test = load_mnist("test")
result = compress(load_mnist_cnn(), (x, y), SQSConfig(sparsity=args.sparsity, components=args.components, epochs=2.0,
                                                       batch_size=128, seed=args.seed), progress=False)
greedy = calibration(predictive_probs(result.greedy_module(), x_test), y_test)
averaged = calibration(predictive_probs(result.averaged_module(), x_test, outputs="probs"), y_test)
print(f"driver: greedy accuracy {greedy['accuracy']:.4f} (NLL {greedy['nll']:.4f}); averaged accuracy "
      f"{averaged['accuracy']:.4f}  NLL {averaged['nll']:.4f}  ECE {averaged['ece']:.4f}")
