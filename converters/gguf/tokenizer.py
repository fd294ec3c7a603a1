"""The tokenizer, chat template and descriptive metadata a GGUF carries, taken from the source.

A GGUF source: every ``tokenizer.*`` and descriptive ``general.*`` field is copied byte for byte,
so the exported file tokenizes and chats exactly like the original. An HF source: a byte-level BPE
(gpt2-style) tokenizer is written the way convert_hf_to_gguf does it (tokens, token types, merges,
special ids, add-bos/eos flags, chat template). SentencePiece-style tokenizers from HF are not
handled yet (D2Error).
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path
from typing import Any, Callable

import gguf
from gguf import GGUFValueType, TokenType

from d2quant.errors import D2Error
from d2quant.qmodel import QuantizedModel

# general.* fields that describe the model (copied) rather than this file (written fresh)
_FILE_FIELDS = {"general.architecture", "general.file_type", "general.quantization_version",
                "general.alignment"}


def _field_value(field) -> Any:
    """A reader field's value in the form GGUFWriter.add_key_value takes, strings as raw bytes."""
    main = field.types[0]
    if main == GGUFValueType.ARRAY:
        if field.types[-1] == GGUFValueType.STRING:
            return [bytes(field.parts[i]) for i in field.data]
        return [field.parts[i][0].item() for i in field.data]
    if main == GGUFValueType.STRING:
        return bytes(field.parts[field.data[0]])
    return field.parts[field.data[0]][0].item()


def copy_fields(writer: gguf.GGUFWriter, reader: gguf.GGUFReader, keep: Callable[[str], bool]) -> list[str]:
    """Copy the reader's key-value fields whose key ``keep`` accepts, as they are; returns the keys."""
    copied = []
    for key, field in reader.fields.items():
        if keep(key):
            sub = field.types[-1] if field.types[0] == GGUFValueType.ARRAY else None
            writer.add_key_value(key, _field_value(field), field.types[0], sub_type=sub)
            copied.append(key)
    return copied


def copy_gguf_metadata(writer: gguf.GGUFWriter, source_path: str | Path) -> list[str]:
    """Copy tokenizer.* and descriptive general.* fields of a source GGUF; returns the keys."""
    try:
        reader = gguf.GGUFReader(str(source_path))
    except Exception as e:  # missing, truncated or not a GGUF
        raise D2Error(f"cannot read the source GGUF {source_path} for its tokenizer "
                      f"({type(e).__name__}: {e}); check the file or re-quantize from it")
    copied = copy_fields(writer, reader, lambda key: key.startswith(("tokenizer.", "general."))
                         and key not in _FILE_FIELDS)
    if not any(k == "tokenizer.ggml.model" for k in copied):
        raise D2Error(f"source GGUF {source_path} has no tokenizer; export from a model that has one")
    return copied


# ---- HF tokenizers ------------------------------------------------------------------------------

def _pre_tokenizer_name(tok_json: dict) -> tuple[str, str | None]:
    """llama.cpp's pre-tokenizer name for a byte-level BPE tokenizer, and a warning if unsure.

    convert_hf_to_gguf identifies it by hashing a probe text's tokens against known models; we
    read the pre-tokenizer's structure instead, which covers the families we export.
    """
    pre = tok_json.get("pre_tokenizer") or {}
    steps = pre.get("pretokenizers", [pre]) if pre.get("type") == "Sequence" else [pre]
    types = [s.get("type") for s in steps]
    if types == ["ByteLevel"] and steps[0].get("use_regex", True):
        return "gpt-2", None
    if types == ["Digits", "ByteLevel"] and steps[0].get("individual_digits"):
        return "smollm", None
    split = next((s for s in steps if s.get("type") == "Split"), None)
    if split and "ByteLevel" in types:
        pattern = (split.get("pattern") or {}).get("Regex", "")
        if r"\p{N}{1,3}" in pattern:
            return "llama-bpe", None
        if r"\p{N}" in pattern and r"(?i:'s|'t|'re|'ve|'m|'ll|'d)" in pattern:
            return "qwen2", None
    return "default", (f"unrecognised pre-tokenizer {types}: wrote 'default'; llama.cpp may split "
                       "text differently from the original tokenizer")


def add_hf_tokenizer(writer: gguf.GGUFWriter, tokenizer, hf_config: dict, n_vocab: int) -> list[str]:
    """Write a byte-level BPE tokenizer's GGUF fields; returns warnings."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        raise D2Error(f"tokenizer {type(tokenizer).__name__} has no fast (tokenizers) backend; "
                      "GGUF export needs a tokenizer.json")
    tok_json = json.loads(backend.to_str())
    model = tok_json.get("model", {})
    if model.get("type") != "BPE" or model.get("byte_fallback"):
        raise D2Error("only byte-level BPE (gpt2-style) tokenizers can be exported from an HF "
                      "source for now; export from the model's GGUF instead")
    pre, warning = _pre_tokenizer_name(tok_json)

    vocab = tokenizer.get_vocab()
    if max(vocab.values()) >= n_vocab:
        raise D2Error(f"tokenizer has ids up to {max(vocab.values())} but the model's vocab is "
                      f"{n_vocab}; the tokenizer does not belong to this model")
    by_id = {i: t for t, i in vocab.items()}
    added = tokenizer.added_tokens_decoder
    tokens, types = [], []
    for i in range(n_vocab):
        if i not in by_id:
            tokens.append(f"[PAD{i}]")
            types.append(TokenType.UNUSED)
        elif i in added:
            tokens.append(by_id[i])
            types.append(TokenType.CONTROL if added[i].special else TokenType.USER_DEFINED)
        else:
            tokens.append(by_id[i])
            types.append(TokenType.NORMAL)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(pre)
    writer.add_token_list(tokens)
    writer.add_token_types(types)

    # gguf-py's SpecialVocab reads merges, special ids, add-bos/eos and the chat template from the
    # files save_pretrained writes; config.json supplies bos/eos ids the tokenizer files may lack.
    with tempfile.TemporaryDirectory() as tmp:
        tokenizer.save_pretrained(tmp)
        (Path(tmp) / "config.json").write_text(json.dumps(hf_config))
        special = gguf.SpecialVocab(tmp, load_merges=True, n_vocab=n_vocab)
    if getattr(tokenizer, "chat_template", None) and special.chat_template is None:
        special.chat_template = tokenizer.chat_template
    # llama.cpp's default for these depends on the pre-tokenizer, so state what the tokenizer does
    plain, full = tokenizer.encode("a", add_special_tokens=False), tokenizer.encode("a")
    extra = len(full) - len(plain)
    special.add_special_token["bos"] = extra > 0 and full[0] == tokenizer.bos_token_id
    special.add_special_token["eos"] = extra > 0 and full[-1] == tokenizer.eos_token_id
    special.add_to_gguf(writer, quiet=True)
    return [warning] if warning else []


def add_tokenizer(writer: gguf.GGUFWriter, qm: QuantizedModel) -> list[str]:
    """Tokenizer and descriptive metadata from the model's source; returns warnings."""
    src = qm.source or {}
    if src.get("kind") == "gguf" and src.get("path"):
        copy_gguf_metadata(writer, src["path"])
        return []
    if qm.tokenizer is None:
        raise D2Error("the quantized model has no tokenizer; GGUF needs one (quantize from a "
                      "source that ships tokenizer files)")
    name = Path(str(src.get("path") or qm.spec.hf_config.get("_name_or_path") or "")).name
    if name:
        writer.add_name(name)
    return add_hf_tokenizer(writer, qm.tokenizer, qm.spec.hf_config, qm.spec.vocab)
