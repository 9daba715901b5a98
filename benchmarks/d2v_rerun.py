"""Re-run the committed Domain2Vec pipeline on the current corpus and write its report.

    python benchmarks/d2v_rerun.py [--data-dir data] [--out DIR]          # DIR: default runs/bench/d2v-<UTC time>
    python benchmarks/d2v_rerun.py --out benchmarks/results/d2v           # refresh the committed results, on purpose
    python benchmarks/d2v_rerun.py --out benchmarks/results/d2v --report-only   # only regenerate results.md

Every stage is a `megamix d2v` command (each shows its own progress bar), run in this one process so
the libraries load once. The stage arguments are the budget: 60 reference passages per domain for
the vocabulary (k=24), 24 sampled passages per domain for the vectors, and 22 proxies of
``benchmarks/results/d2v/proxy.yaml`` (30 steps x 8 x 32 tokens) for ``evaluate``, whose first 8
(the Dirichlet draws) ``regmix`` reuses from the shared proxy cache. It was sized for ~20 min of
wall time on 2 CPU cores shared with about eight other jobs. Per-stage wall and CPU seconds, the
machine, library versions, date and budgets go to ``<out>/conditions.json``; ``<out>/results.md`` is
generated from the outputs (``--report-only`` regenerates it without running anything). The proxy config
(``--proxy-config``, default the committed ``benchmarks/results/d2v/proxy.yaml``) is copied to ``<out>/proxy.yaml``
when the folder has none. The proxy runs' cache ``<out>/proxies/proxies.jsonl`` is not committed; a rerun into a
folder that has it reuses the finished proxies.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shutil
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def stages(data: str, out: str) -> list[tuple[str, list[str]]]:
    vec = f"{out}/vectors.json"
    proxy = ["-c", f"{out}/proxy.yaml", "--set", f"data.data_dir={data}"]
    return [
        ("vocab", ["d2v", "vocab", "--data-dir", data, "--out", out, "--k", "24", "--docs-per-domain", "60",
                   "--max-tokens", "128", "--elbow", "8,16,24,32"]),
        ("classify", ["d2v", "classify", "--vocab", out]),
        ("vectorize", ["d2v", "vectorize", "--vocab", out, "--data-dir", data, "--n", "24", "--out", vec]),
        ("da2", ["d2v", "da2", "--vectors", vec, "-c", "configs/eval-cpu.yaml", "--set", f"data.data_dir={data}",
                 "--out", f"{out}/da2_mixture.json"]),
        ("evaluate", ["d2v", "evaluate", "--vectors", vec, *proxy, "--mixtures", "8", "--sparse", "4",
                      "--pairs", "4", "--seed-repeats", "2", "--proxy-dir", f"{out}/proxies"]),
        ("regmix", ["d2v", "regmix", "--vectors", vec, *proxy, "--proxies", "8", "--proxy-dir", f"{out}/proxies",
                    "--out", f"{out}/mixture_regmix.json"]),
        ("plot", ["d2v", "plot", "--vectors", vec, "--out-dir", out]),
    ]


def _cpu() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def _versions() -> dict:
    import importlib.metadata as md

    out = {"python": platform.python_version()}
    for pkg in ("torch", "numpy", "scipy", "scikit-learn", "lightgbm", "transformers", "sentence-transformers"):
        try:
            out[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            out[pkg] = None
    return out


def _machine() -> dict:
    model = ""
    try:
        model = next(ln.split(":", 1)[1].strip() for ln in Path("/proc/cpuinfo").read_text().splitlines()
                     if ln.startswith("model name"))
    except (OSError, StopIteration):
        pass
    mem = ""
    try:
        kb = int(next(ln.split()[1] for ln in Path("/proc/meminfo").read_text().splitlines()
                      if ln.startswith("MemTotal")))
        mem = f"{kb / 2**20:.0f} GiB"
    except (OSError, StopIteration, ValueError):
        pass
    return {"cpu": model or platform.processor(), "cpus": os.cpu_count(), "memory": mem, "gpu": None,
            "platform": platform.platform()}


def _git_commit() -> str | None:
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True,
                              check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None


def run(data: str, out: str) -> dict:
    from megamix.cli import main

    cond = {"date_utc": datetime.now(timezone.utc).isoformat(timespec="seconds"), "machine": _machine(),
            "versions": _versions(), "git_commit_before_run": _git_commit(), "data_dir": data,
            "load_average_start": list(os.getloadavg()), "stages": []}
    t_all, c_all = time.time(), _cpu()
    for name, argv in stages(data, out):
        print(f"\n=== {name}: megamix {' '.join(argv)}", flush=True)
        t0, c0 = time.time(), _cpu()
        rc = main(argv)
        cond["stages"].append({"stage": name, "argv": ["megamix", *argv], "wall_seconds": round(time.time() - t0, 1),
                               "cpu_seconds": round(_cpu() - c0, 1), "load_average_after": list(os.getloadavg())})
        if rc != 0:
            raise SystemExit(f"stage {name} failed with exit status {rc}")
    cond["wall_seconds_total"] = round(time.time() - t_all, 1)
    cond["cpu_seconds_total"] = round(_cpu() - c_all, 1)
    (Path(out) / "conditions.json").write_text(json.dumps(cond, indent=1))
    return cond


def _f(x, nd=3):
    return "—" if x is None or x != x else f"{x:+.{nd}f}" if nd == 3 else f"{x:.{nd}f}"


def _corr_cell(c: dict) -> str:
    ci = c.get("spearman_ci95")
    return f"{_f(c['spearman'])}" + (f" [{ci[0]:+.2f}, {ci[1]:+.2f}]" if ci else "")


PREDICTORS = [
    ("da2_huber", "DA² Huber, δ = auto (default)"),
    ("da2_huber_delta1", "DA² Huber, δ = 1 (= ½·MSE)"),
    ("da2_l2", "DA² L2"), ("da2_l1", "DA² L1"), ("da2_kl", "DA² KL"), ("da2_js", "DA² JS"),
    ("l1_to_uniform", "naive: L1 distance to uniform"), ("neg_entropy", "naive: negative entropy"),
    ("regmix_cv_argmax", "Domain2Vec+RegMix, 4-fold CV, argmax targets (default)"),
    ("regmix_cv_proba", "Domain2Vec+RegMix, 4-fold CV, proba targets"),
    ("regmix_cv_bayes", "Domain2Vec+RegMix, 4-fold CV, Bayes-mapped targets (previous)"),
]


def report(out: str) -> Path:
    o = Path(out)
    ev = json.loads((o / "evaluate.json").read_text())
    da2 = json.loads((o / "da2_mixture.json").read_text())
    rm = json.loads((o / "mixture_regmix.json").read_text())
    clf = json.loads((o / "classifier.json").read_text())
    cond = json.loads((o / "conditions.json").read_text())
    cfg, px = ev["config"], ev["config"]["proxy"]
    L: list[str] = ["# Domain2Vec on the current corpus: DA², naive predictors and Domain2Vec+RegMix", "",
                    "Generated by `python benchmarks/d2v_rerun.py` from the JSON files in this folder.", ""]
    m = cond["machine"]
    v = cond["versions"]
    L += ["## Conditions", "",
          f"- Date (UTC): {cond['date_utc']}; commit before the run: `{cond['git_commit_before_run']}`.",
          f"- Machine: {m['cpu']}, {m['cpus']} CPUs, {m['memory']}, no GPU; shared with other jobs (load average "
          f"{cond['load_average_start'][0]:.1f} at the start).",
          "- Versions: " + ", ".join(f"{k} {val}" for k, val in v.items() if val) + ".",
          f"- Corpus: `{cond['data_dir']}` (the current build; 12 domains).",
          f"- Total: {cond['wall_seconds_total'] / 60:.1f} min wall, {cond['cpu_seconds_total'] / 60:.1f} min CPU.", "",
          "| stage | wall s | CPU s | command |", "|---|---:|---:|---|"]
    for s in cond["stages"]:
        L.append(f"| {s['stage']} | {s['wall_seconds']:.0f} | {s['cpu_seconds']:.0f} | `{' '.join(s['argv'])}` |")
    mod = px["model"]
    L += ["", f"Proxy budget: {ev['n_runs']} proxies (+{len(ev.get('seed_noise', {}).get('train_seeds', [0])) - 1} "
          f"seed repeats of uniform), each a {mod['n_layer']}-layer d={mod['n_embd']} GPT-2 "
          f"(vocab {mod['vocab_size']}) trained {px['steps']} steps × {px['global_batch_size']} × {px['seq_len']} "
          f"= {px['tokens']:,} tokens (lr {px['lr']}, seed {px['seed']}, loss path {px['loss_impl']}), then scored on "
          f"the {json.loads((o / 'vectors.json').read_text())['valid']['docs']['n']} validation documents "
          f"(first {px['seq_len'] + 1} tokens each). Config: `proxy.yaml`; cache: `proxies/proxies.jsonl` (not "
          "committed; a rerun into this folder reuses it when present).", ""]
    L += ["## Classifier", "",
          f"{clf['n_classes']} meta-domains; held-out accuracy {clf['report']['heldout_acc']:.3f} "
          f"(chance {clf['report']['chance_acc']:.3f}; the paper reports 0.747 for 260 classes).", ""]
    di = cfg["delta_info"]
    q = di["abs_diff_quantiles"]
    L += ["## Huber δ", "",
          f"Component differences |(r·V_train − v_valid)_j| over 10,000 candidates of the search's Dirichlet: "
          f"p10 {q['p10']:.4f}, p25 {q['p25']:.4f}, median {q['p50']:.4f}, p75 {q['p75']:.4f}, p90 {q['p90']:.4f}, "
          f"p99 {q['p99']:.4f}, max {di['abs_diff_max']:.4f}. With δ = 1 no component reaches the linear part "
          f"(fraction {di['linear_fraction_at_delta_1']:.2f}), so Huber is ½·MSE. The default `--delta auto` takes "
          f"the median, δ = {cfg['delta']:.4f}: {100 * di['linear_fraction']:.0f}% of the components are in the "
          "linear part.", ""]
    mt = da2["meta"]
    other = mt.get("dirichlet_search_paper_alpha") or mt.get("dirichlet_search_scaled_alpha")
    L += ["## Dirichlet α of the search (DA², Huber δ auto, 100k candidates, top-100 mean)", "",
          "| α | objective | max abs weight difference to the exact optimum |", "|---|---:|---:|",
          f"| exact convex optimum | {mt['exact']['value']:.4g} | 0 |",
          f"| {mt['dirichlet']} (default): α = m·a_train | {mt['dirichlet_search']['value']:.4g} | "
          f"{mt['max_abs_weight_diff_vs_exact']:.3f} |",
          f"| paper: α = a_train | {other['value']:.4g} | {other['max_abs_weight_diff_vs_exact']:.3f} |",
          f"| natural mixture (token shares) | {mt.get('natural_objective', float('nan')):.4g} | — |", ""]
    sub = ev["subset_sizes"]
    names = {"dirichlet": "draws of the search's Dirichlet", "sparse": "Dirichlet(0.5) draws",
             "pair": "70/30 pairs", "reference": "uniform and natural", "da2_pick": "DA² picks"}
    gs = [r["group"] for r in ev["runs"]]
    groups = ", ".join(f"{gs.count(g)} {names.get(g, g)}" for g in dict.fromkeys(gs))
    L += ["## Rank correlation with the trained proxies' validation loss", "",
          f"Spearman [bootstrap 95% interval] between each predictor and the proxies' actual validation loss "
          f"(Σ_d w_d L_d, uniform w). Mixtures: {sub['all']} in all ({groups}), "
          f"{sub['without_sparse']} without the sparse ones (Dirichlet(0.5) draws and two-domain 70/30 pairs).", "",
          f"| predictor | all ({sub['all']}) | without sparse ({sub['without_sparse']}) |", "|---|---|---|"]
    for k, name in PREDICTORS:
        if k in ev["correlations"]["all"]:
            L.append(f"| {name} | {_corr_cell(ev['correlations']['all'][k])} | "
                     f"{_corr_cell(ev['correlations']['without_sparse'][k])} |")
    L.append("| paper, DA² Huber (its own setting) | +0.67 | — |")
    if "meta_targets" in ev:
        t = ev["meta_targets"]
        L += ["", "## Meta-domain targets: measured vs Bayes-mapped (same proxies)", "",
              f"- argmax: {len(t['uncovered_argmax'])} meta-domains get no validation document "
              f"(q mass {t['uncovered_q_mass']:.3f}, renormalised away); per meta-domain Spearman across proxies "
              f"between measured and Bayes targets: median {_f(t['argmax']['spearman_vs_bayes_median'])}, min "
              f"{_f(t['argmax']['spearman_vs_bayes_min'])}; mean |difference| "
              f"{t['argmax']['mean_abs_diff_vs_bayes']:.3f} nats.",
              f"- proba: median Spearman vs Bayes {_f(t['proba']['spearman_vs_bayes_median'])}; mean |difference| "
              f"{t['proba']['mean_abs_diff_vs_bayes']:.3f}; Σ_j q_j L_j equals the documents' loss to "
              f"{t['proba_identity_max_abs']:.1e}.",
              f"- The documents' loss itself ranks like the trainer's validation loss: Spearman "
              f"{_f(ev['doc_objective']['vs_valid_objective']['spearman'])}."]
    if "seed_noise" in ev:
        sn = ev["seed_noise"]
        L += ["", "## Seed noise", "",
              f"Uniform mixture, train seeds {sn['train_seeds']}: validation loss "
              f"{', '.join(f'{x:.3f}' for x in sn['valid_objective'])} (std {sn['std']:.3f}); the evaluated "
              f"mixtures span {sn['spread_of_evaluated_mixtures']:.3f}."]
    L += ["", "## Picks", "", "| mixture | proxy validation loss |", "|---|---:|"]
    for r in sorted(ev["runs"], key=lambda r: r["valid_objective"]):
        if r["group"] in ("reference", "da2_pick"):
            L.append(f"| {r['label']} | {r['valid_objective']:.3f} |")
    best = min(ev["runs"], key=lambda r: r["valid_objective"])
    L.append(f"| best of all {ev['n_runs']} ({best['label']}) | {best['valid_objective']:.3f} |")
    L += ["", f"Domain2Vec+RegMix ({rm['meta']['meta_targets']} targets, {rm['meta']['proxies']} proxies) "
          f"predicts {rm['meta']['predicted_valid_loss']:.3f} for its pick (`mixture_regmix.json`, not trained)."]
    path = o / "results.md"
    path.write_text("\n".join(L) + "\n")
    return path


def cli(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data-dir", default="data", help="The corpus (built by `megamix data build`).")
    p.add_argument("--out", default=None,
                   help="Output folder (default: a new run folder runs/bench/d2v-<UTC time>/); the committed results "
                        "are refreshed only when named on purpose: --out benchmarks/results/d2v.")
    p.add_argument("--proxy-config", default="benchmarks/results/d2v/proxy.yaml",
                   help="Config of the proxy runs, copied to <out>/proxy.yaml when that file does not exist.")
    p.add_argument("--report-only", action="store_true", help="Only regenerate <out>/results.md (needs --out).")
    a = p.parse_args(argv)
    if a.report_only and a.out is None:
        p.error("--report-only regenerates the report of an existing folder: name it, e.g. --out benchmarks/results/d2v")
    os.chdir(REPO)
    from megamix.kernels.bench.output import default_out_dir
    out = a.out or default_out_dir("d2v")
    if not a.report_only:
        Path(out).mkdir(parents=True, exist_ok=True)
        if not (Path(out) / "proxy.yaml").exists():
            shutil.copyfile(a.proxy_config, Path(out) / "proxy.yaml")
        print(f"d2v rerun: writing to {out}/", flush=True)
        run(a.data_dir, out)
    print(report(out))
    return 0


if __name__ == "__main__":
    sys.exit(cli())
