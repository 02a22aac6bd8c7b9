"""Probe (issue 40): why label-free compression breaks EfficientNet-Lite0 in ``benchmarks/distill_bn.py``'s
setting (128-pixel crops of matplotlib's two sample photos, 128 held-out crops). No training: the weights are
rounded and the held-out KL(dense || rounded) and top-1 agreement are measured, for

* plain uniform per-channel rounding at 8, 6 and 4 bits (no sqs_pyro code: a reference any PTQ user knows);
* one layer at a time at 6 bits: which layers carry the damage, beside the largest gain
  ``gamma / sqrt(var + eps)`` of the BatchNorm after it and its count of channels with running variance < 1e-3;
* sqs_pyro's one-shot quantiser (per-row scales, a K-level codebook per layer) at sparsity 0 and 0.5, with
  layers under ``--min-weights`` values left exact.

    python benchmarks/probes/efficientnet_sensitivity.py     # needs the two efficientnet packages (see distill_bn.py)
"""
from __future__ import annotations

import argparse
import copy
import json
import sys
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from distill_bn import crops, efficientnet_lite0  # noqa: E402
from sqs_pyro.cli.user_model import held_out_metrics  # noqa: E402
from sqs_pyro.compressed.oneshot import quantize_network  # noqa: E402
from sqs_pyro.models.selection import select_layers  # noqa: E402


def rounded(net: nn.Module, names: list[str], bits: int) -> nn.Module:
    """``net`` with the named weights rounded to ``bits``-bit symmetric levels, one absmax scale per output channel."""
    out = copy.deepcopy(net)
    with torch.no_grad():
        for name in names:
            w = out.get_parameter(name)
            rows = w.flatten(1)
            scale = rows.abs().amax(1, keepdim=True).clamp_min(1e-12) / (2 ** (bits - 1) - 1)
            w.copy_(((rows / scale).round() * scale).view_as(w))
    return out


def batchnorm_after(net: nn.Module) -> dict[str, nn.BatchNorm2d]:
    """``conv weight name -> the BatchNorm2d that follows it`` in module order."""
    mods = list(net.named_modules())
    found = {}
    for i, (name, m) in enumerate(mods):
        if isinstance(m, nn.Conv2d):
            for _, nxt in mods[i + 1:]:
                if isinstance(nxt, nn.Conv2d):
                    break
                if isinstance(nxt, nn.BatchNorm2d):
                    found[f"{name}.weight"] = nxt
                    break
    return found


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--components", "-K", type=int, default=16)
    p.add_argument("--min-weights", type=int, nargs="+", default=[0, 1024, 4096])
    p.add_argument("--top", type=int, default=6)
    a = p.parse_args()
    torch.set_num_threads(1)
    net = efficientnet_lite0()
    x_val = crops(128, 128, True, 1)
    sites = [s.name for s in select_layers(net)]

    def measure(module: nn.Module) -> dict[str, float]:
        return {k: round(v, 4) for k, v in held_out_metrics(module, x_val, "distill", dense=net).items()}

    for bits in (8, 6, 4):
        print(json.dumps({"uniform_per_channel_bits": bits, **measure(rounded(net, sites, bits))}), flush=True)
    bns = batchnorm_after(net)
    single = []
    for name in sites:
        bn = bns.get(name)
        gain = float((bn.weight.detach().abs() / (bn.running_var + bn.eps).sqrt()).max()) if bn is not None else None
        low = int((bn.running_var < 1e-3).sum()) if bn is not None else None
        single.append({"layer": name, "weights": net.get_parameter(name).numel(),
                       "kl_6bit_alone": measure(rounded(net, [name], 6))["kl_to_dense"],
                       "bn_max_gain": gain and round(gain, 1), "bn_low_variance_channels": low})
    single.sort(key=lambda r: -r["kl_6bit_alone"])
    for row in single[:a.top]:
        print(json.dumps(row), flush=True)
    print(json.dumps({"sum_of_single_layer_kl": round(sum(r["kl_6bit_alone"] for r in single), 4)}), flush=True)
    for min_w in a.min_weights:
        chosen = [s for s in select_layers(net) if net.get_parameter(s.name).numel() >= min_w]
        exact = sum(net.get_parameter(n).numel() for n in sites) - sum(net.get_parameter(s.name).numel() for s in chosen)
        for sparsity in (0.0, 0.5):
            cn = quantize_network(net, chosen, a.components, 1 << 30, sparsity=sparsity)
            print(json.dumps({"oneshot_K": a.components, "min_weights": min_w, "exact_weights": exact,
                              "sparsity": sparsity, **measure(cn.load_into(efficientnet_lite0()))}), flush=True)


if __name__ == "__main__":
    main()
