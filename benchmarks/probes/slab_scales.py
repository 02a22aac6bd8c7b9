"""The levels' slab scales ``s_k`` after training, at two codebook rates (issue 13, seventh round).

    python benchmarks/probes/slab_scales.py        # MNIST CNN, 95% / K=4, the standard grid's 20k images, 2 epochs

In hard mode the forward uses the level ``mu_k`` only, so ``s_k`` learns from the mode KL alone, whose slab
term pulls it towards the prior's scale; this prints ``s_k`` and ``mu_k`` per layer for ``lr_codebook`` 1e-3
and 3e-3 (own and pooled responsibilities) to show how far that pull gets at each rate.
"""
from pathlib import Path

import torch

from sqs_pyro.config import SQSConfig
from sqs_pyro.experiments.ablation import grid_workload, load_grid
from sqs_pyro.infer import compress

GRID = Path(__file__).parent / "configs" / "codebook_rate_probe.yaml"


def main() -> None:
    torch.set_num_threads(1)
    grid = load_grid(GRID)
    workload = grid_workload("mnist_cnn", grid)
    for lr, responsibilities in ((1e-3, "own"), (3e-3, "pooled"), (3e-3, "own")):
        config = SQSConfig.from_dict({**grid.config, "sparsity": 0.95, "components": 4, "lr_codebook": lr,
                                      "responsibility_scale": responsibilities})
        result = compress(workload.net, workload.train, config, progress=False)
        for layer in result.guide.layers:
            scales = [round(v, 3) for v in layer.scales.detach().tolist()]
            locs = [round(v, 3) for v in layer.locs.detach().tolist()]
            print(f"lr_codebook {lr:g} {responsibilities:6s} {layer.site_name:20s} s_k {scales} mu_k {locs}", flush=True)


if __name__ == "__main__":
    main()
