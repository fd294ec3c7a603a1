"""llama-cpp-python built for the machine it runs on, probed, and cached per CPU.

llama-cpp-python compiles llama.cpp on install with ``GGML_NATIVE`` (``-march=native``). On CPUs
that advertise AMX (Sapphire Rapids) that compiles llama.cpp's AMX tile kernels, and in some VMs
the first tile instruction traps: SIGILL, the process dies. AMX could only speed up prompt
processing of a few block types there; it cannot be measured on a machine where it traps, so
when the CPU advertises AMX the build turns the tile instructions off and keeps every other
native SIMD path (AVX-512, VNNI, ...).

Every build is then *probed* in a worker process (a tiny GGUF with Q4_0/Q8_0/F16 matmuls, a
32-token batch and single-token decodes). If the probe dies, the next, more conservative flavour
is built: AVX2 without ``-march=native``, then plain x86-64. A wheel that passed its probe is kept
under ``~/.cache/d2export/llama-cpp-wheels/<key>``; the key hashes the package version, the
Python tag, the CPU model and its feature flags and the CMake arguments, so a second checkout on
the same machine installs it in seconds and a wheel from another CPU is never reused. pip's own
wheel cache is bypassed (``--no-cache-dir``): it keys builds by the source only.

    python -m runtime_tests.llamacpp_build            # install (or keep) a probed build
    python -m runtime_tests.llamacpp_build --check    # probe what is installed, change nothing
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.metadata
import json
import os
import platform
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from d2quant.cpu import cpu_flags, cpu_model, has_amx
from d2quant.errors import D2Error
from runtime_tests.isolation import Runtime, Worker

VERSION = "0.3.36"  # runtime_tests.libggml declares this version's ggml structs
PACKAGE = "llama-cpp-python"
_NO_AMX = "-mno-amx-tile -mno-amx-int8 -mno-amx-bf16"
# only libllama and libggml are loaded; the multimodal library (mtmd) is not used by d2export
_COMMON = ("-DLLAVA_BUILD=OFF",)
_MARKER = ".d2export-build.json"
NATIVE = "runtime_tests.native.llamacpp:LlamaCppModel"  # what a llama.cpp worker process builds


@dataclass(frozen=True)
class Flavour:
    name: str
    cmake_args: tuple[str, ...]

    @property
    def env_value(self) -> str:
        """CMAKE_ARGS as scikit-build-core reads it (shlex-split)."""
        return shlex.join(self.cmake_args)


def flavours(flags: frozenset[str] | None = None) -> list[Flavour]:
    """Builds to try, fastest first."""
    flags = cpu_flags() if flags is None else flags
    native = _COMMON
    if has_amx(flags):
        native += (f"-DCMAKE_C_FLAGS={_NO_AMX}", f"-DCMAKE_CXX_FLAGS={_NO_AMX}")
    out = [Flavour("native" + ("-no-amx" if has_amx(flags) else ""), native)]
    if platform.machine() in ("x86_64", "AMD64"):
        if {"avx2", "fma", "f16c"} <= flags:
            out.append(Flavour("avx2", _COMMON + ("-DGGML_NATIVE=OFF", "-DGGML_AVX=ON", "-DGGML_AVX2=ON",
                                                  "-DGGML_FMA=ON", "-DGGML_F16C=ON")))
        out.append(Flavour("x86-64", _COMMON + ("-DGGML_NATIVE=OFF",)))
    return out


def rebuild_command(flavour: Flavour | None = None) -> str:
    """The pip command that rebuilds llama-cpp-python for this CPU (what a plain-pip user runs)."""
    flavour = flavour or flavours()[0]
    return (f"CMAKE_ARGS={shlex.quote(flavour.env_value)} pip install --force-reinstall --no-deps "
            f"--no-cache-dir --no-binary {PACKAGE} {PACKAGE}=={VERSION}")


RUNTIME = Runtime("llama.cpp", rebuild_command)


def _key(flavour: Flavour) -> str:
    facts = {"version": VERSION, "python": sys.implementation.cache_tag, "machine": platform.machine(),
             "cpu": cpu_model(), "flags": sorted(cpu_flags()), "cmake_args": list(flavour.cmake_args)}
    return hashlib.sha256(json.dumps(facts, sort_keys=True).encode()).hexdigest()[:20]


def cache_root() -> Path:
    return Path(os.environ.get("D2EXPORT_CACHE", Path.home() / ".cache" / "d2export")) / "llama-cpp-wheels"


# ---- the probe ----------------------------------------------------------------------------------

def write_probe_gguf(path: Path) -> None:
    """A tiny random llama whose matmuls run llama.cpp's quantized kernels (Q4_0, Q8_0, F16)."""
    import gguf
    import numpy as np

    hidden, ffn, vocab, heads = 256, 512, 512, 4
    rng = np.random.default_rng(0)
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_context_length(512)
    w.add_embedding_length(hidden)
    w.add_block_count(1)
    w.add_feed_forward_length(ffn)
    w.add_head_count(heads)
    w.add_head_count_kv(heads)
    w.add_rope_dimension_count(hidden // heads)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_vocab_size(vocab)
    w.add_tokenizer_model("none")  # llama.cpp adds vocab_size dummy tokens; we feed ids

    def mat(rows, cols, qtype):
        x = (rng.standard_normal((rows, cols)) * 0.05).astype(np.float32)
        if qtype == gguf.GGMLQuantizationType.F16:
            return x.astype(np.float16), None
        return gguf.quants.quantize(x, qtype), qtype

    T = gguf.GGMLQuantizationType
    tensors = {"token_embd.weight": mat(vocab, hidden, T.Q8_0), "output_norm.weight": (np.ones(hidden, np.float32), None),
               "output.weight": mat(vocab, hidden, T.Q8_0),
               "blk.0.attn_norm.weight": (np.ones(hidden, np.float32), None),
               "blk.0.attn_q.weight": mat(hidden, hidden, T.Q4_0), "blk.0.attn_k.weight": mat(hidden, hidden, T.Q4_0),
               "blk.0.attn_v.weight": mat(hidden, hidden, T.Q8_0), "blk.0.attn_output.weight": mat(hidden, hidden, T.F16),
               "blk.0.ffn_norm.weight": (np.ones(hidden, np.float32), None),
               "blk.0.ffn_gate.weight": mat(ffn, hidden, T.Q4_0), "blk.0.ffn_up.weight": mat(ffn, hidden, T.Q8_0),
               "blk.0.ffn_down.weight": mat(hidden, ffn, T.Q4_0)}
    for name, (data, qtype) in tensors.items():
        w.add_tensor(name, data, raw_dtype=qtype)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def probe() -> str | None:
    """None when the installed llama.cpp loads and evaluates a model here, else why not (one line)."""
    import numpy as np

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "probe.gguf"
        write_probe_gguf(path)
        try:
            w = Worker(NATIVE, str(path), n_ctx=64,
                       runtime=RUNTIME, label="a probe model")
            try:
                batch = w.call("logits", list(range(1, 33)))
                single = [w.call("logits", [t]) for t in (5, 6)]
            finally:
                w.close()
        except D2Error as e:
            return str(e)
    if not (np.isfinite(batch).all() and all(np.isfinite(s).all() for s in single)):
        return "llama.cpp evaluated the probe model to NaN/Inf logits"
    return None


# ---- install ------------------------------------------------------------------------------------

def installed_build() -> dict | None:
    """The marker d2export left in the installed llama_cpp package, if this version is installed."""
    try:
        if importlib.metadata.version(PACKAGE) != VERSION:
            return None
        dist = importlib.metadata.distribution(PACKAGE)
    except importlib.metadata.PackageNotFoundError:
        return None
    marker = Path(dist.locate_file("llama_cpp")) / _MARKER
    try:
        return json.loads(marker.read_text())
    except (OSError, ValueError):
        return None


def _pip(*args: str, env: dict | None = None) -> None:
    subprocess.run([sys.executable, "-m", "pip", *args], check=True, env=env)


def _build_wheel(flavour: Flavour, into: Path) -> Path:
    env = {**os.environ, "CMAKE_ARGS": flavour.env_value}
    print(f"building {PACKAGE} {VERSION} ({flavour.name}: CMAKE_ARGS={flavour.env_value}) ...", flush=True)
    t0 = time.time()
    _pip("wheel", "-q", "--no-deps", "--no-cache-dir", "--no-binary", PACKAGE, f"{PACKAGE}=={VERSION}",
         "-w", str(into), env=env)
    print(f"built in {time.time() - t0:.0f} s", flush=True)
    return next(into.glob("llama_cpp_python-*.whl"))


def _install(wheel: Path, flavour: Flavour, key: str) -> None:
    _pip("install", "-q", "--force-reinstall", "--no-deps", str(wheel))
    _pip("install", "-q", str(wheel))  # its dependencies (numpy, jinja2, ...), from the index
    dist = importlib.metadata.distribution(PACKAGE)
    marker = Path(dist.locate_file("llama_cpp")) / _MARKER
    marker.write_text(json.dumps({"flavour": flavour.name, "key": key, "cmake_args": list(flavour.cmake_args),
                                  "wheel": wheel.name}))


def ensure(force: bool = False) -> Flavour:
    """Install the first flavour whose build passes the probe; reuse a probed wheel of this CPU."""
    current = installed_build()
    options = flavours()
    if current and not force and current["key"] in {_key(f) for f in options}:
        why = probe()
        if why is None:
            print(f"{PACKAGE} {VERSION} ({current['flavour']}) is installed and runs here")
            return next(f for f in options if _key(f) == current["key"])
        print(f"the installed build fails its probe: {why}")
    for flavour in options:
        key = _key(flavour)
        cached = cache_root() / key
        wheel = next(cached.glob("*.whl"), None) if cached.is_dir() and not force else None
        with tempfile.TemporaryDirectory() as tmp:
            if wheel is None:
                wheel = _build_wheel(flavour, Path(tmp))
            else:
                print(f"using the probed wheel for this CPU from {cached}")
            _install(wheel, flavour, key)
            why = probe()
            if why is None:
                if wheel.parent != cached:
                    cached.mkdir(parents=True, exist_ok=True)
                    shutil.copy2(wheel, cached / wheel.name)
                    (cached / "build.json").write_text(json.dumps(
                        {"cpu": cpu_model(), "flavour": flavour.name, "cmake_args": list(flavour.cmake_args)}))
                print(f"{PACKAGE} {VERSION} ({flavour.name}) passes the probe")
                return flavour
        print(f"the {flavour.name} build fails its probe: {why}")
        if cached.is_dir():
            shutil.rmtree(cached, ignore_errors=True)
    raise D2Error(f"no build of {PACKAGE} runs on this CPU ({cpu_model()}); tried "
                  f"{', '.join(f.name for f in options)}")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--check", action="store_true", help="probe the installed build only")
    ap.add_argument("--force", action="store_true", help="rebuild even if a probed wheel is cached")
    args = ap.parse_args(argv)
    try:
        if args.check:
            why = probe()
            print("llama.cpp runs here" if why is None else f"error: {why}")
            return 0 if why is None else 1
        ensure(force=args.force)
    except D2Error as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except subprocess.CalledProcessError as e:
        print(f"error: {' '.join(map(str, e.cmd[:4]))} ... failed with status {e.returncode}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
