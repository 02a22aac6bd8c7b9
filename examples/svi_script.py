"""Your own SVI loop over the SQS model and guide, with plain Pyro.

The SQS model and guide are ordinary Pyro callables: any SVI script can optimise them with
``pyro.infer.SVI`` and ``TraceMeanField_ELBO`` (which picks up the registered analytic KL
bound), then materialise the compressed network.

    python examples/svi_script.py               # 2 epochs on 10k MNIST images
    python examples/svi_script.py --smoke-test  # a few steps on 512 images (CI)
"""
import argparse

import pyro
import torch
from pyro.infer import SVI, TraceMeanField_ELBO
from pyro.optim import Adam

from sqs_pyro import SQSConfig
from sqs_pyro.data import accuracy, load_mnist, load_mnist_cnn
from sqs_pyro.guides import GateState, SpikeGMMGuide
from sqs_pyro.compressed.materialize import materialize
from sqs_pyro.models import CategoricalLikelihood, SQSModel, select_layers


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--smoke-test", action="store_true", help="tiny run for CI")
    parser.add_argument("--sparsity", type=float, default=0.75)
    args = parser.parse_args()
    torch.set_num_threads(1)
    pyro.set_rng_seed(0)
    pyro.clear_param_store()

    n_train, epochs, batch = (512, 1, 64) if args.smoke_test else (10000, 2, 128)
    x, y = load_mnist("train", n_train)
    x_test, y_test = load_mnist("test", 500 if args.smoke_test else 10000)
    net = load_mnist_cnn()
    config = SQSConfig(components=16, sparsity=args.sparsity)

    sites = select_layers(net)
    model = SQSModel(net, sites, config, CategoricalLikelihood(num_data=n_train))
    guide = SpikeGMMGuide(net, sites, config)
    guide.set_gate_state(GateState.LEARN)
    guide.gate_temperature.fill_(0.5)
    guide.assign_temperature.fill_(0.5)
    svi = SVI(model, guide, Adam({"lr": 1e-3}), TraceMeanField_ELBO())

    steps = epochs * (n_train // batch)
    for step in range(steps):
        idx = torch.randint(0, n_train, (batch,))
        loss = svi.step(x[idx], y[idx])
        guide.prune_to_quantile(args.sparsity * min(1.0, (step + 1) / (0.7 * steps)), config.pruned_logit)
        if step % max(1, steps // 10) == 0:
            print(f"step {step:4d}  -ELBO {loss:12.1f}")
    guide.freeze_mask()

    compressed = materialize(guide, model.net, group_scales=model.group_scales())  # one fp16 scale per row
    greedy = compressed.load_into(load_mnist_cnn())
    kept = sum(layer.nnz for layer in compressed.layers) / sum(layer.numel for layer in compressed.layers)
    print(f"dense accuracy {accuracy(net, x_test, y_test):.4f}  greedy accuracy "
          f"{accuracy(greedy, x_test, y_test):.4f}  sparsity {1 - kept:.3f}")


if __name__ == "__main__":
    main()
