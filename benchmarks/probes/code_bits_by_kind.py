"""The matrices' code bits per weight of ``sqs-pyro quantize`` files by kind (q_proj ... down_proj) and by
thirds of depth (issue 41), from the header's layer table (bytes less side bytes, over weights):

    python benchmarks/probes/code_bits_by_kind.py OUT1/model.sqs OUT2/model.sqs ...
"""
from __future__ import annotations

import collections
import sys

from sqs_pyro.format.container import layer_table, read_header


def main() -> None:
    for path in sys.argv[1:]:
        rows = [r for r in layer_table(read_header(path)) if "layers." in r["name"]]
        kind, depth = collections.defaultdict(lambda: [0, 0]), collections.defaultdict(lambda: [0, 0])
        for r in rows:
            bits = 8 * (r["bytes"] - r["side_bytes"])
            for table, key in ((kind, r["name"].split(".")[-2]), (depth, int(r["name"].split(".")[3]) // 10)):
                table[key][0] += bits
                table[key][1] += r["numel"]
        print(path, {k: round(b / n, 2) for k, (b, n) in kind.items()},
              {f"layers {10 * k}-{10 * k + 9}": round(b / n, 2) for k, (b, n) in sorted(depth.items())})


if __name__ == "__main__":
    main()
