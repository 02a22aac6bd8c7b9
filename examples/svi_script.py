"""Your own SVI loop over the SQS model and guide, with plain Pyro.

The SQS model and guide are ordinary Pyro callables: any SVI script can optimise them with
``pyro.infer.SVI`` and ``TraceMeanField_ELBO`` (which picks up the registered analytic KL
bound), then materialise the compressed network. Two phases, as the driver runs them:

1. the point phases: the guide's default ``"hard"`` forward (the greedy network, straight-through
   gradients), gates learning and pruned along a ramp, then the mask frozen;
2. the posterior phase: the greedy codes fixed, the forward draws ``W ~ q`` (``mode="sample"``: the ELBO),
   and only the slab scales and mixing weights learn (``lr_posterior``; every other rate 0), so the
   posterior predictive's widths come from the data.

    python examples/svi_script.py               # 2 epochs on 10k MNIST images, then 0.25 epoch of the ELBO
    python examples/svi_script.py --smoke-test  # a few steps on 512 images (CI)
"""
import argparse
import math

import pyro
import torch
from pyro.infer import SVI, TraceMeanField_ELBO

from sqs_pyro import SQSConfig
from sqs_pyro.compressed.materialize import AveragedPredictor
from sqs_pyro.data import accuracy, load_mnist, load_mnist_cnn
from sqs_pyro.data.metrics import calibration, predictive_probs
from sqs_pyro.guides import GateState, SpikeGMMGuide
from sqs_pyro.infer.schedules import PRUNE, Schedule
from sqs_pyro.compressed.materialize import materialize
from sqs_pyro.models import CategoricalLikelihood, SQSModel, select_layers


def epoch_batches(n: int, batch: int, generator: torch.Generator):
    """Minibatch indices: a seeded permutation per epoch, walked in order (the last partial batch dropped)."""
    while True:
        order = torch.randperm(n, generator=generator)
        yield from (order[i:i + batch] for i in range(0, n - batch + 1, batch))


def posterior_phase(model: SQSModel, guide: SpikeGMMGuide, config: SQSConfig, batches, steps: int,
                    data: tuple[torch.Tensor, torch.Tensor], particles: int = 1) -> float:
    """The posterior phase on stock SVI: ``W ~ q`` in the forward pass around the fixed greedy codes; only the widths
    and mixing weights learn (Pyro's per-parameter optimiser arguments), at KL weight ``posterior_kl_weight`` (1: the
    ELBO), Adam at ``lr_posterior`` under a cosine to 5%, ``particles`` draws of ``W`` per step. Returns the last
    step's loss (-ELBO)."""
    guide.fix_point_codes()
    guide.mode = "sample"
    model.kl_weight = guide.kl_weight = config.posterior_kl_weight
    learns = lambda name: name.endswith(("scale_raw", "mix_logits"))  # noqa: E731
    cosine = lambda step: 0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * min(1.0, step / steps)))  # noqa: E731
    posterior_optim = pyro.optim.LambdaLR({"optimizer": torch.optim.Adam, "lr_lambda": cosine, "optim_args": lambda
                                           name: {"lr": config.lr_posterior if learns(name) else 0.0}})
    posterior = SVI(model, guide, posterior_optim, TraceMeanField_ELBO(num_particles=particles))
    x, y = data
    for _ in range(steps):
        idx = next(batches)
        loss = posterior.step(x[idx], y[idx])
        posterior_optim.step()
    return loss


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--smoke-test", action="store_true", help="tiny run for CI")
    parser.add_argument("--sparsity", type=float, default=0.75)
    parser.add_argument("--components", type=int, default=16)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    torch.set_num_threads(1)
    pyro.set_rng_seed(args.seed)
    pyro.clear_param_store()

    n_train, epochs, batch = (512, 1, 64) if args.smoke_test else (10000, 2, 128)
    x, y = load_mnist("train", n_train)
    x_test, y_test = load_mnist("test", 500 if args.smoke_test else 10000)
    net = load_mnist_cnn()
    config = SQSConfig(components=args.components, sparsity=args.sparsity, seed=args.seed)

    sites = select_layers(net)
    model = SQSModel(net, sites, config, CategoricalLikelihood(num_data=n_train))
    guide = SpikeGMMGuide(net, sites, config)
    guide.set_gate_state(GateState.LEARN)  # warmup_fraction=0: the gates learn from the first step
    # the driver's rates per parameter, under its cosine decay (pyro.optim.LambdaLR, stepped once per step)
    schedule = Schedule.from_config(config.replace(epochs=float(epochs)), n_train // batch)
    rates = {"gate_logits": config.lr_gates, "latent": config.lr_weights, "locs": config.lr_codebook,
             "mix_logits": config.lr_codebook, "scale_raw": config.slab_scale_rate * config.lr_codebook}
    rate = lambda name: {"lr": rates.get(name.rsplit(".", 1)[-1],  # noqa: E731
                                         config.lr_codebook if "group_scales" in name else config.lr_dense)}
    optim = pyro.optim.LambdaLR({"optimizer": torch.optim.Adam, "optim_args": rate, "lr_lambda": schedule.lr_factor})
    svi = SVI(model, guide, optim, TraceMeanField_ELBO())
    order = torch.Generator().manual_seed(args.seed)
    batches = epoch_batches(n_train, batch, order)

    for step in range(schedule.total_steps):
        model.kl_weight = guide.kl_weight = schedule.kl_weight(step)
        guide.gate_temperature.fill_(schedule.gate_temperature(step))
        guide.assign_temperature.fill_(schedule.assign_temperature(step))
        idx = next(batches)
        loss = svi.step(x[idx], y[idx])
        optim.step()
        if schedule.phase(step) == PRUNE:  # the cubic ramp; the mask freezes where pruning ends
            guide.prune_to_quantile(schedule.target_sparsity(step), config.pruned_logit, config.prune_scope)
            if step == schedule.prune_end - 1:
                guide.freeze_mask()
        if step % max(1, schedule.total_steps // 10) == 0:
            print(f"step {step:4d}  -ELBO {loss:12.1f}")
    guide.freeze_mask()

    loss = posterior_phase(model, guide, config, batches, max(1, int(config.posterior_epochs * n_train // batch)),
                           (x, y))
    print(f"posterior phase  -ELBO {loss:12.1f}")

    compressed = materialize(guide, model.net, group_scales=model.group_scales())  # one fp16 scale per row
    greedy = compressed.load_into(load_mnist_cnn())
    averaged = AveragedPredictor(guide, load_mnist_cnn(), compressed, config.num_averaged, seed=args.seed)
    kept = sum(layer.nnz for layer in compressed.layers) / sum(layer.numel for layer in compressed.layers)
    greedy_nll = calibration(predictive_probs(greedy, x_test), y_test)["nll"]
    averaged_stats = calibration(predictive_probs(averaged, x_test, outputs="probs"), y_test)
    print(f"dense accuracy {accuracy(net, x_test, y_test):.4f}  greedy accuracy "
          f"{accuracy(greedy, x_test, y_test):.4f} (NLL {greedy_nll:.4f})  sparsity {1 - kept:.3f}")
    print(f"averaged accuracy {averaged_stats['accuracy']:.4f}  NLL {averaged_stats['nll']:.4f}  "
          f"ECE {averaged_stats['ece']:.4f}")


if __name__ == "__main__":
    main()
