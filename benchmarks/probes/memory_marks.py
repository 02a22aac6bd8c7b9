"""Where the training peak of a language-model run sits: RSS marks inside the second training step of
``benchmarks/lm_memory.py``'s proxy (a random Llama with SmolLM2's matrix shapes, 50% sparsity, gates
learning, block checkpoints, freed memory returned to the system).

    python benchmarks/probes/memory_marks.py                    # Adam on the gate logits
    python benchmarks/probes/memory_marks.py --gate-rule sign

Prints, per mark, the peak since the previous mark and the RSS at the mark, both in bytes per compressed
parameter above the process's start: before and after the guide's draw, at the forward pass of layers 0, 3
and 5, before the backward pass, when the latent weights' and gate logits' gradients of every seventh
compressed matrix are complete, and after the backward pass and the optimiser step.
"""
import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # benchmarks/: lm_memory.py, memory.py
from lm_memory import child  # noqa: E402
from memory import reset_peak, vm  # noqa: E402

import sqs_pyro.infer.trainer as trainer
from sqs_pyro.config import GATE_RULES
from sqs_pyro.guides.spike_gmm import SpikeGMMGuide

MARKED_STEP = 1  # the first step in which every optimiser state exists


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--gate-rule", choices=GATE_RULES, default="adam")
    args = parser.parse_args()
    base = vm("VmRSS")
    marks, state = [], {"step": -1, "hooked": False}

    def mark(label: str) -> None:
        if state["step"] == MARKED_STEP:
            marks.append((label, vm("VmHWM"), vm("VmRSS")))
        reset_peak()

    schedule = trainer.Trainer._apply_schedule

    def marked_schedule(self, step, *rest, **kwargs):
        state["step"] = step
        mark("start of the step")
        if step == MARKED_STEP and not state["hooked"]:
            state["hooked"] = True
            for i, layer in enumerate(self.result.guide.layers):
                if i % 7 == 0:
                    layer.latent.register_post_accumulate_grad_hook(lambda p, i=i: mark(f"latent gradient {i}"))
                    layer.gate_logits.register_post_accumulate_grad_hook(lambda p, i=i: mark(f"gate gradient {i}"))
            for name, module in self.result.model.net.named_modules():
                if name.endswith(("layers.0", "layers.3", "layers.5")):
                    module.register_forward_pre_hook(lambda *_, name=name: mark(f"forward {name}"))
        return schedule(self, step, *rest, **kwargs)

    def around(owner, name: str, label: str) -> None:
        original = getattr(owner, name)

        def wrapped(*a, **k):
            mark(f"before {label}")
            out = original(*a, **k)
            mark(f"after {label}")
            return out

        setattr(owner, name, wrapped)

    trainer.Trainer._apply_schedule = marked_schedule
    around(torch.Tensor, "backward", "backward")
    around(SpikeGMMGuide, "forward", "the guide's draw")
    around(torch.optim.Optimizer, "zero_grad", "zero_grad")
    row = child(0.5, True, 0.2, 2048, 64, True, args.gate_rule)
    n = row["compressed_params"]
    print(f"gate rule {args.gate_rule}, step {MARKED_STEP} (bytes per compressed parameter above the process's start;"
          " the marks reset the peak, so benchmarks/lm_memory.py's own figure does not apply here)")
    for label, peak, rss in marks:
        print(f"{label:32s} peak since last mark {(peak - base) / n:6.1f}   RSS {(rss - base) / n:6.1f}")


if __name__ == "__main__":
    main()
