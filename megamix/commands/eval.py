"""`megamix eval`: compare mixtures (static vs online) on the same model, budget and seeds."""
from __future__ import annotations

import json
import math
import os
from pathlib import Path

from megamix.commands.config import add_config_args, load_config



def _or_default(v) -> str:
    return "each strategy's default" if v is None else str(v)

def register(sub) -> None:
    p = sub.add_parser("eval", help="Evaluation harness: train every mixture method x seed, write a report.")
    s = p.add_subparsers(dest="eval_cmd", metavar="SUBCOMMAND")
    r = s.add_parser("run", help="Run a suite (resumable: finished runs are reused) and write REPORT.md.")
    add_config_args(r)
    r.add_argument("--out", required=True, help="Output folder (runs/, REPORT.md, PNG plots).")
    r.add_argument("--scenario", default="standard", choices=["standard", "junk", "repeat", "target"],
                   help="standard: every method on the store (default); junk / repeat / target: the known-answer "
                        "scenarios of docs/evaluation.md (their data is built next to data.data_dir, once; "
                        "--prior, --regrouped and the overhead probe are for standard only).")
    r.add_argument("--seeds", default="0,1,2,3,4", help="Comma-separated seeds (>= 3 for mean ± std).")
    r.add_argument("--methods", default="", help="Comma-separated subset of method names (default: all "
                                                  "whose prerequisites exist).")
    r.add_argument("--prior", default="", help="Domain2Vec mixture JSON (enables da2 and rnb+da2).")
    r.add_argument("--regrouped", default="", help="A regrouped data_dir (enables rnb-regrouped).")
    r.add_argument("--overhead-steps", type=int, default=40,
                   help="Steps per variant of the interleaved step-time overhead probe (0 = skip).")
    r.add_argument("--d2v-eval", default=D2V_EVAL_DEFAULT, help="`megamix d2v evaluate` JSON to cite.")
    r.add_argument("--repeat-domain", default="code_c", help="repeat: the domain replaced by one repeated document.")
    r.add_argument("--target", default="docs_python", help="target: the domain evaluated on and not trained on.")
    r.add_argument("--relatives", default="code_python,manpages",
                   help="target: domains each trained on alone as the single-relative baselines.")
    r.add_argument("--vectors", default="benchmarks/results/d2v/vectors.json",
                   help="target: Domain2Vec vectors.json for the target's DA² prior ('' = no da2 method).")
    r.add_argument("--eval-grad-batches", type=int, default=2,
                   help="target: held-out batches of the target per R&B update for `rnb-heldout`.")
    r.add_argument("--scenario-seed", type=int, default=0,
                   help="junk / repeat: seed of the random ids / of the repeated document (not the training seed).")
    r.add_argument("--max-runs", type=int, default=0,
                   help="Train at most this many new runs in this call, then report what is finished (0 = all).")
    r.add_argument("--no-progress", action="store_true")
    r.set_defaults(func=run)
    rep = s.add_parser("report", help="Re-render REPORT.md and plots from an existing suite folder.")
    rep.add_argument("--out", required=True)
    rep.add_argument("--d2v-eval", default=D2V_EVAL_DEFAULT, help="`megamix d2v evaluate` JSON to cite.")
    rep.set_defaults(func=report)
    p.set_defaults(func=lambda a: (p.print_help(), 0)[1])


def _conditions(cfg, seeds) -> dict:
    import platform

    import torch
    m, t = cfg.model, cfg.train
    vocab = m.vocab_size
    if vocab == "auto":
        from megamix.data.manifest import load_manifest
        man = load_manifest(Path(cfg.data.data_dir) / "tokens") or {}
        vocab = f"{man.get('vocab_size', 'auto')} (auto: the store's tokenizer {man.get('tokenizer', '?')})"
    return {
        "model": (f"GPT-2 style, {m.n_layer} layers, d={m.n_embd}, {m.n_head} heads, vocab {vocab}, "
                  f"seq {m.seq_len}") if m.hf_config in ("", {}) else
                 f"model.hf_config={m.hf_config}, vocab {vocab}, seq {m.seq_len}",
        "budget": f"{t.steps} steps x {t.global_batch_size} sequences x {m.seq_len} tokens = "
                  f"{t.steps * t.global_batch_size * m.seq_len:,} tokens per run",
        "seeds": ",".join(map(str, seeds)),
        "mixing": f"update every {cfg.mixing.update_every} steps, λ={cfg.mixing.rnb_lambda}, "
                  f"min_weight={_or_default(cfg.mixing.min_weight)}, ema={_or_default(cfg.mixing.ema)}, "
                  f"DoGraph objective={cfg.mixing.dograph_objective}",
        "projection": f"k1×k2 = {cfg.projection.k1}×{cfg.projection.k2} ({cfg.projection.kind})",
        "data": cfg.data.data_dir,
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, torch "
                   f"{torch.__version__}, {torch.get_num_threads()} threads",
    }


def run(args) -> int:
    from megamix.evaluation.harness import conditions_summary, default_methods, run_suite, write_report
    from megamix.evaluation.scenarios import Scenario, summarise_scenario_run
    from megamix.io import atomic_write_json

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    cfg = load_config(args)
    seeds = [int(s) for s in args.seeds.split(",") if s.strip()]
    if args.scenario != "standard":
        return _run_scenario(args, cfg, seeds)
    methods = default_methods(prior=args.prior or None, regrouped_dir=args.regrouped or None)
    if args.methods:
        wanted = [m.strip() for m in args.methods.split(",") if m.strip()]
        unknown = set(wanted) - {m.name for m in methods}
        if unknown:
            from megamix.configbase import ConfigError
            raise ConfigError(f"unknown or unavailable methods {sorted(unknown)}; available: "
                              f"{[m.name for m in methods]} (da2/rnb+da2 need --prior, rnb-regrouped "
                              "needs --regrouped)")
        methods = [m for m in methods if m.name in wanted]
    out = Path(args.out)
    sc = Scenario("standard", methods, "avg valid loss over domains", info={"data_dir": cfg.data.data_dir})
    summaries = run_suite(cfg, methods, seeds, out, eval_data_dir=cfg.data.data_dir, progress=not args.no_progress,
                          summarise=lambda rd, m, seed: summarise_scenario_run(rd, m, seed, sc),
                          max_runs=args.max_runs or None)
    atomic_write_json(out / "scenario.json", sc.to_json())
    overhead = None
    if args.overhead_steps > 0:
        from megamix.evaluation.harness import measure_overhead
        print("overhead probe ...", flush=True)
        overhead = measure_overhead(cfg, out, steps=args.overhead_steps)
    cond = _conditions(cfg, seeds)
    atomic_write_json(out / "conditions.json", cond)
    cond = {**cond, "runs": conditions_summary(summaries) + f" (of {len(methods) * len(seeds)} planned)"}
    path = write_report(summaries, out, title="megamix evaluation: static vs online mixing",
                        conditions=cond, paper_numbers=_paper_table(summaries, out, args.d2v_eval), overhead=overhead,
                        extra_plots=_standard_plot(summaries, sc.to_json(), out))
    print(f"report: {path}")
    return 0


def _standard_plot(summaries, sc: dict, out: Path) -> list:
    from megamix.evaluation.scenario_report import plot_scenario

    if not summaries or "metric" not in summaries[0]:      # summaries of an older harness
        return []
    p = plot_scenario(summaries, sc, out / "standard.png")
    return [p] if p is not None else []


def _scenario_callbacks(sc):
    from megamix.evaluation.scenarios import WatchFactors

    def make(method, seed):
        dograph = "mixing.strategy=dograph" in method.overrides
        return [WatchFactors(sc.watch)] if sc.watch and dograph else []
    return make


def _run_scenario(args, cfg, seeds) -> int:
    """`eval run --scenario junk|repeat|target`: build (or reuse) the data, train what is missing, report."""
    from megamix.configbase import ConfigError
    from megamix.evaluation.harness import run_suite
    from megamix.evaluation.scenarios import prepare_scenario, summarise_scenario_run
    from megamix.io import atomic_write_json

    out = Path(args.out)
    sc = prepare_scenario(args.scenario, cfg, out, seed=args.scenario_seed, repeat_domain=args.repeat_domain,
                          target=args.target, relatives=[r.strip() for r in args.relatives.split(",") if r.strip()],
                          vectors=args.vectors, eval_grad_batches=args.eval_grad_batches)
    if args.methods:
        wanted = [m.strip() for m in args.methods.split(",") if m.strip()]
        unknown = set(wanted) - {m.name for m in sc.methods}
        if unknown:
            raise ConfigError(f"--methods {sorted(unknown)} are not methods of the {sc.name} scenario; it has "
                              f"{[m.name for m in sc.methods]}")
        sc.methods = [m for m in sc.methods if m.name in wanted]
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_json(out / "scenario.json", sc.to_json())
    summaries = run_suite(cfg, sc.methods, seeds, out, progress=not args.no_progress,
                          callbacks=_scenario_callbacks(sc), max_runs=args.max_runs or None,
                          summarise=lambda rd, m, seed: summarise_scenario_run(rd, m, seed, sc))
    cond = {**_conditions(cfg, seeds), "knobs": list(args.overrides)}
    atomic_write_json(out / "conditions.json", cond)
    path = _scenario_report(summaries, out, sc.to_json(), cond)
    print(f"report: {path}")
    return 0


def _seeds(cond: dict) -> list[str]:
    return [x for x in str(cond.get("seeds", "")).split(",") if x.strip()]


def _scenario_report(summaries, out: Path, sc: dict, cond: dict) -> Path:
    from megamix.evaluation.harness import conditions_summary
    from megamix.evaluation.scenario_report import write_scenario_report

    cond = dict(cond)
    knobs = cond.pop("knobs", [])
    steps = int(cond.pop("steps", 0)) or max([r["curve"][-1][0] for r in summaries if r.get("curve")] or [0])
    cond["runs"] = conditions_summary(summaries) + f" (of {len(sc['methods']) * len(_seeds(cond))} planned)"
    return write_scenario_report(summaries, out, sc, title=f"megamix evaluation, scenario `{sc['name']}`",
                                 conditions=cond, steps=steps, knobs=knobs)


D2V_EVAL_DEFAULT = "benchmarks/results/d2v/evaluate.json"


def _paired(agg: dict, method: str, baseline: str = "uniform") -> str:
    """'Δ ± s.e. (n seeds)' of a method's avg valid loss against the baseline, paired by seed."""
    import numpy as np
    x, b = np.asarray(agg[method]["avg"], float), np.asarray(agg[baseline]["avg"], float)
    n = min(len(x), len(b))
    d = x[:n] - b[:n]
    se = f" ± {d.std(ddof=1) / np.sqrt(n):.3f} s.e." if n > 1 else ""
    return f"{d.mean():+.3f}{se} (n={n})"


def _paper_table(summaries, out: Path, d2v_eval: str | None = D2V_EVAL_DEFAULT) -> dict:
    """Each paper's own figure next to ours (ours computed from this suite and the interleaved probe; '—'
    where the suite lacks the run). Loss differences are in nats, so a paper's perplexity ratio p1/p0 is
    shown as ln(p1/p0), the same unit as our Δ avg valid loss."""
    from megamix.evaluation.harness import aggregate

    agg = aggregate(summaries)
    rows = {}
    med = {}
    probe = out / "overhead.json"
    if probe.exists():
        med = json.loads(probe.read_text())["median_step_seconds"]

    def probe_step(prefix: str):
        return next((v for k, v in med.items() if k.startswith(prefix)), None)

    off, static, plain = (probe_step("fused CE, projection off"), probe_step("fused CE + projection, static"),
                          probe_step("plain torch CE"))
    if "rnb" in agg and "uniform" in agg:
        reach = agg["rnb"]["steps_to_baseline"]
        final = agg["uniform"]["final_steps"]
        ours = ", ".join("never" if r is None else f"{r}/{f}" for r, f in zip(reach, final))
        rows["R&B reaches the stratified (uniform) baseline's loss in fewer steps"] = (
            "yes, far fewer (R&B paper)", f"`rnb`: steps needed / budget per seed: {ours}")
        rows["R&B final loss vs stratified (uniform)"] = (
            "matches or beats the baselines (R&B paper)",
            f"Δ avg valid loss `rnb` {_paired(agg, 'rnb')}"
            + (f"; `rnb-damped` {_paired(agg, 'rnb-damped')}" if "rnb-damped" in agg else ""))
        rnb = probe_step("R&B")
        if rnb and off and static and plain:
            ours = (f"{100 * (rnb / static - 1):+.1f}% step time for the strategy over the same fused loss with "
                    f"projection; {100 * (rnb / off - 1):+.1f}% over the fused loss without statistics; "
                    f"{100 * (rnb / plain - 1):+.1f}% vs a plain torch CE step (CPU, interleaved probe)")
        else:
            ov = agg["rnb"]["overhead"]
            ours = f"{100 * sorted(ov)[len(ov) // 2]:+.1f}% median step time (confounded by load)" if ov else "—"
        rows["R&B overhead"] = ("0.0006–0.1% FLOPs (R&B Table 1)", ours)
    if "rnb-regrouped" in agg and "rnb" in agg:
        rows["Regrouped clusters beat the given domains under R&B"] = (
            "yes (R&B paper)", f"Δ avg valid loss `rnb-regrouped` {_paired(agg, 'rnb-regrouped', 'rnb')} vs `rnb`")
    if "uniform" in agg and any(m in agg for m in ("dograph", "dograph-sample")):
        paper = f"{math.log(3.09 / 4.13):+.3f} (val PPL 4.13 → 3.09 on SlimPajama, GPT-2 Medium; DoGraph Table 2)"
        ours = "; ".join(f"`{m}` {_paired(agg, m)}" for m in ("dograph", "dograph-sample") if m in agg)
        rows["DoGraph (uncertainty) vs uniform, Δ ln PPL"] = (paper, ours)
        dog = probe_step("DoGraph")
        if dog and static and off:
            rows["DoGraph overhead"] = ("+4.51% wall time vs RegMix (H200 cluster; DoGraph A.8)",
                                        f"{100 * (dog / static - 1):+.1f}% step time over the same fused loss with "
                                        f"projection; {100 * (dog / off - 1):+.1f}% over the fused loss without "
                                        "statistics (CPU, interleaved probe)")
    corr = Path(d2v_eval) if d2v_eval else None
    if corr is not None and corr.exists():
        ev = json.loads(corr.read_text())
        c = ev["da2"]
        naive = ev.get("naive", {})
        ne = (f"; the mixture's negative entropy alone: {naive['neg_entropy']['spearman']:.2f}"
              if "neg_entropy" in naive else "")
        rows["Domain2Vec DA² ranks mixtures"] = (
            "Spearman 0.67 (Domain2Vec)",
            f"Spearman {c['huber']['spearman']:.2f} (Huber), {c['kl']['spearman']:.2f} (KL) over "
            f"{c['huber']['n']} trained proxy mixtures{ne} ({corr})")
    else:
        rows["Domain2Vec DA² ranks mixtures"] = ("Spearman 0.67 (Domain2Vec)",
                                                 "not measured in this suite (see `megamix d2v evaluate`)")
    return rows


def report(args) -> int:
    from megamix.evaluation.harness import write_report

    out = Path(args.out)
    summaries = json.loads((out / "summaries.json").read_text())
    cond = json.loads((out / "conditions.json").read_text()) if (out / "conditions.json").exists() else {}
    sc = json.loads((out / "scenario.json").read_text()) if (out / "scenario.json").exists() else None
    if sc is not None and sc["name"] != "standard":
        print(f"report: {_scenario_report(summaries, out, sc, cond)}")
        return 0
    ov = json.loads((out / "overhead.json").read_text()) if (out / "overhead.json").exists() else None
    path = write_report(summaries, out, title="megamix evaluation: static vs online mixing",
                        conditions=cond, paper_numbers=_paper_table(summaries, out, args.d2v_eval), overhead=ov,
                        extra_plots=_standard_plot(summaries, sc, out) if sc else [])
    print(f"report: {path}")
    return 0
