"""The CLI's one reporter and its logging: every error the user can fix (a config or data error, a run that stops
on a non-finite loss or an exhausted domain) is one line on stderr with exit code 2; anything else keeps its
traceback; ``log.info`` notes of the ``megamix`` logger reach stderr (rank 0 only), warnings on every rank; in a
multi-rank launch a start-up error is printed once (rank 0's), a rank-specific one by the rank that has it, and every
failing rank exits 2."""
from __future__ import annotations

import logging
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

from megamix.cli import main
from megamix.configbase import ConfigError, MegamixError, RunError

ROOT = Path(__file__).resolve().parents[1]


def _one_line(err: str) -> str:
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert len(lines) == 1 and "Traceback" not in err, err
    assert lines[0].startswith("megamix"), lines[0]
    return lines[0]


# ------------------------------------------------------------------------------------------------ errors
def test_run_errors_are_not_config_errors():
    from megamix.loader import DomainExhaustedError
    from megamix.train.guard import NonFiniteError

    for cls in (NonFiniteError, DomainExhaustedError):
        assert issubclass(cls, RunError) and issubclass(cls, MegamixError) and not issubclass(cls, ConfigError)
    assert issubclass(DomainExhaustedError, RuntimeError)  # code catching the old base keeps working
    assert issubclass(ConfigError, MegamixError) and issubclass(ConfigError, ValueError)


@pytest.fixture(scope="module")
def small_store(tmp_path_factory):
    """A token store of two domains with ~15-20 training samples of 32 tokens each."""
    from megamix.data.testing import build_tiny_store
    return build_tiny_store(tmp_path_factory.mktemp("small_store"), ("legal", "changelogs"), max_docs=4,
                            max_doc_chars=600).parent


def test_exhausted_domain_is_one_line_naming_loader_max_epochs(small_store, tmp_path, capsys):
    out = tmp_path / "run"
    argv = ["train", "--no-progress"] + [x for kv in (
        f"data.data_dir={small_store}", f"train.out_dir={out}", "model.n_layer=1", "model.n_embd=32",
        "model.n_head=2", "model.seq_len=32", "train.global_batch_size=8", "train.micro_batch_size=8",
        "train.warmup_steps=0", "train.steps=40", "train.eval_every=0", "train.eval_batches=1",
        "train.checkpoint_every=0", "train.log_every=1", "train.threads=1", "mixing.strategy=rnb",
        "loader.max_epochs=1") for x in ("--set", kv)]
    assert main(argv) == 2
    line = _one_line(capsys.readouterr().err)
    assert line.startswith("megamix: error: domain ") and "is exhausted" in line, line
    assert "loader.max_epochs" in line and "max_epochs=1 passes" in line, line


def test_d2v_user_errors_go_through_the_cli_reporter(tmp_path, capsys):
    assert main(["d2v", "da2", "--vectors", str(tmp_path / "missing.json")]) == 2
    assert "run `megamix d2v vectorize` first" in _one_line(capsys.readouterr().err)
    assert main(["d2v", "vocab", "--data-dir", str(tmp_path), "--embedder", "nope"]) == 2
    line = _one_line(capsys.readouterr().err)
    assert "unknown embedder 'nope'" in line and "hashing" in line
    with pytest.raises(SystemExit) as e:   # a usage error: argparse exits before the command runs
        main(["d2v", "regmix", "--max-drift", "2"])
    assert e.value.code == 2 and "argument --max-drift" in _one_line(capsys.readouterr().err)


def test_d2v_programming_errors_keep_their_traceback(monkeypatch, tmp_path):
    import megamix.domain2vec.vectorize as vectorize

    def broken(path):
        raise ValueError("a bug, not bad input")

    monkeypatch.setattr(vectorize, "load_vectors", broken)
    with pytest.raises(ValueError, match="a bug"):
        main(["d2v", "plot", "--vectors", str(tmp_path / "v.json")])


# ------------------------------------------------------------------------------------------------ logging
def _logging_command(monkeypatch):
    """``megamix config`` replaced by a command that logs one record of every level."""
    import megamix.commands.config as config_cmd

    def run(args) -> int:
        log = logging.getLogger("megamix.some.module")
        log.debug("megamix: a debug detail")
        log.info("megamix: an info note")
        log.warning("megamix: a warning")
        return 0

    monkeypatch.setattr(config_cmd, "run", run)


def test_info_notes_reach_stderr_through_the_cli(monkeypatch, capsys):
    _logging_command(monkeypatch)
    monkeypatch.delenv("RANK", raising=False)
    monkeypatch.delenv("SLURM_PROCID", raising=False)
    assert main(["config"]) == 0
    assert capsys.readouterr().err.splitlines() == ["megamix: an info note", "megamix: a warning"]
    assert main(["-v", "config"]) == 0
    assert capsys.readouterr().err.splitlines() == ["megamix: a debug detail", "megamix: an info note",
                                                    "megamix: a warning"]
    assert main(["-q", "config"]) == 0
    assert capsys.readouterr().err.splitlines() == ["megamix: a warning"]
    assert main(["--log-level", "error", "config"]) == 0
    assert capsys.readouterr().err == ""
    # the CLI leaves the logger as it found it: library code never prints info by itself
    assert not logging.getLogger("megamix").handlers
    logging.getLogger("megamix").info("megamix: outside the CLI")
    assert "outside the CLI" not in capsys.readouterr().err


def test_only_rank_0_prints_info_every_rank_prints_warnings(monkeypatch, capsys):
    _logging_command(monkeypatch)
    monkeypatch.setenv("RANK", "1")
    assert main(["config"]) == 0
    assert capsys.readouterr().err.splitlines() == ["megamix: a warning"]
    monkeypatch.setenv("RANK", "0")
    assert main(["config"]) == 0
    assert capsys.readouterr().err.splitlines() == ["megamix: an info note", "megamix: a warning"]


# ------------------------------------------------------------------------------ one error line per launch
# Several ranks that fail the same way at start-up print the error once (rank 0's), every rank exits 2; a rank
# whose error differs prints it (once, from the first rank that has it). See megamix.cli.fail_once.
_LAUNCH_ENV = ("RANK", "WORLD_SIZE", "SLURM_PROCID", "SLURM_NTASKS", "SLURM_JOB_ID", "SLURM_STEP_ID",
               "TORCHELASTIC_RUN_ID", "TORCHELASTIC_RESTART_COUNT", "MASTER_ADDR", "MASTER_PORT", "LOCAL_RANK")


def _as_rank(monkeypatch, rank: int, world: int = 2, **env: str) -> None:
    for k in _LAUNCH_ENV:
        monkeypatch.delenv(k, raising=False)
    monkeypatch.setenv("RANK", str(rank))
    monkeypatch.setenv("WORLD_SIZE", str(world))
    for k, v in env.items():
        monkeypatch.setenv(k, v)


@pytest.fixture
def cli(monkeypatch):
    """megamix.cli with a 1 s wait for rank 0's report, no linger, started now."""
    import megamix.cli as cli

    monkeypatch.setattr(cli, "REPORT_WAIT_S", 1.0)
    monkeypatch.setattr(cli, "REPORT_LINGER_S", 0.0)
    monkeypatch.setattr(cli, "_started", time.time())
    return cli


def _timed(fn) -> tuple[int, float]:
    t = time.monotonic()
    rc = fn()
    return rc, time.monotonic() - t


def test_same_error_on_every_rank_prints_once_different_errors_each_once(cli, monkeypatch, tmp_path, capsys):
    shared = str(tmp_path / "run")
    _as_rank(monkeypatch, 0, world=4, TORCHELASTIC_RUN_ID="launch-a")
    assert cli.fail_once("bad  value\n  x", shared) == 2
    assert capsys.readouterr().err == "megamix: error: bad value x\n"
    seen = []
    for rank, msg in ((1, "bad value x"), (2, "only ranks 2 and 3 have this"), (3, "only ranks 2 and 3 have this")):
        _as_rank(monkeypatch, rank, world=4, TORCHELASTIC_RUN_ID="launch-a")
        rc, dt = _timed(lambda: cli.fail_once(msg, shared))
        assert rc == 2 and dt < 0.9, (rank, dt)   # rank 0's report is there: no wait
        seen.append(capsys.readouterr().err)
    assert seen == ["", "megamix: error: only ranks 2 and 3 have this\n", ""]
    # another launch (another torchrun run id) cannot take this launch's report for its own: rank 1 waits, prints
    _as_rank(monkeypatch, 1, world=4, TORCHELASTIC_RUN_ID="launch-b")
    rc, dt = _timed(lambda: cli.fail_once("bad value x", shared))
    assert rc == 2 and dt >= 1.0 and capsys.readouterr().err == "megamix: error: bad value x\n"
    # nor can a later launch with the same launcher variables (a report older than this process)
    monkeypatch.setattr(cli, "_started", time.time() + cli.REPORT_SKEW_S + 1)
    _as_rank(monkeypatch, 1, world=4, TORCHELASTIC_RUN_ID="launch-a")
    assert cli.fail_once("bad value x", shared) == 2 and capsys.readouterr().err == "megamix: error: bad value x\n"
    assert not list((tmp_path / "run" / cli.REPORTS_DIR).glob("*.tmp"))   # only the reports themselves


def test_a_rank_that_cannot_compare_prints(cli, monkeypatch, tmp_path, capsys):
    """train.out_dir unusable (a file): the ranks compare in this node's temporary folder; neither usable: print."""
    run_id = f"launch-{time.time_ns()}"
    (tmp_path / "afile").write_text("x")
    for rank, err in ((0, "megamix: error: boom\n"), (1, "")):
        _as_rank(monkeypatch, rank, TORCHELASTIC_RUN_ID=run_id)
        assert cli.fail_once("boom", str(tmp_path / "afile")) == 2 and capsys.readouterr().err == err
    monkeypatch.setattr(cli.tempfile, "gettempdir", lambda: str(tmp_path / "afile"))
    _as_rank(monkeypatch, 1, TORCHELASTIC_RUN_ID=run_id + "-2")
    rc, dt = _timed(lambda: cli.fail_once("boom", str(tmp_path / "afile")))
    assert rc == 2 and dt < 0.9 and capsys.readouterr().err == "megamix: error: boom\n"
    # one process, or a rank the launch variables do not place: print at once
    for env in ({"RANK": "0", "WORLD_SIZE": "1"}, {"RANK": "3", "WORLD_SIZE": "2"}):
        _as_rank(monkeypatch, int(env["RANK"]), int(env["WORLD_SIZE"]))
        assert cli.fail_once("boom", str(tmp_path / "afile")) == 2
        assert capsys.readouterr().err == "megamix: error: boom\n"


def test_an_agreed_rank_failure_prints_on_rank_0_only(cli, monkeypatch, capsys):
    """A RankFailure (megamix.comm.together: every rank raised the same agreed error) needs no comparing."""
    import megamix.commands.config as config_cmd
    from megamix.comm import RankFailure

    def run(args) -> int:
        raise RankFailure("rank 1 of 2 failed writing ds_config.json: disk full", 1, "writing ds_config.json")

    monkeypatch.setattr(config_cmd, "run", run)
    for rank, err in ((1, ""), (0, "megamix: error: rank 1 of 2 failed writing ds_config.json: disk full\n")):
        _as_rank(monkeypatch, rank)
        rc, dt = _timed(lambda: main(["config"]))
        assert rc == 2 and dt < 0.9 and capsys.readouterr().err == err


def _train_argv(data: str, out: Path, *extra: str) -> list[str]:
    sets = [f"data.data_dir={data}", f"train.out_dir={out}", "model.n_layer=1", "model.n_embd=32", "model.n_head=2",
            "model.seq_len=32", "train.global_batch_size=4", "train.micro_batch_size=2", "train.steps=2",
            "train.eval_every=0", "train.checkpoint_every=0", "train.threads=1", *extra]
    return ["train", "--no-progress", *(x for kv in sets for x in ("--set", kv))]


def _env(**kw: str) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in _LAUNCH_ENV}
    return {**env, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", **kw}


def _error_lines(text: str) -> list[str]:
    return [ln for ln in text.splitlines() if ln.startswith("megamix: error:")]


def test_torchrun_start_up_error_prints_once_and_both_ranks_exit_2(small_store, tmp_path):
    """`torchrun --nproc_per_node 2 -m megamix train` with a deepspeed.config file that does not exist: every rank
    fails its start-up check (before any process group); one line, and torchrun reports exit code 2 for each rank."""
    missing = tmp_path / "missing_ds.json"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m", "megamix",
           *_train_argv(str(small_store), tmp_path / "run", "deepspeed.enabled=true", f"deepspeed.config={missing}")]
    p = subprocess.run(cmd, cwd=tmp_path, env=_env(), capture_output=True, text=True, timeout=300)
    out = p.stdout + p.stderr
    assert p.returncode != 0
    assert _error_lines(out) == [f"megamix: error: deepspeed.config={missing}: no such file"], out[-3000:]
    # torchrun's summary: one entry per rank that ended, with its exit code
    assert sorted(re.findall(r"^\s*rank\s+:\s*(\d+) \(local_rank", out, re.M)) == ["0", "1"], out[-3000:]
    assert re.findall(r"^\s*exitcode\s+:\s*(-?\d+)", out, re.M) == ["2", "2"], out[-3000:]


# slow (about 25 s: it waits out the non-zero rank's 3 s comparison window in several launches)
@pytest.mark.slow
def test_rank_specific_start_up_errors_are_each_printed(small_store, tmp_path):
    """Plain processes with RANK/WORLD_SIZE (what a launcher sets), `megamix train --dry-run` on one out_dir:
    (a) ranks 0 and 1 fail differently: both lines; (b) rank 1 fails and rank 0 reports nothing (it passed, or
    died): rank 1's line, after its wait for rank 0's report. Every failing rank exits 2."""
    bad_data = str(tmp_path / "nodata")
    ds_cfg = tmp_path / "missing_ds.json"
    bad_ds = (str(small_store), "deepspeed.enabled=true", f"deepspeed.config={ds_cfg}")
    procs = {}
    for name, rank, (data, *extra) in (("differ", 0, (bad_data,)), ("differ", 1, bad_ds), ("alone", 1, bad_ds)):
        argv = _train_argv(data, tmp_path / name, *extra) + ["--dry-run"]
        procs[name, rank] = subprocess.Popen([sys.executable, "-m", "megamix", *argv], cwd=tmp_path,
                                             env=_env(RANK=str(rank), WORLD_SIZE="2"), stdout=subprocess.PIPE,
                                             stderr=subprocess.PIPE, text=True)
    res = {k: (p.wait(timeout=300), p.communicate()[1]) for k, p in procs.items()}
    assert {k: rc for k, (rc, _) in res.items()} == {("differ", 0): 2, ("differ", 1): 2, ("alone", 1): 2}
    data_err = f"megamix: error: data.data_dir={bad_data} does not exist"
    ds_err = f"megamix: error: deepspeed.config={ds_cfg}: no such file"
    differ = _error_lines(res["differ", 0][1]) + _error_lines(res["differ", 1][1])
    assert len(differ) == 2 and differ[0].startswith(data_err) and differ[1] == ds_err, differ
    assert _error_lines(res["alone", 1][1]) == [ds_err], res["alone", 1][1]
