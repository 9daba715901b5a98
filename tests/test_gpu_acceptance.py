"""benchmarks/gpu_acceptance.sh (the one prepared GPU acceptance run): its dry run on this CPU machine, and the
driver's checks, result file and time limits on fabricated runs.

The dry run prints the plan and checks every item as far as a CPU allows: `megamix train --dry-run` of each
training command (with train.device=cpu / deepspeed.backend=gloo substituted), the Trainer driver's dry run,
the two-rank statistics driver on CPU gloo, the GPU pytest selection collecting. CUDA is hidden from it."""
from __future__ import annotations

import importlib.util
import json
import math
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "gpu_acceptance.sh"
REQUIRED = ["gpu_kernel_tests", "plain_bf16", "deepspeed_zero1_nccl", "deepspeed_zero3_nccl", "hf_trainer_bf16",
            "stats_allreduce_cuda_gloo", "exact_resume_cuda"]


def _driver():
    spec = importlib.util.spec_from_file_location("gpu_acceptance", ROOT / "benchmarks" / "gpu_acceptance.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules["gpu_acceptance"] = mod
    spec.loader.exec_module(mod)
    return mod


ga = _driver()


def _failed_items(result_file: Path) -> str:
    """The failing items' problems and output tails, first in an assertion message (the log shows its end)."""
    try:
        rep = json.loads(result_file.read_text())
    except (OSError, ValueError) as e:
        return f"[no result file: {e}]\n"
    return "".join(f"[{i['name']}: {i['status']}] problems={i.get('problems')}\n{i.get('output_tail', '')}\n"
                   for i in rep.get("items", []) if i.get("status") not in ("pass", "dry-run-ok"))


@pytest.mark.skipif(shutil.which("bash") is None, reason="needs bash")
def test_dry_run_plans_and_checks_every_item_without_cuda(tmp_path):
    out = tmp_path / "acceptance.json"
    env = {k: v for k, v in os.environ.items() if k != "OUT"}       # OUT would move the result file and logs
    env.update(PYTHON=sys.executable, CUDA_VISIBLE_DEVICES="")
    t0 = time.monotonic()
    # --layout copy: megamix is imported from a copy of the checkout laid out as installed, as on the GPU machine
    p = subprocess.run(["bash", str(SCRIPT), "--dry-run", "--layout", "copy", "--out", str(out),
                        "--work-dir", str(tmp_path / "work")],
                       cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    wall = time.monotonic() - t0
    assert p.returncode == 0, _failed_items(out) + p.stdout[-4000:] + p.stderr[-2000:]
    rep = json.loads(out.read_text())
    assert rep["dry_run"] is True and rep["complete"] is True and rep["summary"]["all_passed"] is True
    assert rep["environment"]["cuda_available"] is False          # the dry run needed no CUDA
    assert [i["name"] for i in rep["items"]] == REQUIRED
    imp = rep["environment"]["megamix_import"]
    assert Path(imp["megamix"]).is_relative_to(tmp_path / "work" / "src"), imp
    for item in rep["items"]:
        assert item["status"] == "dry-run-ok", (item["name"], item.get("problems"), item.get("output_tail"))
        assert item["command"] and item["dry_run_commands"] and item["what"]
        assert item["name"] in p.stdout
    by = {i["name"]: i for i in rep["items"]}
    assert "train.device=cuda" in by["plain_bf16"]["command"] and "train.dtype=bf16" in by["plain_bf16"]["command"]
    assert "train.device=cpu" in by["plain_bf16"]["dry_run_commands"][0] and "--dry-run" in \
        by["plain_bf16"]["dry_run_commands"][0] and "train.device=cpu" in by["plain_bf16"]["note"]
    for stage in (1, 3):
        cmd = by[f"deepspeed_zero{stage}_nccl"]["command"]
        assert "--nproc_per_node 1" in cmd and "deepspeed.backend=nccl" in cmd and f"deepspeed.zero_stage={stage}" in cmd
    assert "--backend cuda:gloo" in by["stats_allreduce_cuda_gloo"]["command"]
    assert "-m gpu" in by["gpu_kernel_tests"]["command"] and by["gpu_kernel_tests"]["details"]["collected"] > 0
    assert len(by["exact_resume_cuda"]["commands"]) == 4
    assert rep["budget"]["total_s"] <= 9 * 60 and rep["budget"]["deadline_s"] <= 9 * 60
    assert "== plan: DRY RUN" in p.stdout and "== budget (s)" in p.stdout
    assert "gpu_acceptance: python" in p.stdout
    assert {f"{n}.log" for n in REQUIRED} <= {f.name for f in (tmp_path / "work" / "logs").iterdir()}
    print(f"dry run: {wall:.1f} s")


# ------------------------------------------------------------------------------------------ result file, exit code
def test_result_file_is_strict_json_and_exit_code_needs_every_item_passed(tmp_path):
    recs = [{"name": "a", "status": "pass", "details": {"final_loss": float("nan"), "x": [float("inf")]}},
            {"name": "b", "status": "pass", "details": {}}]
    rep = {"items": recs, "summary": ga.summarize(recs, dry_run=False)}
    assert rep["summary"] == {"counts": {"pass": 2}, "all_passed": True, "failed": []}
    ga.write_results(tmp_path / "r" / "out.json", rep)
    text = (tmp_path / "r" / "out.json").read_text()
    back = json.loads(text, parse_constant=lambda c: pytest.fail(f"non-strict JSON constant {c}"))
    assert back["items"][0]["details"] == {"final_loss": "NaN", "x": ["Infinity"]}
    assert ga.exit_code(rep) == 0
    for bad in ("fail", "skipped"):
        recs[1]["status"] = bad
        rep["summary"] = ga.summarize(recs, dry_run=False)
        assert ga.exit_code(rep) == 1 and rep["summary"]["failed"] == ["b"]
    assert ga.summarize([{"name": "a", "status": "dry-run-ok"}], dry_run=True)["all_passed"]
    assert not ga.summarize([{"name": "a", "status": "pass"}], dry_run=True)["all_passed"]
    assert ga.exit_code({"summary": ga.summarize([], dry_run=False)}) == 1


def test_budgets_fit_nine_minutes_and_options_are_checked():
    b = ga.budgets(list(ga.ITEMS), 1.0, {})
    assert set(b) == set(REQUIRED) and ga.PREPARE_BUDGET + sum(b.values()) <= ga.DEADLINE <= 9 * 60
    assert ga.budgets(["plain_bf16", "exact_resume_cuda"], 0.5, {"exact_resume_cuda": 12})["plain_bf16"] == \
        ga.BUDGETS["plain_bf16"] * 0.5
    with pytest.raises(SystemExit):
        ga.main(["--only", "nope", "--dry-run"])
    with pytest.raises(SystemExit):
        ga.main(["--timeout", "plain_bf16", "--dry-run"])


def test_pytest_summary_parsing():
    assert ga.check_pytest("18 passed in 41.2s")[0] == []
    assert ga.check_pytest("17 passed, 1 skipped in 3s")[0]                   # a skip is not a GPU pass
    assert ga.check_pytest("1 failed, 17 passed in 3s")[0]
    assert ga.check_pytest("18 skipped in 0.3s")[0]
    assert ga.check_collect("tests/x.py::t\n\n18 tests collected in 0.12s")[1] == {"collected": 18}


# ------------------------------------------------------------------------------------------ the items' checks
def _train_run(out: Path, losses, *, rounds: int, backend="plain", path="fused", peak=12.5):
    out.mkdir(parents=True)
    (out / "result.json").write_text(json.dumps({"step_losses": losses, "train_loss": losses[-1], "backend": backend,
                                                 "lm_head_path": path, "peak_device_mb": peak, "weights": {}}))
    recs = [{"kind": "train", "step": i} for i in range(len(losses))] + [{"kind": "mixing"}] * rounds
    (out / "metrics.jsonl").write_text("\n".join(json.dumps(r) for r in recs) + "\n")
    return out


def test_training_run_check(tmp_path):
    good = [10.0 - i * 0.1 for i in range(ga.STEPS)]
    n = ga.STEPS // ga.K
    assert ga.check_train_run(_train_run(tmp_path / "ok", good, rounds=n), "plain")[0] == []
    assert ga.check_train_run(_train_run(tmp_path / "ds", good, rounds=n, backend="deepspeed"), "deepspeed")[0] == []
    bad = {"nan": dict(losses=good[:-1] + [math.nan], rounds=n), "rounds": dict(losses=good, rounds=n - 1),
           "capture": dict(losses=good, rounds=n, path="capture"), "cpu": dict(losses=good, rounds=n, peak=math.nan),
           "short": dict(losses=good[:3], rounds=n)}
    for name, kw in bad.items():
        problems, _ = ga.check_train_run(_train_run(tmp_path / name, **kw), "plain")
        assert problems, name
    assert ga.check_train_run(tmp_path / "missing", "plain")[0]
    assert ga.check_train_run(tmp_path / "cpu", "plain", gpu=False)[0] == []   # the --cpu test mode


def _resume_pair(tmp_path: Path, *, straight=None, stopped=None, resumed=None, param_shift=0.0):
    la = straight or [1.0, 0.9, 0.8, 0.7, 0.6, 0.5]
    full, part = tmp_path / "straight", tmp_path / "stopped"
    common = {"weight_history": [[0, [0.5, 0.5]], [2, [0.4, 0.6]]], "weights": {"a": 0.4, "b": 0.6},
              "valid_loss": {"a": 1.5}}
    for d, res in ((full, {"step_losses": la, "start_step": 0}),
                   (part, {"step_losses": resumed or la[3:], "start_step": 3})):
        (d / "checkpoints" / "step_0000006").mkdir(parents=True)
        (d / "checkpoints" / "latest").write_text("step_0000006")
        (d / "result.json").write_text(json.dumps(dict(common, **res)))
        w = torch.arange(6.0).reshape(2, 3) + (param_shift if d is part else 0.0)
        torch.save({"model": {"w": w}, "optimizer": {"state": {0: {"exp_avg": torch.ones(2, 3)}}, "param_groups": []}},
                   d / "checkpoints" / "step_0000006" / "model.pt")
    (part / "result_stop.json").write_text(json.dumps(dict(common, step_losses=stopped or la[:3], start_step=0)))
    return full, part


def test_exact_resume_check(tmp_path):
    assert ga.check_exact_resume(*_resume_pair(tmp_path / "same"))[0] == []
    problems, _ = ga.check_exact_resume(*_resume_pair(tmp_path / "param", param_shift=1e-7))
    assert any("model/w" in p for p in problems), problems
    problems, _ = ga.check_exact_resume(*_resume_pair(tmp_path / "loss", resumed=[0.7, 0.6, 0.5000001]))
    assert any("after the resume" in p for p in problems), problems
    problems, _ = ga.check_exact_resume(*_resume_pair(tmp_path / "nondet", stopped=[1.0, 0.9, 0.8000001]))
    assert any("not deterministic" in p for p in problems), problems


def test_a_command_past_its_budget_is_killed_with_its_children(tmp_path):
    ctx = ga.Ctx(python=sys.executable, work=tmp_path, data_dir=tmp_path / "data", logs=tmp_path, env=dict(os.environ),
                 cuda=False, dry_run=False)
    marker = tmp_path / "child_alive"
    child = f"import time, pathlib; time.sleep(3); pathlib.Path({str(marker)!r}).write_text('x')"
    step = ga.Step(["bash", "-c", f"echo started; {sys.executable} -c \"{child}\" & sleep 30"])
    t0 = time.monotonic()
    rc, timed_out, out = ga.run_step(step, ctx, 1.0, tmp_path / "x.log")
    assert (rc, timed_out) == (124, True) and "started" in out and time.monotonic() - t0 < 15
    time.sleep(3.5)
    assert not marker.exists(), "the launcher's child outlived the timeout"
