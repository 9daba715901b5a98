"""Atomic file writes and JSON-lines reading: the one owner of both for all of megamix.

It imports only the standard library and sits at the bottom of the layering, so anything may use it (the data
builders, the loader, the strategies, the trainer, the integrations, the commands).

**Atomic writes.** The content goes to a temporary file in the target's own folder (so the same file system),
which then replaces the target with ``os.replace``: a reader, or a process killed mid-write, sees the old file
or the new one, never a torn one. The temporary file is ``<name>.tmp<pid>`` (two processes writing the same
file do not share one), or ``<name><tmp_suffix>`` where a caller names its own. The parent folder is created
when missing. There is no ``fsync``: the writes survive a killed process, not a power cut (none of megamix's
writers ever synced). When the write fails (a full disk) the target is left as it was and the temporary file
is left behind (the checkpoint readers ignore names with ``.tmp`` in them).

- :func:`atomic_write_text`, :func:`atomic_write_bytes`, :func:`atomic_write_json`, :func:`atomic_write_lines`:
  the whole content at once;
- :func:`atomic_open`: a file object to write into (``np.savez(f, ...)``, a stream of lines);
- :func:`atomic_path`: a temporary path, for writers that want a path (``torch.save``, ``np.save``, a link);
- :func:`tmp_path`: the temporary name alone, for a writer that keeps a file open across calls and
  replaces it itself (:class:`megamix.data.token_store.IndexedTokenWriter`).

**JSON lines.** :func:`iter_json_lines` / :func:`read_jsonl` read one JSON value per line (``.gz`` too),
skipping blank lines. By default a line that is not JSON is an error naming ``path:line``; with
``skip_bad=True`` such lines are dropped (the last line of a log that a kill tore mid-write).
"""
from __future__ import annotations

import json
import os
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any, Iterable, Iterator

__all__ = ["tmp_path", "atomic_path", "atomic_open", "atomic_write_bytes", "atomic_write_text",
           "atomic_write_json", "atomic_write_lines", "iter_json_lines", "read_jsonl"]


# ----------------------------------------------------------------------------------------------- writing
def tmp_path(path: str | os.PathLike, suffix: str | None = None) -> Path:
    """The temporary file next to ``path``: ``<name>.tmp<pid>``, or ``<name><suffix>``."""
    path = Path(path)
    return path.with_name(path.name + (f".tmp{os.getpid()}" if suffix is None else suffix))


@contextmanager
def atomic_path(path: str | os.PathLike, *, tmp_suffix: str | None = None) -> Iterator[Path]:
    """A temporary path next to ``path`` (see :func:`tmp_path`) that replaces ``path`` when the block ends
    without an error::

        with atomic_path(ckpt / "model.pt") as tmp:
            torch.save(state, tmp)
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = tmp_path(path, tmp_suffix)
    yield tmp
    os.replace(tmp, path)


@contextmanager
def atomic_open(path: str | os.PathLike, mode: str = "w", *, encoding: str | None = None,
                tmp_suffix: str | None = None) -> Iterator[IO]:
    """``open(mode)`` on a temporary file that replaces ``path`` once the block ends without an error (the
    file is closed first). ``mode``: ``"w"`` or ``"wb"``."""
    with atomic_path(path, tmp_suffix=tmp_suffix) as tmp, open(tmp, mode, encoding=encoding) as f:
        yield f


def atomic_write_bytes(path: str | os.PathLike, data: bytes, *, tmp_suffix: str | None = None) -> Path:
    """Write ``data`` to ``path`` atomically; returns ``path``."""
    with atomic_path(path, tmp_suffix=tmp_suffix) as tmp:
        tmp.write_bytes(data)
    return Path(path)


def atomic_write_text(path: str | os.PathLike, text: str, *, encoding: str | None = None,
                      tmp_suffix: str | None = None) -> Path:
    """Write ``text`` to ``path`` atomically (``encoding``: as :meth:`pathlib.Path.write_text`); returns
    ``path``."""
    with atomic_path(path, tmp_suffix=tmp_suffix) as tmp:
        tmp.write_text(text, encoding=encoding)
    return Path(path)


def atomic_write_json(path: str | os.PathLike, obj: Any, *, indent: int | None = 1,
                      tmp_suffix: str | None = None, **dumps: Any) -> Path:
    """Write ``json.dumps(obj, indent=indent, **dumps)`` to ``path`` atomically; returns ``path``."""
    return atomic_write_text(path, json.dumps(obj, indent=indent, **dumps), tmp_suffix=tmp_suffix)


def atomic_write_lines(path: str | os.PathLike, lines: Iterable[str], *, tmp_suffix: str | None = None) -> Path:
    """Write each of ``lines`` followed by ``\\n`` (UTF-8) to ``path`` atomically; ``lines`` may be a
    generator (it is streamed). Returns ``path``."""
    with atomic_open(path, "w", encoding="utf-8", tmp_suffix=tmp_suffix) as f:
        for line in lines:
            f.write(line)
            f.write("\n")
    return Path(path)


# ----------------------------------------------------------------------------------------------- reading
def iter_json_lines(path: str | os.PathLike, *, skip_bad: bool = False,
                    error: type[Exception] = ValueError) -> Iterator[tuple[int, Any]]:
    """``(line number, parsed value)`` for every non-blank line of a JSON-lines file (``.gz`` too; UTF-8).

    A line that is not JSON raises ``error`` (a ``ValueError`` by default; the data layer passes its
    ``DataError``) naming ``path:line``; ``skip_bad=True`` skips such lines instead (a line torn by a kill
    mid-write). A file that is not UTF-8 raises ``error`` naming the line either way.
    """
    import gzip

    path = Path(path)
    opener = gzip.open if path.name.endswith(".gz") else open
    lineno = 0
    try:
        with opener(path, "rt", encoding="utf-8") as f:
            for lineno, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    value = json.loads(line)
                except json.JSONDecodeError as e:
                    if skip_bad:
                        continue
                    raise error(f"{path}:{lineno}: not valid JSON ({e}); fix or remove that line") from e
                yield lineno, value
    except UnicodeDecodeError as e:
        raise error(f"{path}:{lineno + 1}: not UTF-8 text ({e.reason}); convert the file "
                    "to UTF-8 JSON lines") from e


def read_jsonl(path: str | os.PathLike, *, skip_bad: bool = False,
               error: type[Exception] = ValueError) -> list[Any]:
    """Every value of a JSON-lines file, in order (see :func:`iter_json_lines`)."""
    return [value for _, value in iter_json_lines(path, skip_bad=skip_bad, error=error)]
