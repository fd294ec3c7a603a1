"""Model sources: a Hugging Face directory, a LLaMA-family .gguf file, or a built-in alias.

Every source becomes a float32 transformers model plus its tokenizer and a ModelSpec. A ``-padN``
suffix (``smollm2-135m-pad768``) gives that model zero-padded to hidden size N (d2quant.padding).
``load_source(..., stream=True)`` gives a skeleton on the meta device instead, whose weights are
read from the safetensors or the .gguf one module at a time as calibration reaches them
(d2quant.weights); a GGUF's tensors are dequantized one by one, never the whole file.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors.torch import save_file

from d2quant.errors import D2Error
from d2quant.aliases import alias_path
from d2quant.families import families, supported_hf_classes
from d2quant.padding import pad_model, pad_shape, param_count
from d2quant.qmodel import ModelSpec
from d2quant.weights import GGUFWeights, ResidentWeights, SafetensorsWeights, open_gguf, skeleton

DEFAULT_MODEL = "smollm2-135m"


def gguf_archs() -> list[str]:
    """GGUF architectures that load as one of our families (transformers reads them)."""
    return sorted({a for f in families() for a in (f.model_type, *f.gguf_model_types, *f.gguf_archs)}
                  & {"llama", "mistral", "qwen2", "qwen3", "gemma3", "phi3"})
# MODEL-padN: MODEL zero-padded to hidden size N, an exactly equivalent model (d2quant.padding)
_PADDED = re.compile(r"^(?P<base>.+)-pad(?P<hidden>\d+)$")


@dataclass
class Source:
    model: torch.nn.Module  # transformers *ForCausalLM, float32, eval mode
    tokenizer: object
    spec: ModelSpec
    info: dict  # {"kind": "hf"|"gguf", "path": str, "name": str}
    weights: ResidentWeights | SafetensorsWeights | GGUFWeights = field(default_factory=ResidentWeights)


def resolve(model: str | None) -> tuple[str, Path]:
    """(kind, path) for a MODEL argument: kind is 'hf' or 'gguf'."""
    model = model or DEFAULT_MODEL
    path = Path(model).expanduser()
    if not path.exists():
        if "/" in model or model.endswith(".gguf"):
            raise D2Error(f"model path {model} does not exist")
        return "gguf", alias_path(model)
    if path.is_file():
        with open(path, "rb") as f:
            if f.read(4) != b"GGUF":
                raise D2Error(f"{path} is not a GGUF file (bad magic); pass a .gguf file or a "
                              "Hugging Face model directory")
        return "gguf", path
    if not (path / "config.json").is_file():
        raise D2Error(f"{path} is a directory without config.json; pass a Hugging Face model "
                      "directory (config.json + safetensors) or a .gguf file")
    return "hf", path


def _check_gguf_arch(path: Path):
    """The file's GGUFReader, once its architecture is known to be supported."""
    reader, arch = open_gguf(path)
    if arch not in gguf_archs():
        raise D2Error(f"GGUF architecture {arch!r} is not supported; supported: {', '.join(gguf_archs())}")
    return reader


def _check_hf_arch(path: Path) -> None:
    try:
        cfg = json.loads((path / "config.json").read_text())
    except Exception as e:
        raise D2Error(f"{path}/config.json is unreadable ({e})")
    archs = cfg.get("architectures") or [cfg.get("model_type")]
    if not any(a in supported_hf_classes() for a in archs):
        raise D2Error(f"unsupported architecture {archs}; supported: {', '.join(supported_hf_classes())}")


def _cache_dir(path: Path) -> Path:
    """Decoding a GGUF to float takes ~40 s on two cores; its float copy loads in ~1 s."""
    st = path.stat()
    key = hashlib.sha1(f"{path.resolve()}:{st.st_size}:{st.st_mtime_ns}".encode()).hexdigest()[:16]
    root = Path(os.environ.get("D2EXPORT_CACHE", Path.home() / ".cache" / "d2export"))
    return root / f"{path.stem}-{key}"


def _gguf_cache(path: Path) -> str | None:
    d = _cache_dir(path)
    return str(d) if (d / "config.json").is_file() else None


def _fill_gguf_cache(path: Path, model, tokenizer) -> None:
    d, tmp = _cache_dir(path), None
    try:
        d.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=".tmp-", dir=d.parent))
        # save_pretrained refuses models transformers loaded from GGUF; their float state is plain
        state = {k: v.contiguous() for k, v in model.state_dict().items()}
        if model.config.tie_word_embeddings:
            state.pop("lm_head.weight", None)
        save_file(state, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        model.config.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        os.replace(tmp, d)
    except (OSError, ValueError):  # a read-only or full cache only costs time
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)


def load_source(model: str | None, stream: bool = False) -> Source:
    padded = _PADDED.match(model or "")
    if padded and not Path(model).expanduser().exists():
        if stream:
            raise D2Error(f"{model} is padded in memory, so it cannot be streamed; drop --stream")
        return pad_source(load_source(padded["base"]), int(padded["hidden"]))
    if stream:
        return _stream_source(model)
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # our own progress display owns the terminal
    kind, path = resolve(model)
    try:
        if kind == "gguf":
            folder, kw = _gguf_cache(path), {}
            if folder is None:  # a cached float copy was made from this file once its arch passed
                _check_gguf_arch(path)
                folder, kw = str(path.parent), {"gguf_file": path.name}
        else:
            _check_hf_arch(path)
            kw, folder = {}, str(path)
        m = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32, **kw)
        tok = AutoTokenizer.from_pretrained(folder, **kw)
        if kw:
            _fill_gguf_cache(path, m, tok)
    except D2Error:
        raise
    except Exception as e:
        raise D2Error(f"cannot load model {path} ({type(e).__name__}: {str(e).splitlines()[0][:200]})")
    spec = ModelSpec.from_hf_config(m.config)
    for name, p in m.named_parameters():
        if not torch.isfinite(p).all():
            raise D2Error(f"model {path} has NaN/Inf values in {name}; the weights are corrupt")
    return Source(model=m.eval(), tokenizer=tok, spec=spec,
                  info={"kind": kind, "path": str(path.resolve()), "name": model or DEFAULT_MODEL})


def _stream_source(model: str | None) -> Source:
    from transformers import AutoConfig, AutoTokenizer

    kind, path = resolve(model)
    reader = None
    if kind == "gguf":
        reader = _check_gguf_arch(path)
        folder, kw = str(path.parent), {"gguf_file": path.name}
    else:
        _check_hf_arch(path)
        folder, kw = str(path), {}
    try:
        config = AutoConfig.from_pretrained(folder, **kw)
        tok = AutoTokenizer.from_pretrained(folder, **kw)
    except Exception as e:
        raise D2Error(f"cannot load model {path} ({type(e).__name__}: {str(e).splitlines()[0][:200]})")
    m = skeleton(config)
    weights = GGUFWeights(path, m, reader) if kind == "gguf" else SafetensorsWeights(path)
    return Source(model=m, tokenizer=tok, spec=ModelSpec.from_hf_config(m.config), weights=weights,
                  info={"kind": kind, "path": str(path.resolve()), "name": model or DEFAULT_MODEL})


def pad_source(src: Source, hidden_to: int = 768, heads_to: int | None = None,
               ffn_to: int | None = None) -> Source:
    """The source zero-padded to ``hidden_to`` (d2quant.padding), an exactly equivalent model;
    ``info["real_params"]`` keeps the unpadded parameter count for bits-per-weight figures."""
    model = pad_model(src.model, hidden_to, heads_to, ffn_to)
    s = pad_shape(src.model.config, hidden_to, heads_to, ffn_to)
    info = {**src.info, "name": f"{src.info.get('name', 'model')}-pad{hidden_to}",
            "real_params": src.info.get("real_params", param_count(src.model)),
            "padded_from": {"hidden": s.hidden, "heads": s.heads, "kv_heads": s.kv_heads, "ffn": s.ffn}}
    return Source(model=model, tokenizer=src.tokenizer, spec=ModelSpec.from_hf_config(model.config), info=info)
