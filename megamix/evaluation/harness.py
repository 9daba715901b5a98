"""Does online mixing beat static mixtures? Same model, token budget and seeds; different mixtures.

A *suite* is a base config plus a list of *methods* (config overrides). ``run_suite`` trains every
(method, seed) pair with the real trainer, skipping pairs whose ``result.json`` already exists (so an
interrupted suite resumes), and ``write_report`` turns the results into a markdown report with
mean ± std tables and PNG plots.

Metrics per run, from the trainer's ``metrics.jsonl``:
- final validation loss per domain and its average over domains (the *target mix* is the uniform
  average over domains, i.e. every domain counts the same, whatever its training share);
- steps to reach the uniform baseline's final average validation loss (first evaluation at or below
  it; ``None`` if never reached);
- median step time, so each strategy's wall-clock overhead is a ratio against the static run of the
  same seed, measured in the same suite.
"""
from __future__ import annotations

import json
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from megamix.config import MegamixConfig
from megamix.io import atomic_write_json


@dataclass
class Method:
    """One mixture method: a name, config overrides and what it needs prepared first."""

    name: str
    overrides: list[str]
    description: str
    needs: list[str] = field(default_factory=list)   # "prior" (Domain2Vec mixture), "regrouped"


def default_methods(prior: str | None = None, regrouped_dir: str | None = None) -> list[Method]:
    """The comparison of issue 8. Methods whose prerequisite is missing are left out by the caller."""
    ms = [
        Method("natural", ["mixture.kind=natural", "mixing.strategy=static"], "proportional to tokens"),
        Method("uniform", ["mixture.kind=uniform", "mixing.strategy=static"], "stratified (R&B's baseline)"),
        Method("temperature", ["mixture.kind=temperature", "mixture.temperature=3.0",
                               "mixing.strategy=static"], "tokens^(1/3)"),
        Method("rnb", ["mixture.kind=uniform", "mixing.strategy=rnb"],
               "R&B Balance on original domains, as in the paper (uniform start, no EMA, no floor)"),
        Method("rnb-damped", ["mixture.kind=uniform", "mixing.strategy=rnb-damped"],
               "R&B Balance with EMA 0.5 and a 0.02 floor"),
        Method("dograph", ["mixture.kind=uniform", "mixing.strategy=dograph"],
               "DoGraph: in-step gradient reweighting by cluster (objective from the base config)"),
        Method("dograph-sample", ["mixture.kind=uniform", "mixing.strategy=dograph-sample"],
               "DoGraph variant: cluster weights turned into domain sampling weights"),
    ]
    if prior:
        ms.append(Method("da2", ["mixture.kind=file", f"mixture.file={prior}", "mixing.strategy=static"],
                         "Domain2Vec DA² prior, static", ["prior"]))
        ms.append(Method("rnb+da2", ["mixture.kind=file", f"mixture.file={prior}", "mixing.strategy=rnb"],
                         "R&B seeded with the DA² prior", ["prior"]))
    if regrouped_dir:
        ms.append(Method("rnb-regrouped", ["mixture.kind=uniform", "mixing.strategy=rnb",
                                           f"data.data_dir={regrouped_dir}"],
                         "R&B on embedding-regrouped clusters", ["regrouped"]))
    return ms


def run_dir(out_root: Path, method: str, seed: int) -> Path:
    return out_root / "runs" / f"{method}__seed{seed}"


def run_suite(base: MegamixConfig, methods: list[Method], seeds: list[int], out_root: str | Path,
              *, eval_data_dir: str | None = None, progress: bool = True, callbacks=None, summarise=None,
              max_runs: int | None = None) -> list[dict]:
    """Train every (method, seed); returns one summary dict per finished run. Existing results are reused.

    ``callbacks(method, seed) -> list``: extra training callbacks for a run (run before the default ones);
    ``summarise(run_dir, method, seed) -> dict``: the per-run summary (default :func:`summarise_run`);
    ``max_runs``: train at most this many new runs in this call (the others wait for the next call)."""
    from megamix.train.callbacks import default_callbacks
    from megamix.train.loop import Trainer

    out_root = Path(out_root)
    out_root.mkdir(parents=True, exist_ok=True)
    summarise = summarise or summarise_run
    summaries, pending = [], []
    total = len(methods) * len(seeds)
    i = trained = 0
    # seed-major: every method at the first seed, then the next seed, ..., so a suite cut short by --max-runs
    # already holds whole seeds, which the paired comparisons need
    for s in seeds:
        for m in methods:
            i += 1
            rd = run_dir(out_root, m.name, s)
            res_path = rd / "result.json"
            if not res_path.exists() and max_runs is not None and trained >= max_runs:
                pending.append(f"{m.name}__seed{s}")
                continue
            if not res_path.exists():
                ov = list(m.overrides) + [f"train.seed={s}", f"train.out_dir={rd}", "train.resume=true"]
                if eval_data_dir and any(o.startswith("data.data_dir=") for o in m.overrides):
                    ov.append(f"data.eval_data_dir={eval_data_dir}")
                cfg = base
                for o in ov:
                    cfg = cfg.with_override(o)
                print(f"[{i}/{total}] {m.name} seed={s} -> {rd}", flush=True)
                extra = list(callbacks(m, s)) if callbacks else []
                with RunConditions(rd) as rc:
                    Trainer(cfg, progress=progress, log_to_stdout=False, callbacks=extra + default_callbacks()).fit()
                trained += 1
                print(f"    done in {rc.record['wall_seconds']:.0f}s (1-min load {rc.record['load_start']:.2f} -> "
                      f"{rc.record['load_end']:.2f})", flush=True)
            summaries.append(summarise(rd, m.name, s))
    if pending:
        print(f"{len(pending)} runs left for a later call (--max-runs): {', '.join(pending)}", flush=True)
    atomic_write_json(out_root / "summaries.json", summaries)
    return summaries


class RunConditions:
    """Context manager around one run's training: writes ``<run>/run_conditions.json`` with the wall time, the
    machine's 1-minute load average at the start and the end, the CPU count and the UTC start, so a report can
    state under what load its runs were timed (written only when the run finished)."""

    FILE = "run_conditions.json"

    def __init__(self, rd: Path):
        self.rd = Path(rd)
        self.record: dict = {}

    def __enter__(self) -> "RunConditions":
        self._t0 = time.time()
        self.record = {"started_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                       "load_start": _load1(), "cpus": os.cpu_count()}
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.record.update(wall_seconds=round(time.time() - self._t0, 2), load_end=_load1())
            atomic_write_json(self.rd / self.FILE, self.record)

    @staticmethod
    def read(rd: Path) -> dict | None:
        f = Path(rd) / RunConditions.FILE
        return json.loads(f.read_text()) if f.is_file() else None


def _load1() -> float:
    try:
        return round(os.getloadavg()[0], 2)
    except OSError:   # not available on this platform
        return float("nan")


def conditions_summary(summaries: list[dict]) -> str:
    """One line on the finished runs' wall times and load: what a report states next to its numbers."""
    rcs = [s["run_conditions"] for s in summaries if s.get("run_conditions")]
    if not rcs:
        return f"{len(summaries)} runs; their wall time and load were not recorded"
    walls = [r["wall_seconds"] for r in rcs]
    loads = [x for r in rcs for x in (r["load_start"], r["load_end"]) if x == x]
    when = sorted(r["started_utc"] for r in rcs)
    return (f"{len(summaries)} runs ({len(rcs)} timed): wall median {np.median(walls):.0f} s (min {min(walls):.0f}, "
            f"max {max(walls):.0f}), total {sum(walls) / 3600:.2f} h; 1-min load average {min(loads):.2f}–"
            f"{max(loads):.2f} on {rcs[0]['cpus']} CPUs; started {when[0]} to {when[-1]}")


def summarise_run(rd: Path, method: str, seed: int) -> dict:
    from megamix.train.metrics import read_metrics

    recs = read_metrics(rd / "metrics.jsonl")
    res = json.loads((rd / "result.json").read_text())
    evals = [r for r in recs if r["kind"] == "eval"]
    trains = [r for r in recs if r["kind"] == "train"]
    weights = [r for r in recs if r["kind"] == "weights"]
    grams = [r for r in recs if r["kind"] == "mixing"]
    return {
        "method": method, "seed": seed, "dir": str(rd),
        "valid_loss": res["valid_loss"], "valid_loss_avg": res["valid_loss_avg"],
        "curve": [(r["step"], r["valid_loss_avg"]) for r in evals],
        "step_seconds": float(np.median([r["step_seconds"] for r in trains])) if trains else float("nan"),
        "weights": [(r["step"], r["weights"]) for r in weights],
        "last_gram": grams[-1]["gram"] if grams else None,
        "domains": list(res["valid_loss"].keys()),
        "run_conditions": RunConditions.read(rd),
    }


def steps_to_reach(curve: list[tuple[int, float]], target: float) -> int | None:
    """First evaluated step whose average validation loss is <= target."""
    for step, v in curve:
        if v is not None and v <= target + 1e-12:
            return int(step)
    return None


def _ms(xs: list[float]) -> str:
    xs = [x for x in xs if x is not None and not (isinstance(x, float) and math.isnan(x))]
    if not xs:
        return "n/a"
    if len(xs) == 1:
        return f"{xs[0]:.4f}"
    return f"{np.mean(xs):.4f} ± {np.std(xs, ddof=1):.4f}"


def aggregate(summaries: list[dict], baseline: str = "uniform", static: str = "uniform") -> dict:
    """Per-method aggregates over seeds (means, stds, steps-to-baseline, overhead ratios)."""
    by: dict[str, list[dict]] = {}
    for s in summaries:
        by.setdefault(s["method"], []).append(s)
    base_final = {s["seed"]: s["valid_loss_avg"] for s in by.get(baseline, [])}
    static_t = {s["seed"]: s["step_seconds"] for s in by.get(static, [])}
    out = {}
    for m, runs in by.items():
        domains = runs[0]["domains"]
        reach = [steps_to_reach(r["curve"], base_final[r["seed"]]) if r["seed"] in base_final else None
                 for r in runs]
        overhead = [r["step_seconds"] / static_t[r["seed"]] - 1.0 for r in runs if r["seed"] in static_t]
        out[m] = {
            "n_seeds": len(runs),
            "avg": [r["valid_loss_avg"] for r in runs],
            "per_domain": {d: [r["valid_loss"].get(d) for r in runs] for d in domains},
            "steps_to_baseline": reach,
            "overhead": overhead,
            "final_steps": [r["curve"][-1][0] if r["curve"] else None for r in runs],
        }
    return out


def write_report(summaries: list[dict], out_root: str | Path, *, title: str, conditions: dict,
                 paper_numbers: dict | None = None, baseline: str = "uniform",
                 overhead: dict | None = None, extra_plots: list[Path] | None = None) -> Path:
    """Markdown report + PNG plots under ``out_root``. Returns the report path."""
    out_root = Path(out_root)
    agg = aggregate(summaries, baseline=baseline)
    plots = _plots(summaries, out_root) + list(extra_plots or [])
    lines = [f"# {title}", "", f"Generated {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())} by "
             "`megamix eval run`. Every number below was measured in this run; nothing is copied.", "",
             "## Conditions", ""]
    lines += [f"- {k}: {v}" for k, v in conditions.items()]
    lines += ["", "## Average validation loss over domains (target mix = uniform over domains)", "",
              f"mean ± std over seeds; lower is better. 'steps to {baseline}' = first evaluation at which the "
              f"method reaches the {baseline} baseline's final loss for the same seed (— = never).", "",
              f"| method | avg valid loss | Δ vs {baseline} | steps to {baseline} final |", "|---|---|---|---|"]
    base_avg = np.mean(agg[baseline]["avg"]) if baseline in agg else float("nan")
    for m, a in sorted(agg.items(), key=lambda kv: np.mean(kv[1]["avg"])):
        reach = a["steps_to_baseline"]
        reach_s = ", ".join("—" if r is None else str(r) for r in reach)
        lines.append(f"| {m} | {_ms(a['avg'])} | {np.mean(a['avg']) - base_avg:+.4f} | {reach_s} |")
    domains = summaries[0]["domains"] if summaries else []
    lines += ["", "## Per-domain validation loss (mean over seeds)", "",
              "| method | " + " | ".join(domains) + " |", "|---|" + "---|" * len(domains)]
    for m, a in sorted(agg.items()):
        cells = []
        for d in domains:
            vals = [v for v in a["per_domain"].get(d, []) if v is not None]
            cells.append(f"{np.mean(vals):.3f}" if vals else "n/a")
        lines.append(f"| {m} | " + " | ".join(cells) + " |")
    if overhead:
        key = next(k for k in overhead if k.startswith("overhead_vs_"))
        lines += ["", "## Step-time overhead (interleaved probe, same process, medians)", "",
                  f"{overhead['repeats']} interleaved repeats x {overhead['steps_per_run']} steps per variant; "
                  f"ratios against *{key[len('overhead_vs_'):]}* measured in the same call. The suite's own "
                  "per-run step times above are confounded by whatever else ran on the machine; these are not.",
                  "", "| variant | median step (s) | overhead |", "|---|---|---|"]
        for k, v in overhead["median_step_seconds"].items():
            lines.append(f"| {k} | {v:.3f} | {100 * overhead[key][k]:+.1f}% |")
    lines += ["", "## Verdict (computed, not written by hand)", "",
              "Paired by seed; 'better/worse' = the mean paired difference is beyond 2 standard errors (the 95% "
              "interval is t-based over the seeds). With few seeds this is a weak test: treat a single 'better' "
              "as a hint, not a result.", ""]
    lines += _verdicts(agg, baseline)
    if paper_numbers:
        lines += ["", "## Our numbers next to the papers'", "", "| claim | paper | ours |", "|---|---|---|"]
        lines += [f"| {k} | {v[0]} | {v[1]} |" for k, v in paper_numbers.items()]
    lines += ["", "## Plots", ""] + [f"![{p.stem}]({p.name})" for p in plots]
    path = out_root / "REPORT.md"
    path.write_text("\n".join(lines) + "\n")
    (out_root / "aggregate.json").write_text(json.dumps(agg, indent=1, default=float))
    return path


def paired_difference(x, b, level: float = 0.95) -> dict:
    """Paired (by position: seed) difference ``x - b``: n, mean, standard error and the t-based ``level``
    interval over the pairs (None where n < 2). The rule of the standard comparison is ``verdict_2se``: the
    mean beyond 2 standard errors; the scenarios use ``verdict_ci``: the interval excludes 0."""
    from scipy.stats import t as student_t

    x, b = np.asarray(x, dtype=float), np.asarray(b, dtype=float)
    n = min(len(x), len(b))
    d = x[:n] - b[:n]
    d = d[np.isfinite(d)]
    n = len(d)
    out = {"n": n, "mean": float(d.mean()) if n else float("nan"), "se": None, "lo": None, "hi": None,
           "verdict_2se": "one seed" if n == 1 else "no data" if n == 0 else None, "verdict_ci": None}
    if n < 2:
        out["verdict_ci"] = out["verdict_2se"]
        return out
    se = float(d.std(ddof=1) / math.sqrt(n))
    half = float(student_t.ppf(0.5 + level / 2, n - 1)) * se
    m = out["mean"]
    out.update(se=se, lo=m - half, hi=m + half,
               verdict_2se="better" if m < -2 * se else "worse" if m > 2 * se else "within noise",
               verdict_ci="better" if m + half < 0 else "worse" if m - half > 0 else "within noise")
    return out


def _verdicts(agg: dict, baseline: str) -> list[str]:
    """For each method: is its mean avg loss better than the baseline by more than the seed noise?"""
    out = []
    if baseline not in agg:
        return ["- no baseline runs"]
    words = {"better": "better than", "worse": "worse than", "within noise": "within noise of"}
    for m, a in sorted(agg.items()):
        if m == baseline:
            continue
        p = paired_difference(a["avg"], agg[baseline]["avg"])
        if p["n"] < 2:
            out.append(f"- {m}: {p['mean']:+.4f} vs {baseline} (one seed; no noise estimate)")
            continue
        out.append(f"- {m}: {words[p['verdict_2se']]} {baseline} (paired Δ = {p['mean']:+.4f} ± {p['se']:.4f} s.e., "
                   f"95% CI [{p['lo']:+.4f}, {p['hi']:+.4f}], n={p['n']})")
    return out


def _plots(summaries: list[dict], out_root: Path) -> list[Path]:
    from megamix.plotting import pyplot, save_figure
    plt = pyplot()

    paths = []
    methods = sorted({s["method"] for s in summaries})
    cmap = plt.get_cmap("tab10")
    fig, (ax, axz) = plt.subplots(1, 2, figsize=(14, 5))
    for i, m in enumerate(methods):
        runs = [s for s in summaries if s["method"] == m]
        steps = [st for st, _ in runs[0]["curve"]]
        ys = np.array([[v for _, v in r["curve"]][:len(steps)] for r in runs if len(r["curve"]) >= len(steps)],
                      dtype=float)
        mu = ys.mean(0)
        half = len(steps) // 2
        for axis, sl in ((ax, slice(None)), (axz, slice(half, None))):
            axis.plot(steps[sl], mu[sl], label=m, color=cmap(i % 10), marker="o", ms=3)
            if len(ys) > 1:
                sd = ys.std(0, ddof=1)
                axis.fill_between(steps[sl], (mu - sd)[sl], (mu + sd)[sl], alpha=0.12, color=cmap(i % 10))
    for axis, t in ((ax, "validation loss (mean ± std over seeds)"), (axz, "second half, zoomed")):
        axis.set_xlabel("step")
        axis.set_ylabel("avg validation loss over domains")
        axis.set_title(t)
    axz.legend(fontsize=8)
    paths.append(save_figure(fig, out_root / "loss_curves.png"))

    dyn = [m for m in methods if any(len(s["weights"]) > 1 for s in summaries if s["method"] == m)]
    if dyn:
        fig, axes = plt.subplots(1, len(dyn), figsize=(5.5 * len(dyn), 4.5), squeeze=False)
        for ax, m in zip(axes[0], dyn):
            run = next(s for s in summaries if s["method"] == m)
            names = list(run["weights"][0][1].keys())
            xs = [st for st, _ in run["weights"]]
            ys = [[w[n] for _, w in run["weights"]] for n in names]
            ax.stackplot(xs, ys, labels=names, step="post",
                         colors=[plt.get_cmap("tab20")(j % 20) for j in range(len(names))])
            ax.set_ylim(0, 1)
            ax.set_title(f"{m}: weights (seed {run['seed']})")
            ax.set_xlabel("step")
        axes[0][0].legend(fontsize=6, loc="upper left", ncol=2)
        paths.append(save_figure(fig, out_root / "weight_trajectories.png"))

    grams = [(s["method"], s) for s in summaries if s.get("last_gram") and s["method"].startswith("rnb")]
    if grams:
        from megamix.strategies.plots import plot_gram
        m, run = grams[0]
        names = list(run["weights"][0][1].keys()) if run["weights"] else \
            [str(i) for i in range(len(run["last_gram"]))]
        paths.append(plot_gram(run["last_gram"], names, out_root / "gram_heatmap.png",
                               title=f"{m} (seed {run['seed']}): last-round domain gradients"))
    return paths


OVERHEAD_VARIANTS = [
    ("plain torch CE (no megamix statistics)", ["train.loss_impl=torch", "mixing.strategy=static"]),
    ("fused CE, projection off", ["projection.enabled=false", "mixing.strategy=static"]),
    ("fused CE + projection, static", ["mixing.strategy=static"]),
    ("R&B (fused + projection + updates)", ["mixing.strategy=rnb"]),
    ("DoGraph (fused + projection + k-means + per-sample gradient weights)", ["mixing.strategy=dograph"]),
]


def measure_overhead(base: MegamixConfig, out_root: str | Path, *, steps: int = 40, repeats: int = 2,
                     variants=OVERHEAD_VARIANTS) -> dict:
    """Median optimizer-step time of each variant, interleaved (A B C .. A B C ..) so that machine load
    hits every variant alike; ratios are against the first variant, measured in the same call."""
    from megamix.train.metrics import read_metrics
    from megamix.train.loop import train

    out_root = Path(out_root)
    times: dict[str, list[float]] = {name: [] for name, _ in variants}
    for rep in range(repeats):
        for i, (name, ov) in enumerate(variants):
            rd = out_root / "overhead" / f"v{i}_rep{rep}"
            cfg = base
            for o in ov + [f"train.steps={steps}", "train.eval_every=0", "train.log_every=1",
                           f"train.out_dir={rd}", "train.resume=false", "train.checkpoint_every=0"]:
                cfg = cfg.with_override(o)
            train(cfg, progress=False, log_to_stdout=False, overwrite=True)   # a re-run re-measures
            recs = [r for r in read_metrics(rd / "metrics.jsonl") if r["kind"] == "train"]
            times[name] += [r["step_seconds"] for r in recs[2:]]  # skip warm-up steps
    base_name = variants[0][0]
    med = {k: float(np.median(v)) for k, v in times.items()}
    res = {"steps_per_run": steps, "repeats": repeats, "median_step_seconds": med,
           "overhead_vs_" + base_name: {k: med[k] / med[base_name] - 1.0 for k in med}}
    (out_root / "overhead.json").write_text(json.dumps(res, indent=1))
    return res
