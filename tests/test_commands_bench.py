"""`megamix bench ...` as a new user runs it: results go to the folder named with --out (by default a new run
folder under runs/bench/), the committed results stay as they are, and the run ends with a readable table."""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest

from megamix.cli import main

ROOT = Path(__file__).resolve().parents[1]
COMMITTED = [ROOT / "kernels" / "bench" / "results", ROOT / "benchmarks" / "results"]


def _snapshot() -> dict:
    """Every file under the committed results folders: size, mtime and (for all but the large per-run files)
    the bytes' hash."""
    snap = {}
    for top in COMMITTED:
        for p in sorted(top.rglob("*")):
            if p.is_file():
                st = p.stat()
                digest = hashlib.sha256(p.read_bytes()).hexdigest() if st.st_size < 1 << 20 else None
                snap[str(p.relative_to(ROOT))] = (st.st_size, st.st_mtime_ns, digest)
    return snap


def test_bench_kernels_cpu_quick_writes_the_named_folder_and_ends_with_a_table(tmp_path, capsys):
    import torch

    before, threads = _snapshot(), torch.get_num_threads()
    out = tmp_path / "k"
    assert main(["bench", "kernels", "--cpu", "--quick", "--out", str(out)]) == 0
    text = capsys.readouterr().out
    assert torch.get_num_threads() == threads      # the in-process projection case restores the thread count
    assert _snapshot() == before, "a bench command touched the committed results"
    assert {p.name for p in out.iterdir()} == {"bench_cpu.json", "bench_cpu.csv", "bench_cpu.md"}
    res = json.loads((out / "bench_cpu.json").read_text())
    assert res["meta"]["quick"] and res["meta"]["iters"] == 5 and "loadavg_1m_at_start" in res["meta"]
    rows = {r["method"]: r for r in res["rows"]}
    assert set(rows) == {"floor", "fused+proj 16x16", "fused", "eager+proj 16x16"}
    assert all(r["error"] is None and r["full_ms"] > 0 for r in rows.values()), rows
    assert rows["floor"]["ratio_vs_floor"] == 1.0
    assert res["projection_ratio"][0]["speedup"] > 0
    # the table (also saved as bench_cpu.md) ends the output; no raw JSON rows on the terminal
    table = (out / "bench_cpu.md").read_text().strip()
    assert table in text and text.rstrip().endswith("bench_cpu.md")
    assert "| method" in table and "× floor" in table and "TFLOP/s" in table and "peak RSS +MB" in table
    assert "| floor " in table and "| fused+proj 16x16 " in table and "factored ms" in table
    assert "torch " in table and "median of 5" in table          # the conditions line
    assert not any(line.startswith("{") for line in text.splitlines())


def test_bench_default_out_is_a_new_run_folder(tmp_path, monkeypatch):
    from megamix.cli import build_parser
    from megamix.kernels.bench.output import default_out_dir

    monkeypatch.chdir(tmp_path)
    args = build_parser().parse_args(["bench", "kernels", "--cpu"])
    assert args.out_dir is None and args.warmup is None and args.iters is None   # resolved by main (--quick aware)
    gram = build_parser().parse_args(["bench", "gram", "--cpu"])
    assert gram.out_dir.startswith("runs/bench/gram-")
    first = default_out_dir("kernels")
    assert first.startswith("runs/bench/kernels-")
    Path(first).mkdir(parents=True)
    assert default_out_dir("kernels") != first            # an existing folder is never reused
    # --out-dir is still accepted (kernels/bench/gpu_run.sh and older notes use it)
    assert build_parser().parse_args(["bench", "kernels", "--out-dir", "x"]).out_dir == "x"


def test_bench_loader_runs_the_benchmarks_script_into_a_run_folder(tmp_path, monkeypatch, capsys):
    before = _snapshot()
    monkeypatch.chdir(tmp_path)
    assert main(["bench", "loader", "--quick", "--repeats", "1"]) == 0
    text = capsys.readouterr().out
    assert _snapshot() == before
    (run,) = (tmp_path / "runs" / "bench").iterdir()
    assert run.name.startswith("loader-")
    res = json.loads((run / "loader_bench.json").read_text())
    assert res["quick"] and res["index_generation"][0]["ratio_vs_naive"] > 0
    table = (run / "loader_bench.md").read_text().strip()
    assert table in text and "× naive" in table and "× steady" in table and "× index gen" in table


def test_bench_gram_cpu_writes_the_named_folder_and_ends_with_a_table(tmp_path, capsys):
    before = _snapshot()
    out = tmp_path / "g"
    assert main(["bench", "gram", "--cpu", "--shapes", "64:16", "--k", "4x4", "--iters", "1",
                 "--warmup", "0", "--out", str(out)]) == 0
    text = capsys.readouterr().out
    assert _snapshot() == before
    names = {p.name for p in out.iterdir()}
    assert {"bench_domain_gram_cpu.json", "bench_domain_gram_cpu.csv", "bench_domain_gram_cpu.md"} <= names
    table = (out / "bench_domain_gram_cpu.md").read_text().strip()
    assert table in text and "× baseline" in table and "| method" in table
    assert not any(line.startswith("{") for line in text.splitlines())


def test_bench_loader_without_a_checkout_fails_in_one_line(tmp_path, monkeypatch, capsys):
    import megamix.commands.bench as cmd

    monkeypatch.setattr(cmd, "loader_script", lambda: tmp_path / "missing" / "loader_bench.py")
    assert main(["bench", "loader", "--quick"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("megamix: error:") and "source checkout" in err and "\n" not in err


@pytest.mark.parametrize("target", ["kernels", "gram", "loader"])
def test_bench_help_names_the_output_rule(target, capsys):
    with pytest.raises(SystemExit) as e:
        main(["bench", target, "--help"])
    assert e.value.code == 0
    out = " ".join(capsys.readouterr().out.split())
    assert "runs/bench/" in out and "--out" in out
