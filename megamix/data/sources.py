"""Text sources of the default multi-domain corpus.

Each :class:`Source` names a domain, the Debian packages it needs (``apt_packages``, fetched into
the cache with ``apt-get download`` + ``dpkg-deb -x``; empty for text already on this machine),
its license, and a reader that yields ``(text, source_path)`` documents in a seeded random order.
Readers never touch the network; :mod:`megamix.data.fetch` provides the unpacked package roots.
"""
from __future__ import annotations

import gzip
import html
import platform
import random
import re
import subprocess
import sysconfig
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator

Doc = tuple[str, str]  # (text, source path / id)


@dataclass
class SourceContext:
    """What a reader gets: unpacked package roots and a seeded RNG."""

    roots: dict[str, Path]  # apt package -> unpacked root (``dpkg-deb -x`` target)
    rng: random.Random


@dataclass(frozen=True)
class Source:
    """One domain of the default corpus."""

    name: str
    description: str
    reader: Callable[[SourceContext], Iterator[Doc]]
    license: str
    apt_packages: tuple[str, ...] = ()
    local_packages: tuple[str, ...] = ()  # installed Debian packages recorded for provenance
    source_paths: tuple[str, ...] = ()  # human-readable description of where the text comes from
    license_files: tuple[str, ...] = ()  # relative to a package root (apt) or absolute (local)
    default: bool = True
    revision: int = 1  # bump when the reader changes, so cached corpora are rebuilt
    extra: dict = field(default_factory=dict)

    @property
    def needs_network(self) -> bool:
        return bool(self.apt_packages)


# ----------------------------------------------------------------------------- helpers
def _read_text(path: Path) -> str:
    data = path.read_bytes()
    if path.suffix == ".gz":
        data = gzip.decompress(data)
    return data.decode("utf-8", errors="replace")


def _shuffled(paths: list[Path], rng: random.Random) -> list[Path]:
    paths = sorted(paths)
    rng.shuffle(paths)
    return paths


def _files(paths: list[Path], rng: random.Random) -> Iterator[Doc]:
    for p in _shuffled(paths, rng):
        try:
            yield _read_text(p), str(p)
        except OSError:
            continue


_DICTD_B64 = {c: i for i, c in enumerate(
    "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/")}


def _dictd_num(s: str) -> int:
    n = 0
    for c in s:
        n = n * 64 + _DICTD_B64[c]
    return n


def read_dictd(dict_dz: Path, index: Path) -> list[tuple[str, str]]:
    """Entries ``(headword, body)`` of a dictd database (``.dict.dz`` is gzip-compatible).

    Headwords that point at the same body are kept once; ``00-database-*`` metadata is skipped.
    """
    data = gzip.decompress(dict_dz.read_bytes())
    out, seen = [], set()
    for line in index.read_text(encoding="utf-8", errors="replace").splitlines():
        parts = line.split("\t")
        if len(parts) < 3 or parts[0].startswith("00-database") or parts[0].startswith("00database"):
            continue
        off, ln = _dictd_num(parts[1]), _dictd_num(parts[2])
        if (off, ln) in seen:
            continue
        seen.add((off, ln))
        body = data[off:off + ln].decode("utf-8", errors="replace")
        out.append((parts[0], body))
    return out


_TAG = re.compile(r"<[^>\n]{1,40}>")


def _dictd_docs(ctx: SourceContext, specs: list[tuple[str, str]]) -> Iterator[Doc]:
    """``specs``: (package, dictd basename). Dictionary entries in a seeded random order."""
    entries = []
    for pkg, base in specs:
        d = ctx.roots[pkg] / "usr/share/dictd"
        for head, body in read_dictd(d / f"{base}.dict.dz", d / f"{base}.index"):
            entries.append((body, f"{pkg}:{base}#{head}"))
    ctx.rng.shuffle(entries)
    for body, src in entries:
        yield _TAG.sub("", body), src


def _fortune_docs(dirs: list[Path], rng: random.Random) -> Iterator[Doc]:
    items = []
    for d in dirs:
        for f in sorted(d.iterdir()):
            if f.is_symlink() or not f.is_file() or f.suffix in (".dat", ".u8"):
                continue
            text = f.read_bytes().decode("utf-8", errors="replace")
            for i, entry in enumerate(re.split(r"\n%\n", text)):
                entry = entry.strip("\n%")
                if entry.strip():
                    items.append((entry, f"{f}#{i}"))
    rng.shuffle(items)
    yield from items


# ----------------------------------------------------------------------------- local readers
def python_stdlib_dir() -> Path:
    """The interpreter's standard-library folder (not the venv's site-packages)."""
    return Path(sysconfig.get_paths()["stdlib"])


def _read_code_python(ctx: SourceContext) -> Iterator[Doc]:
    root = python_stdlib_dir()
    skip = ("site-packages", "test", "tests", "idle_test", "__pycache__", "dist-packages")
    paths = [p for p in root.rglob("*.py") if not any(s in p.relative_to(root).parts for s in skip)]
    yield from _files(paths, ctx.rng)


def _read_code_c(ctx: SourceContext) -> Iterator[Doc]:
    yield from _files([p for p in Path("/usr/include").rglob("*.h") if p.is_file()], ctx.rng)


def _read_legal(ctx: SourceContext) -> Iterator[Doc]:
    lic = [p for p in Path("/usr/share/common-licenses").iterdir() if p.is_file()]
    cps = [p for p in Path("/usr/share/doc").glob("*/copyright") if p.is_file()]
    yield from _files(lic + cps, ctx.rng)


def _read_changelogs(ctx: SourceContext) -> Iterator[Doc]:
    yield from _files([p for p in Path("/usr/share/doc").glob("*/changelog.Debian.gz")
                       if p.is_file()], ctx.rng)


def render_manpage(path: Path, timeout: float = 20.0) -> str:
    """Render one (gzipped) man page to plain UTF-8 text with groff; '' if it is a ``.so`` stub."""
    raw = _read_text(path)
    if raw.lstrip().startswith(".so ") and raw.count("\n") <= 2:
        return ""
    res = subprocess.run(["groff", "-man", "-Tutf8", "-P", "-cbou"], input=raw.encode(),
                         capture_output=True, timeout=timeout)
    return re.sub(r"\n{3,}", "\n\n", res.stdout.decode("utf-8", errors="replace"))


_MAN_SKIP = ("gcloud", "bq.", "gsutil")


def _read_manpages(ctx: SourceContext) -> Iterator[Doc]:
    # the ~16k near-identical Google Cloud SDK pages on some images would swamp the domain
    paths = [p for n in range(1, 9) for p in Path(f"/usr/share/man/man{n}").glob("*.gz")
             if p.is_file() and not p.is_symlink() and not p.name.startswith(_MAN_SKIP)]
    for p in _shuffled(paths, ctx.rng):
        try:
            text = render_manpage(p)
        except (OSError, subprocess.SubprocessError):
            continue
        if text.strip():
            yield text, str(p)


# ----------------------------------------------------------------------------- apt readers
def _read_docs_python(ctx: SourceContext) -> Iterator[Doc]:
    root = ctx.roots["python3.11-doc"] / "usr/share/doc/python3.11/html/_sources"
    yield from _files([p for p in root.rglob("*.rst.txt") if p.is_file()], ctx.rng)


def _read_dictionary(ctx: SourceContext) -> Iterator[Doc]:
    yield from _dictd_docs(ctx, [("dict-gcide", "gcide")])


def _read_lexicon(ctx: SourceContext) -> Iterator[Doc]:
    yield from _dictd_docs(ctx, [("dict-foldoc", "foldoc"), ("dict-jargon", "jargon")])


def _read_quotes_en(ctx: SourceContext) -> Iterator[Doc]:
    yield from _fortune_docs([ctx.roots["fortunes"] / "usr/share/games/fortunes"], ctx.rng)


def _read_quotes_de(ctx: SourceContext) -> Iterator[Doc]:
    yield from _fortune_docs([ctx.roots["fortunes-de"] / "usr/share/games/fortunes/de"], ctx.rng)


def _read_docs_debian(ctx: SourceContext) -> Iterator[Doc]:
    """Debian Policy (plain text) and the Debian Reference (HTML rendered to text)."""
    docs = []
    pol = ctx.roots["debian-policy"] / "usr/share/doc/debian-policy"
    for p in sorted(pol.glob("*.txt.gz")) + sorted(pol.glob("*.txt")):
        text = _read_text(p)
        # split the policy manual into its numbered chapters
        for i, part in enumerate(re.split(r"\n(?=[^\n]+\n\*{5,}\n)", text)):  # at "****" headings
            if part.strip():
                docs.append((part, f"{p}#{i}"))
    ref = ctx.roots["debian-reference-en"] / "usr/share/debian-reference"
    for p in sorted(ref.rglob("*.en.html")):
        docs.append((html_to_text(p.read_text(encoding="utf-8", errors="replace")), str(p)))
    ctx.rng.shuffle(docs)
    yield from docs


def _need_pip(module: str, pip_spec: str, domain: str):
    try:
        return __import__(module)
    except ImportError as e:
        raise RuntimeError(f"domain {domain!r} needs the Python package {pip_spec}: "
                           f"pip install torch==2.13.0 {pip_spec}") from e


def read_r_lazyload(rdx: Path, rdb: Path) -> dict[str, object]:
    """Objects of an R lazy-load database (``.rdx`` index + ``.rdb`` chunks), via ``rdata``.

    The ``.rdx`` is a gzip-compressed serialized list whose ``variables`` map names to
    ``(offset, length)`` in the ``.rdb``; each chunk is a 4-byte length followed by a zlib stream.
    """
    import warnings
    import zlib

    rdata = _need_pip("rdata", "rdata==1.1.0", "novels")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "Unknown file type: assumed RDS"
        index = rdata.conversion.convert(rdata.parser.parse_data(rdx.read_bytes()))
        blob = rdb.read_bytes()
        out = {}
        for name, (off, ln) in index["variables"].items():
            chunk = blob[int(off):int(off) + int(ln)]
            out[str(name)] = rdata.conversion.convert(rdata.parser.parse_data(zlib.decompress(chunk[4:])))
    return out


_CHAPTER = re.compile(r"^(?:CHAPTER|Chapter)\s+[IVXLC\d]+\.?\s*$", re.M)


def _read_novels(ctx: SourceContext) -> Iterator[Doc]:
    """Jane Austen's six novels, one document per chapter."""
    d = ctx.roots["r-cran-janeaustenr"] / "usr/lib/R/site-library/janeaustenr/data"
    docs = []
    for name, lines in sorted(read_r_lazyload(d / "Rdata.rdx", d / "Rdata.rdb").items()):
        text = "\n".join(str(x) for x in lines)
        starts = [m.start() for m in _CHAPTER.finditer(text)] or [0]
        bounds = starts + [len(text)]
        for i in range(len(starts)):
            docs.append((text[bounds[i]:bounds[i + 1]], f"janeaustenr:{name}#chapter{i + 1}"))
    ctx.rng.shuffle(docs)
    yield from docs


def _read_bible(ctx: SourceContext) -> Iterator[Doc]:
    """The King James Bible (SWORD module), one document per chapter. Slow: ~70 s for all of it."""
    _need_pip("pysword", "pysword==0.2.8", "religious_kjv")
    from pysword.modules import SwordModules

    mods = SwordModules(str(ctx.roots["sword-text-kjv"] / "usr/share/sword"))
    found = mods.parse_modules()
    if not found:
        raise RuntimeError("sword-text-kjv holds no SWORD module")
    bible = mods.get_bible_from_module(next(iter(found)))
    chapters = [(bk.name, c) for part in bible.get_structure().get_books().values() for bk in part
                for c in range(1, bk.num_chapters + 1)]
    ctx.rng.shuffle(chapters)
    for book, c in chapters:
        text = bible.get(books=[book], chapters=[c], clean=True, join="\n")
        yield f"{book} {c}\n\n" + "\n".join(v.strip() for v in text.split("\n")), f"kjv:{book}.{c}"


_SCRIPT = re.compile(r"<(script|style)\b.*?</\1>", re.S | re.I)
_BLOCK = re.compile(r"</?(p|div|br|li|h\d|pre|tr|table|dt|dd|section)\b[^>]*>", re.I)
_ANYTAG = re.compile(r"<[^>]+>")


def html_to_text(s: str) -> str:
    """A small HTML-to-text conversion: drop scripts/styles, newline at block tags, unescape."""
    s = _SCRIPT.sub("", s)
    s = _BLOCK.sub("\n", s)
    s = html.unescape(_ANYTAG.sub("", s))
    return re.sub(r"\n\s*\n+", "\n\n", s)


# ----------------------------------------------------------------------------- registry
SOURCES: dict[str, Source] = {s.name: s for s in [
    Source("code_python", "Python standard library source (.py, tests excluded)", _read_code_python,
           license="PSF-2.0", local_packages=(),
           source_paths=(str(python_stdlib_dir()) + "/**/*.py",),
           license_files=(str(python_stdlib_dir() / "LICENSE.txt"),),
           extra={"package": f"python{platform.python_version()} (interpreter stdlib)",
                  "version": platform.python_version()}),
    Source("code_c", "C headers under /usr/include", _read_code_c,
           license="LGPL-2.1+ (glibc), GPL-2.0 WITH Linux-syscall-note, others per header",
           local_packages=("libc6-dev", "linux-libc-dev"), source_paths=("/usr/include/**/*.h",),
           license_files=("/usr/share/doc/libc6-dev/copyright", "/usr/share/doc/linux-libc-dev/copyright")),
    Source("manpages", "man pages rendered to text with groff", _read_manpages,
           license="various free licenses (per page)", local_packages=("manpages", "manpages-dev", "man-db"),
           source_paths=("/usr/share/man/man[1-8]/*.gz",),
           license_files=("/usr/share/doc/manpages/copyright",), revision=2),
    Source("legal", "license texts and Debian copyright files", _read_legal,
           license="license texts (verbatim copying permitted)", local_packages=("base-files",),
           source_paths=("/usr/share/common-licenses/*", "/usr/share/doc/*/copyright"),
           license_files=("/usr/share/common-licenses",)),
    Source("changelogs", "Debian package changelogs", _read_changelogs,
           license="per package (see /usr/share/doc/<pkg>/copyright)",
           source_paths=("/usr/share/doc/*/changelog.Debian.gz",),
           license_files=("/usr/share/doc/<pkg>/copyright",)),
    Source("docs_python", "Python 3.11 documentation, reStructuredText sources", _read_docs_python,
           license="PSF-2.0", apt_packages=("python3.11-doc",),
           source_paths=("usr/share/doc/python3.11/html/_sources/**/*.rst.txt",),
           license_files=("usr/share/doc/python3.11-doc/copyright",)),
    Source("dictionary", "GCIDE English dictionary entries (Webster 1913 + WordNet)", _read_dictionary,
           license="GPL-3+", apt_packages=("dict-gcide",),
           source_paths=("usr/share/dictd/gcide.dict.dz",),
           license_files=("usr/share/doc/dict-gcide/copyright",)),
    Source("lexicon_computing", "FOLDOC and the Jargon File (computing lexicons)", _read_lexicon,
           license="FOLDOC license (free); Jargon File public domain",
           apt_packages=("dict-foldoc", "dict-jargon"),
           source_paths=("usr/share/dictd/foldoc.dict.dz", "usr/share/dictd/jargon.dict.dz"),
           license_files=("usr/share/doc/dict-foldoc/copyright", "usr/share/doc/dict-jargon/copyright")),
    Source("quotes_en", "English fortune-cookie quotes", _read_quotes_en,
           license="BSD-4-clause and various", apt_packages=("fortunes",),
           source_paths=("usr/share/games/fortunes/*",),
           license_files=("usr/share/doc/fortunes/copyright",)),
    Source("quotes_de", "German fortune-cookie quotes (fortunes-de)", _read_quotes_de,
           license="GPL-2+", apt_packages=("fortunes-de",),
           source_paths=("usr/share/games/fortunes/de/*",),
           license_files=("usr/share/doc/fortunes-de/copyright",)),
    Source("novels", "Jane Austen's six novels, by chapter (r-cran-janeaustenr, read with rdata)",
           _read_novels, license="text public domain; package MIT", apt_packages=("r-cran-janeaustenr",),
           source_paths=("usr/lib/R/site-library/janeaustenr/data/Rdata.rdb",),
           license_files=("usr/share/doc/r-cran-janeaustenr/copyright",), extra={"pip": "rdata==1.1.0"}),
    Source("religious_kjv", "King James Bible by chapter (sword-text-kjv, read with pysword)",
           _read_bible, license="public domain", apt_packages=("sword-text-kjv",),
           source_paths=("usr/share/sword/modules/texts/ztext/engKJV2006eb",),
           license_files=("usr/share/doc/sword-text-kjv/copyright",),
           extra={"pip": "pysword==0.2.8"}),
    Source("docs_debian", "Debian Policy manual and Debian Reference", _read_docs_debian,
           license="GPL-2+", apt_packages=("debian-policy", "debian-reference-en"),
           source_paths=("usr/share/doc/debian-policy/*.txt.gz", "usr/share/debian-reference/*.en.html"),
           license_files=("usr/share/doc/debian-policy/copyright",
                          "usr/share/doc/debian-reference-en/copyright"),
           default=False, revision=2),
]}

DEFAULT_DOMAINS: tuple[str, ...] = tuple(n for n, s in SOURCES.items() if s.default)
LOCAL_DOMAINS: tuple[str, ...] = tuple(n for n, s in SOURCES.items() if not s.needs_network)


def get_sources(names: list[str] | tuple[str, ...] | None) -> list[Source]:
    """Resolve domain names (``None`` = the default set) with a clear error for unknown ones."""
    if names is None or len(names) == 0:
        names = DEFAULT_DOMAINS
    bad = [n for n in names if n not in SOURCES]
    if bad:
        raise ValueError(f"unknown domain(s) {bad}; known domains: {sorted(SOURCES)}")
    return [SOURCES[n] for n in names]
