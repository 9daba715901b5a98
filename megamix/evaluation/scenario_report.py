"""The report of a known-answer scenario (see :mod:`megamix.evaluation.scenarios`): ``REPORT.md`` and one PNG.

Every table is computed from the per-run summaries (``summaries.json``, one row per method and seed). Paired
differences are taken by seed against the baseline (uniform) and, where the scenario has one, the oracle; each
comes with its t-based 95% interval over the seeds, and the verdict is the interval's (``better`` / ``worse``
when it excludes 0). The figure shows, per method, the weights over training (the junk / repeated domain, or
the target's relatives, highlighted; DoGraph's gradient factor on the watched domain where its weights do not
move), the paired differences as a forest plot and the metric's curve.
"""
from __future__ import annotations

import time
from pathlib import Path

import numpy as np

from megamix.evaluation.harness import paired_difference
from megamix.io import atomic_write_json, atomic_write_text

__all__ = ["write_scenario_report", "scenario_tables"]


def _by_method(summaries: list[dict]) -> dict[str, dict[int, dict]]:
    by: dict[str, dict[int, dict]] = {}
    for s in summaries:
        by.setdefault(s["method"], {})[s["seed"]] = s
    return by


def _paired(by: dict, m: str, ref: str, key: str = "metric") -> dict | None:
    if m not in by or ref not in by or m == ref:
        return None
    seeds = sorted(set(by[m]) & set(by[ref]))
    return paired_difference([by[m][s][key] for s in seeds], [by[ref][s][key] for s in seeds])


def _fmt_p(p: dict | None) -> str:
    if p is None:
        return "—"
    if p["lo"] is None:
        return f"{p['mean']:+.4f} ({p['verdict_ci']})"
    return f"{p['mean']:+.4f} [{p['lo']:+.4f}, {p['hi']:+.4f}] {p['verdict_ci']}"


def _ms(xs) -> str:
    xs = [x for x in xs if x is not None and np.isfinite(x)]
    if not xs:
        return "n/a"
    return f"{np.mean(xs):.4f}" if len(xs) == 1 else f"{np.mean(xs):.4f} ± {np.std(xs, ddof=1):.4f}"


def _weight_at(traj: list, step: int) -> float:
    """The weight in force after ``step`` from a step-function trajectory [(step, w), ...]."""
    w = traj[0][1] if traj else float("nan")
    for st, x in traj:
        if st <= step:
            w = x
    return w


def _time_average(traj: list, end: int) -> float:
    if not traj or end <= 0:
        return float("nan")
    pts = [(st, w) for st, w in traj if st < end] + [(end, None)]
    return float(sum(w * (pts[i + 1][0] - st) for i, (st, w) in enumerate(pts[:-1])) / end)


def _first_below(traj: list, level: float) -> int | None:
    """The first step from which the weight stays below ``level`` to the end."""
    first = None
    for st, w in traj:
        if w < level:
            first = st if first is None else first
        else:
            first = None
    return first


def _main_table(sc: dict, by: dict) -> list[str]:
    base, ref = sc["baseline"], sc.get("reference")
    cols = [f"Δ vs {base} [95% CI] verdict"] + ([f"Δ vs {ref} [95% CI] verdict"] if ref else [])
    extra = [f"{sc['watch']} valid loss"] if sc.get("watch") else []
    lines = [f"| method | {sc['metric_label']} (mean ± std) | " + " | ".join(cols + extra) + " | n |",
             "|---" * (3 + len(cols) + len(extra)) + "|"]
    order = sorted(by, key=lambda m: np.nanmean([r["metric"] for r in by[m].values()]))
    for m in order:
        runs = by[m]
        cells = [_fmt_p(_paired(by, m, base))] + ([_fmt_p(_paired(by, m, ref))] if ref else [])
        if sc.get("watch"):
            cells.append(_ms([r.get("watch_loss") for r in runs.values()]))
        lines.append(f"| {m} | {_ms([r['metric'] for r in runs.values()])} | " + " | ".join(cells) +
                     f" | {len(runs)} |")
    return lines


def _watch_table(sc: dict, by: dict, steps: int) -> list[str]:
    w = sc["watch"]
    d = max(len(r.get("final_weights") or {}) for runs in by.values() for r in runs.values()) or 1
    marks = sorted({0, steps // 10, steps // 4, steps // 2, steps})
    level = 0.5 / d
    lines = [f"Weight of `{w}` in force after each step (mean over seeds; uniform = {1 / d:.3f}); 'off at' = first "
             f"step from which it stays below half of uniform ({level:.3f}), per seed (— = never); DoGraph keeps "
             f"the sampling weights, so its row gives the mean in-step gradient factor of `{w}`'s samples instead "
             "(1 = the batch average; per seed, whole run after the first cluster refresh).", "",
             "| method | " + " | ".join(f"w@{s}" for s in marks) + " | time-avg w | off at | factor of "
             f"`{w}` samples |", "|---" * (len(marks) + 4) + "|"]
    for m, runs in sorted(by.items()):
        rs = [runs[s] for s in sorted(runs)]
        at = [np.mean([_weight_at(r["watch_weight"], s) for r in rs]) for s in marks]
        avg = np.mean([_time_average(r["watch_weight"], steps) for r in rs])
        off = ", ".join("—" if (x := _first_below(r["watch_weight"], level)) is None else str(x) for r in rs)
        fac = [r["watch_factor"]["mean"] for r in rs if r.get("watch_factor") and r["watch_factor"]["mean"]]
        facs = ", ".join(f"{x:.3f}" for x in fac) if fac else "—"
        lines.append(f"| {m} | " + " | ".join(f"{x:.3f}" for x in at) + f" | {avg:.3f} | {off} | {facs} |")
    return lines


def _gram_table(sc: dict, by: dict) -> list[str]:
    """Why each method moved (or kept) the watched domain's weight, from the mixing statistics it saw."""
    w = sc["watch"]
    rows = []
    for m, runs in sorted(by.items()):
        gs = [r["watch_gram"] for r in runs.values() if r.get("watch_gram")]
        if not gs:
            continue
        mean = {k: float(np.mean([g[k] for g in gs])) for k in ("norm_ratio", "cos_others", "score", "score_others")}
        rows.append(f"| {m} | {len(gs)} × {gs[0]['rounds']} | {mean['norm_ratio']:.2f} | {mean['cos_others']:+.3f} | "
                    f"{mean['score']:+.3f} | {mean['score_others']:+.3f} |")
    if not rows:
        return []
    return ["", f"## Why, from the statistics: `{w}` in the domain Gram", "",
            f"Per round, from the Gram G of the projected per-domain gradients and the weights p in force; averaged "
            f"over rounds, then seeds. ‖g‖² ratio: G[{w},{w}] over the other domains' median diagonal (median over "
            f"rounds). cos: mean cosine of `{w}`'s gradient with each other domain's. Score: (Gp)/‖Gp‖, R&B's "
            f"Balance input; its next weights are ∝ exp(λ·score), so a gap Δ between `{w}`'s score and the others' "
            f"scales `{w}`'s weight relative to theirs by exp(λ·Δ) per round (before any EMA or floor).", "",
            f"| method | seeds × rounds | ‖g_{w}‖² / median others | cos({w}, others) | score of `{w}` | "
            "mean score of others |", "|---|---|---|---|---|---|"] + rows


def _target_tables(sc: dict, by: dict, steps: int) -> list[str]:
    info, base = sc["info"], sc["baseline"]
    singles = [m for m in by if m.startswith("only-")]
    best = min(singles, key=lambda m: np.nanmean([r["metric"] for r in by[m].values()])) if singles else None
    lines = []
    if best:
        lines += [f"Best single relative (lowest mean target loss): `{best}`.", "",
                  "| method | Δ vs best single relative [95% CI] verdict |", "|---|---|"]
        lines += [f"| {m} | {_fmt_p(_paired(by, m, best))} |" for m in sorted(by) if m != best]
        lines.append("")
    rel = info.get("relatives", [])
    lines += ["Where the weight went: final sampling weights, mean over seeds (the relatives first, then the three "
              "largest others), and the relatives' summed share averaged over the whole run.", "",
              "| method | " + " | ".join(rel) + " | largest others | relatives, time-avg |", "|---" * (len(rel) + 3) + "|"]
    for m, runs in sorted(by.items()):
        doms = sorted({d for r in runs.values() for d in r.get("final_weights", {})})
        mean = {d: np.mean([r.get("final_weights", {}).get(d, 0.0) for r in runs.values()]) for d in doms}
        others = sorted((d for d in doms if d not in rel), key=lambda d: -mean[d])[:3]
        share = np.mean([_time_average([(st, sum(w.get(d, 0.0) for d in rel)) for st, w in r["weights"]], steps)
                         for r in runs.values()])
        lines.append(f"| {m} | " + " | ".join(f"{mean.get(d, 0.0):.3f}" for d in rel) + " | " +
                     ", ".join(f"{d} {mean[d]:.3f}" for d in others) + f" | {share:.3f} |")
    curves = {m: _mean_curve(list(runs.values())) for m, runs in by.items()}
    steps = sorted({st for c in curves.values() for st in c})
    lines += ["", f"Target loss at each evaluation (mean over seeds; {base} first):", "",
              "| method | " + " | ".join(str(s) for s in steps) + " |", "|---" * (len(steps) + 1) + "|"]
    for m in sorted(curves, key=lambda k: (k != base, k)):
        lines.append(f"| {m} | " + " | ".join(f"{curves[m][s]:.3f}" if s in curves[m] else "" for s in steps) + " |")
    return lines


def _mean_curve(runs: list[dict]) -> dict[int, float]:
    acc: dict[int, list[float]] = {}
    for r in runs:
        for st, v in r.get("metric_curve", []):
            if v is not None and np.isfinite(v):
                acc.setdefault(int(st), []).append(v)
    return {st: float(np.mean(v)) for st, v in sorted(acc.items())}


def scenario_tables(summaries: list[dict], sc: dict, steps: int) -> list[str]:
    """The markdown sections of a scenario's results (no header, no conditions)."""
    by = _by_method(summaries)
    if not by:
        return ["No finished runs yet."]
    lines = ["## Result", "", f"Metric: {sc['metric_label']}, at the last step; lower is better. Δ is paired by "
             "seed; the interval is t-based over the seeds (95%); the verdict is the interval's (better / worse "
             "when it excludes 0).", ""]
    lines += _main_table(sc, by)
    if sc.get("watch"):
        lines += ["", f"## Weight of `{sc['watch']}` over time", ""] + _watch_table(sc, by, steps)
        lines += _gram_table(sc, by)
    if sc["name"] == "target":
        lines += ["", "## The target", ""] + _target_tables(sc, by, steps)
    return lines


def write_scenario_report(summaries: list[dict], out_root: str | Path, sc: dict, *, title: str,
                          conditions: dict, steps: int, knobs: list[str] | None = None) -> Path:
    """``REPORT.md``, ``aggregate.json`` and ``<scenario>.png`` under ``out_root``; returns the report's path."""
    out_root = Path(out_root)
    png = plot_scenario(summaries, sc, out_root / f"{sc['name']}.png")
    lines = [f"# {title}", "", f"Generated {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())} by `megamix eval "
             f"run --scenario {sc['name']}`. Every number below was measured in these runs; nothing is copied.", "",
             "## Conditions", ""]
    lines += [f"- {k}: {v}" for k, v in conditions.items()]
    lines += [f"- scenario: {k} = {v}" for k, v in sc.get("info", {}).items()]
    lines += ["- knobs changed for every scenario alike: " + ("; ".join(knobs) if knobs else "none (the config as "
              "given; each strategy's defaults)"), "", "## Methods", ""]
    lines += [f"- `{m['name']}`: {m['description']}" for m in sc["methods"]]
    lines += [""] + scenario_tables(summaries, sc, steps)
    if png is not None:
        lines += ["", "## Plot", "", f"![{png.stem}]({png.name})"]
    path = atomic_write_text(out_root / "REPORT.md", "\n".join(lines) + "\n")
    by = _by_method(summaries)
    agg = {m: {"metric": [runs[s]["metric"] for s in sorted(runs)], "seeds": sorted(runs),
               f"vs_{sc['baseline']}": _paired(by, m, sc["baseline"]),
               **({f"vs_{sc['reference']}": _paired(by, m, sc["reference"])} if sc.get("reference") else {})}
           for m, runs in by.items()}
    atomic_write_json(out_root / "aggregate.json", agg, default=float)
    return path


def plot_scenario(summaries: list[dict], sc: dict, path: Path) -> Path | None:
    """One PNG: weights per method (top row), forest plot and metric curves (bottom row)."""
    from megamix.plotting import pyplot, save_figure

    by = _by_method(summaries)
    if not by:
        return None
    plt = pyplot()
    methods = sorted(by)
    ncol = max(len(methods), 2)
    fig = plt.figure(figsize=(3.6 * ncol, 8.5))
    gs = fig.add_gridspec(2, ncol)
    for i, m in enumerate(methods):
        _plot_weights(fig.add_subplot(gs[0, i]), m, [by[m][s] for s in sorted(by[m])], sc)
    half = ncol // 2
    _plot_forest(fig.add_subplot(gs[1, :half]), by, sc)
    _plot_curves(fig.add_subplot(gs[1, half:]), by, sc, plt)
    fig.suptitle(f"scenario {sc['name']}: {sc['metric_label']}")
    fig.tight_layout()
    return save_figure(fig, path)


def _plot_weights(ax, m: str, runs: list[dict], sc: dict) -> None:
    hi = [sc["watch"]] if sc.get("watch") else list(sc.get("info", {}).get("relatives", []))
    names = sorted({d for r in runs for _, w in r["weights"] for d in w})
    end = max([r["curve"][-1][0] for r in runs if r.get("curve")] or [1])
    xs = np.linspace(0, end, 101)
    colors = ["tab:red", "tab:blue", "tab:green", "tab:orange"]
    for d in names:
        ys = np.mean([[_weight_at([(st, w.get(d, 0.0)) for st, w in r["weights"]], x) for x in xs] for r in runs],
                     axis=0)
        if d in hi:
            ax.plot(xs, ys, color=colors[hi.index(d) % 4], lw=2.2, label=d)
        else:
            ax.plot(xs, ys, color="0.7", lw=0.8)
    fac = [r["watch_factor"] for r in runs if r.get("watch_factor") and r["watch_factor"].get("curve")]
    if fac:
        tw = ax.twinx()
        for f in fac:
            tw.plot([c[0] for c in f["curve"]], [c[1] for c in f["curve"]], color="tab:purple", lw=0.6, alpha=0.6)
        tw.axhline(1.0, color="tab:purple", ls=":", lw=0.8)
        tw.set_ylabel(f"gradient factor of {sc['watch']} samples", color="tab:purple", fontsize=7)
    ax.set_ylim(0, max(0.15, ax.get_ylim()[1]))
    ax.set_title(f"{m} (mean over {len(runs)} seeds)", fontsize=9)
    ax.set_xlabel("step")
    ax.set_ylabel("sampling weight")
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=7, loc="upper right")


def _plot_forest(ax, by: dict, sc: dict) -> None:
    refs = [r for r in (sc["baseline"], sc.get("reference")) if r]
    methods = sorted(m for m in by if m not in refs or len(refs) > 1)
    for j, ref in enumerate(refs):
        for i, m in enumerate(methods):
            p = _paired(by, m, ref)
            if p is None:
                continue
            y = i + 0.18 * (j - (len(refs) - 1) / 2)
            lo, hi = (p["lo"], p["hi"]) if p["lo"] is not None else (p["mean"], p["mean"])
            ax.errorbar(p["mean"], y, xerr=[[p["mean"] - lo], [hi - p["mean"]]], fmt="o", capsize=3,
                        color=["tab:blue", "tab:red"][j], label=f"vs {ref}" if i == 0 else None)
    ax.axvline(0.0, color="k", lw=0.8)
    ax.set_yticks(range(len(methods)))
    ax.set_yticklabels(methods, fontsize=8)
    ax.set_xlabel(f"paired Δ {sc['metric_label']} (95% CI)")
    ax.legend(fontsize=7)


def _plot_curves(ax, by: dict, sc: dict, plt) -> None:
    cmap = plt.get_cmap("tab10")
    for i, (m, runs) in enumerate(sorted(by.items())):
        curves = [r.get("metric_curve", []) for r in runs.values()]
        n = min(len(c) for c in curves)
        if n == 0:
            continue
        steps = [c[0] for c in curves[0][:n]]
        ys = np.array([[v for _, v in c[:n]] for c in curves], dtype=float)
        mu = ys.mean(0)
        ax.plot(steps, mu, marker="o", ms=3, color=cmap(i % 10), label=m)
        if len(ys) > 1:
            sd = ys.std(0, ddof=1)
            ax.fill_between(steps, mu - sd, mu + sd, color=cmap(i % 10), alpha=0.12)
    ax.set_xlabel("step")
    ax.set_ylabel(sc["metric_label"])
    ax.legend(fontsize=7)
