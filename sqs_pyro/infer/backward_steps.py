"""Optimiser steps taken inside the backward pass, so that no two parameters' gradients need to be alive
at once (an opt-in memory saving for large models)."""
from __future__ import annotations

import torch


class BackwardSteps:
    """Steps ``optimizer`` on each parameter as soon as the backward pass has accumulated its gradient,
    then frees that gradient.

    A normal step keeps every gradient until ``optimizer.step()``: one more weight-sized tensor per
    parameter at the peak (4 bytes per latent weight and per gate logit). Here each parameter's
    post-accumulate-grad hook calls ``optimizer.step()`` while that parameter is the only one holding a
    gradient (gradients start as ``None``; each is set back to ``None`` after its step), so for
    optimisers that update every parameter on its own (Adam, SGD) the result is the same bits as one
    step after the backward pass. A non-finite gradient stops the remaining steps of the pass and clears
    :attr:`finite`; the caller rolls back (the steps already taken are undone with the rest).

    Use as a context manager around the training loop: the hooks are removed on exit.
    """

    def __init__(self, optimizer: torch.optim.Optimizer) -> None:
        self.optimizer = optimizer
        self.finite = True
        self._handles: list = []

    def __enter__(self) -> "BackwardSteps":
        params = [p for group in self.optimizer.param_groups for p in group["params"]]
        self._handles = [p.register_post_accumulate_grad_hook(self._step) for p in params]
        return self

    def __exit__(self, *exc) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []

    def start(self) -> None:
        """Before each backward pass: no gradient seen yet."""
        self.finite = True

    def _step(self, param: torch.Tensor) -> None:
        self.finite = self.finite and bool(torch.isfinite(param.grad).all())
        if self.finite:
            self.optimizer.step()  # only ``param`` has a gradient: the others are None until theirs arrives
        param.grad = None
