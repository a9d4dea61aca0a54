"""What every benchmark prints about the machine it ran on: CPU model, cores, bf16 support."""

from __future__ import annotations

import os
import platform
from pathlib import Path


def cpu_model(cpuinfo: str = "/proc/cpuinfo") -> str:
    """The CPU's model name as the kernel reports it (platform's guess elsewhere)."""
    try:
        for line in Path(cpuinfo).read_text().splitlines():
            if line.startswith("model name"):
                return line.partition(":")[2].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine_line() -> str:
    """One line: CPU model, core count, bfloat16 instructions, load average now."""
    flags = set()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                flags.update(line.partition(":")[2].split())
    except OSError:
        pass
    bf16 = "/".join(f for f in ("avx512_bf16", "amx_bf16") if f in flags) or "no bf16"
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    return f"CPU: {cpu_model()}, {os.cpu_count()} cores, {bf16}, load average {load:.1f}"
