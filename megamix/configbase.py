"""Config machinery: documented dataclasses, YAML files and dotted overrides.

Every config section is a ``@dataclass`` deriving from :class:`ConfigBase`. Each field carries
its documentation in ``field(metadata={"help": ...})`` so that ``megamix config --explain``
can print it. Loading is strict: an unknown key is an error that names the closest valid key.

Example::

    cfg = MegamixConfig.from_yaml("configs/tiny-cpu.yaml", overrides=["train.steps=20"])
    cfg.validate()
"""
from __future__ import annotations

import dataclasses
import difflib
import typing
from pathlib import Path
from typing import Any

import yaml


class MegamixError(Exception):
    """The base of every error megamix reports to the user as one line: the message names the field, file or
    step and says how to fix it; the ``megamix`` CLI prints it (``megamix: error: ...``) and exits with code 2.
    Anything else that escapes a command is a bug and keeps its traceback."""


class ConfigError(MegamixError, ValueError):
    """A configuration value, or an input file the run reads, is missing, unknown or invalid. The message
    names the field or file and says how to fix it; the ``megamix`` CLI prints it as one line and exits
    with code 2."""


class RunError(MegamixError, RuntimeError):
    """A run stopped for a reason found while it ran, not in its configuration (a non-finite loss, a domain
    out of data). The message names the step and the setting to change; the CLI prints it as one line and
    exits with code 2."""


def doc(help: str, default: Any = dataclasses.MISSING, default_factory: Any = dataclasses.MISSING):
    """A dataclass field with a help string (shown by ``megamix config --explain``)."""
    kw: dict[str, Any] = {"metadata": {"help": help}}
    if default is not dataclasses.MISSING:
        kw["default"] = default
    if default_factory is not dataclasses.MISSING:
        kw["default_factory"] = default_factory
    return dataclasses.field(**kw)


def _suggest(key: str, valid: list[str]) -> str:
    close = difflib.get_close_matches(key, valid, n=1)
    return f" Did you mean '{close[0]}'?" if close else f" Valid keys: {', '.join(sorted(valid))}."


def _yaml_problem(e: yaml.YAMLError) -> str:
    """A YAML error as one line: what is wrong and where (1-based line and column)."""
    mark = getattr(e, "problem_mark", None) or getattr(e, "context_mark", None)
    what = getattr(e, "problem", None) or getattr(e, "context", None) or str(e).splitlines()[0]
    where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
    return f"{what}{where}"


def _yaml_value(text: str, where: str) -> Any:
    """Parse a flow-style YAML value given on the command line (``[a, b]``, ``{a: 1}``)."""
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise ConfigError(f"{where}: {text!r} is not valid YAML ({_yaml_problem(e)}); write a list as [a, b] and "
                          "a mapping as {a: 0.5, b: 0.5}, quoted for the shell") from None


def read_yaml_file(path: str | Path, what: str = "YAML file") -> Any:
    """Load a YAML file; a missing file, a directory, binary data or a syntax error is a
    :class:`ConfigError` naming the file (and line) and the fix."""
    p = Path(path)
    if p.is_dir():
        raise ConfigError(f"{what} {p} is a directory; pass a YAML file (e.g. configs/tiny-cpu.yaml)")
    if not p.exists():
        raise ConfigError(f"{what} {p} does not exist; check the path (the examples are in configs/)")
    try:
        text = p.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise ConfigError(f"{what} {p} is not a text file (not UTF-8); pass a YAML file such as "
                          "configs/tiny-cpu.yaml") from None
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise ConfigError(f"{what} {p} is not valid YAML: {_yaml_problem(e)}; fix that line (indent with "
                          "spaces, close every bracket and quote)") from None


def _coerce(value: Any, tp: Any, where: str) -> Any:
    """Convert ``value`` (from YAML or a CLI string) to the annotated type ``tp``."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if tp is Any:
        return value
    if origin is typing.Union or (origin is not None and str(origin) == "<class 'types.UnionType'>"):
        if value is None and type(None) in args:
            return None
        errors = []
        for a in args:
            if a is type(None):
                continue
            try:
                return _coerce(value, a, where)
            except (ConfigError, TypeError, ValueError) as e:
                errors.append(str(e))
        raise ConfigError(f"{where}: cannot interpret {value!r} as {tp}: {'; '.join(errors)}")
    if dataclasses.is_dataclass(tp):
        if isinstance(value, tp):
            return value
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping for section {tp.__name__}, got {value!r}")
        return tp.from_dict(value, where=where)
    if origin in (list, tuple):
        if isinstance(value, str):
            value = _yaml_value(value, where) if value.strip().startswith("[") else [
                v.strip() for v in value.split(",") if v.strip()]
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where}: expected a list, got {value!r}")
        inner = args[0] if args else Any
        return [_coerce(v, inner, f"{where}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        if isinstance(value, str):
            value = _yaml_value(value, where)
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping, got {value!r}")
        vt = args[1] if len(args) == 2 else Any
        return {str(k): _coerce(v, vt, f"{where}.{k}") for k, v in value.items()}
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "1", "yes", "on"):
            return True
        if isinstance(value, str) and value.lower() in ("false", "0", "no", "off"):
            return False
        raise ConfigError(f"{where}: expected true/false, got {value!r}")
    if tp is int:
        if isinstance(value, bool):
            raise ConfigError(f"{where}: expected an integer, got {value!r}")
        if isinstance(value, int):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        if isinstance(value, str):
            try:
                return int(float(value)) if "e" in value.lower() else int(value)
            except ValueError:
                pass
        raise ConfigError(f"{where}: expected an integer, got {value!r}")
    if tp is float:
        if isinstance(value, bool):
            raise ConfigError(f"{where}: expected a number, got {value!r}")
        try:
            return float(value)
        except (TypeError, ValueError):
            raise ConfigError(f"{where}: expected a number, got {value!r}") from None
    if tp is str:
        if isinstance(value, (dict, list)):
            raise ConfigError(f"{where}: expected a string, got {value!r}")
        return str(value)
    return value


@dataclasses.dataclass
class ConfigBase:
    """Base class of every config section (strict loading, overrides, explain, validate)."""

    @classmethod
    def _hints(cls) -> dict[str, Any]:
        return typing.get_type_hints(cls)

    @classmethod
    def from_dict(cls, data: dict[str, Any] | None, where: str = "") -> "ConfigBase":
        data = dict(data or {})
        hints = cls._hints()
        names = [f.name for f in dataclasses.fields(cls)]
        kwargs = {}
        for key, value in data.items():
            path = f"{where}.{key}" if where else key
            if key not in names:
                raise ConfigError(f"unknown config key '{path}'.{_suggest(key, names)}")
            kwargs[key] = _coerce(value, hints[key], path)
        return cls(**kwargs)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_yaml(cls, path: str | Path | None, overrides: list[str] | None = None):
        data: dict[str, Any] = {}
        if path is not None:
            data = read_yaml_file(path, what="config file")
            data = {} if data is None else data
            if not isinstance(data, dict):
                raise ConfigError(f"{path}: top level must be a mapping of sections (data:, model:, train:, ...); "
                                  "see configs/tiny-cpu.yaml")
        cfg = cls.from_dict(data)
        for ov in overrides or []:
            cfg = cfg.with_override(ov)
        return cfg

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)

    def with_override(self, assignment: str):
        """Apply one ``a.b.c=value`` override (value parsed as YAML, then coerced)."""
        if "=" not in assignment:
            raise ConfigError(f"override '{assignment}' must look like section.key=value")
        dotted, raw = assignment.split("=", 1)
        keys = dotted.strip().split(".")
        data = self.to_dict()
        node = data
        cls: Any = type(self)
        for i, k in enumerate(keys):
            names = [f.name for f in dataclasses.fields(cls)]
            if k not in names:
                raise ConfigError(f"unknown config key '{'.'.join(keys[:i + 1])}' in override "
                                  f"'{assignment}'.{_suggest(k, names)}")
            tp = cls._hints()[k]
            if i == len(keys) - 1:
                try:
                    parsed = yaml.safe_load(raw) if raw.strip() != "" else ""
                except yaml.YAMLError:
                    parsed = raw
                node[k] = parsed if not isinstance(parsed, (int, float, bool)) or tp is not str else raw
            else:
                if not (dataclasses.is_dataclass(tp)):
                    raise ConfigError(f"'{'.'.join(keys[:i + 1])}' is not a section; cannot set "
                                      f"'{assignment}'")
                node = node[k]
                cls = tp
        return type(self).from_dict(data)

    @classmethod
    def explain(cls, prefix: str = "") -> list[str]:
        """One line per field: dotted name, type, default and help text."""
        lines = []
        hints = cls._hints()
        for f in dataclasses.fields(cls):
            name = f"{prefix}{f.name}"
            tp = hints[f.name]
            if dataclasses.is_dataclass(tp):
                lines.append(f"[{name}] {(tp.__doc__ or '').strip().splitlines()[0]}")
                lines.extend(tp.explain(prefix=name + "."))
                continue
            default = f.default if f.default is not dataclasses.MISSING else (
                f.default_factory() if f.default_factory is not dataclasses.MISSING else "<required>")
            tname = getattr(tp, "__name__", str(tp)).replace("typing.", "")
            lines.append(f"  {name} ({tname}, default {default!r}): {f.metadata.get('help', '')}")
        return lines

    def validate(self) -> "ConfigBase":
        """Check values; raise :class:`ConfigError` with an actionable message. Recurses into sections."""
        for f in dataclasses.fields(self):
            v = getattr(self, f.name)
            if isinstance(v, ConfigBase):
                v.validate()
        return self


def check(cond: bool, msg: str) -> None:
    """Raise :class:`ConfigError` with ``msg`` unless ``cond``."""
    if not cond:
        raise ConfigError(msg)
