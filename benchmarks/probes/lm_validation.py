"""Validation perplexity of ``sqs-pyro quantize`` files (issue 41): the text settings are chosen on.

    python benchmarks/probes/lm_validation.py --data emma.txt mansfieldpark.txt northangerabbey.txt \\
        prideprejudice.txt sensesensibility.txt --files OUT1/model.sqs OUT2/model.sqs ...

The validation windows are the last 64 of the seeded order (seed 0) over the windows of the
calibration files, whose first 128 ``quantize --data`` (same files, same order, ``--seed 0``)
calibrates on: text of the calibration domain that no calibration window holds (for the five
novels, the ``validation`` windows of ``benchmarks/lm_embedding.py``; their dense perplexity is
printed first, 49.87 there). One JSON line per file on stdout and in ``--out``.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from sqs_pyro.hf import CausalLM, load_smollm, load_transformers, perplexity, text_windows

HERE = Path(__file__).resolve().parents[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, nargs="+", required=True, help="the calibration text files, in order")
    parser.add_argument("--files", type=Path, nargs="+", required=True, help="model.sqs files of quantize")
    parser.add_argument("--windows", type=int, default=64)
    parser.add_argument("--dense", action="store_true", help="also the dense model's validation perplexity")
    parser.add_argument("--out", type=Path, default=HERE / "results" / "lm_validation.jsonl")
    args = parser.parse_args()
    torch.set_num_threads(1)
    tokenizer, lm = load_smollm()
    windows = text_windows(tokenizer, args.data, 128)
    order = torch.randperm(len(windows), generator=torch.Generator().manual_seed(0))
    if len(windows) < 128 + args.windows:
        raise SystemExit(f"{len(windows)} windows: too few for 128 calibration and {args.windows} validation windows")
    validation = windows[order[-args.windows:]]
    rows = [{"file": "dense", "validation": perplexity(CausalLM(lm), validation)}] if args.dense else []
    del lm
    for path in args.files:
        rows.append({"file": str(path), "validation": perplexity(CausalLM(load_transformers(path)), validation)})
    with open(args.out, "a") as f:
        for row in rows:
            print(json.dumps(row))
            f.write(json.dumps(row) + "\n")


if __name__ == "__main__":
    main()
