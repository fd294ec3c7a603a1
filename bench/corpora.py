"""Out-of-domain evaluation corpora: English text unlike wikitext, built offline and deterministically.

Every quality benchmark scores on these besides wikitext-2 test, and never calibrates on them
(``check_not_calibration`` refuses it). Each corpus is made from a pinned package of a registry this
machine reaches, by a stdlib-only recipe, and checked against a pinned SHA-256 of the result, so a
number measured on it names exactly one text.

=========  =====================================================  ==========================  =========
name       text                                                   source                      licence
=========  =====================================================  ==========================  =========
gutenberg  *Alice's Adventures in Wonderland*, *Botchan* (English  PyPI sdists Brotli 1.1.0    public
           translation), the 1992 Library of Congress Workshop     (Canterbury corpus test     domain
           on Electronic Texts proceedings: literature and         data) and sentencepiece     (Project
           essays, 0.8 M characters                                0.2.0 (test data)           Gutenberg)
pydocs     the Python 3.11 documentation's tutorial, language      Debian python3.11-doc       PSF
           reference, HOWTOs and FAQ as prose: reST markup         (its reST sources under
           resolved, code and doctest blocks dropped, 1.0 M chars  html/_sources)
=========  =====================================================  ==========================  =========

Recipes (``_finish`` is shared: NFC, LF line ends, tabs and runs of spaces to one space, lines
stripped, at most one blank line in a row, one final newline):

* gutenberg: the three files are read from the sdists with ``tarfile`` in the order alice29,
  botchan, lcet10; Botchan keeps only the text between its ``*** START OF`` and ``*** END OF``
  lines, lcet10 loses its two Project Gutenberg banner lines; hard line breaks are kept.
* pydocs: the folders tutorial, reference, howto, faq in that order, their ``*.rst.txt`` files
  sorted by path (``index.rst.txt`` skipped, it is a table of contents); ``_rst_prose`` drops
  section underlines, directives other than prose admonitions (code, index, toctree, comments),
  doctest blocks and literal blocks after ``::``, unwraps paragraphs (a list item starts a new one)
  and resolves inline roles and literals to their text.

    python bench/corpora.py [NAME ...]   # fetch and build; prints path, characters and SHA-256
"""

from __future__ import annotations

import hashlib
import os
import re
import subprocess
import sys
import tarfile
import tempfile
import unicodedata
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from d2quant.errors import D2Error


def cache_dir() -> Path:
    return Path(os.environ.get("D2EXPORT_CACHE", Path.home() / ".cache" / "d2export")) / "corpora"


# ---- shared text normalisation ---------------------------------------------------------------

def _finish(text: str) -> str:
    text = unicodedata.normalize("NFC", text.replace("\r\n", "\n").replace("\r", "\n"))
    text = text.replace("\ufeff", "").replace("\t", " ")
    text = "\n".join(re.sub(r" {2,}", " ", ln).strip() for ln in text.split("\n"))
    return re.sub(r"\n{3,}", "\n\n", text).strip() + "\n"


# ---- gutenberg ----------------------------------------------------------------------------------

def _member(sdist: Path, suffix: str) -> str:
    with tarfile.open(sdist) as tar:
        names = sorted(m.name for m in tar.getmembers() if m.name.endswith(suffix))
        if len(names) != 1:
            raise D2Error(f"{sdist.name} holds {len(names)} files ending in {suffix}, expected one; "
                          "the pinned sdist is not the one the recipe was written for")
        return tar.extractfile(names[0]).read().decode("utf-8").replace("\r\n", "\n").lstrip("\ufeff")


def gutenberg_text(brotli_sdist: Path, sentencepiece_sdist: Path) -> str:
    alice = _member(brotli_sdist, "/tests/testdata/alice29.txt")
    lcet = "\n".join(ln for ln in _member(brotli_sdist, "/tests/testdata/lcet10.txt").split("\n")
                     if not re.match(r"\s*(The Project Gutenberg Etext of|\*End of The Project Gutenberg)", ln))
    botchan = _member(sentencepiece_sdist, "/test/botchan.txt")
    start = botchan.index("\n", botchan.index("*** START OF")) + 1
    botchan = botchan[start:botchan.index("*** END OF")]
    return _finish("\n\n".join([alice, botchan, lcet]))


# ---- pydocs -------------------------------------------------------------------------------------

PYDOCS_FOLDERS = ("tutorial", "reference", "howto", "faq")
# directives whose body is prose: the directive line goes (its argument stays), the body stays
_PROSE_DIRECTIVES = {
    "note", "warning", "seealso", "versionadded", "versionchanged", "deprecated", "deprecated-removed",
    "impl-detail", "attention", "caution", "important", "tip", "hint", "admonition", "topic", "sidebar",
    "rubric", "centered", "glossary", "function", "method", "class", "attribute", "data", "exception",
    "decorator", "decoratormethod", "classmethod", "staticmethod", "describe", "opcode", "cmdoption",
    "option", "envvar", "abstractmethod", "coroutinefunction", "coroutinemethod", "only", "availability"}
_VERSION_WORDS = {"versionadded": "New in version {}.", "versionchanged": "Changed in version {}:",
                  "deprecated": "Deprecated since version {}:",
                  "deprecated-removed": "Deprecated since version {}, will be removed:"}
_ADORNMENT = re.compile(r"([=\-~^\"'`#*+.:_])\1{2,}")
_DIRECTIVE = re.compile(r"\.\.\s+([\w:-]+)::(.*)")
_LIST_ITEM = re.compile(r"([-*+\u2022]|#\.|\d+\.|\(\d+\)|:[\w -]+:)\s")


def _role_text(m: re.Match) -> str:
    kind, text = m.group(1), re.sub(r"\s*<[^>]*>$", "", m.group(2))  # `text <target>` -> text
    if kind in ("pep", "rfc"):
        return f"{kind.upper()} {text.split('#')[0]}"
    text = text.lstrip("!")
    return text[1:].split(".")[-1] if text.startswith("~") else text


def _inline(s: str) -> str:
    s = re.sub(r":(?:[a-zA-Z0-9_+-]+:)*([a-zA-Z0-9_+-]+):`([^`]*)`", _role_text, s)
    s = re.sub(r"``(.+?)``", r"\1", s)
    s = re.sub(r"`([^`<]*?)\s*<[^>`]*>`__?", r"\1", s)
    s = re.sub(r"`([^`]+)`_{1,2}", r"\1", s)
    s = re.sub(r"`([^`]+)`", r"\1", s)
    s = re.sub(r"\*\*(\S[^*]*?)\*\*", r"\1", s)
    s = re.sub(r"(?<![\w*])\*(\S[^*]*?)\*(?![\w*])", r"\1", s)
    return re.sub(r"\\(.)", r"\1", s)


def _indent(line: str) -> int:
    return len(line) - len(line.lstrip(" "))


def _rst_prose(src: str) -> str:
    """The prose of one reST page: one paragraph per line, blank lines between."""
    lines = src.replace("\r\n", "\n").split("\n")
    out, i, n = [], 0, len(lines)

    def past_block(j: int, base: int) -> int:  # first line at or below indent ``base`` after j
        while j < n and (not lines[j].strip() or _indent(lines[j]) > base):
            j += 1
        return j

    while i < n:
        line, s = lines[i], lines[i].strip()
        if _ADORNMENT.fullmatch(s):
            i += 1
        elif s.startswith(".."):
            m = _DIRECTIVE.match(s)
            if m and m.group(1).split(":")[-1] in _PROSE_DIRECTIVES:
                name, arg = m.group(1), m.group(2).strip()
                if name in _VERSION_WORDS and arg:
                    version, rest = arg.split()[0], arg.partition(" ")[2].strip()
                    arg = _VERSION_WORDS[name].format(version) + (f" {rest}" if rest else "")
                if arg and name != "only":
                    out.append(" " * _indent(line) + arg)
                i += 1
                while i < n and re.match(r"\s+:[\w -]+:", lines[i]):  # the directive's options
                    i += 1
            else:  # code-block, index, toctree, comments, link targets ...
                i = past_block(i + 1, _indent(line))
                out.append("")
        elif s.startswith(">>>"):  # a doctest block runs to the next blank line
            while i < n and lines[i].strip():
                i += 1
            out.append("")
        elif s.endswith("::"):  # a literal block follows
            text = s[:-2].rstrip()
            if text:
                out.append(" " * _indent(line) + text + ("" if text[-1] in ".:!?;," else ":"))
            i += 1
            while i < n and not lines[i].strip():
                i += 1
            i = past_block(i, _indent(line))
            out.append("")
        else:
            out.append(line)
            i += 1
    paragraphs = []
    for block in re.split(r"\n\s*\n", "\n".join(out)):
        current: list[str] = []
        for ln in (t.strip() for t in block.split("\n")):
            if not ln:
                continue
            if current and _LIST_ITEM.match(ln):
                paragraphs.append(" ".join(current))
                current = []
            current.append(ln)
        if current:
            paragraphs.append(" ".join(current))
    return "\n\n".join(_inline(p) for p in paragraphs)


def pydocs_text(sources: Path) -> str:
    """``sources``: the html/_sources folder of the Python documentation."""
    pages = []
    for folder in PYDOCS_FOLDERS:
        files = sorted((sources / folder).rglob("*.rst.txt"), key=lambda p: p.as_posix())
        if not files:
            raise D2Error(f"{sources / folder} holds no .rst.txt pages; the documentation package "
                          "does not have the layout the recipe was written for")
        pages += [_rst_prose(f.read_text(encoding="utf-8")) for f in files if f.name != "index.rst.txt"]
    return _finish("\n\n".join(p for p in pages if p.strip()))


# ---- fetching -----------------------------------------------------------------------------------

def _run(cmd: list[str], cwd: Path, what: str) -> None:
    try:
        subprocess.run(cmd, cwd=cwd, check=True, capture_output=True, text=True)
    except FileNotFoundError:
        raise D2Error(f"{what}: `{cmd[0]}` is not on this machine") from None
    except subprocess.CalledProcessError as e:
        last = (e.stderr or e.stdout or "").strip().splitlines()
        raise D2Error(f"{what}: `{' '.join(cmd)}` failed ({last[-1][:200] if last else e.returncode})") from None


def _sdist(name: str, version: str, into: Path) -> Path:
    want = f"{name.lower()}-{version}.tar.gz"

    def found() -> Path | None:
        return next((p for p in sorted(into.glob("*.tar.gz")) if p.name.lower() == want), None)

    if found() is None:
        _run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--no-binary", ":all:",
              "-d", str(into), f"{name}=={version}"], into, f"the PyPI package {name}=={version}")
    if (path := found()) is None:
        raise D2Error(f"pip downloaded no sdist of {name}=={version} into {into}")
    return path


def _debian(package: str, versions: tuple[str, ...], into: Path) -> Path:
    """The extracted tree of a Debian package, at the first of ``versions`` apt still serves."""
    tree = into / f"x_{package}"
    if tree.is_dir():
        return tree
    for v in versions:
        try:
            _run(["apt-get", "download", "-q", f"{package}={v}"], into, f"the Debian package {package}")
            break
        except D2Error as e:
            last = e
    else:
        raise D2Error(f"{last}; the corpus needs one of the versions {', '.join(versions)}")
    deb = sorted(into.glob(f"{package}_*.deb"))[-1]
    tmp = Path(tempfile.mkdtemp(prefix=f".x_{package}.", dir=into))
    _run(["dpkg-deb", "-x", str(deb), str(tmp)], into, f"unpacking {deb.name}")
    tmp.rename(tree)
    return tree


@dataclass(frozen=True)
class Corpus:
    name: str
    sha256: str  # of the built text, UTF-8
    build: Callable[[Path], str]  # fetch what it needs into the folder, return the text
    about: str


def _build_gutenberg(src: Path) -> str:
    return gutenberg_text(_sdist("Brotli", "1.1.0", src), _sdist("sentencepiece", "0.2.0", src))


def _build_pydocs(src: Path) -> str:
    # the four prose folders are byte-identical in both security updates seen so far
    tree = _debian("python3.11-doc", ("3.11.2-6+deb12u9", "3.11.2-6+deb12u8"), src)
    return pydocs_text(tree / "usr/share/doc/python3.11/html/_sources")


CORPORA = {c.name: c for c in (
    Corpus("gutenberg", "2569c2a248046f905976369d2f1d9ebcb67e28c7e061f7344a83057232c2705c",
           _build_gutenberg, "literature and essays (Project Gutenberg)"),
    Corpus("pydocs", "ec2fc09aff6b27e1f0575c0bded5e19d43da1624ab9e63edaad3648570daf192",
           _build_pydocs, "Python 3.11 documentation prose"),
)}


def corpus_path(name: str) -> Path:
    """The built text of corpus ``name`` (fetched and built on first use, then checked)."""
    if name not in CORPORA:
        raise D2Error(f"unknown corpus {name!r}; known: {', '.join(CORPORA)}")
    corpus, root = CORPORA[name], cache_dir()
    out = root / f"{name}.txt"
    if out.is_file() and hashlib.sha256(out.read_bytes()).hexdigest() == corpus.sha256:
        return out
    src = root / "src"
    src.mkdir(parents=True, exist_ok=True)
    data = corpus.build(src).encode("utf-8")
    digest = hashlib.sha256(data).hexdigest()
    if digest != corpus.sha256:
        raise D2Error(f"corpus {name} built to SHA-256 {digest[:16]}..., not the pinned "
                      f"{corpus.sha256[:16]}...: its source package changed, so numbers on it would "
                      "not be comparable; pin the source or update the recipe and the hash together")
    tmp = out.with_suffix(".part")
    tmp.write_bytes(data)
    tmp.replace(out)
    return out


def check_not_calibration(calib: str) -> None:
    """Refuse calibrating on an evaluation corpus: every out-of-domain number would be in-domain."""
    try:
        path = Path(calib).resolve()
    except (OSError, ValueError):
        return
    root = cache_dir().resolve()
    if path == root or root in path.parents:
        raise D2Error(f"--calib {calib} is an evaluation corpus; calibrate on other text")


def main(argv: list[str]) -> int:
    try:
        for name in argv or list(CORPORA):
            p = corpus_path(name)
            print(f"{name}: {p} ({len(p.read_text(encoding='utf-8')):,} characters, sha256 "
                  f"{CORPORA[name].sha256}) - {CORPORA[name].about}")
    except D2Error as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
