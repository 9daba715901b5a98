"""`megamix eval run --scenario junk|repeat|target` (megamix.evaluation.scenarios, scenario_report): each scenario's
methods, a few-step run of each through the CLI on a small store, the per-run rows, the report and its plot."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

VECTORS = str(Path(__file__).resolve().parents[1] / "benchmarks" / "results" / "d2v" / "vectors.json")
TINY = """data: {{data_dir: {data}}}
model: {{n_layer: 1, n_embd: 32, n_head: 2, seq_len: 32, vocab_size: auto}}
train: {{steps: {steps}, global_batch_size: 8, micro_batch_size: 8, warmup_steps: 1, eval_every: 2, eval_batches: 1,
        log_every: 1, checkpoint_every: 0, threads: 1}}
mixture: {{kind: uniform}}
projection: {{enabled: true, k1: 8, k2: 4}}
mixing: {{strategy: static, update_every: 1, dograph_reservoir: 16}}
"""


@pytest.fixture(scope="module")
def small(tiny_store, tmp_path_factory):
    """The tiny corpus with a 512-id BPE (fast runs), and a 3-step config on it."""
    from megamix.data.tokenizer_train import build_tokenized_store

    root = tmp_path_factory.mktemp("scen")
    build_tokenized_store(tiny_store.parent, root / "data", vocab_size=512, progress=False)
    cfg = root / "tiny.yaml"
    cfg.write_text(TINY.format(data=root / "data", steps=3))
    return root, cfg


def _run(cfg: Path, out: Path, *argv: str) -> int:
    from megamix.cli import main

    return main(["eval", "run", "--config", str(cfg), "--out", str(out), "--no-progress", "--overhead-steps", "0",
                 *argv])


def test_each_scenario_has_its_methods(small):
    from megamix.commands.config import load_config
    from megamix.evaluation.scenarios import prepare_scenario

    root, cfg_path = small
    cfg = load_config(type("A", (), {"config": str(cfg_path), "overrides": []})())
    junk = prepare_scenario("junk", cfg, root / "o")
    assert [m.name for m in junk.methods] == ["uniform", "oracle", "rnb", "rnb-damped", "dograph", "dograph-sample"]
    oracle = next(m for m in junk.methods if m.name == "oracle")
    assert "data.domains=[changelogs, code_python, legal, manpages]" in oracle.overrides
    assert junk.watch == "junk" and junk.reference == "oracle" and len(junk.metric_domains) == 4
    rep = prepare_scenario("repeat", cfg, root / "o", repeat_domain="legal")
    assert rep.watch == "legal" and "legal" not in rep.metric_domains
    tgt = prepare_scenario("target", cfg, root / "o", target="manpages", relatives=["code_python"], vectors=VECTORS)
    assert [m.name for m in tgt.methods] == ["uniform", "da2", "rnb", "rnb-heldout", "only-code_python"]
    prior = json.loads((root / "o" / "priors" / "da2-manpages.json").read_text())
    assert sorted(prior["weights"]) == ["changelogs", "code_python", "legal"] and prior["meta"]["target"] == "manpages"
    assert abs(sum(prior["weights"].values()) - 1) < 1e-9


def test_junk_scenario_runs_reports_and_resumes(small, capsys):
    root, cfg = small
    out = root / "junk"
    assert _run(cfg, out, "--scenario", "junk", "--methods", "uniform,oracle,dograph", "--seeds", "0,1") == 0
    rows = json.loads((out / "summaries.json").read_text())
    assert sorted((r["method"], r["seed"]) for r in rows) == [(m, s) for m in ("dograph", "oracle", "uniform")
                                                              for s in (0, 1)]
    for r in rows:
        real = [v for d, v in r["valid_loss"].items() if d != "junk"]
        assert r["metric"] == pytest.approx(np.mean(real)) and len(r["metric_curve"]) == 2
        w = r["watch_weight"]
        assert w[0][1] == (0.0 if r["method"] == "oracle" else pytest.approx(0.2))
    dog = [r for r in rows if r["method"] == "dograph"]
    assert all(r["watch_factor"]["mean"] > 0 and r["watch_factor"]["samples"] > 0 for r in dog)
    for r in dog:   # what the statistics said about junk: a score per round, R&B's Balance input
        g = r["watch_gram"]
        assert g["rounds"] >= 1 and g["norm_ratio"] > 0 and -1 <= g["cos_others"] <= 1
        assert -1 <= g["score"] <= 1 and -1 <= g["score_others"] <= 1
    assert all(r["watch_gram"] is None for r in rows if r["method"] == "oracle")   # junk not trained on
    for r in rows:   # each run's wall time and the machine's load, recorded by the harness
        rc = r["run_conditions"]
        assert rc["wall_seconds"] > 0 and rc["cpus"] >= 1 and rc["started_utc"].endswith("Z"), rc
    report = (out / "REPORT.md").read_text()
    assert "## Why, from the statistics: `junk` in the domain Gram" in report
    assert "- runs: 6 runs (6 timed): wall median" in report and "(of 6 planned)" in report
    assert "Δ vs uniform [95% CI] verdict" in report and "Δ vs oracle [95% CI] verdict" in report
    assert "## Weight of `junk` over time" in report and "junk.png" in report and (out / "junk.png").is_file()
    # resumable: finished runs are reused (nothing trains again), and the report re-renders from the rows
    capsys.readouterr()
    assert _run(cfg, out, "--scenario", "junk", "--methods", "uniform,oracle,dograph", "--seeds", "0,1") == 0
    assert "done in" not in capsys.readouterr().out
    from megamix.cli import main
    assert main(["eval", "report", "--out", str(out)]) == 0 and (out / "REPORT.md").is_file()


def test_target_scenario_runs_in_pieces_with_heldout_gradients_and_the_da2_prior(small, capsys):
    root, cfg = small
    out = root / "target"
    argv = ["--scenario", "target", "--target", "manpages", "--relatives", "code_python", "--vectors", VECTORS,
            "--methods", "uniform,da2,rnb-heldout,only-code_python", "--seeds", "0"]
    assert _run(cfg, out, *argv, "--max-runs", "3") == 0              # a first session: 3 of the 4 runs
    said = capsys.readouterr().out
    assert said.count("done in") == 3 and "1 runs left for a later call" in said
    assert len(json.loads((out / "summaries.json").read_text())) == 3
    assert _run(cfg, out, *argv) == 0                                 # the next session finishes the suite
    rows = {r["method"]: r for r in json.loads((out / "summaries.json").read_text())}
    assert set(rows) == {"uniform", "da2", "rnb-heldout", "only-code_python"}
    for r in rows.values():
        assert list(r["valid_loss"]) == ["manpages"] and r["metric"] == r["valid_loss"]["manpages"]
    assert list(rows["only-code_python"]["final_weights"]) == ["code_python"]
    cfg_used = (Path(rows["rnb-heldout"]["dir"]) / "config.yaml").read_text()
    assert "eval_grad_batches: 2" in cfg_used
    report = (out / "REPORT.md").read_text()
    assert "Best single relative" in report and "Where the weight went" in report and (out / "target.png").is_file()


def test_unknown_scenario_method_is_one_line(small, capsys):
    root, cfg = small
    assert _run(cfg, root / "x", "--scenario", "repeat", "--repeat-domain", "legal", "--methods", "da2") == 2
    err = [x for x in capsys.readouterr().err.splitlines() if x.strip()]
    assert len(err) == 1 and "not methods of the repeat scenario" in err[0]


@pytest.mark.slow
def test_every_method_of_every_scenario_runs(small):
    root, cfg = small
    for argv in (["--scenario", "junk"], ["--scenario", "repeat", "--repeat-domain", "legal"],
                 ["--scenario", "target", "--target", "manpages", "--relatives", "code_python,legal",
                  "--vectors", VECTORS]):
        out = root / f"all-{argv[1]}"
        assert _run(cfg, out, *argv, "--seeds", "0,1") == 0
        rows = json.loads((out / "summaries.json").read_text())
        methods = json.loads((out / "scenario.json").read_text())["methods"]
        assert len(rows) == 2 * len(methods)
