"""Reading the reference corpus for Domain2Vec: jsonl files, passage chunking, seeded sampling and
language detection.

Domain2Vec works on *passages*: documents longer than ``max_chars`` (a novel, a whole bible) are cut
into passages at paragraph or line boundaries, so every unit the embedder sees fits its token window.
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator

import numpy as np

from megamix.configbase import ConfigError

__all__ = ["Passage", "iter_jsonl_texts", "chunk_text", "iter_passages", "sample_passages",
           "domain_file", "detect_language", "language_group", "domain_token_counts"]

CODE_EXTENSIONS = {
    ".py": "python", ".pyi": "python", ".c": "c", ".h": "c", ".cc": "cpp", ".cpp": "cpp", ".cxx": "cpp",
    ".hpp": "cpp", ".hh": "cpp", ".java": "java", ".js": "javascript", ".mjs": "javascript",
    ".ts": "typescript", ".rs": "rust", ".go": "go", ".rb": "ruby", ".sh": "shell", ".bash": "shell",
    ".pl": "perl", ".pm": "perl", ".php": "php", ".cs": "csharp", ".kt": "kotlin", ".scala": "scala",
    ".swift": "swift", ".lua": "lua", ".r": "r", ".m": "objc", ".sql": "sql", ".hs": "haskell",
    ".ml": "ocaml", ".el": "lisp", ".lisp": "lisp", ".scm": "lisp", ".f90": "fortran", ".f": "fortran",
}

_STOPWORDS = {
    "en": set("the of and to in is that it for was on with as be by this are not or his her which from "
              "at have an they you he".split()),
    "de": set("der die und das ist nicht ein eine zu den mit sich des auf für ich du er sie es wir "
              "dem im auch wie".split()),
    "fr": set("le la les et des est un une que qui dans pour pas au du sur il elle nous vous ce".split()),
    "es": set("el la los las y que en un una es por con para del se no lo al su como".split()),
}
_WORD_RE = re.compile(r"[^\W\d_]+", re.UNICODE)
_CODE_LINE_RE = re.compile(
    r"^\s*(def |class |import |from \S+ import|#\s*include|#\s*define|#\s*if|#\s*endif|public |private |"
    r"protected |static |extern |typedef |struct |return\b|if\s*\(|for\s*\(|while\s*\(|\}|\{|fn |func |"
    r"let |const |var |package |#!|elif |else:|try:|except\b|raise |self\.|@\w+|//|/\*|\*/|\w+\s*=\s*\S|"
    r"\w+(\.\w+)*\(.*\)\s*$)")
_CODE_SYMBOLS = set("{}()[];=<>_*&|#")


@dataclass
class Passage:
    """A unit of text for Domain2Vec: a document or a chunk of one. ``index`` is its position in the
    domain split's passage stream (:func:`iter_passages`), so a sample can be located again."""

    text: str
    domain: str
    source: str
    index: int = -1


def domain_file(data_dir: str | Path, domain: str, split: str) -> Path:
    """``<data_dir>/corpus/<domain>/<split>.jsonl`` (see docs/interfaces.md)."""
    return Path(data_dir) / "corpus" / domain / f"{split}.jsonl"


def iter_jsonl_texts(path: str | Path) -> Iterator[tuple[str, str]]:
    """Yield ``(text, source)`` from a jsonl file of ``{"text", "source"}`` objects."""
    from megamix.data.corpus import iter_jsonl

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist")
    for obj in iter_jsonl(path):
        yield obj["text"], str(obj.get("source", ""))


def chunk_text(text: str, max_chars: int = 1024, min_chars: int = 32) -> list[str]:
    """Cut ``text`` into passages of at most ``max_chars`` at paragraph/line boundaries.

    Passages shorter than ``min_chars`` (after stripping) are dropped unless the text has nothing else.
    Lines longer than ``max_chars`` are hard-split.
    """
    if max_chars < 16:
        raise ConfigError(f"max_chars (--max-chars) must be >= 16 (got {max_chars})")
    text = text.strip()
    if not text:
        return []
    if len(text) <= max_chars:
        return [text]
    pieces: list[str] = []
    for para in re.split(r"\n\s*\n", text):
        if len(para) <= max_chars:
            pieces.append(para)
            continue
        for line in para.split("\n"):
            while len(line) > max_chars:
                pieces.append(line[:max_chars])
                line = line[max_chars:]
            pieces.append(line)
    out: list[str] = []
    cur = ""
    for p in pieces:
        sep = "\n\n" if cur else ""
        if len(cur) + len(sep) + len(p) <= max_chars:
            cur = cur + sep + p
        else:
            if cur.strip():
                out.append(cur.strip())
            cur = p
    if cur.strip():
        out.append(cur.strip())
    kept = [c for c in out if len(c) >= min_chars]
    return kept or out[:1]


def iter_passages(data_dir: str | Path, domain: str, split: str = "train",
                  max_chars: int = 1024) -> Iterator[Passage]:
    """All passages of one domain split, in file order (``Passage.index`` counts from 0)."""
    i = 0
    for text, source in iter_jsonl_texts(domain_file(data_dir, domain, split)):
        for chunk in chunk_text(text, max_chars=max_chars):
            yield Passage(chunk, domain, source, i)
            i += 1


def sample_passages(passages: Iterable[Passage], n: int, seed: int) -> list[Passage]:
    """Seeded reservoir sample of ``n`` passages from a stream (one pass, O(n) memory).

    Deterministic for a given stream and seed; returns every passage (in stream order) when the stream
    holds at most ``n``.
    """
    if n < 1:
        raise ConfigError(f"sample size must be >= 1 (got {n}); pass --n / --docs-per-domain >= 1")
    rng = np.random.default_rng(seed)
    res: list[Passage] = []
    idx: list[int] = []
    for i, p in enumerate(passages):
        if i < n:
            res.append(p)
            idx.append(i)
        else:
            j = int(rng.integers(0, i + 1))
            if j < n:
                res[j] = p
                idx[j] = i
    order = np.argsort(idx, kind="stable")
    return [res[k] for k in order]


def detect_language(text: str, source: str = "") -> str:
    """Best-effort language label: ``code:<lang>`` (by file extension, else a code heuristic),
    ``zh``/``ja``/``ko`` (by script), ``en``/``de``/``fr``/``es`` (by stopwords), else ``other``."""
    m = re.search(r"(\.[A-Za-z0-9]+)$", source.strip())
    if m and m.group(1).lower() in CODE_EXTENSIONS:
        return "code:" + CODE_EXTENSIONS[m.group(1).lower()]
    sample = text[:4000]
    lines = [ln for ln in sample.split("\n") if ln.strip()]
    if lines:
        code_lines = sum(1 for ln in lines if _CODE_LINE_RE.match(ln) or ln.rstrip().endswith((";", "{", "}", ":", ",")))
        symbols = sum(1 for c in sample if c in _CODE_SYMBOLS) / max(1, len(sample))
        if (code_lines / len(lines) > 0.5 and symbols > 0.03) or symbols > 0.08:
            return "code:unknown"
    n = max(1, len(sample))
    cjk = sum(1 for c in sample if "\u4e00" <= c <= "\u9fff")
    kana = sum(1 for c in sample if "\u3040" <= c <= "\u30ff")
    hangul = sum(1 for c in sample if "\uac00" <= c <= "\ud7af")
    if kana / n > 0.05:
        return "ja"
    if cjk / n > 0.15:
        return "zh"
    if hangul / n > 0.15:
        return "ko"
    words = [w.lower() for w in _WORD_RE.findall(sample)]
    if not words:
        return "other"
    scores = {lang: sum(w in sw for w in words) / len(words) for lang, sw in _STOPWORDS.items()}
    best = max(scores, key=scores.get)
    return best if scores[best] >= 0.05 else "other"


def language_group(lang: str, group_by: str = "language") -> str:
    """Map a detected language to a clustering group.

    ``language``: every label is its own group (``code:python``, ``code:c``, ``en``, ``de``, ...);
    ``coarse``: all code is one ``code`` group; ``none``: one group ``all``.
    """
    if group_by == "none":
        return "all"
    if group_by == "coarse":
        return "code" if lang.startswith("code:") else lang
    if group_by == "language":
        return lang
    raise ValueError(f"group_by must be language, coarse or none (got {group_by!r})")


def domain_token_counts(data_dir: str | Path, domains: list[str]) -> dict[str, float]:
    """Training-token counts per domain: from ``tokens/manifest.json`` when present, else
    ``corpus/stats.json``, else the byte size of ``train.jsonl`` divided by 4 (a rough estimate)."""
    data_dir = Path(data_dir)
    man = data_dir / "tokens" / "manifest.json"
    if man.is_file():
        doms = json.loads(man.read_text()).get("domains", {})
        if all(d in doms and "train_tokens" in doms[d] for d in domains):
            return {d: float(doms[d]["train_tokens"]) for d in domains}
    stats = data_dir / "corpus" / "stats.json"
    if stats.is_file():
        st = json.loads(stats.read_text())
        st = st.get("domains", st)
        out = {}
        for d in domains:
            entry = st.get(d, {}) if isinstance(st, dict) else {}
            tok = entry.get("tokens", {}) if isinstance(entry, dict) else {}
            val = tok.get("train") if isinstance(tok, dict) else None
            if val is None and isinstance(entry, dict):
                val = entry.get("train_tokens")
            if val is None:
                break
            out[d] = float(val)
        else:
            return out
    out = {}
    for d in domains:
        f = domain_file(data_dir, d, "train")
        if not f.is_file():
            raise FileNotFoundError(f"no token counts for domain {d!r}: {f} missing")
        out[d] = f.stat().st_size / 4.0
    return out
