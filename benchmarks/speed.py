"""Speed of an SQS SVI step against plain fine-tuning and Pyro's AutoNormal (issue 7).

    python benchmarks/speed.py                      # all networks, README numbers
    python benchmarks/speed.py --networks mlp --rounds 5   # a quick look
    python benchmarks/speed.py --smoke              # a small MLP and a 1-layer MiniLM, one round, a temporary output (CI)

One process, one thread, batch 128 (MLP, CNN) or 32 sentences x 64 tokens (MiniLM). Per
network and round, every variant runs one step, in turn, so that load on a shared machine
hits all of them alike; the table gives medians over rounds and ratios to the plain step.

* plain:     forward + cross-entropy + backward + Adam on the dense network;
* SQS:       one ``compress`` step (SQSMeanFieldELBO, backward, Adam) with learned gates, in
             each forward mode: ``hard`` (the default: the greedy level, straight-through),
             ``sample`` (a drawn level and slab noise) and ``expected`` (the expected weight);
* AutoNormal: Pyro's ``AutoNormal`` guide with ``Trace_ELBO`` on the same network, N(0, 1)
             priors on the same weight tensors, the same likelihood, batch and Adam.

Then, per network: materialise + save (``save_compressed``) and load (``load_compressed``)
times per million parameters, and the inference latency of the loaded compressed module
against the dense one. Writes ``benchmarks/results/speed.json``.
"""
from __future__ import annotations

import argparse
import copy
import gc
import json
import statistics
import tempfile
import time
from pathlib import Path
from typing import Callable

import pyro
import pyro.distributions as dist
import torch
from pyro.infer import Trace_ELBO
from pyro.infer.autoguide import AutoNormal
from torch import nn
from torch.func import functional_call

from sqs_pyro import SQSConfig
from sqs_pyro.infer.elbo import SQSMeanFieldELBO
from sqs_pyro.format.container import load_compressed, save_compressed
from sqs_pyro.guides import GateState, SpikeGMMGuide, kernels
from sqs_pyro.compressed.materialize import materialize
from sqs_pyro.models import CategoricalLikelihood, SQSModel, select_layers
from sqs_pyro.infer.trainer import param_groups
from smoke import add_smoke_flag, smoke_folder

NUM_DATA = 50_000
Step = Callable[[], None]


class PooledClassifier(nn.Module):
    """A transformers encoder with a linear classification head on its pooled output."""

    def __init__(self, encoder: nn.Module, classes: int = 2) -> None:
        super().__init__()
        self.encoder = encoder
        self.head = nn.Linear(encoder.config.hidden_size, classes)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.head(self.encoder(input_ids=input_ids).pooler_output)


def build_network(name: str, batch: int, smoke: bool = False) -> tuple[nn.Module, torch.Tensor, torch.Tensor] | str:
    """``(net, inputs, labels)`` for a network name, or the reason it is skipped (``smoke``: an MLP of 32 and
    16 hidden units, a 1-layer, 32-wide MiniLM with a 512-token vocabulary)."""
    torch.manual_seed(0)
    if name == "mlp":
        hidden = (32, 16) if smoke else (300, 100)
        net = nn.Sequential(nn.Flatten(), nn.Linear(784, hidden[0]), nn.ReLU(), nn.Linear(*hidden), nn.ReLU(),
                            nn.Linear(hidden[1], 10))
        return net, torch.randn(batch, 1, 28, 28), torch.randint(0, 10, (batch,))
    if name == "cnn":
        try:
            from sqs_pyro.data import load_mnist_cnn
            net = load_mnist_cnn()
        except Exception as exc:  # noqa: BLE001 - reported as the skip reason
            return f"the ccexam MNIST CNN is not installed ({exc})"
        return net.train(), torch.randn(batch, 1, 28, 28), torch.randint(0, 10, (batch,))
    if name == "minilm":
        try:
            from transformers import BertConfig, BertModel
        except ImportError:
            return "transformers is not installed (pip install transformers)"
        shape = (dict(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64, vocab_size=512)
                 if smoke else dict(hidden_size=384, num_hidden_layers=6, num_attention_heads=12, intermediate_size=1536))
        config = BertConfig(**shape)
        net = PooledClassifier(BertModel(config))
        return net, torch.randint(0, config.vocab_size, (batch, 64)), torch.randint(0, 2, (batch,))
    raise ValueError(f"unknown network {name!r}")


def plain_step(net: nn.Module, x: torch.Tensor, y: torch.Tensor) -> Step:
    net = copy.deepcopy(net).train()
    opt = torch.optim.Adam(net.parameters(), lr=1e-4)

    def step() -> None:
        opt.zero_grad(set_to_none=True)
        nn.functional.cross_entropy(net(x), y).backward()
        opt.step()
    return step


def sqs_step(net: nn.Module, x: torch.Tensor, y: torch.Tensor, mode: str) -> tuple[Step, SQSModel, SpikeGMMGuide]:
    """The body of ``compress``'s loop (learned gates): loss, backward, Adam."""
    config = SQSConfig(mode=mode)
    with pyro.settings.context(module_local_params=True):
        sites = select_layers(net, config.include_types)
        model = SQSModel(net, sites, config, CategoricalLikelihood(NUM_DATA))
        guide = SpikeGMMGuide(net, sites, config)
        guide.set_gate_state(GateState.LEARN)
        loss_fn = SQSMeanFieldELBO()(model, guide)
    opt = torch.optim.Adam(param_groups(model, guide, config))

    def step() -> None:
        with pyro.settings.context(module_local_params=True):
            opt.zero_grad(set_to_none=True)
            (loss_fn(x, y) / NUM_DATA).backward()
            opt.step()
    return step, model, guide


def autonormal_step(net: nn.Module, x: torch.Tensor, y: torch.Tensor) -> Step:
    """Pyro's AutoNormal + Trace_ELBO with N(0, 1) priors on the weights SQS compresses."""
    net = copy.deepcopy(net).train()
    shapes = {s.name: s.shape for s in select_layers(net)}
    likelihood = CategoricalLikelihood(NUM_DATA)

    def model(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        weights = {name: pyro.sample(name, dist.Normal(0.0, 1.0).expand(shape).to_event(len(shape)))
                   for name, shape in shapes.items()}
        return likelihood(functional_call(net, weights, (x,), strict=False), y)

    with pyro.settings.context(module_local_params=True):
        guide = AutoNormal(model)
        elbo = Trace_ELBO()
        elbo.differentiable_loss(model, guide, x, y)  # creates the guide's parameters
    opt = torch.optim.Adam(list(guide.parameters()) + list(net.parameters()), lr=1e-4)

    def step() -> None:
        with pyro.settings.context(module_local_params=True):
            opt.zero_grad(set_to_none=True)
            (elbo.differentiable_loss(model, guide, x, y) / NUM_DATA).backward()
            opt.step()
    return step


def alternate(steps: dict[str, Step], rounds: int, warmup: int = 2) -> dict[str, float]:
    """Median seconds per call, running every step once per round, in turn."""
    for _ in range(warmup):
        for fn in steps.values():
            fn()
    times: dict[str, list[float]] = {name: [] for name in steps}
    for r in range(rounds):
        order = list(steps) if r % 2 == 0 else list(reversed(steps))
        for name in order:
            gc.collect()
            start = time.perf_counter()
            steps[name]()
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(ts) for name, ts in times.items()}


def file_and_latency(net: nn.Module, model: SQSModel, guide: SpikeGMMGuide, x: torch.Tensor,
                     rounds: int) -> dict[str, float]:
    """Materialise + save, load, and inference latency of the loaded module against the dense one."""
    with torch.no_grad():  # a realistic mask: about 75% of the gates closed
        for layer in guide.layers:
            layer.gate_logits.copy_(torch.where(torch.rand_like(layer.gate_logits) < 0.75, -3.0, 3.0))
    params = sum(p.numel() for p in net.parameters())
    dense = copy.deepcopy(net).eval()
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "model.sqs"
        save_s, load_s, size = [], [], 0
        for _ in range(3):
            start = time.perf_counter()
            compressed = materialize(guide, model.net, group_scales=model.group_scales())
            size = save_compressed(compressed, path, model=net)
            save_s.append(time.perf_counter() - start)
            start = time.perf_counter()
            loaded = load_compressed(path, model=copy.deepcopy(net)).eval()
            load_s.append(time.perf_counter() - start)
    with torch.no_grad():
        latency = alternate({"dense": lambda: dense(x), "loaded": lambda: loaded(x)}, rounds)
    return {"parameters": params, "file_bytes": size,
            "save_s_per_million": statistics.median(save_s) / params * 1e6,
            "load_s_per_million": statistics.median(load_s) / params * 1e6,
            "latency_dense_ms": 1e3 * latency["dense"], "latency_loaded_ms": 1e3 * latency["loaded"],
            "latency_ratio": latency["loaded"] / latency["dense"]}


MODES = ("hard", "sample", "expected")


def measure(name: str, batch: int, rounds: int, smoke: bool = False) -> dict | str:
    built = build_network(name, batch, smoke)
    if isinstance(built, str):
        return built
    net, x, y = built
    pyro.set_rng_seed(0)
    sqs = {mode: sqs_step(net, x, y, mode) for mode in MODES}
    steps = {"plain": plain_step(net, x, y), **{f"sqs_{mode}": sqs[mode][0] for mode in MODES},
             "autonormal": autonormal_step(net, x, y)}
    _, model, guide = sqs["hard"]
    medians = alternate(steps, rounds, warmup=0 if smoke else 2)
    row = {f"{k}_ms": 1e3 * v for k, v in medians.items()}
    row.update({f"{k}_ratio": v / medians["plain"] for k, v in medians.items() if k != "plain"})
    row.update(compressed_weights=sum(s.numel for s in model.sites), batch=batch)
    row.update(file_and_latency(net, model, guide, x, rounds))
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--networks", nargs="+", default=["mlp", "cnn", "minilm"], choices=["mlp", "cnn", "minilm"])
    parser.add_argument("--rounds", type=int, default=15, help="timed rounds per network (default 15)")
    parser.add_argument("--out", type=Path, default=None,
                        help="result file (default benchmarks/results/speed.json; with --smoke a temporary file)")
    add_smoke_flag(parser)  # a small MLP and a 1-layer MiniLM, batch 8, one round, no warm-up
    args = parser.parse_args()
    torch.set_num_threads(1)
    if args.smoke:
        args.networks, args.rounds = ["mlp", "minilm"], 1
        args.out = args.out or smoke_folder() / "speed.json"
    args.out = args.out or Path(__file__).parent / "results" / "speed.json"
    batches = {"mlp": 128, "cnn": 128, "minilm": 32} if not args.smoke else {"mlp": 8, "minilm": 8}
    results: dict[str, dict | str] = {}
    for name in args.networks:
        # MiniLM steps take seconds: fewer rounds keep the run to minutes
        rounds = args.rounds if name != "minilm" or args.smoke else max(3, args.rounds // 3)
        results[name] = measure(name, batches[name], rounds, args.smoke)
        if isinstance(results[name], str):
            print(f"{name}: skipped: {results[name]}")
    print(f"fused kernels: {'on' if kernels.available(torch.zeros(1), components=16) else 'off (eager path)'}; "
          f"1 thread; median step times over rounds, ratio to plain")
    print(f"{'network':8s} {'weights':>9s} {'plain ms':>9s} {'SQS hard':>17s} {'SQS sample':>17s} "
          f"{'SQS expected':>17s} {'AutoNormal':>17s}")
    for name, r in results.items():
        if isinstance(r, str):
            continue
        cells = [f"{r[k + '_ms']:9.1f} {r[k + '_ratio']:5.2f}x" for k in ("sqs_hard", "sqs_sample", "sqs_expected", "autonormal")]
        print(f"{name:8s} {r['compressed_weights']:9d} {r['plain_ms']:9.1f} " + " ".join(f"{c:>17s}" for c in cells))
    print(f"{'network':8s} {'params':>9s} {'save s/M':>9s} {'load s/M':>9s} {'dense ms':>9s} {'loaded ms':>9s} "
          f"{'ratio':>6s}")
    for name, r in results.items():
        if isinstance(r, str):
            continue
        print(f"{name:8s} {r['parameters']:9d} {r['save_s_per_million']:9.4f} {r['load_s_per_million']:9.4f} "
              f"{r['latency_dense_ms']:9.2f} {r['latency_loaded_ms']:9.2f} {r['latency_ratio']:6.3f}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"threads": 1, "results": results}, indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
