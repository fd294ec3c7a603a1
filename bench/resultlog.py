"""The benchmarks' result files: one JSON object per line, appended as each row finishes so an
interrupted benchmark resumes where it stopped."""

from __future__ import annotations

import json
import os
import platform
from functools import cache
from pathlib import Path


def read_rows(path: Path) -> list[dict]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


@cache
def machine() -> str:
    """Where a row was measured: speeds (and, through float order, calibrations) depend on it."""
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    where = f"{cpu}, {len(os.sched_getaffinity(0))} cores"
    try:
        import torch
        if torch.cuda.is_available():
            where += f", {torch.cuda.get_device_name(0)}"
    except ImportError:
        pass
    return where


def append_row(path: Path, row: dict) -> None:
    """Print the row (with the machine it was measured on) and append it to ``path``."""
    line = json.dumps({**row, "machine": row.get("machine", machine())})
    print(line, flush=True)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a") as f:
        f.write(line + "\n")
