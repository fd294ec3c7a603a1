"""Built-in model aliases: GGUF files from PyPI packages, assembled from chunk packages with a checksum."""

from __future__ import annotations

import hashlib
import importlib

import pytest

from d2quant import aliases
from d2quant.aliases import ALIASES, Alias, alias_path
from d2quant.errors import D2Error


@pytest.fixture
def chunk_packages(tmp_path, monkeypatch):
    """Three fake chunk packages on sys.path, and the alias that assembles them."""
    parts = [b"GGUF" + b"a" * 100, b"b" * 50, b"c" * 7]
    root = tmp_path / "site"
    for i, data in enumerate(parts, 1):
        (root / f"fakemodel_part{i}" / "data").mkdir(parents=True)
        (root / f"fakemodel_part{i}" / "__init__.py").write_text("")
        (root / f"fakemodel_part{i}" / "data" / f"m.gguf.part{i:02d}").write_bytes(data)
    monkeypatch.syspath_prepend(str(root))
    importlib.invalidate_caches()
    monkeypatch.setenv("D2EXPORT_CACHE", str(tmp_path / "cache"))
    whole = b"".join(parts)
    alias = Alias("fake-1b", "fake", tuple(f"fakemodel_part{i}" for i in range(1, 4)),
                  tuple(f"m.gguf.part{i:02d}" for i in range(1, 4)), hashlib.sha256(whole).hexdigest(), "fake.gguf")
    return alias, whole, root


def test_chunks_assemble_once_into_the_cache(chunk_packages, monkeypatch):
    alias, whole, _ = chunk_packages
    path = alias.path()
    assert path.read_bytes() == whole and path.parent.name == "models"
    monkeypatch.setattr(aliases, "_sha256", lambda p: pytest.fail("re-hashed a checked file"))
    assert alias.path() == path  # the sidecar says it was checked: no second hash


def test_a_corrupt_assembled_file_is_rebuilt(chunk_packages):
    alias, whole, _ = chunk_packages
    path = alias.path()
    path.write_bytes(b"GGUF truncated")
    assert alias.path().read_bytes() == whole


def test_chunks_with_the_wrong_checksum_are_refused_without_leftovers(chunk_packages):
    alias, _, _ = chunk_packages
    bad = Alias(alias.name, alias.extra, alias.modules, alias.pattern, "0" * 64, alias.file_name)
    with pytest.raises(D2Error, match="assemble to SHA-256 .*reinstall them"):
        bad.path()
    cache = aliases._cache_root()
    assert not list(cache.glob("*")) if cache.exists() else True


def test_missing_chunk_packages_are_named_with_the_install(chunk_packages):
    alias, _, root = chunk_packages
    (root / "fakemodel_part2" / "data" / "m.gguf.part02").unlink()
    with pytest.raises(D2Error, match=r"needs the PyPI package fakemodel-part2: run `pip install 'd2export\[fake\]'`"):
        alias.path()


def test_unknown_alias_lists_the_built_in_ones():
    with pytest.raises(D2Error, match="smollm2-135m, gemma3-270m, qwen2.5-coder-1.5b"):
        alias_path("llama-7b")
    assert {a.extra for a in ALIASES.values()} == {"smollm2", "gemma3", "qwen-coder"}
