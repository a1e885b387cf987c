"""Peak-memory measurement shared by the benchmarks: CUDA's max_memory_allocated, or on a CPU the growth of the
process's peak resident set (VmHWM, reset through /proc/self/clear_refs) over the measured section."""
from __future__ import annotations

from pathlib import Path

import torch


def proc_kb(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    return 0


class PeakMemory:
    """`start()` before the measured section, `extra_mib()` after it: the peak above the memory in use at start."""

    def __init__(self, device: torch.device):
        self.device = device
        self.base = 0

    def start(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self.base = torch.cuda.memory_allocated()
            return
        try:
            Path("/proc/self/clear_refs").write_text("5")
        except OSError:
            pass
        self.base = proc_kb("VmRSS") * 1024

    def extra_mib(self) -> float:
        peak = torch.cuda.max_memory_allocated() if self.device.type == "cuda" else proc_kb("VmHWM") * 1024
        return (peak - self.base) / 2 ** 20
