"""`megamix mix --list` / `megamix mix simulate` and the telemetry plots."""
import json

import numpy as np

from megamix.cli import main
from megamix.config import MixingConfig
from megamix.strategies import build_strategy
from megamix.strategies.exact import snapshot_from_per_sample
from megamix.strategies.plots import plot_cluster_sizes, plot_gram, plot_strategy, plot_weights
from megamix.snapshot import save_snapshot_npz
from strategy_driver import propose

NAMES = ["a", "b", "c"]


def _snap(seed=0):
    rng = np.random.default_rng(seed)
    dom = np.repeat(np.arange(3), 10)
    g = rng.normal(size=(3, 8))[dom] + 0.3 * rng.normal(size=(30, 8))
    return snapshot_from_per_sample(g, dom, NAMES, step=10)


def _is_png(p):
    return p.is_file() and p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_mix_list(capsys):
    assert main(["mix", "--list"]) == 0
    out = capsys.readouterr().out
    for name in ("static", "rnb", "dograph", "uncertainty"):
        assert name in out


def test_mix_simulate(tmp_path, capsys):
    f1 = save_snapshot_npz(_snap(0), tmp_path / "s1.npz")
    f2 = save_snapshot_npz(_snap(1), tmp_path / "s2.npz")
    rc = main(["mix", "simulate", "--snapshot", str(f1), "--snapshot", str(f2), "--strategy", "dograph",
               "--set", "mixing.min_weight=0.05", "--json", "--out-dir", str(tmp_path / "out")])
    assert rc == 0
    lines = [json.loads(x) for x in capsys.readouterr().out.strip().splitlines()]
    assert len(lines) == 2
    for line in lines:
        w = np.array(list(line["weights"].values()))
        assert abs(w.sum() - 1) < 1e-9 and w.min() >= 0.05 - 1e-12
    hist = json.loads((tmp_path / "out" / "weights.json").read_text())
    assert len(hist["history"]) == 2
    assert _is_png(tmp_path / "out" / "mix_dograph_weights.png")
    assert _is_png(tmp_path / "out" / "mix_dograph_clusters.png")


def test_plots(tmp_path):
    s = build_strategy(MixingConfig(strategy="rnb"), NAMES, np.full(3, 1 / 3))
    history = []
    for r in range(3):
        s.observe(_snap(r))
        history.append((10 * (r + 1), propose(s, 10 * (r + 1)).tolist()))
    paths = plot_strategy(s, tmp_path, history=history)
    assert {p.name for p in paths} == {"mix_weights.png", "mix_gram.png"}
    assert all(_is_png(p) for p in paths)
    assert _is_png(plot_weights([(0, [0.5, 0.5])], ["x", "y"], tmp_path / "one.png"))
    assert _is_png(plot_gram(np.eye(2), ["x", "y"], tmp_path / "g.png"))
    assert _is_png(plot_cluster_sizes([3, 0, 5], tmp_path / "c.png"))
