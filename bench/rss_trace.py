"""Where a command's memory peak happens: run it, sample its VmRSS and VmHWM every 0.2 s, and print
each output line stamped with the time and both readings, then the child's ``ru_maxrss`` (the figure
``bench/scale.py`` records).

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


def _readings(pid: int) -> tuple[int, int] | None:
    """(VmRSS, VmHWM) in MiB, or None once the process is gone."""
    try:
        fields = {line.split(":")[0]: int(line.split()[1]) // 1024
                  for line in Path(f"/proc/{pid}/status").read_text().splitlines()
                  if line.startswith(("VmRSS", "VmHWM"))}
    except (OSError, ValueError):
        return None
    return (fields["VmRSS"], fields["VmHWM"]) if len(fields) == 2 else None


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
    done, last = threading.Event(), [(0, 0)]

    def sample() -> None:
        with open(a.samples, "w", buffering=1) as out:
            while not done.is_set():
                if (r := _readings(p.pid)) is not None:
                    last[0] = r
                    out.write(f"{time.time() - t0:.1f} {r[0]} {r[1]}\n")
                time.sleep(0.2)

    threading.Thread(target=sample, daemon=True).start()
    for line in p.stdout:
        rss, hwm = last[0]
        print(f"[{time.time() - t0:7.1f} s, rss {rss:6d} hwm {hwm:6d} MiB] {line}", end="", flush=True)
    _, status, usage = os.wait4(p.pid, 0)  # the child stays unreaped until here, so its /proc is there
    done.set()
    print(f"ru_maxrss {usage.ru_maxrss / 1024:.0f} MiB, wall {time.time() - t0:.1f} s")
    return os.waitstatus_to_exitcode(status)


if __name__ == "__main__":
    raise SystemExit(main())
