"""``sqs-pyro export FILE``: a ``.sqs`` file's network as files that load without sqs-pyro: a transformers
folder (``--hf``), a dense torch state_dict (``--torch``), a safetensors file (``--safetensors``) or an ONNX
graph of the user's architecture (``--onnx``, with ``--model`` and ``--data``)."""
from __future__ import annotations

import argparse
import json
from pathlib import Path

from sqs_pyro.cli.common import Progress
from sqs_pyro.cli.user_model import eval_batches, load_data, load_network
from sqs_pyro.errors import SQSInputError
from sqs_pyro.format.container import load_compressed
from sqs_pyro.format.dense import dense_state, export_onnx, write_dense
from sqs_pyro.hf.export import export_transformers


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "export", help="write a .sqs file's network as plain files (transformers folder, .pt, safetensors, ONNX)",
        description="Decompress a .sqs file into files that load without sqs-pyro. --hf: a transformers folder "
                    "(config.json, model.safetensors, generation_config.json for generative models) that "
                    "from_pretrained loads with the outputs of sqs_pyro.hf.load_transformers(FILE). --torch / "
                    "--safetensors: the dense state_dict (pruned weights as zeros, every other tensor such as "
                    "BatchNorm statistics as stored) for YourNet().load_state_dict(...). --onnx: the network "
                    "FACTORY() of --model with those weights, traced on the first examples of --data.")
    target = p.add_mutually_exclusive_group(required=True)
    target.add_argument("--hf", type=Path, metavar="OUT_DIR",
                        help="a transformers folder; it must not exist or be empty, unless --force")
    target.add_argument("--torch", type=Path, metavar="OUT.pt",
                        help="a torch state_dict of dense weights: torch.load(OUT, weights_only=True)")
    target.add_argument("--safetensors", type=Path, metavar="OUT",
                        help="a safetensors file of dense weights: safetensors.torch.load_file(OUT)")
    target.add_argument("--onnx", type=Path, metavar="OUT.onnx",
                        help="an ONNX graph (pip install 'sqs-pyro[onnx]'); needs --model and --data")
    p.add_argument("file", type=Path, help="the .sqs file")
    p.add_argument("--model", metavar="MODULE:FACTORY", help="--onnx: the architecture the file was compressed from")
    p.add_argument("--data", metavar="SPEC", help="--onnx: inputs to trace the graph on (as compress --data)")
    p.add_argument("--task", choices=("classification", "regression", "distill"), default="classification",
                   help="--onnx: how to read --data's batches (distill: every entry is an input)")
    p.add_argument("--tokenizer", metavar="PATH",
                   help="--hf: also copy a tokenizer into OUT_DIR (.sqs files hold none): a tokenizer or model folder, "
                        "a .gguf file or an installed package name, e.g. the model given to compress --hf")
    p.add_argument("--force", action="store_true",
                   help="replace an existing output (a folder only once the new one is complete)")
    p.add_argument("--no-progress", action="store_true", help="hide the stage lines on stderr")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    if args.hf is not None:
        return _run_hf(args)
    if not args.file.is_file():
        raise SQSInputError(f"no such file: {args.file}")
    out = args.torch or args.safetensors or args.onnx
    if out.exists() and not args.force:
        raise SQSInputError(f"{out} exists (use --force to replace it)")
    if args.onnx is not None:
        if args.model is None or args.data is None:
            raise SQSInputError("--onnx needs --model MODULE:FACTORY and --data SPEC (inputs to trace the graph on)")
        say = Progress(not args.no_progress)
        say(f"decoding {args.file} into {args.model}")
        model = load_compressed(args.file, load_network(args.model))
        inputs, _ = next(iter(eval_batches(load_data(args.data, args.task), args.task, "cpu", batch_size=2)))
        say(f"tracing the ONNX graph into {out}")
        export_onnx(model, inputs, out)
        print(f"wrote {out}: run it with onnxruntime.InferenceSession('{out}')")
        return 0
    say = Progress(not args.no_progress)
    say(f"decoding {args.file}")
    state = dense_state(args.file)
    say(f"writing {out}")
    write_dense(state, out, "torch" if args.torch is not None else "safetensors")
    print(f"wrote {out}: {len(state)} dense tensors, {sum(t.numel() for t in state.values()):,} values; "
          f"load them with YourNet().load_state_dict(...)")
    return 0


def _run_hf(args: argparse.Namespace) -> int:
    out = export_transformers(args.file, args.hf, force=args.force, tokenizer=args.tokenizer)
    classes = json.loads((out / "config.json").read_text()).get("architectures") or ["AutoModel"]
    files = ", ".join(sorted(f.name for f in out.iterdir()))
    print(f"wrote {out}/: {files}")
    print(f"load it with transformers.{classes[0]}.from_pretrained('{out}')")
    return 0
