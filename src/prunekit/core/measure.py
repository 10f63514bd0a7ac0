"""Measuring a run: peak memory (host RSS and device), and the software versions behind a result."""

from __future__ import annotations

import platform
import resource
import sys
from pathlib import Path
from types import TracebackType

import torch

_CLEAR_REFS = Path("/proc/self/clear_refs")
_STATUS = Path("/proc/self/status")


def _status_bytes(field: str) -> int | None:
    """A ``VmXXX`` line of ``/proc/self/status`` in bytes; ``None`` where there is none (not Linux)."""
    try:
        for line in _STATUS.read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def current_rss_bytes() -> int:
    """The process's resident set size now (``VmRSS`` on Linux; 0 where unknown)."""
    return _status_bytes("VmRSS") or 0


def current_peak_rss_bytes() -> int:
    """The process's peak resident set size (``VmHWM`` on Linux, else ``ru_maxrss``)."""
    peak = _status_bytes("VmHWM")
    if peak is not None:
        return peak
    maxrss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return maxrss if sys.platform == "darwin" else maxrss * 1024


def reset_peak_rss() -> bool:
    """Reset the kernel's peak-RSS mark (Linux: ``echo 5 > /proc/self/clear_refs``); False where impossible."""
    try:
        _CLEAR_REFS.write_text("5")
        return True
    except OSError:
        return False


class MemoryMeter:
    """Context manager that records the peak host RSS and peak device memory of what runs inside it."""

    def __init__(self, device: torch.device | str = "cpu") -> None:
        self.device = torch.device(device)
        self.peak_rss_bytes = 0
        self.peak_device_bytes: int | None = None
        self.rss_reset = False

    def __enter__(self) -> MemoryMeter:
        self.rss_reset = reset_peak_rss()
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.peak_rss_bytes = current_peak_rss_bytes()
        if self.device.type == "cuda":
            self.peak_device_bytes = int(torch.cuda.max_memory_allocated(self.device))


def versions() -> dict[str, str]:
    """Versions of the software that produced a result."""
    from importlib.metadata import PackageNotFoundError, version

    found = {"python": platform.python_version(), "platform": platform.platform()}
    for package in ("prunekit", "torch", "transformers", "safetensors", "accelerate"):
        try:
            found[package] = version(package)
        except PackageNotFoundError:
            continue
    if torch.cuda.is_available():
        found["cuda_device"] = torch.cuda.get_device_name()
    return found
