"""What the CPU this runs on advertises (Linux /proc/cpuinfo; empty elsewhere): the llama.cpp build
and the self-generation's attention kernel depend on AMX, the dtype of the calibration forwards and
of self-generation on native bfloat16 matmuls. And this process's peak resident memory, which a
calibration reports."""

from __future__ import annotations

import ctypes
import functools
import os
import platform
import resource
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


def has_bf16_matmul(flags: frozenset[str] | None = None) -> bool:
    """bfloat16 matmuls in hardware: AMX tiles, or AVX-512 BF16's dot products (AMD Zen 4 and later,
    Cooper Lake). A [8·512, 1536] x [1536, 8960] linear under autocast on two cores of the AMD EPYC
    VM here: 293 ms against 626 ms in float32; AMX is 5x (BENCHMARKS.md)."""
    flags = cpu_flags() if flags is None else flags
    return has_amx(flags) or "avx512_bf16" in flags


def native_matmul_dtype(device) -> str:
    """bfloat16 where its matmuls are native (CUDA; a CPU with AMX tiles or AVX-512 BF16, 2-5x
    float32 there), float32 elsewhere: on an AVX2-only CPU torch emulates bfloat16, and SmolLM2's
    lm_head step of 32 rows took 99.5 ms against 32.1 ms in float32 (BENCHMARKS.md). A rule by the
    hardware, not a race timed at run time: the kernels round differently, so the file would
    otherwise depend on the machine's load. ``device`` is a torch.device."""
    return "bfloat16" if device.type == "cuda" or (device.type == "cpu" and has_bf16_matmul()) else "float32"


def reset_peak_rss() -> bool:
    """Start this process's peak-RSS count again from its current RSS (Linux's clear_refs "5", which
    resets VmHWM), so that a step run after other work (a bench that scored a 262k-vocabulary model
    first) reports its own peak. False where the kernel offers no reset: the peak is then the
    process's since it started."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        return False
    return True


def _status_mb(field: str) -> float | None:
    try:
        status = Path("/proc/self/status").read_text()
    except OSError:
        return None
    return int(next(ln for ln in status.splitlines() if ln.startswith(field)).split()[1]) / 1024


def peak_rss_mb() -> float:
    """The peak RSS in MiB since the last reset_peak_rss (VmHWM), or since the process started."""
    peak = _status_mb("VmHWM")
    if peak is None:  # macOS: ru_maxrss is in bytes there, kilobytes on Linux
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    return peak


def rss_mb() -> float | None:
    """The RSS in MiB now (None where /proc is not there)."""
    return _status_mb("VmRSS")


def release_free_heap() -> bool:
    """Hand the C heap's free pages back to the OS (glibc's malloc_trim; False where there is none).
    Blocks under glibc's mmap threshold come from the heap, which keeps their pages resident once
    they are freed: a calibration's per-layer temporaries left the next layer's (and the vocabulary
    table's) peak that much higher."""
    libc = _glibc()
    if libc is None:
        return False
    libc.malloc_trim(ctypes.c_size_t(0))
    return True


HEAP_BLOCK_LIMIT = 8 * 2**20
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # mallopt's parameters, from glibc's malloc.h


def bound_heap_blocks(limit: int = HEAP_BLOCK_LIMIT) -> bool:
    """Serve blocks of ``limit`` bytes and more by mmap, so they go back to the OS when freed (False
    where the C library is not glibc, or MALLOC_MMAP_THRESHOLD_ already says what the user wants).

    glibc's threshold starts at 128 KiB and rises to 32 MiB as larger mmapped blocks are freed. GPTQ's
    lazy-update temporaries of 8-32 MiB then came from the heap, whose fragments stay resident until
    the trim between layers: a layer's peak crept up with every layer (2.27 -> 2.60 GiB over six
    layers of a 2048/8192 model, 2.38 -> 2.85 GiB over 24), the same work with the same bits. Fixed
    at 8 MiB the six layers peaked at 2.17 -> 2.20 GiB at the same speed; at 1 MiB, 2.12 GiB but 50%
    slower, every block a freshly zeroed mapping (BENCHMARKS.md, issue 13). On a small model the
    8 MiB blocks are a larger share of the work: the README job's calibration took 184-189 s
    against 148 s, so only a streamed calibration (memory first) calls this."""
    libc = _glibc()
    if libc is None or "MALLOC_MMAP_THRESHOLD_" in os.environ:
        return False
    if "MALLOC_TRIM_THRESHOLD_" not in os.environ:
        # A fixed threshold ends glibc's dynamic rule, which keeps the trim threshold at twice the
        # mmap threshold; left where it was (128 KiB at start), the heap's top was handed back
        # after every free and zeroed again at the next allocation. An IQ1_S calibration spent 43%
        # of its time in the kernel (page faults); release_free_heap still trims it between layers.
        libc.mallopt(ctypes.c_int(_M_TRIM_THRESHOLD), ctypes.c_int(2 * limit))
    return bool(libc.mallopt(ctypes.c_int(_M_MMAP_THRESHOLD), ctypes.c_int(limit)))


@functools.cache
def _glibc():
    """The process's C library where it is glibc (malloc_trim and mallopt), looked up once; None on
    another (musl, macOS)."""
    try:
        libc = ctypes.CDLL(None)
    except OSError:
        return None
    return libc if hasattr(libc, "malloc_trim") and hasattr(libc, "mallopt") else None
