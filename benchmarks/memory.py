"""Resident-memory readings of this process from /proc (Linux), for the peak-RSS benchmarks."""
from pathlib import Path


def vm(field: str) -> int:
    """``VmRSS`` (now) or ``VmHWM`` (peak since start or the last :func:`reset_peak`) in bytes."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"{field} not in /proc/self/status")


def reset_peak() -> None:
    """Reset ``VmHWM`` to the current RSS (``echo 5 > /proc/self/clear_refs``)."""
    Path("/proc/self/clear_refs").write_text("5")
