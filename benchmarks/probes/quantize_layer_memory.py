"""Where ``quantize_layer`` on a token-table-sized weight peaks (issue 41): RSS marks around its calls.

    python benchmarks/probes/quantize_layer_memory.py [--rows 49152 --cols 576 -K 16 -G 64 --exact 16] [--weighted]

Codes a random weight of SmolLM2's token-table shape as ``sqs-pyro quantize`` does (freed memory
returned to the system; ``--weighted``: the k-means weighted by ``H_cc sigma^2`` with made-up ``H_cc``,
as ``--weighted-codebook``), with a mark before and after each call of whichever of ``top_indices`` (else
``torch.topk``), ``_group_absmax``, ``_over_scales_``, ``torch.masked_select`` and ``kmeans_codebook``
the code has. Prints, for each stretch between two marks (repeated stretches merged: their highest peak,
the last RSS), its peak (``VmHWM``, reset at each mark) and the RSS at its end, in MB above the RSS with
the weight made, then the call's peak.
"""
import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # benchmarks/: memory.py
from memory import reset_peak, vm  # noqa: E402

import sqs_pyro.compressed.oneshot as oneshot  # noqa: E402
from sqs_pyro.infer.allocator import return_freed_memory  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=49152)
    parser.add_argument("--cols", type=int, default=576)
    parser.add_argument("-K", "--components", type=int, default=16)
    parser.add_argument("-G", "--group-size", type=int, default=64)
    parser.add_argument("--exact", type=int, default=16)
    parser.add_argument("--weighted", action="store_true", help="a weighted k-means (made-up input energies)")
    args = parser.parse_args()
    torch.set_num_threads(1)
    return_freed_memory()
    stretches: dict[tuple[str, str], list[int]] = {}
    state = {"last": "start"}

    def mark(label: str) -> None:
        peak, rss = vm("VmHWM"), vm("VmRSS")
        entry = stretches.setdefault((state["last"], label), [0, 0, 0])
        entry[0], entry[1], entry[2] = max(entry[0], peak), rss, entry[2] + 1
        state["last"] = label
        reset_peak()

    def around(owner, name: str) -> None:
        original = getattr(owner, name)

        def marked(*a, **k):
            mark(f"before {name}")
            out = original(*a, **k)
            mark(name)
            return out
        setattr(owner, name, marked)

    top = (oneshot, "top_indices") if hasattr(oneshot, "top_indices") else (torch, "topk")
    for owner, name in (top, (oneshot, "_group_absmax"), (oneshot, "_over_scales_"), (torch, "masked_select"),
                        (oneshot, "kmeans_codebook")):
        around(owner, name)
    weight = torch.randn(args.rows, args.cols, generator=torch.Generator().manual_seed(0)) * 0.02
    energy = torch.rand(args.cols, generator=torch.Generator().manual_seed(1)) + 0.1 if args.weighted else None
    base = vm("VmRSS")
    reset_peak()
    oneshot.quantize_layer("table", weight, args.components, args.group_size, args.exact, input_energy=energy)
    mark("end")
    print(f"weight {args.rows} x {args.cols} ({4 * weight.numel() / 1e6:.0f} MB fp32); MB above the RSS with it made")
    for (before, label), (peak, rss, times) in stretches.items():
        above = f"peak {(peak - base) / 1e6:6.0f}   after {(rss - base) / 1e6:6.0f}"
        print(f"{before:>26} -> {label:<26} {above}   x{times}")
    print(f"quantize_layer's peak: {(max(p for p, _, _ in stretches.values()) - base) / 1e6:.0f} MB above the weight")


if __name__ == "__main__":
    main()
