"""Calibration activations (one tensor per batch of samples) where they fit: the device, CPU
memory (pinned when the device is a GPU) or a memmap on disk (``--offload``).

A layer keeps a few streams at once (its inputs, the residual after attention, the attention
context, the float model's stream for DAC); ``plan_offload`` sizes them before calibration starts.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch

from d2quant.errors import D2Error

OFFLOADS = ("auto", "cpu", "disk")
_HEADROOM = 0.8  # of the free memory, the rest is the layer's weights, Hessians and temporaries


def _free_ram() -> int:
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    return 0


@dataclass(frozen=True)
class OffloadPlan:
    where: str  # device | cpu | disk
    need_bytes: int
    reason: str


def plan_offload(offload: str, device: torch.device, need_bytes: int, folder: Path | None = None) -> OffloadPlan:
    """Where the activations go: ``auto`` keeps them on the device while they fit, else in CPU
    memory, else on disk; ``cpu`` and ``disk`` are checked against what is free."""
    gib = need_bytes / 2**30
    ram = _free_ram()
    disk = shutil.disk_usage(folder or tempfile.gettempdir()).free
    dev_free = torch.cuda.mem_get_info(device)[0] if device.type == "cuda" else ram
    if offload == "auto":
        if need_bytes <= _HEADROOM * dev_free:
            return OffloadPlan("device", need_bytes, f"{gib:.2f} GiB of activations fit on {device.type}")
        if device.type == "cuda" and need_bytes <= _HEADROOM * ram:
            return OffloadPlan("cpu", need_bytes, f"{gib:.2f} GiB of activations exceed the GPU's free memory")
        offload = "disk"
    if offload == "cpu":
        if need_bytes > _HEADROOM * ram:
            raise D2Error(f"the activations need {gib:.2f} GiB but {ram / 2**30:.2f} GiB of RAM is free; "
                          "use --offload disk, or fewer --nsamples")
        return OffloadPlan("cpu" if device.type == "cuda" else "device", need_bytes, "asked for (--offload cpu)")
    if need_bytes > disk:
        raise D2Error(f"the activations need {gib:.2f} GiB on disk but {disk / 2**30:.2f} GiB is free in "
                      f"{folder or tempfile.gettempdir()}; free space (TMPDIR chooses the folder), or fewer --nsamples")
    return OffloadPlan("disk", need_bytes, "asked for (--offload disk)" if offload == "disk" else
                       f"{gib:.2f} GiB of activations exceed the free RAM")


class Activations:
    """A list of per-batch tensors kept where the plan says; iteration yields them on ``device``."""

    def __init__(self, where: str, device: torch.device, folder: Path | None = None):
        self.where, self.device = where, device
        self._items: list[torch.Tensor | Path] = []
        self._dir = None
        if where == "disk":
            self._dir = Path(tempfile.mkdtemp(prefix="d2export-acts-", dir=folder))

    @classmethod
    def like(cls, other: "Activations", items=()) -> "Activations":
        new = cls(other.where, other.device, other._dir.parent if other._dir else None)
        for t in items:
            new.append(t)
        return new

    def append(self, t: torch.Tensor) -> None:
        if self.where == "device":
            self._items.append(t)
        elif self.where == "cpu":
            cpu = torch.empty(t.shape, dtype=t.dtype, pin_memory=self.device.type == "cuda")
            self._items.append(cpu.copy_(t))
        else:
            path = self._dir / f"{len(self._items):05d}.bin"
            mm = torch.from_file(str(path), shared=True, size=t.numel(), dtype=t.dtype).view(t.shape)
            mm.copy_(t)
            self._items.append(mm)

    def __len__(self) -> int:
        return len(self._items)

    def __getitem__(self, i: int) -> torch.Tensor:
        return self._items[i].to(self.device, non_blocking=True)

    def __iter__(self):
        return (self[i] for i in range(len(self)))

    def cpu(self) -> list[torch.Tensor]:
        return [t.cpu().clone() for t in self._items]

    def close(self) -> None:
        self._items = []
        if self._dir is not None:
            shutil.rmtree(self._dir, ignore_errors=True)

    def __del__(self):
        if getattr(self, "_dir", None) is not None and os.path.isdir(self._dir):
            shutil.rmtree(self._dir, ignore_errors=True)
