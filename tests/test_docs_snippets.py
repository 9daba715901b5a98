"""Every code snippet in README.md and docs/*.md is real:

- a ```python block is an excerpt of an example script that the test suite runs (its code lines appear,
  in order, in that script), so a documented API call cannot drift from a working one; or it is an
  interface listing (``class Name:  # path/to/module.py`` with fields and ``def name(...): ...``) whose
  classes, fields and methods all exist in that module;
- in a ```bash block, every ``megamix ...`` command (also as ``torchrun ... -m megamix ...``) parses with the
  real CLI parser (subcommands and flags exist), every ``make`` target exists, and every script or file a
  command runs exists;
- every relative link ``[text](path#anchor)`` points to a file or folder that exists, and an anchor into a
  ``.md`` page (or into the same page) names one of its headings, slugged as GitHub does.
"""
from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
RUN_EXAMPLES = ["examples/plain_loop.py", "examples/hf_fused_loop.py", "examples/deepspeed_loop.py",
                "examples/hf_trainer_loop.py", "examples/accelerate_loop.py", "examples/add_strategy.py",
                "examples/add_backend.py", "examples/add_kernel.py"]
#: the test files that run the examples
EXAMPLE_TESTS = ["tests/test_integration_examples.py", "tests/test_contributing.py"]


def _blocks(lang: str) -> list[tuple[str, int, str]]:
    out = []
    for doc in DOCS:
        text = doc.read_text()
        for m in re.finditer(rf"```{lang}\n(.*?)```", text, flags=re.S):
            out.append((doc.name, text[:m.start()].count("\n") + 1, m.group(1)))
    return out


def _code_lines(text: str) -> list[str]:
    lines = []
    for raw in text.splitlines():
        line = raw.split("  #")[0].strip()
        if line and not line.startswith("#"):
            lines.append(line)
    return lines


def _is_subsequence(needles: list[str], hay: list[str]) -> bool:
    it = iter(hay)
    return all(any(n == h for h in it) for n in needles)


def test_examples_are_run_by_the_suite():
    tests = "".join((ROOT / t).read_text() for t in EXAMPLE_TESTS)
    for rel in RUN_EXAMPLES:
        assert Path(rel).name in tests or Path(rel).stem in tests, f"{rel} is not run by any of {EXAMPLE_TESTS}"


def _check_interface_listing(doc: str, line: int, code: str) -> None:
    import dataclasses
    import importlib

    cls = None
    for raw in code.splitlines():
        m = re.match(r"^class (\w+).*#\s*([\w/]+)\.py", raw)
        if m:
            mod = importlib.import_module(m.group(2).replace("/", "."))
            assert hasattr(mod, m.group(1)), f"{doc}:{line}: {m.group(2)}.py has no class {m.group(1)}"
            cls = getattr(mod, m.group(1))
            names = {f.name for f in dataclasses.fields(cls)} if dataclasses.is_dataclass(cls) else set()
            continue
        if cls is None:
            continue
        for name in re.findall(r"def (\w+)\(", raw) + re.findall(r"^\s+(\w+):", raw):
            assert hasattr(cls, name) or name in names, f"{doc}:{line}: {cls.__name__} has no {name}"


@pytest.mark.parametrize("doc,line,code", _blocks("python"), ids=lambda v: str(v)[:30])
def test_python_snippet_is_an_excerpt_of_a_run_example(doc, line, code):
    if re.search(r"^class \w+.*#\s*[\w/]+\.py", code, flags=re.M):
        _check_interface_listing(doc, line, code)
        return
    lines = _code_lines(code)
    assert lines, f"{doc}:{line}: empty python block"
    sources = {rel: _code_lines((ROOT / rel).read_text()) for rel in RUN_EXAMPLES}
    assert any(_is_subsequence(lines, src) for src in sources.values()), (
        f"{doc}:{line}: this python snippet is not an excerpt of any example run by the tests "
        f"({', '.join(RUN_EXAMPLES)}); copy it from one, or add it to one")


def _commands(code: str) -> list[str]:
    joined = code.replace("\\\n", " ")
    return [c.strip() for c in joined.splitlines() if c.strip() and not c.strip().startswith("#")]


def _make_targets() -> set[str]:
    return set(re.findall(r"^([A-Za-z][\w-]*):", (ROOT / "Makefile").read_text(), flags=re.M))


@pytest.mark.parametrize("doc,line,code", _blocks("bash"), ids=lambda v: str(v)[:30])
def test_bash_snippet_commands_exist(doc, line, code):
    from megamix.cli import build_parser

    parser = build_parser()
    for cmd in _commands(code):
        words = shlex.split(cmd, comments=True)
        while words and re.match(r"^[A-Z_]+=", words[0]):        # VAR=value prefixes
            words = words[1:]
        if not words:
            continue
        head = words[0]
        where = f"{doc}:{line}: `{cmd}`"
        if head == "megamix":
            try:
                parser.parse_args(words[1:])
            except SystemExit as e:
                raise AssertionError(f"{where} does not parse with the megamix CLI") from e
        elif head == "make":
            assert set(words[1:]) <= _make_targets(), f"{where}: unknown make target"
        elif head in ("python", "torchrun") and "-m" in words and words[words.index("-m") + 1:][:1] == ["megamix"]:
            try:  # `torchrun ... -m megamix train ...`: the megamix arguments must parse
                parser.parse_args(words[words.index("-m") + 2:])
            except SystemExit as e:
                raise AssertionError(f"{where} does not parse with the megamix CLI") from e
        elif head in ("python", "bash", "sbatch", "torchrun") or "/" in head:
            paths = [w for w in words if re.search(r"\.(py|sh|sbatch)$", w) or w.startswith("launch/")]
            assert paths, f"{where}: no script in the command"
            for p in paths:
                assert (ROOT / p).exists(), f"{where}: {p} does not exist"


# ------------------------------------------------------------------------------------------------ links
_FENCE = re.compile(r"^[ \t]*(```|~~~).*?^[ \t]*\1[^\n]*$", flags=re.S | re.M)
_LINK = re.compile(r"!?\[(?:[^\[\]]|\[[^\]]*\])*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")


def _prose(text: str) -> str:
    """The text outside fenced code blocks, line count kept, inline code spans emptied."""
    text = _FENCE.sub(lambda m: "\n" * m.group(0).count("\n"), text)
    return re.sub(r"`[^`\n]*`", lambda m: "`" + "x" * (len(m.group(0)) - 2) + "`", text)


def _slug(heading: str) -> str:
    """GitHub's anchor for a heading (github-slugger): the rendered text, lower-cased, punctuation and symbols
    dropped (``-`` and ``_`` kept), spaces turned into hyphens."""
    import unicodedata

    text = re.sub(r"!?\[([^\]]*)\]\([^)]*\)", r"\1", heading)     # links and images: their text
    text = re.sub(r"<[^>]+>", "", text).replace("`", "").replace("*", "").strip().lower()
    keep = []
    for ch in text:
        if ch in " -_" or (ch.isascii() and ch.isalnum()):
            keep.append(ch)
        elif not ch.isascii() and (unicodedata.category(ch)[0] in "LM" or unicodedata.category(ch) in ("Nd", "Nl")):
            keep.append(ch)
    return "".join(keep).replace(" ", "-")


def _anchors(path: Path) -> set[str]:
    seen: dict[str, int] = {}
    out = set()
    for line in _FENCE.sub("", path.read_text()).splitlines():
        m = re.match(r"^ {0,3}(#{1,6})\s+(.*?)\s*#*\s*$", line)
        if not m:
            continue
        base = _slug(m.group(2))
        n = seen.get(base, 0)
        seen[base] = n + 1
        out.add(base if n == 0 else f"{base}-{n}")
    return out


def _links() -> list[tuple[str, int, str]]:
    out = []
    for doc in DOCS:
        text = _prose(doc.read_text())
        for m in _LINK.finditer(text):
            out.append((str(doc.relative_to(ROOT)), text[:m.start()].count("\n") + 1, m.group(1)))
    return out


def test_slug_follows_github():
    assert _slug("Communication (`megamix/comm.py`)") == "communication-megamixcommpy"
    assert _slug("3. Megatron-DeepSpeed / Megatron-LM `pretrain_gpt.py`") == "3-megatron-deepspeed--megatron-lm-pretrain_gptpy"
    assert _slug("Logs, snapshots, Weights & Biases") == "logs-snapshots-weights--biases"
    assert _slug("Our figures next to the papers'") == "our-figures-next-to-the-papers"
    assert _slug("DA² and the α search") == "da-and-the-α-search"


def test_docs_have_links_to_check():
    assert len(_links()) > 50, "the link check found almost no links: its pattern is broken"


@pytest.mark.parametrize("doc,line,target", _links(), ids=lambda v: str(v)[:40])
def test_relative_link_resolves(doc, line, target):
    if re.match(r"^[a-z][a-z0-9+.-]*:", target, flags=re.I):      # http:, https:, mailto:
        return
    path, _, anchor = target.partition("#")
    source = ROOT / doc
    dest = (source.parent / path).resolve() if path else source
    where = f"{doc}:{line}: ({target})"
    assert dest.exists(), f"{where}: {path} does not exist"
    assert ROOT in dest.parents or dest == ROOT, f"{where}: points outside the repository"
    if anchor and dest.suffix == ".md":
        anchors = _anchors(dest)
        assert anchor in anchors, (f"{where}: {dest.relative_to(ROOT)} has no heading with the anchor #{anchor}; "
                                   f"it has: {', '.join(sorted(anchors))}")

