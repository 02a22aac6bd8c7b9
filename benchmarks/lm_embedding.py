"""How SmolLM2's tied token embedding is stored (issue 41): its perplexity cost alone, everything else dense.

    python benchmarks/lm_embedding.py --austen assets/austen

The 49152 x 576 table (also the LM head) is coded the way ``sqs-pyro quantize`` codes it (nearest
level on a K-level k-means codebook of group-normalised values, the group scales searched, 16
exact weights) with K and the group size G of each variant; ``k256_row`` (one scale per row, 256
levels) is the "8 bits with per-row scales" option; ``_head`` variants code the table with GPTQ error
feedback under the LM head's input moments from the quantiser's 128 calibration windows (its
``--head-feedback``). Perplexity on 64 validation windows of the
five training novels (the last 64 of the seeded order whose first 128 the quantiser calibrates
on) and on the 64 *Persuasion* windows of the LM table. One JSON line per variant in
``results/lm_embedding.jsonl`` with the table's bytes in the file.
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from sqs_pyro.compressed.oneshot import quantize_sites
from sqs_pyro.data.text import austen_novels
from sqs_pyro.format.container import encode_file
from sqs_pyro.compressed.materialize import CompressedNetwork
from sqs_pyro.hf import CausalLM, load_smollm, perplexity, token_windows
from sqs_pyro.hf.oneshot import embedding_sites, tied_head_hessian

HERE = Path(__file__).parent
VARIANTS = {"fp16": None, "k256_row": (256, 576), "k32_g64": (32, 64), "k16_g64": (16, 64), "k16_g32": (16, 32),
            "k32_g64_head": (32, 64), "k16_g64_head": (16, 64)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--austen", type=Path, required=True)
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    parser.add_argument("--out", type=Path, default=HERE / "results" / "lm_embedding.jsonl")
    args = parser.parse_args()
    torch.set_num_threads(1)
    tokenizer, lm = load_smollm()
    net = CausalLM(lm)
    books = austen_novels(args.austen)
    train = torch.cat([token_windows(tokenizer, t, 128) for name, t in books.items() if name != "persuasion"])
    order = torch.randperm(len(train), generator=torch.Generator().manual_seed(0))
    sets = {"validation": train[order[-64:]], "persuasion": token_windows(tokenizer, books["persuasion"], 128)[:64]}
    site, = embedding_sites(net)
    calib = train[order[:128], :-1]  # the quantiser's pick (its windows of the five novels, seed 0)
    head = tied_head_hessian(net, site, calib.split(8)) if any(v.endswith("_head") for v in args.variants) else None
    table = net.get_parameter(site.name)
    dense = table.detach().clone()
    rows = [{"variant": "fp32", "bytes": 4 * dense.numel(), **{k: perplexity(net, w) for k, w in sets.items()}}]
    for variant in args.variants:
        started = time.perf_counter()
        if VARIANTS[variant] is None:
            weight, nbytes = dense.half().float(), 2 * dense.numel()
        else:
            k, g = VARIANTS[variant]
            moments = head if variant.endswith("_head") else torch.eye(site.shape[1])
            layer, = quantize_sites(net, [site], k, g, 16, None, {site.name: moments})
            weight = layer.weight()
            nbytes = len(encode_file(CompressedNetwork([layer], {})))
        with torch.no_grad():
            table.copy_(weight)
        rows.append({"variant": variant, "bytes": nbytes, "seconds": time.perf_counter() - started,
                     "rel_rms_error": float((weight - dense).norm() / dense.norm()),
                     **{k: perplexity(net, w) for k, w in sets.items()}})
        with torch.no_grad():
            table.copy_(dense)
    with open(args.out, "a") as f:
        for row in rows:
            print(json.dumps(row))
            f.write(json.dumps(row) + "\n")


if __name__ == "__main__":
    main()
