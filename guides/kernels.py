r"""Fused CPU kernels for the two ``O(N K)`` parts of an SVI step (``kernels.c`` beside this file).

For a weight tensor with latent values ``x_j`` and a K-level codebook the responsibilities
are ``phi_jk = softmax_k(c_k - z_jk^2 / 2)``, ``z_jk = (x_j - mu_k) a_k``, with
``c_k = (log pi_k - log s_k) / tau`` and ``a_k = 1 / (s_k sqrt(tau))`` (components outside
the weight's window excluded; shifted logits clipped at -80 exactly as in
:mod:`sqs_pyro.guides.distributions`). Two autograd functions compute, in one pass over the
weights each way and without any ``N x K`` tensor:

* :func:`phi_dot`: ``sum_k phi_jk v_k`` (the KL's slab term with ``v = B``, the
  expected weight with ``v = mu``);
* :func:`straight_through_sample`: the Gumbel-max draw ``k_j = argmax_k (log phi_jk + G_jk)``
  (an exact draw from ``Categorical(phi_j)``) returned as ``mu_{k_j} + s_{k_j} eps_j``, whose
  backward pass is the straight-through gradient of the relaxed one-hot
  ``softmax((log phi_j + G_j) / t)`` (Concrete), as in the eager code.

The Gumbel noise ``G_jk = -log(-log U_jk)`` comes from a counter-based generator:
``U_jk`` is the SplitMix64 finaliser of ``seed + (j K + k + 1) * 0x9E3779B97F4A7C15``, top
23 bits, mapped to ``(b + 0.5) / 2^23``. The seed is drawn from torch's default generator,
so ``torch.manual_seed`` / ``pyro.set_rng_seed`` make runs reproducible; the backward pass
regenerates the same noise instead of storing it.

The C source is compiled once per machine with the system C compiler (``$CC``, default
``cc``) into ``$XDG_CACHE_HOME/sqs_pyro`` (default ``~/.cache/sqs_pyro``). Where no
compiler is available, tensors are not float32 on the CPU, or ``SQS_PYRO_KERNELS=0`` is
set, :func:`available` is false and the callers use the eager PyTorch code (same math).
"""
from __future__ import annotations

import ctypes
import functools
import hashlib
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

_i64, _f32 = ctypes.c_int64, ctypes.c_float
_ptr = ctypes.c_void_p
_SIGNATURES = {
    "sqs_kernel_kmax": ((), _i64),
    "sqs_phi_dot_forward": ((_i64, _i64) + (_ptr,) * 8, _i64),
    "sqs_phi_dot_backward": ((_i64, _i64) + (_ptr,) * 13, _i64),
    "sqs_st_forward": ((_i64, _i64, _i64) + (_ptr,) * 8 + (ctypes.c_uint64, _ptr), _i64),
    "sqs_st_backward": ((_i64, _i64, _i64) + (_ptr,) * 8 + (ctypes.c_uint64, _f32) + (_ptr,) * 6, _i64),
}


def _cache_dir() -> Path:
    root = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(root) / "sqs_pyro"


@functools.lru_cache(maxsize=None)
def _library() -> ctypes.CDLL | None:
    """Compile (once per source, compiler flags and machine) and load the kernels; ``None`` if impossible."""
    compiler = os.environ.get("CC", "cc")
    source = SOURCE.read_bytes()
    key = hashlib.sha256(b"\0".join([source, " ".join(FLAGS).encode(), compiler.encode(),
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
                               timeout=120)
                os.replace(tmp, target)
            finally:
                if os.path.exists(tmp):
                    os.unlink(tmp)
        lib = ctypes.CDLL(str(target))
    except (OSError, subprocess.SubprocessError) as exc:
        detail = getattr(exc, "stderr", b"") or b""
        warnings.warn(f"sqs_pyro: fused CPU kernels unavailable ({exc} {detail.decode(errors='replace')[:200]}); "
                      "using the (slower) eager PyTorch path", RuntimeWarning, stacklevel=2)
        return None
    for name, (args, res) in _SIGNATURES.items():
        fn = getattr(lib, name)
        fn.argtypes, fn.restype = list(args), res
    return lib


def available(*tensors: torch.Tensor, components: int) -> bool:
    """Whether the fused kernels can serve these (float32, CPU) tensors with ``components`` levels."""
    if os.environ.get("SQS_PYRO_KERNELS", "1") == "0":
        return False
    if not all(t.device.type == "cpu" and t.dtype == torch.float32 for t in tensors):
        return False
    lib = _library()
    return lib is not None and components <= lib.sqs_kernel_kmax()


def _p(t: torch.Tensor | None) -> int | None:
    return None if t is None else t.data_ptr()


def _call(name: str, *args) -> None:
    if getattr(_library(), name)(*args) != 0:
        raise MemoryError(f"{name}: could not allocate its work space")


def _prepare(*tensors: torch.Tensor | None) -> list[torch.Tensor | None]:
    return [None if t is None else t.detach().contiguous() for t in tensors]


def _grads(k: int) -> list[torch.Tensor]:
    return [torch.zeros(k, dtype=torch.float64) for _ in range(4)]


class _PhiDot(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, c, a, mu, v, window_ids, comp_window):
        x, c, a, mu, v, win, cw = _prepare(x, c, a, mu, v, window_ids, comp_window)
        out = torch.empty_like(x)
        _call("sqs_phi_dot_forward", x.numel(), mu.numel(), _p(x), _p(win), _p(cw), _p(c), _p(a), _p(mu),
                                       _p(v), _p(out))
        ctx.save_for_backward(x, c, a, mu, v)
        ctx.windows = (win, cw)
        return out

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, dout):
        x, c, a, mu, v = ctx.saved_tensors
        win, cw = ctx.windows
        dout = dout.contiguous()
        dx = torch.empty_like(x)
        dc, da, dmu, dv = _grads(mu.numel())
        _call("sqs_phi_dot_backward", x.numel(), mu.numel(), _p(x), _p(win), _p(cw), _p(c), _p(a), _p(mu), _p(v),
                                        _p(dout), _p(dx), _p(dc), _p(da), _p(dmu), _p(dv))
        return dx, dc.to(c.dtype), da.to(a.dtype), dmu.to(mu.dtype), dv.to(v.dtype), None, None


class _StraightThroughSample(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, c, a, mu, s, eps, window_ids, comp_window, temperature, seed):
        x, c, a, mu, s, eps, win, cw = _prepare(x, c, a, mu, s, eps, window_ids, comp_window)
        value = torch.empty_like(eps)
        _call("sqs_st_forward", eps.numel(), x.numel(), mu.numel(), _p(x), _p(win), _p(cw), _p(c), _p(a), _p(mu),
                                  _p(s), _p(eps), seed, _p(value))
        ctx.save_for_backward(x, c, a, mu, s, eps)
        ctx.windows, ctx.temperature, ctx.seed = (win, cw), temperature, seed
        return value

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, dvalue):
        x, c, a, mu, s, eps = ctx.saved_tensors
        win, cw = ctx.windows
        dvalue = dvalue.contiguous()
        dx = torch.empty_like(eps)
        dc, da, dmu, ds = _grads(mu.numel())
        _call("sqs_st_backward", eps.numel(), x.numel(), mu.numel(), _p(x), _p(win), _p(cw), _p(c), _p(a), _p(mu),
                                   _p(s), _p(eps), ctx.seed, ctx.temperature, _p(dvalue), _p(dx), _p(dc), _p(da),
                                   _p(dmu), _p(ds))
        dx = dx.reshape(-1, x.numel()).sum(0).reshape(x.shape)
        return (dx, dc.to(c.dtype), da.to(a.dtype), dmu.to(mu.dtype), ds.to(s.dtype), None, None, None, None,
                None)


def phi_dot(x: torch.Tensor, c: torch.Tensor, a: torch.Tensor, mu: torch.Tensor, v: torch.Tensor,
            window_ids: torch.Tensor | None = None, comp_window: torch.Tensor | None = None) -> torch.Tensor:
    """``sum_k phi_jk v_k`` for every weight (shape of ``x``), differentiable in x, c, a, mu and v."""
    return _PhiDot.apply(x, c, a, mu, v, window_ids, comp_window)


def straight_through_sample(x: torch.Tensor, c: torch.Tensor, a: torch.Tensor, mu: torch.Tensor,
                            s: torch.Tensor, eps: torch.Tensor, temperature: float,
                            window_ids: torch.Tensor | None = None, comp_window: torch.Tensor | None = None,
                            seed: int | None = None) -> torch.Tensor:
    """``mu_k + s_k eps`` for a Gumbel-max draw ``k ~ Categorical(phi)`` per element of ``eps``.

    ``eps`` has shape ``sample_shape + x.shape`` (element j uses weight ``j mod x.numel()``);
    gradients flow to x, c, a (Concrete relaxation at ``temperature``), mu and s. ``seed``
    (default: drawn from torch's generator) fixes the Gumbel noise.
    """
    if seed is None:
        seed = int(torch.randint(_SEED_HIGH, ()))
    return _StraightThroughSample.apply(x, c, a, mu, s, eps, window_ids, comp_window, float(temperature), seed)

