"""Every code snippet in README.md and docs/*.md is real:

- a ```python block is an excerpt of an example script that the test suite runs (its code lines appear,
  in order, in that script), so a documented API call cannot drift from a working one; or it is an
  interface listing (``class Name:  # path/to/module.py`` with fields and ``def name(...): ...``) whose
  classes, fields and methods all exist in that module;
- in a ```bash block, every ``megamix ...`` command (also as ``torchrun ... -m megamix ...``) parses with the
  real CLI parser (subcommands and flags exist), every ``make`` target exists, and every script or file a
  command runs exists.
"""
from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
RUN_EXAMPLES = ["examples/plain_loop.py", "examples/hf_fused_loop.py", "examples/deepspeed_loop.py",
                "examples/hf_trainer_loop.py", "examples/accelerate_loop.py"]


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
    tests = (ROOT / "tests" / "test_integration_examples.py").read_text()
    for rel in RUN_EXAMPLES:
        assert Path(rel).name in tests, f"{rel} is not run by tests/test_integration_examples.py"


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
