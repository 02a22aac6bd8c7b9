"""The run's optimiser: Adam, with optional stateless sign steps for some parameter groups."""
from __future__ import annotations

import torch


class AdamWithSignGroups(torch.optim.Adam):
    """Adam on every parameter group except those with ``sign=True``, which take the stateless step
    ``p <- p - lr sign(dL/dp)`` (Adam's first step, ``lr m_1 / sqrt(v_1)``, without its two moments; no weight
    decay).

    A sign group keeps no optimiser state, so its parameters cost their gradient and nothing more: for
    the gate logits of a large model that is 8 bytes per weight less while the gates learn. Its
    gradients are freed by the step (set to ``None``) before Adam runs on the other groups.
    """

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            if group.get("sign"):
                for p in group["params"]:
                    if p.grad is not None:
                        p.add_(p.grad.sign(), alpha=-group["lr"])
                        p.grad = None
        super().step()
        return loss
