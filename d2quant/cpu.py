"""What the CPU this runs on advertises (Linux /proc/cpuinfo; empty elsewhere): the llama.cpp build
and the self-generation's attention kernel both depend on AMX."""

from __future__ import annotations

import platform
from pathlib import Path


def _cpuinfo_field(name: str) -> str:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return ""
    line = next((ln for ln in text.splitlines() if ln.startswith(name)), "")
    return line.partition(":")[2].strip()


def cpu_flags() -> frozenset[str]:
    return frozenset(_cpuinfo_field("flags").split())


def cpu_model() -> str:
    return _cpuinfo_field("model name") or platform.processor()


def has_amx(flags: frozenset[str] | None = None) -> bool:
    return any(f.startswith("amx") for f in (cpu_flags() if flags is None else flags))
