"""``sqs-pyro export FILE --hf OUT_DIR``: a ``.sqs`` file's transformers model as a plain
transformers folder that loads without sqs-pyro."""
from __future__ import annotations

import argparse
import json
from pathlib import Path

from sqs_pyro.hf.export import export_transformers


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "export", help="write a .sqs file's transformers model as a plain transformers folder",
        description="Decompress the transformers model of a .sqs file (written by compress --hf) into a plain "
                    "transformers folder: config.json, model.safetensors of the dense decompressed weights and, "
                    "for generative models, generation_config.json. transformers' from_pretrained loads it "
                    "without sqs-pyro and gives the same outputs as sqs_pyro.hf.load_transformers(FILE).")
    p.add_argument("file", type=Path, help="the .sqs file")
    p.add_argument("--hf", type=Path, required=True, metavar="OUT_DIR",
                   help="the folder to write; it must not exist or be empty, unless --force")
    p.add_argument("--tokenizer", metavar="PATH",
                   help="also copy a tokenizer into OUT_DIR (.sqs files hold none): a tokenizer or model folder, "
                        "a .gguf file or an installed package name, e.g. the model given to compress --hf")
    p.add_argument("--force", action="store_true",
                   help="replace a non-empty OUT_DIR (removed only once the new folder is complete)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    out = export_transformers(args.file, args.hf, force=args.force, tokenizer=args.tokenizer)
    classes = json.loads((out / "config.json").read_text()).get("architectures") or ["AutoModel"]
    files = ", ".join(sorted(f.name for f in out.iterdir()))
    print(f"wrote {out}/: {files}")
    print(f"load it with transformers.{classes[0]}.from_pretrained('{out}')")
    return 0
