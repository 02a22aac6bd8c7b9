"""Re-write and splice ``sqs-pyro quantize`` files of SmolLM2 (issue 41): today's bytes of an older file,
and which part of a file (the token table or the matrices) a perplexity change comes from.

    python benchmarks/probes/lm_splice.py --out NEW.sqs --matrices A/model.sqs [--table B/model.sqs] \\
        [--eval persuasion.txt policy.txt --max-eval-windows 64]

``--matrices A`` alone: ``A``'s network written again by today's writer (``save_compressed``'s default
format), its bytes printed. With ``--table B``: ``A``'s network with ``B``'s token table (a table tied to
the LM head, so the head too). ``--eval``: the new file's perplexity on the first windows of each text,
loaded back from the file. One JSON line on stdout.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from sqs_pyro.compressed.materialize import CompressedNetwork
from sqs_pyro.format import load_compressed, save_compressed
from sqs_pyro.hf import CausalLM, load_smollm, load_transformers, perplexity, text_windows

TABLE = "lm.model.embed_tokens.weight"


def spliced(matrices: Path, table: Path | None) -> CompressedNetwork:
    """The network of ``matrices``, its token table replaced by that of ``table`` (if given)."""
    network = load_compressed(matrices)
    if table is not None:
        new = {layer.name: layer for layer in load_compressed(table).layers}[TABLE]
        network.layers = [new if layer.name == TABLE else layer for layer in network.layers]
    return network


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--matrices", type=Path, required=True, help="the file whose network is written again")
    parser.add_argument("--table", type=Path, help="the file whose token table replaces --matrices' table")
    parser.add_argument("--out", type=Path, required=True, help="the new .sqs file")
    parser.add_argument("--eval", type=Path, nargs="*", default=[], help="texts to evaluate the new file on")
    parser.add_argument("--max-eval-windows", type=int, default=64)
    args = parser.parse_args()
    torch.set_num_threads(1)
    tokenizer, lm = load_smollm()
    row = {"matrices": str(args.matrices), "table": str(args.table or args.matrices),
           "file_bytes": save_compressed(spliced(args.matrices, args.table), args.out, model=CausalLM(lm),
                                         tensor_dtype="float16")}
    del lm
    if args.eval:
        net = CausalLM(load_transformers(args.out))
        row["perplexity_by_file"] = {path.name: perplexity(net, text_windows(tokenizer, [path], 128)
                                                           [:args.max_eval_windows]) for path in args.eval}
    print(json.dumps(row))


if __name__ == "__main__":
    main()
