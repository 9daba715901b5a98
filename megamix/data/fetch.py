"""Fetch Debian packages into a local cache without installing them.

``apt-get download PKG`` puts the ``.deb`` in ``<cache>/debs``; ``dpkg-deb -x`` unpacks it into
``<cache>/roots/<pkg>``. A ``.done.json`` marker (package, version, deb file) makes repeat calls
free. Nothing is installed system-wide and no root-only step is needed except ``apt-get update``
(run once, on request, when the package lists are empty or stale).
"""
from __future__ import annotations

import json
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path


class MissingPackageError(RuntimeError):
    """One or more Debian packages could not be fetched."""

    def __init__(self, packages: dict[str, str], domains: dict[str, list[str]] | None = None):
        self.packages = dict(packages)  # package -> reason
        self.domains = dict(domains or {})  # package -> affected domains
        lines = []
        for pkg, why in self.packages.items():
            aff = self.domains.get(pkg)
            lines.append(f"  - {pkg}: {why}" + (f" (needed by domain(s): {', '.join(aff)})" if aff else ""))
        affected = sorted({d for ds in self.domains.values() for d in ds})
        msg = "could not fetch Debian package(s):\n" + "\n".join(lines)
        if affected:
            msg += (f"\naffected domains: {', '.join(affected)}. Fix the network/apt access "
                    "(try `apt-get update`), pick other domains with --domains, or drop them with "
                    "--skip-missing.")
        super().__init__(msg)


@dataclass(frozen=True)
class FetchedPackage:
    name: str
    version: str
    root: Path
    deb: str


class AptFetcher:
    """Download and unpack Debian packages into ``cache_dir``.

    Args:
        cache_dir: e.g. ``data/cache``.
        allow_update: run ``apt-get update`` once if a package cannot be located.
        offline: never call apt; only cached packages are available.
    """

    def __init__(self, cache_dir: str | Path, allow_update: bool = True, offline: bool = False):
        self.cache_dir = Path(cache_dir)
        self.allow_update = allow_update
        self.offline = offline
        self._updated = False

    def _marker(self, pkg: str) -> Path:
        return self.cache_dir / "roots" / f"{pkg}.done.json"

    def cached(self, pkg: str) -> FetchedPackage | None:
        m = self._marker(pkg)
        if not m.is_file():
            return None
        info = json.loads(m.read_text())
        root = self.cache_dir / "roots" / pkg
        if not root.is_dir():
            return None
        return FetchedPackage(pkg, info["version"], root, info["deb"])

    def _run(self, cmd: list[str], cwd: Path | None = None) -> subprocess.CompletedProcess:
        return subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=600)

    def _download(self, pkg: str, debs: Path) -> Path:
        if shutil.which("apt-get") is None:
            raise MissingPackageError({pkg: "apt-get is not available on this machine"})
        for attempt in range(2):
            res = self._run(["apt-get", "download", pkg], cwd=debs)
            found = sorted(debs.glob(f"{pkg}_*.deb"))
            if res.returncode == 0 and found:
                return found[-1]
            err = (res.stderr or res.stdout).strip().splitlines()
            reason = err[-1] if err else f"apt-get exited with {res.returncode}"
            if attempt == 0 and self.allow_update and not self._updated and (
                    "Unable to locate" in reason or "No packages found" in reason
                    or "Can't select" in reason):
                self._updated = True
                up = self._run(["apt-get", "update"])
                if up.returncode != 0:
                    raise MissingPackageError({pkg: f"{reason}; `apt-get update` also failed: "
                                                    f"{(up.stderr or '').strip()[-200:]}"})
                continue
            raise MissingPackageError({pkg: reason})
        raise MissingPackageError({pkg: "download failed"})  # pragma: no cover

    def fetch(self, pkg: str) -> FetchedPackage:
        """Return the unpacked package, downloading it first if needed."""
        hit = self.cached(pkg)
        if hit is not None:
            return hit
        if self.offline:
            raise MissingPackageError({pkg: f"not in the cache {self.cache_dir} and offline mode is on"})
        debs = self.cache_dir / "debs"
        debs.mkdir(parents=True, exist_ok=True)
        existing = sorted(debs.glob(f"{pkg}_*.deb"))
        deb = existing[-1] if existing else self._download(pkg, debs)
        ver = self._run(["dpkg-deb", "-f", str(deb), "Version"])
        if ver.returncode != 0:
            raise MissingPackageError({pkg: f"{deb.name} is not a valid .deb: {ver.stderr.strip()}"})
        root = self.cache_dir / "roots" / pkg
        tmp = root.with_name(pkg + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        x = self._run(["dpkg-deb", "-x", str(deb), str(tmp)])
        if x.returncode != 0:
            shutil.rmtree(tmp, ignore_errors=True)
            raise MissingPackageError({pkg: f"dpkg-deb -x failed: {x.stderr.strip()}"})
        shutil.rmtree(root, ignore_errors=True)
        tmp.rename(root)
        self._marker(pkg).write_text(json.dumps({"package": pkg, "version": ver.stdout.strip(),
                                                 "deb": deb.name}))
        return FetchedPackage(pkg, ver.stdout.strip(), root, deb.name)

    def fetch_all(self, packages: dict[str, list[str]]) -> tuple[dict[str, FetchedPackage], dict[str, str]]:
        """Fetch every package (``pkg -> domains needing it``); returns (fetched, failures)."""
        ok, bad = {}, {}
        for pkg in packages:
            try:
                ok[pkg] = self.fetch(pkg)
            except MissingPackageError as e:
                bad.update(e.packages)
            except (OSError, subprocess.SubprocessError) as e:
                bad[pkg] = str(e)
        return ok, bad


def local_package_version(pkg: str) -> str | None:
    """Version of an installed Debian package (``dpkg-query``), or None."""
    if shutil.which("dpkg-query") is None:
        return None
    res = subprocess.run(["dpkg-query", "-W", "-f", "${Version}", pkg], capture_output=True, text=True)
    return res.stdout.strip() or None if res.returncode == 0 else None
