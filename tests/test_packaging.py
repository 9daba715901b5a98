"""The installed package layout: kernels/ installs as ``megamix.kernels``, so megamix never claims the
top-level name ``kernels`` (Hugging Face's ``kernels`` package, which transformers looks for)."""
import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

PROBE = """
import importlib.util, json
import megamix.kernels.projection as p
from megamix.kernels.fused_linear_ce import fused_linear_cross_entropy
spec = importlib.util.find_spec("kernels")
print(json.dumps({"projection": p.__file__, "kernels_origin": None if spec is None else spec.origin}))
"""


def test_kernels_install_as_megamix_kernels_and_leave_the_top_level_name_free(tmp_path):
    # run outside the checkout, so only the installed package is visible
    r = subprocess.run([sys.executable, "-c", PROBE], cwd=tmp_path, capture_output=True, text=True, timeout=120,
                       env={"PATH": "/usr/bin:/bin", "TRITON_INTERPRET": "1"})
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout.strip().splitlines()[-1])
    assert Path(out["projection"]).name == "projection.py"
    origin = out["kernels_origin"]
    # `kernels` is either absent or somebody else's package (e.g. HF kernels), never ours
    assert origin is None or not Path(origin).resolve().is_relative_to(REPO), origin


def test_no_module_imports_the_old_top_level_name():
    offenders = []
    for p in list(REPO.glob("megamix/**/*.py")) + list(REPO.glob("kernels/**/*.py")) + \
            list(REPO.glob("tests/*.py")) + list(REPO.glob("examples/*.py")) + list(REPO.glob("benchmarks/*.py")):
        for i, line in enumerate(p.read_text().splitlines(), 1):
            s = line.strip()
            if s.startswith(("from kernels.", "from kernels import", "import kernels")):
                offenders.append(f"{p.relative_to(REPO)}:{i}: {s}")
    assert not offenders, "\n".join(offenders)
