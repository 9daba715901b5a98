"""``import megamix.kernels`` works the same from a plain checkout, a git worktree and an install, and always gives
the checkout's own kernels/: the committed relative symlink ``megamix/kernels -> ../kernels`` (setup.py installs
kernels/ as megamix.kernels; the top-level name ``kernels`` stays free, see test_packaging.py).

Before the symlink only the editable install's finder mapped megamix.kernels to kernels/, so a checkout without an
install could not import it, and a worktree (or any copy on PYTHONPATH) silently imported the main checkout's
kernels/ through that finder. The tests copy the working tree's megamix/ (with the link) and kernels/ to a
temporary folder, as a fresh worktree would have them, and import from there.
"""
from __future__ import annotations

import json
import os
import shutil
import site
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
LINK = REPO / "megamix" / "kernels"
PROBE = ("import json, megamix, megamix.kernels, megamix.kernels.fused_linear_ce as f; "
         "print(json.dumps([megamix.__file__, megamix.kernels.__file__, f.__file__]))")


def _checkout(dst: Path) -> Path:
    """megamix/ (the symlink kept a symlink) and kernels/ of this working tree, copied to ``dst``."""
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc", "results")
    shutil.copytree(REPO / "megamix", dst / "megamix", symlinks=True, ignore=ignore)
    shutil.copytree(REPO / "kernels", dst / "kernels", ignore=ignore)
    return dst


def _import_from(checkout: Path, cwd: Path, *, installed: bool) -> list[Path]:
    """The files of megamix, megamix.kernels and megamix.kernels.fused_linear_ce as a fresh Python process
    imports them with ``checkout`` first on its path. ``installed=False``: without site processing (``-S``), so
    no ``.pth`` file installs the editable finder, as in an environment where megamix was never installed (the
    third-party packages come from the same site-packages folders, added by hand)."""
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONSAFEPATH")}
    if installed:
        cmd = [sys.executable, "-c", PROBE]
        env["PYTHONPATH"] = str(checkout)
    else:
        paths = [str(checkout), *site.getsitepackages()]
        cmd = [sys.executable, "-S", "-c", f"import sys; sys.path[:0] = {paths!r}; {PROBE}"]
    r = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    return [Path(p) for p in json.loads(r.stdout.strip().splitlines()[-1])]


def test_the_link_is_relative_and_points_at_kernels():
    assert LINK.is_symlink(), "megamix/kernels must be a symlink to ../kernels (committed in git)"
    assert os.readlink(LINK) == "../kernels"
    assert LINK.resolve() == (REPO / "kernels").resolve()


@pytest.fixture(scope="module")
def copy(tmp_path_factory) -> Path:
    return _checkout(tmp_path_factory.mktemp("worktree"))


@pytest.mark.parametrize("installed", [False, True], ids=["plain-checkout", "worktree-beside-an-install"])
def test_a_checkout_imports_its_own_kernels(copy, tmp_path, installed):
    """From a copy of the tree on PYTHONPATH, with and without this checkout's editable install in the
    environment, megamix.kernels is the copy's kernels/ (through the copy's link), never this checkout's."""
    files = _import_from(copy, tmp_path, installed=installed)
    for f in files:
        assert f.is_relative_to(copy), f"{f} is not inside the checkout {copy}"
        assert f.resolve().is_relative_to(copy.resolve()), f"{f} resolves outside the checkout {copy}"
    megamix_init, kernels_init, flce = files
    assert megamix_init == copy / "megamix" / "__init__.py"
    assert kernels_init.resolve() == (copy / "kernels" / "__init__.py").resolve()
    assert flce.resolve() == (copy / "kernels" / "fused_linear_ce.py").resolve()


def test_this_checkout_imports_its_own_kernels(tmp_path):
    """The repository itself, from its root on the path (the test suite's own setting) or through the
    installed package, gets kernels/ of this checkout."""
    for installed in (False, True):
        files = _import_from(REPO, tmp_path, installed=installed)
        assert all(f.resolve().is_relative_to(REPO) for f in files), files
        assert files[2].resolve() == REPO / "kernels" / "fused_linear_ce.py"
