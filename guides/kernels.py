r"""Fused CPU kernels for the ``O(N K)`` work of an SVI step (C source: ``kernels.c`` beside this file).

For a weight tensor with latent values ``x_j`` and a K-level codebook the responsibilities are
``phi_jk = softmax_k(c_k - z_jk^2 / 2)``, ``z_jk = (x_j - mu_k) a_k``, with
``c_k = (log pi_k - log s_k) / tau`` and ``a_k = 1 / (s_k sqrt(tau))`` (components outside the
weight's window excluded; shifted logits clipped at -80 exactly as in
:mod:`sqs_pyro.guides.distributions`). Two autograd functions compute, in one pass over the
weights forward and one backward, without any ``N x K`` tensor:

* :func:`phi_dot`: ``sum_k phi_jk v_k``; :func:`phi_argmax`: ``argmax_k phi_jk``;
* :func:`fused_layer`: a weight tensor's draw ``w_j = z_j (mu_{k_j} + s_{k_j} eps_j)`` (a
  straight-through relaxed Bernoulli gate ``z_j`` and a Gumbel-max index ``k_j``, an exact
  draw from ``Categorical(phi_j)``, with the Concrete relaxations' gradients), or the
  expected weight ``g_j sum_k phi_jk mu_k``, together with its KL bound
  ``KL_Bern(g_j || lam) + g_j sum_k phi_jk B_k``.

The uniforms come from a counter-based generator: the SplitMix64 finaliser of
``seed + (counter + 1) * 0x9E3779B97F4A7C15`` gives two 23-bit uniforms ``(b + 1/2) / 2^23``
(bits 41-63 for level ``2h``, bits 9-31 for level ``2h + 1`` at counter ``j ceil(K/2) + h``;
the gate of element j uses bits 41-63 at counter ``n ceil(K/2) + j``). The seed is drawn from
torch's generator, so ``torch.manual_seed`` / ``pyro.set_rng_seed`` make runs reproducible,
and the backward pass regenerates the noise instead of storing it.

The C source is compiled once per machine with the system C compiler (``$CC``, default
``cc``) into ``$XDG_CACHE_HOME/sqs_pyro`` (default ``~/.cache/sqs_pyro``). Where no compiler
is available, tensors are not float32 on the CPU, or ``SQS_PYRO_KERNELS=0`` is set,
:func:`available` is false and callers use the eager PyTorch code (same math).
"""
from __future__ import annotations

import ctypes
import functools
import hashlib
import math
import os
import platform
import subprocess
import tempfile
import warnings
from pathlib import Path

import torch

SOURCE = Path(__file__).with_name("kernels.c")
FLAGS = ("-O3", "-march=native", "-fno-math-errno", "-fno-trapping-math", "-fPIC", "-shared")
_SEED_HIGH = 2 ** 62


class _Args(ctypes.Structure):
    """Mirror of ``Args`` in kernels.c."""

    _fields_ = ([(name, ctypes.c_int64) for name in ("n", "nparam", "K", "expected")]
                + [(name, ctypes.c_void_p) for name in ("x", "theta", "gate_fixed", "win", "cw", "c", "a", "mu",
                                                        "s", "v", "eps")]
                + [("seed", ctypes.c_uint64)]
                + [(name, ctypes.c_float) for name in ("t_assign", "t_gate", "log_lam", "log1m_lam")]
                + [(name, ctypes.c_void_p) for name in ("w", "kl", "dw", "dkl", "dx", "dtheta", "dc", "da", "dmu",
                                                        "ds", "dv", "codes")])


def _cache_dir() -> Path:
    root = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(root) / "sqs_pyro"


@functools.lru_cache(maxsize=None)
def _library() -> ctypes.CDLL | None:
    """Compile (once per source, flags, compiler and machine) and load the kernels; ``None`` if impossible."""
    compiler = os.environ.get("CC", "cc")
    key = hashlib.sha256(b"\0".join([SOURCE.read_bytes(), " ".join(FLAGS).encode(), compiler.encode(),
                                     platform.machine().encode(), platform.processor().encode(),
                                     torch.backends.cpu.get_cpu_capability().encode()])).hexdigest()[:16]
    target = _cache_dir() / f"kernels-{key}.so"
    try:
        if not target.exists():
            target.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(dir=target.parent, suffix=".so")
            os.close(fd)
            try:
                subprocess.run([compiler, *FLAGS, "-o", tmp, str(SOURCE)], check=True, capture_output=True,
                               timeout=300)
                os.replace(tmp, target)
            finally:
                if os.path.exists(tmp):
                    os.unlink(tmp)
        lib = ctypes.CDLL(str(target))
    except (OSError, subprocess.SubprocessError) as exc:
        detail = (getattr(exc, "stderr", None) or b"").decode(errors="replace")[:300]
        warnings.warn(f"sqs_pyro: fused CPU kernels unavailable ({exc} {detail}); using the slower eager "
                      "PyTorch path", RuntimeWarning, stacklevel=3)
        return None
    lib.sqs_kernel_kmax.restype = ctypes.c_int64
    for name in ("sqs_layer_forward", "sqs_layer_backward", "sqs_phi_dot_forward", "sqs_phi_dot_backward",
                 "sqs_phi_argmax"):
        fn = getattr(lib, name)
        fn.argtypes, fn.restype = [ctypes.POINTER(_Args)], ctypes.c_int64
    return lib


def available(*tensors: torch.Tensor, components: int) -> bool:
    """Whether the kernels can serve these tensors (float32 on the CPU) with ``components`` levels."""
    if os.environ.get("SQS_PYRO_KERNELS", "1") == "0":
        return False
    if not all(t.device.type == "cpu" and t.dtype == torch.float32 for t in tensors):
        return False
    lib = _library()
    return lib is not None and components <= lib.sqs_kernel_kmax()


def _run(name: str, **fields) -> None:
    """Call a kernel with an ``Args`` whose tensor fields are given as tensors (or ``None``)."""
    args = _Args(**{k: (v.data_ptr() if isinstance(v, torch.Tensor) else v) for k, v in fields.items()})
    if getattr(_library(), name)(ctypes.byref(args)) != 0:
        raise MemoryError(f"{name}: could not allocate its work space")


def _contiguous(*tensors: torch.Tensor | None) -> list[torch.Tensor | None]:
    return [None if t is None else t.detach().contiguous() for t in tensors]


def _int8(window_ids: torch.Tensor | None) -> torch.Tensor | None:
    """Window ids as the kernels read them: one signed byte per weight."""
    return None if window_ids is None else window_ids.to(torch.int8)


def _codebook_grads(k: int) -> dict[str, torch.Tensor]:
    return {name: torch.zeros(k, dtype=torch.float64) for name in ("dc", "da", "dmu", "ds", "dv")}


class _PhiDot(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, c, a, mu, v, window_ids, comp_window):
        x, c, a, mu, v, win, cw = _contiguous(x, c, a, mu, v, _int8(window_ids), comp_window)
        out = torch.empty_like(x)
        fields = dict(n=x.numel(), nparam=x.numel(), K=mu.numel(), x=x, win=win, cw=cw, c=c, a=a, mu=mu, v=v)
        _run("sqs_phi_dot_forward", w=out, **fields)
        ctx.save_for_backward(x, c, a, mu, v)
        ctx.windows = (win, cw)
        return out

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, dout):
        x, c, a, mu, v = ctx.saved_tensors
        win, cw = ctx.windows
        dx, grads = torch.empty_like(x), _codebook_grads(mu.numel())
        _run("sqs_phi_dot_backward", n=x.numel(), nparam=x.numel(), K=mu.numel(), x=x, win=win, cw=cw, c=c, a=a,
             mu=mu, v=v, dw=dout.contiguous(), dx=dx, **grads)
        return (dx, grads["dc"].to(c.dtype), grads["da"].to(a.dtype), grads["dmu"].to(mu.dtype),
                grads["dv"].to(v.dtype), None, None)


class _FusedLayer(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, theta, c, a, mu, s, kl_components, gate_fixed, eps, window_ids, comp_window, settings):
        x, theta, c, a, mu, s, v, gate_fixed, eps, win, cw = _contiguous(
            x, theta, c, a, mu, s, kl_components, gate_fixed, eps, _int8(window_ids), comp_window)
        n = x.numel() if eps is None else eps.numel()
        fields = dict(n=n, nparam=x.numel(), K=mu.numel(), x=x, theta=theta, gate_fixed=gate_fixed, win=win, cw=cw,
                      c=c, a=a, mu=mu, s=s, v=v, eps=eps, **settings)
        w = torch.empty_like(x if eps is None else eps)
        kl = torch.empty_like(w) if v is not None else w.new_zeros(0)
        _run("sqs_layer_forward", w=w, kl=kl if v is not None else None, **fields)
        ctx.save_for_backward(x, theta, c, a, mu, s, v, gate_fixed, eps)
        ctx.fields = {k: fields[k] for k in ("n", "nparam", "K", "win", "cw", *settings)}
        if v is None:
            ctx.mark_non_differentiable(kl)
        return w, kl

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, dw, dkl):
        x, theta, c, a, mu, s, v, gate_fixed, eps = ctx.saved_tensors
        fields = ctx.fields
        dx = torch.empty(fields["n"], dtype=x.dtype)
        dtheta = torch.empty(fields["n"], dtype=x.dtype) if theta is not None else None
        grads = _codebook_grads(mu.numel())
        _run("sqs_layer_backward", x=x, theta=theta, gate_fixed=gate_fixed, c=c, a=a, mu=mu, s=s, v=v, eps=eps,
             dw=None if dw is None else dw.contiguous(), dkl=None if dkl is None or v is None else dkl.contiguous(),
             dx=dx, dtheta=dtheta, **grads, **fields)

        def per_weight(g: torch.Tensor | None) -> torch.Tensor | None:
            return None if g is None else g.reshape(-1, x.numel()).sum(0).reshape(x.shape)

        return (per_weight(dx), per_weight(dtheta), grads["dc"].to(c.dtype), grads["da"].to(a.dtype),
                grads["dmu"].to(mu.dtype), grads["ds"].to(s.dtype), None if v is None else grads["dv"].to(v.dtype),
                None, None, None, None, None)


def phi_argmax(x: torch.Tensor, c: torch.Tensor, a: torch.Tensor, mu: torch.Tensor,
               window_ids: torch.Tensor | None = None, comp_window: torch.Tensor | None = None) -> torch.Tensor:
    """``argmax_k phi_jk`` (int64, shape of ``x``; the first maximum), without gradients."""
    x, c, a, mu, win, cw = _contiguous(x, c, a, mu, _int8(window_ids), comp_window)
    codes = torch.empty(x.shape, dtype=torch.int64)
    _run("sqs_phi_argmax", n=x.numel(), nparam=x.numel(), K=mu.numel(), x=x, win=win, cw=cw, c=c, a=a, mu=mu,
         codes=codes)
    return codes


def phi_dot(x: torch.Tensor, c: torch.Tensor, a: torch.Tensor, mu: torch.Tensor, v: torch.Tensor,
            window_ids: torch.Tensor | None = None, comp_window: torch.Tensor | None = None) -> torch.Tensor:
    """``sum_k phi_jk v_k`` for every weight (shape of ``x``), differentiable in x, c, a, mu and v."""
    return _PhiDot.apply(x, c, a, mu, v, window_ids, comp_window)


def fused_layer(x: torch.Tensor, theta: torch.Tensor | None, c: torch.Tensor, a: torch.Tensor, mu: torch.Tensor,
                s: torch.Tensor, kl_components: torch.Tensor | None, *, gate_fixed: torch.Tensor | None = None,
                eps: torch.Tensor | None = None, window_ids: torch.Tensor | None = None,
                comp_window: torch.Tensor | None = None, assign_temperature: float = 1.0,
                gate_temperature: float = 1.0, prior_inclusion: float = 0.5,
                seed: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """A weight tensor's draw (or expected weight) and its per-weight KL bound, in one pass.

    Gates: learned from the logits ``theta``, or ``gate_fixed`` (0/1) when ``theta`` is None.
    With ``eps`` (standard normal, shape ``sample_shape + x.shape``) returns a straight-through
    draw per element of ``eps``; without, the expected weight ``g_j sum_k phi_jk mu_k``.
    ``kl_components`` is the K-vector ``B_k`` of the KL bound; the KL (per element) is returned
    when it is given, an empty tensor otherwise. ``seed`` (default: drawn from torch's
    generator) fixes the uniforms.
    """
    if seed is None:
        seed = int(torch.randint(_SEED_HIGH, ())) if eps is not None else 0
    settings = dict(expected=int(eps is None), seed=seed, t_assign=float(assign_temperature),
                    t_gate=float(gate_temperature), log_lam=math.log(prior_inclusion),
                    log1m_lam=math.log1p(-prior_inclusion))
    return _FusedLayer.apply(x, theta, c, a, mu, s, kl_components, gate_fixed, eps, window_ids, comp_window,
                             settings)
