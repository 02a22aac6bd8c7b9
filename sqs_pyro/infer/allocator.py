"""An opt-in C allocator setting for runs on large models: freed large blocks go back to the system."""
from __future__ import annotations

import ctypes
import ctypes.util

_M_MMAP_THRESHOLD = -3  # glibc's mallopt parameter (malloc.h)


def return_freed_memory(threshold_bytes: int = 65536) -> bool:
    """Serve allocations of at least ``threshold_bytes`` with their own ``mmap`` (glibc's
    ``mallopt(M_MMAP_THRESHOLD, threshold_bytes)``, as ``MALLOC_MMAP_THRESHOLD_`` in the environment
    would), so that a freed tensor's pages return to the system at once instead of staying in the
    heap for later allocations: the resident peak of a training step is then its live tensors, not
    the heap's high-water mark. The price is a page fault per page of every large tensor a step
    allocates: on ``benchmarks/lm_memory.py`` the peak drops by about 15 bytes per compressed weight and
    training takes about 1.8x as long (docs/results.md, training memory). Returns whether it was set
    (``False`` where the C library is not glibc)."""
    if threshold_bytes <= 0:
        raise ValueError(f"threshold_bytes must be positive, got {threshold_bytes}")
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name)
        mallopt = libc.mallopt
    except (OSError, AttributeError, TypeError):
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    return bool(mallopt(_M_MMAP_THRESHOLD, int(threshold_bytes)))
