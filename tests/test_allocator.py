"""The opt-in allocator setting: large tensors get their own mapping, so freeing one returns it (glibc only)."""
import ctypes
import ctypes.util
import subprocess
import sys

import pytest

from sqs_pyro.infer.allocator import return_freed_memory

_PROBE = """
import ctypes, ctypes.util, sys
import torch
from sqs_pyro.infer.allocator import return_freed_memory

class MallInfo2(ctypes.Structure):  # glibc >= 2.33
    _fields_ = [(name, ctypes.c_size_t) for name in ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks",
                                                     "fsmblks", "uordblks", "fordblks", "keepcost")]

libc = ctypes.CDLL(ctypes.util.find_library("c"))
libc.mallinfo2.restype = MallInfo2
assert return_freed_memory(64 << 10 if sys.argv[1] == "return" else 32 << 20)
before = libc.mallinfo2().hblkhd  # bytes in blocks with their own mapping (munmap'ed when freed)
block = torch.ones(1 << 18)  # 1 MiB
print((libc.mallinfo2().hblkhd - before) / 2**20)
"""


def _glibc_with_mallinfo2() -> bool:
    name = ctypes.util.find_library("c")
    return bool(name) and hasattr(ctypes.CDLL(name), "mallinfo2")


def _mapped_mib(mode: str) -> float:
    out = subprocess.run([sys.executable, "-c", _PROBE, mode], capture_output=True, text=True, check=True)
    return float(out.stdout.strip())


@pytest.mark.skipif(not _glibc_with_mallinfo2(), reason="glibc's mallopt and mallinfo2")
def test_a_large_tensor_gets_its_own_mapping_only_when_asked():
    assert _mapped_mib("return") >= 1.0  # its own mapping: freeing it returns the pages at once
    assert _mapped_mib("keep") == 0.0  # control: a threshold above its size serves it from the heap


def test_a_non_positive_threshold_is_refused():
    with pytest.raises(ValueError, match="threshold_bytes"):
        return_freed_memory(0)
