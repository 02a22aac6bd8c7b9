"""``sqs-pyro inspect FILE``: check a compressed ``.sqs`` file and print its per-layer table."""
from __future__ import annotations

import argparse
import json
import math
from pathlib import Path
from typing import Any

from sqs_pyro.errors import SQSInputError
from sqs_pyro.format.container import FLOAT_DTYPES, layer_table, read_header, tensor_table
from sqs_pyro.format.posterior import section_bytes


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "inspect", help="check a compressed .sqs file and print its per-layer table",
        description="Verify a .sqs file (magic, version, lengths, checksums, header schema) and print, per "
                    "compressed layer, its shape, density, code bits, codebook, codings, bytes in the file, "
                    "entropy lower bound and share of the file, then every other tensor's dtype, bytes and "
                    "share, then the totals.")
    p.add_argument("file", type=Path, help="the .sqs file")
    p.add_argument("--json", action="store_true", help="print the header and the table as JSON instead")
    p.set_defaults(func=run)


def totals(header: dict[str, Any], rows: list[dict[str, Any]]) -> dict[str, Any]:
    """File bytes, fp32 bytes of every floating-point value (a tied tensor once), the compressed
    layers' bytes and bound, and the posterior section's bytes."""
    other = sum(math.prod(t["shape"]) for t in header["tensors"] if t["dtype"] in FLOAT_DTYPES and "same_as" not in t)
    return {
        "file_bytes": header["file_bytes"], "header_bytes": header["file_bytes"] - header["payload_bytes"],
        "bytes_fp32": 4 * (sum(r["numel"] for r in rows) + other),
        "layer_bytes": sum(r["bytes"] for r in rows), "bound_bytes": sum(r["bound_bytes"] for r in rows),
        "other_bytes": sum(t["bytes"] for t in header["tensors"]), "posterior_bytes": section_bytes(header),
    }


def _group_label(row: dict[str, Any]) -> str:
    """The group size, ``row`` when a group covers its row (one scale per output row), ``-`` without scales."""
    g, shape = row["group_size"], row["shape"]
    if not g:
        return "-"
    return "row" if shape and g >= row["numel"] // max(shape[0], 1) else str(g)


def _columns(table: list[tuple[str, ...]], left: int) -> list[str]:
    """Rows of aligned columns, the first ``left`` left-aligned and the rest right-aligned."""
    widths = [max(len(row[i]) for row in table) for i in range(len(table[0]))]
    return ["  ".join(c.ljust(w) if i < left else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths)))
            for row in table]


def format_inspection(path: Path, header: dict[str, Any], rows: list[dict[str, Any]]) -> str:
    t = totals(header, rows)
    share = lambda nbytes: f"{100 * nbytes / t['file_bytes']:.2f}%"  # noqa: E731
    cls = header["architecture"].get("class", "?") if isinstance(header["architecture"], dict) else "?"
    lines = [f"{path.name}: sqs-pyro format {header['format_version']}, {t['file_bytes']:,} bytes "
             f"(header {t['header_bytes']:,}), checksums OK, architecture {cls}", ""]
    table = [("layer", "shape", "density", "bits", "codebook", "mask", "codes", "group", "exact", "side bytes",
              "bytes", "bound", "x bound", "file share")]
    for r in rows:
        ratio = f"{r['bytes'] / r['bound_bytes']:.2f}" if r["bound_bytes"] else "-"
        table.append((r["name"], "x".join(map(str, r["shape"])), f"{r['density']:.4f}", str(r["bits"]),
                      f"K={r['components']} {r['codebook_dtype']} w={r['windows']}", r["mask_coding"],
                      r["codes_coding"], _group_label(r), f"{r['exact']:,}", f"{r['side_bytes']:,}",
                      f"{r['bytes']:,}", f"{r['bound_bytes']:,.0f}", ratio, share(r["bytes"])))
    lines += _columns(table, 7)
    others = [("tensor", "shape", "dtype", "stored as", "bytes", "file share")]
    for r in tensor_table(header):
        stored = f"= {r['same_as']}" if r["same_as"] else r["stored_dtype"]
        others.append((r["name"], "x".join(map(str, r["shape"])), r["dtype"], stored, f"{r['bytes']:,}", share(r["bytes"])))
    if len(others) > 1:
        lines += [""] + _columns(others, 4)
    exact, side = sum(r["exact"] for r in rows), sum(r["side_bytes"] for r in rows)
    if side:
        lines += ["", f"side information: {exact:,} exact weights, {side:,} bytes of fp16 scales and exact weights "
                      f"({8 * side / max(1, sum(r['numel'] for r in rows)):.4f} bits per compressed weight)"]
    bound = f"{t['layer_bytes'] / t['bound_bytes']:.3f}x" if t["bound_bytes"] else "-"
    lines += ["",
              f"compressed layers: {t['layer_bytes']:,} bytes ({share(t['layer_bytes'])} of the file), entropy bound "
              f"{t['bound_bytes']:,.0f} bytes ({bound})",
              f"other tensors: {len(header['tensors'])}, {t['other_bytes']:,} bytes ({share(t['other_bytes'])}); "
              f"header {share(t['header_bytes'])}",
              *([f"posterior section: {t['posterior_bytes']:,} bytes ({share(t['posterior_bytes'])}; threshold "
                 f"{header['posterior']['threshold']:g}, {header['posterior']['prob_bits']}-bit probabilities)"]
                if "posterior" in header else []),
              f"fp32 bytes {t['bytes_fp32']:,} / file bytes {t['file_bytes']:,} = "
              f"{t['bytes_fp32'] / t['file_bytes']:.1f}x"]
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    if not args.file.is_file():
        raise SQSInputError(f"no such file: {args.file}")
    header = read_header(args.file)
    rows = layer_table(header)
    if args.json:
        print(json.dumps({"header": header, "layers": rows, "tensors": tensor_table(header),
                          "totals": totals(header, rows)}, indent=2))
    else:
        print(format_inspection(args.file, header, rows))
    return 0
