"""The data layer's user-facing error: bad data on disk or a bad ``data.*`` setting.

:class:`DataError` derives from :class:`~megamix.configbase.ConfigError` (itself a ``ValueError``), so
the CLI prints its one-line message and exits with code 2, and code catching ``ValueError`` keeps working.
Every message names the file or setting and says how to fix it.
"""
from __future__ import annotations

from megamix.configbase import ConfigError


class DataError(ConfigError):
    """Unusable data (a corrupt ``.bin/.idx``, a stale manifest, a vocabulary mismatch, ...)."""


def check_domain_name(name: str, where: str = "domain") -> str:
    """Return ``name`` if it can be a domain (a folder name under ``tokens/`` and a metrics key); else
    raise :class:`DataError` saying why. Allowed: letters, digits and ``_ - . +``, not starting with ``.``,
    at most 100 characters."""
    import re

    if not isinstance(name, str) or not re.fullmatch(r"[A-Za-z0-9_+\-][A-Za-z0-9_.+\-]{0,99}", name):
        raise DataError(f"{where}: invalid domain name {name!r}: use up to 100 letters, digits, '_', '-', "
                        "'+' or '.' (no '/', spaces, or leading '.')")
    return name
