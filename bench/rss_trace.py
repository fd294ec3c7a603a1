"""Where a command's memory peak happens: run it, sample its VmRSS and VmHWM every 0.2 s, and print
each output line stamped with the time and both readings, then the child's own peak (the figure
``bench/scale.py`` records, measured the same way: ``ChildPeak``).

    python bench/rss_trace.py --samples g24.tsv -- d2export gguf MODEL ... --no-verify

The samples file holds "seconds rss_mib hwm_mib" lines, written as they come (so a run stopped early
keeps them). A calibration resets VmHWM when it starts, so the HWM column is the calibration's own
peak from then on."""
from __future__ import annotations

import argparse
import os
import subprocess
import threading
import time
from pathlib import Path
from typing import Callable


def _readings(pid: int) -> tuple[int, int] | None:
    """(VmRSS, VmHWM) in MiB, or None once the process is gone."""
    try:
        fields = {line.split(":")[0]: int(line.split()[1]) // 1024
                  for line in Path(f"/proc/{pid}/status").read_text().splitlines()
                  if line.startswith(("VmRSS", "VmHWM"))}
    except (OSError, ValueError):
        return None
    return (fields["VmRSS"], fields["VmHWM"]) if len(fields) == 2 else None


def _tree(pid: int) -> list[int]:
    """pid and its descendants (torchrun's workers are the child's children)."""
    parents: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            ppid = int(stat.read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            continue
        parents.setdefault(ppid, []).append(int(stat.parent.name))
    out, todo = [], [pid]
    while todo:
        out.append(todo.pop())
        todo.extend(parents.get(out[-1], []))
    return out


class ChildPeak:
    """Samples a child's process tree every ``every`` s on a thread until ``stop``. ``last`` is the
    latest (VmRSS summed over the tree, largest VmHWM) and ``peak`` the highest VmHWM seen, in MiB:
    the child's own peak, or its largest process's under torchrun.

    Not the ``ru_maxrss`` that ``wait4`` gives: Python starts a child with vfork, and Linux records the
    address space that exec replaces (the parent's, under vfork) in the child's maxrss, so a child
    reported its parent's peak whenever that was higher (a bench that had just made a 5.5 GiB model
    reported 5.93 GiB for a 2.8 GiB calibration). VmHWM counts from the child's exec. A calibration
    resets it once it starts (``cpu.reset_peak_rss``); the maximum over samples keeps what came before,
    up to the last sample ahead of the reset."""

    def __init__(self, pid: int, every: float = 0.2,
                 on_reading: Callable[[float, int, int], None] | None = None):
        self.peak, self.last, self._t0 = 0, (0, 0), time.time()
        self._pid, self._every, self._on = pid, every, on_reading
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()

    def _sample(self) -> None:
        while not self._done.is_set():
            rs = [r for r in map(_readings, _tree(self._pid)) if r is not None]
            if rs:
                self.last = (sum(r[0] for r in rs), max(r[1] for r in rs))
                self.peak = max(self.peak, self.last[1])
                if self._on is not None:
                    self._on(time.time() - self._t0, *self.last)
            self._done.wait(self._every)

    def stop(self) -> int:
        """Stops sampling (call it once the child has exited) and returns ``peak``."""
        self._done.set()
        self._thread.join()
        return self.peak


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--samples", type=Path, required=True, help="file for the 0.2 s samples")
    ap.add_argument("command", nargs=argparse.REMAINDER, help="the command, after --")
    a = ap.parse_args(argv)
    cmd = a.command[1:] if a.command[:1] == ["--"] else a.command
    if not cmd:
        ap.error("give the command to trace after --")
    t0 = time.time()
    p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    with open(a.samples, "w", buffering=1) as out:
        watch = ChildPeak(p.pid, on_reading=lambda t, rss, hwm: out.write(f"{t:.1f} {rss} {hwm}\n"))
        for line in p.stdout:
            rss, hwm = watch.last
            print(f"[{time.time() - t0:7.1f} s, rss {rss:6d} hwm {hwm:6d} MiB] {line}", end="", flush=True)
        _, status, _ = os.wait4(p.pid, 0)  # the child stays unreaped until here, so its /proc is there
        peak = watch.stop()
    print(f"peak {peak} MiB (VmHWM sampled), wall {time.time() - t0:.1f} s")
    return os.waitstatus_to_exitcode(status)


if __name__ == "__main__":
    raise SystemExit(main())
