"""The posterior section of the ``.sqs`` file on a trained network (issue 38, item 3).

    flock /tmp/heavy.lock python benchmarks/posterior_file.py --cache runs/posterior_file/result.pt
    python benchmarks/posterior_file.py --smoke        # a few hundred images, a tiny run, to a temporary folder

Compresses the ccexam MNIST CNN at 95% / K=4 for one epoch (the CLI's other defaults), or loads
the ``--cache`` of an earlier run (written when missing; our own pickle, loaded with
``weights_only=False``). Then, on the MNIST test images:

* ``greedy``: the greedy network (the point file);
* ``guide``: the guide-based posterior predictive ``result.averaged_module(M)`` (seed ``config.seed``);
* ``file eps=.. bits=..``: the predictive loaded from a file written with that
  :class:`~sqs_pyro.format.posterior.PosteriorCoding` (``load_compressed(..., predictive=True)``,
  same M and seed, so the draws are paired with the guide's); ``eps=0.9999`` keeps the scales only.

Prints and writes (``--output``, JSON) each predictor's accuracy, NLL, ECE (15 bins) and the
posterior section's bytes, also as a share of the point file.
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from smoke import add_smoke_flag, smoke_folder  # noqa: E402

from sqs_pyro import SQSConfig, compress, load_compressed, save_compressed  # noqa: E402
from sqs_pyro.data import calibration, load_mnist, load_mnist_cnn, predictive_probs  # noqa: E402
from sqs_pyro.format.container import read_header  # noqa: E402
from sqs_pyro.format.posterior import PosteriorCoding, section_bytes  # noqa: E402

# (threshold, prob_bits): the near-exact summary, the grid, and the scales alone
CODINGS = ((0.0, 16), (0.1, 1), (0.5, 1), (0.7, 1), (0.9, 1), (0.9999, 1))
SMOKE = {"train_limit": 512, "test_limit": 200, "config": {"epochs": 0.5, "batch_size": 32, "num_averaged": 2}}


def trained(cache: Path | None, smoke: bool):
    """The run: loaded from ``cache`` if it exists, else trained (and written to ``cache``)."""
    if cache is not None and cache.exists():
        return torch.load(cache, weights_only=False)  # our own pickle of an SQSResult
    config = SQSConfig.from_dict({"sparsity": 0.95, "components": 4, "epochs": 1,
                                  **(SMOKE["config"] if smoke else {})})
    result = compress(load_mnist_cnn(), load_mnist("train", SMOKE["train_limit"] if smoke else None), config,
                      progress=False)
    if cache is not None:
        cache.parent.mkdir(parents=True, exist_ok=True)
        torch.save(result, cache)
    return result


def metrics(probs: torch.Tensor, y: torch.Tensor) -> dict[str, float]:
    return {k: v for k, v in calibration(probs, y).items() if k in ("accuracy", "nll", "ece")}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cache", type=Path, help="the trained run: loaded if it exists, else written")
    parser.add_argument("--members", type=int, default=10, help="posterior draws M (default 10)")
    parser.add_argument("--output", type=Path, default=Path(__file__).parent / "results" / "posterior_file.json")
    add_smoke_flag(parser)
    args = parser.parse_args()
    if args.smoke:
        args.output = smoke_folder() / "posterior_file.json"
    torch.set_num_threads(1)
    result = trained(args.cache, args.smoke)
    x, y = load_mnist("test", SMOKE["test_limit"] if args.smoke else None)
    rows = [{"predictor": "greedy", **metrics(predictive_probs(result.greedy_module(), x), y)},
            {"predictor": "guide", **metrics(predictive_probs(result.averaged_module(args.members), x, outputs="probs"),
                                             y)}]
    with tempfile.TemporaryDirectory() as tmp:
        point = save_compressed(result, Path(tmp) / "point.sqs")
        for threshold, bits in CODINGS:
            path = Path(tmp) / "posterior.sqs"
            save_compressed(result, path, posterior=PosteriorCoding(threshold, bits))
            header = read_header(path)
            predictor = load_compressed(path, load_mnist_cnn(), predictive=True, members=args.members)
            section = section_bytes(header)
            rows.append({"predictor": f"file eps={threshold:g} bits={bits}", "threshold": threshold,
                         "prob_bits": bits, "section_bytes": section, "share": section / point,
                         "uncertain": sum(e["uncertain"] for e in header["posterior"]["layers"]),
                         "kinds": [e["runner_kind"] for e in header["posterior"]["layers"]],
                         **metrics(predictive_probs(predictor, x, outputs="probs"), y)})
            print(json.dumps(rows[-1]), flush=True)
    nnz = sum(layer["nnz"] for layer in result.accounting()["layers"])
    summary = {"point_file_bytes": point, "nnz": nnz, "members": args.members, "seed": result.config.seed,
               "config": result.config.to_dict(), "rows": rows}
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(summary, indent=1))
    guide_nll = rows[1]["nll"]
    print(f"point file {point} bytes, {nnz} kept weights, M={args.members}")
    for row in rows:
        extra = f" section {row['section_bytes']:6d} B ({100 * row['share']:.1f}%) uncertain {row['uncertain']}" \
            if "section_bytes" in row else ""
        print(f"{row['predictor']:28s} acc {row['accuracy']:.4f} nll {row['nll']:.4f} "
              f"(vs guide {row['nll'] - guide_nll:+.4f}) ece {row['ece']:.4f}{extra}")


if __name__ == "__main__":
    main()
