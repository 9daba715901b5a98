"""The CLI's one reporter and its logging: every error the user can fix (a config or data error, a run that stops
on a non-finite loss or an exhausted domain) is one line on stderr with exit code 2; anything else keeps its
traceback; ``log.info`` notes of the ``megamix`` logger reach stderr (rank 0 only), warnings on every rank."""
from __future__ import annotations

import logging

import pytest

from megamix.cli import main
from megamix.configbase import ConfigError, MegamixError, RunError


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
