"""Known-answer scenarios for the evaluation harness: what each trains on, which methods run, what is measured.

A :class:`Scenario` is the data (a view built by :mod:`megamix.data.scenarios` next to the base store), the
methods (config overrides, as :class:`~megamix.evaluation.harness.Method`) and the headline metric:

- ``standard``: the comparison of :func:`~megamix.evaluation.harness.default_methods` on the base store; metric:
  the average validation loss over its domains.
- ``junk``: the base domains plus ``junk`` (uniformly random ids). Methods: uniform over all domains, the
  *oracle* (uniform over the real domains only: the junk domain dropped), rnb, rnb-damped, dograph,
  dograph-sample. Metric: the average validation loss over the real domains; watched: the junk domain's weight,
  and DoGraph's mean gradient factor on junk samples.
- ``repeat``: one domain's train split is one document repeated. Methods as for junk, the oracle dropping the
  repeated domain. Metric: the average over the other domains; watched: the repeated domain.
- ``target``: train on every domain but the target, evaluate on the target only. Methods: uniform, the DA²
  prior computed for the target from Domain2Vec vectors, rnb (its target: the training mixture's gradient),
  ``rnb-heldout`` (R&B's evaluation variant: held-out gradients of the target, ``mixing.eval_grad_batches``), and
  each single relative alone (``only-<domain>``). Metric: the target's validation loss.

Every scenario uses the config as given (no knob is tuned per scenario); the overrides below only choose the
data and the method. DoGraph's per-sample factors are read during the run by :class:`WatchFactors`, a training
callback (``<run>/watch_factors.json``).
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from megamix.configbase import ConfigError
from megamix.evaluation.harness import Method, default_methods
from megamix.io import atomic_write_json
from megamix.train.callbacks import Callback

SCENARIOS = ("standard", "junk", "repeat", "target")
WATCH_FILE = "watch_factors.json"
DEFAULT_REPEAT = "code_c"
DEFAULT_TARGET = "docs_python"
DEFAULT_RELATIVES = ("code_python", "manpages")
DEFAULT_VECTORS = "benchmarks/results/d2v/vectors.json"
DYNAMIC = [("rnb", "R&B Balance as in the paper (uniform start, no EMA, no floor)"),
           ("rnb-damped", "R&B Balance with EMA 0.5 and a 0.02 floor"),
           ("dograph", "DoGraph: in-step gradient reweighting (weights stay uniform)"),
           ("dograph-sample", "DoGraph variant: cluster weights as domain sampling weights")]

__all__ = ["Scenario", "SCENARIOS", "prepare_scenario", "WatchFactors", "target_da2_prior", "summarise_scenario_run", "watch_gram"]


@dataclass
class Scenario:
    """A scenario ready to run: its methods and what the report measures."""

    name: str
    methods: list[Method]
    metric_label: str
    metric_domains: list[str] | None = None     # None: every evaluated domain
    watch: str | None = None                    # the junk / repeated domain
    baseline: str = "uniform"
    reference: str | None = None                # the oracle
    info: dict = field(default_factory=dict)

    def to_json(self) -> dict:
        return {"name": self.name, "metric_label": self.metric_label, "metric_domains": self.metric_domains,
                "watch": self.watch, "baseline": self.baseline, "reference": self.reference, "info": self.info,
                "methods": [{"name": m.name, "overrides": m.overrides, "description": m.description}
                            for m in self.methods]}


def _yaml_list(names) -> str:
    return "[" + ", ".join(names) + "]"


def _static(name: str, data: list[str], desc: str, extra=()) -> Method:
    return Method(name, data + ["mixture.kind=uniform", "mixing.strategy=static", *extra], desc)


def _drop_one(data_dir: Path, domains: list[str], watch: str) -> list[Method]:
    data = [f"data.data_dir={data_dir}", "data.eval_data_dir="]
    rest = [d for d in domains if d != watch]
    ms = [_static("uniform", data, f"uniform over all {len(domains)} domains, {watch} included"),
          _static("oracle", data, f"uniform over the {len(rest)} other domains ({watch} dropped: the known answer)",
                  [f"data.domains={_yaml_list(rest)}"])]
    ms += [Method(n, data + ["mixture.kind=uniform", f"mixing.strategy={n}"], d) for n, d in DYNAMIC]
    return ms


def _junk(cfg, seed: int) -> Scenario:
    from megamix.data.scenarios import JUNK, build_junk_store

    view = build_junk_store(cfg.data.data_dir, seed=seed)
    rec = json.loads((view / "scenario.json").read_text())
    domains = sorted(rec["base_records"]) + [JUNK]
    real = sorted(rec["base_records"])
    return Scenario("junk", _drop_one(view, sorted(domains), JUNK),
                    f"avg valid loss over the {len(real)} real domains", real, JUNK, reference="oracle",
                    info={"data_dir": str(view), **rec["junk"], "seed": seed})


def _repeat(cfg, domain: str, seed: int) -> Scenario:
    from megamix.data.scenarios import build_repeat_store

    view = build_repeat_store(cfg.data.data_dir, domain, seed=seed)
    rec = json.loads((view / "scenario.json").read_text())
    domains = sorted(rec["base_records"])
    others = [d for d in domains if d != domain]
    return Scenario("repeat", _drop_one(view, domains, domain),
                    f"avg valid loss over the {len(others)} other domains", others, domain, reference="oracle",
                    info={"data_dir": str(view), **rec["repeat"]})


def _target(cfg, out: Path, target: str, relatives, vectors: str, eval_grad_batches: int) -> Scenario:
    from megamix.data.scenarios import build_target_stores

    view, ev = build_target_stores(cfg.data.data_dir, target)
    rec = json.loads((view / "scenario.json").read_text())
    trained = rec["target"]["trained_domains"]
    bad = [r for r in relatives if r not in trained]
    if bad:
        raise ConfigError(f"--relatives {bad} are not training domains of the target scenario ({trained})")
    data = [f"data.data_dir={view}", f"data.eval_data_dir={ev}"]
    ms = [_static("uniform", data, f"uniform over the {len(trained)} training domains")]
    info = {"data_dir": str(view), "eval_data_dir": str(ev), "target": target, "relatives": list(relatives),
            "held_out_gradients_from": rec["target"]["held_out_gradients_from"]}
    if vectors:
        total = cfg.train.steps * cfg.train.global_batch_size * cfg.model.seq_len
        prior = target_da2_prior(vectors, view, target, out / "priors" / f"da2-{target}.json", total)
        ms.append(Method("da2", data + ["mixture.kind=file", f"mixture.file={prior}", "mixing.strategy=static"],
                         f"Domain2Vec DA² prior for {target} (static)", ["prior"]))
        info["da2_prior"] = str(prior)
    else:
        info["da2_prior"] = "not computed: no --vectors"
    ms.append(Method("rnb", data + ["mixture.kind=uniform", "mixing.strategy=rnb"],
                     "R&B, target = the training mixture's gradient (no held-out data)"))
    ms.append(Method("rnb-heldout", data + ["mixture.kind=uniform", "mixing.strategy=rnb",
                                            f"mixing.eval_grad_batches={eval_grad_batches}"],
                     f"R&B, target = held-out gradients of {target} ({eval_grad_batches} batches per update)"))
    ms += [_static(f"only-{r}", data, f"{r} alone (a relative of {target})", [f"data.domains=[{r}]"])
           for r in relatives]
    return Scenario("target", ms, f"valid loss on {target}", [target], None, info=info)


def prepare_scenario(name: str, cfg, out: str | Path, *, seed: int = 0, repeat_domain: str = DEFAULT_REPEAT,
                     target: str = DEFAULT_TARGET, relatives=DEFAULT_RELATIVES, vectors: str = DEFAULT_VECTORS,
                     prior: str | None = None, regrouped: str | None = None, eval_grad_batches: int = 2) -> Scenario:
    """Build (or reuse) the scenario's data next to ``cfg.data.data_dir`` and return its :class:`Scenario`."""
    if name not in SCENARIOS:
        raise ConfigError(f"--scenario must be one of {SCENARIOS} (got {name!r})")
    if cfg.data.paths:
        raise ConfigError("the evaluation scenarios build views of a megamix store (data.data_dir); data.paths "
                          "(in-place data) is not supported here")
    if name == "standard":
        return Scenario("standard", default_methods(prior=prior, regrouped_dir=regrouped),
                        "avg valid loss over domains", info={"data_dir": cfg.data.data_dir})
    if name == "junk":
        return _junk(cfg, seed)
    if name == "repeat":
        return _repeat(cfg, repeat_domain, seed)
    return _target(cfg, Path(out), target, list(relatives), vectors, eval_grad_batches)


# ------------------------------------------------------------------------------------------- DA² for a target
def target_da2_prior(vectors: str | Path, view: str | Path, target: str, out: str | Path,
                     total_tokens: float, *, samples: int = 100_000, top_k: int = 100, seed: int = 0) -> Path:
    """The DA² mixture over the view's training domains whose Domain2Vec vector is nearest (Huber, δ auto) to
    the target's validation vector, by the paper's Dirichlet search (``megamix d2v da2``'s defaults), with the
    data-amount caps of a ``total_tokens`` run on the view's token counts. Reused when its inputs match."""
    from megamix.data.manifest import load_manifest
    from megamix.domain2vec.da2 import da2_objective, data_caps, dirichlet_search, huber_delta_auto, search_alpha
    from megamix.domain2vec.vectorize import load_vectors
    from megamix.mixture import write_mixture

    vec = load_vectors(vectors)
    man = load_manifest(Path(view) / "tokens")
    doms = sorted(man["domains"])
    missing = [d for d in doms if d not in vec.domains]
    if missing or target not in vec.valid_domains:
        raise ConfigError(f"{vectors} lacks {'domains ' + str(missing) if missing else ''}"
                          f"{' and ' if missing and target not in vec.valid_domains else ''}"
                          f"{'a validation vector for ' + target if target not in vec.valid_domains else ''}; "
                          "rerun `megamix d2v vectorize` over these domains")
    V = vec.V_train[[vec.domains.index(d) for d in doms]]
    v = vec.V_valid[vec.valid_domains.index(target)]
    tokens = np.asarray([man["domains"][d]["train_tokens"] for d in doms], np.float64)
    key = {"vectors_V": V.round(12).tolist(), "v_target": v.round(12).tolist(), "tokens": tokens.tolist(),
           "total_tokens": float(total_tokens), "samples": samples, "top_k": top_k, "seed": seed}
    out = Path(out)
    if out.is_file() and json.loads(out.read_text()).get("meta", {}).get("inputs") == key:
        return out
    alpha = search_alpha(tokens, len(doms), "scaled")
    delta, delta_info = huber_delta_auto(V, v, alpha, seed=seed)
    caps = data_caps(tokens, float(total_tokens), 1.0)
    res = dirichlet_search(da2_objective(V, v, "huber", delta), alpha, n_samples=samples, top_k=top_k, caps=caps,
                           seed=seed)
    meta = {"target": target, "distance": "huber", "delta": delta, "delta_info": delta_info, "objective": res.value,
            "caps": dict(zip(doms, caps.tolist())) if caps is not None else None, "vectors": str(vectors),
            "search": res.info, "inputs": key}
    write_mixture(out, doms, res.weights, "da2", meta)
    return out


# ------------------------------------------------------------------------------------ DoGraph factors, per run
class WatchFactors(Callback):
    """Records DoGraph's in-step gradient weights of one domain's samples (normalised to mean 1 over each
    micro-batch by the LM head), averaged over every ``train.log_every`` steps, into ``<out_dir>/watch_factors.json``
    when the run ends. It wraps the Mixer's ``next_step`` of this trainer to see each micro-batch's domain ids
    after the LM head weighted it; nothing in the training changes."""

    def __init__(self, domain: str):
        self.domain = domain
        self.rows: list[tuple[int, float, int]] = []
        self._acc = [0.0, 0]
        self.did = -1

    def on_fit_start(self, trainer) -> None:
        mixer = trainer.mixer
        if self.domain not in mixer.domains:
            return
        self.did, driver, orig = mixer.domains.index(self.domain), mixer.head, mixer.next_step
        self.start = trainer.start

        def next_step():
            for batch in orig():
                driver.last_sample_weights = None
                yield batch
                w = driver.last_sample_weights
                if w is not None:
                    sel = batch.domain_ids.to(w.device) == self.did
                    self._acc[0] += float(w[sel].sum())
                    self._acc[1] += int(sel.sum())

        mixer.next_step = next_step

    def on_step_end(self, trainer, out) -> None:
        if self.did >= 0 and (out.step % trainer.cfg.train.log_every == 0 or out.step == trainer.end):
            if self._acc[1]:
                self.rows.append((out.step, self._acc[0] / self._acc[1], self._acc[1]))
            self._acc = [0.0, 0]

    def on_fit_end(self, trainer) -> None:
        if self.did < 0 or not trainer.main:
            return
        n = sum(r[2] for r in self.rows)
        atomic_write_json(Path(trainer.out_dir) / WATCH_FILE, {
            "domain": self.domain, "from_step": self.start, "samples": n,
            "mean": sum(r[1] * r[2] for r in self.rows) / n if n else None,
            "curve": [list(r) for r in self.rows],
            "note": "mean in-step gradient weight of this domain's samples (1 = the micro-batch average)"})


# ------------------------------------------------------------------------------------------- per-run summary
def _mean(vals) -> float:
    vals = [v for v in vals if v is not None and np.isfinite(v)]
    return float(np.mean(vals)) if vals else float("nan")


def watch_gram(records: list[dict], watch: str) -> dict | None:
    """What the mixing statistics said about the watched domain, averaged over the run's rounds (None when the
    run recorded no Gram, or the domain was not trained on).

    Per round, from the domain Gram G of the projected gradients and the weights p in force during the round:
    ``norm_ratio`` = G[w,w] / median G[o,o] over the other domains (its gradient's squared length, relative);
    ``cos_others`` = mean over o of G[w,o] / sqrt(G[w,w] G[o,o]) (does it point where the others point);
    ``score`` = (G p)[w] / ‖G p‖ and ``score_others`` = the mean of the others': R&B's Balance sets the next
    weights ∝ exp(λ·score), so a score gap Δ scales the watched domain's weight ratio by exp(λ·Δ)."""
    weights = sorted(((r["step"], r["weights"]) for r in records if r["kind"] == "weights"), key=lambda x: x[0])
    rows = []
    for r in records:
        if r["kind"] != "mixing" or not r.get("gram") or watch not in r.get("domain_train_loss", {}):
            continue
        names = list(r["domain_train_loss"])
        G = np.asarray(r["gram"], dtype=np.float64)
        if G.shape != (len(names), len(names)):
            continue
        before = [w for st, w in weights if st < r["step"]]
        cur = before[-1] if before else {}
        p = np.array([cur.get(n, 0.0) for n in names]) if cur else np.full(len(names), 1.0 / len(names))
        j, o = names.index(watch), [i for i, n in enumerate(names) if n != watch]
        d = np.clip(np.diag(G), 1e-30, None)
        gp = G @ p
        sc = gp / max(np.linalg.norm(gp), 1e-30)
        rows.append((d[j] / np.median(d[o]), float(np.mean(G[j, o] / np.sqrt(d[j] * d[o]))), sc[j],
                     float(np.mean(sc[o]))))
    if not rows:
        return None
    a = np.asarray(rows)
    return {"rounds": len(rows), "norm_ratio": float(np.median(a[:, 0])), "cos_others": float(a[:, 1].mean()),
            "score": float(a[:, 2].mean()), "score_others": float(a[:, 3].mean())}


def summarise_scenario_run(rd: Path, method: str, seed: int, sc: Scenario) -> dict:
    """:func:`~megamix.evaluation.harness.summarise_run` plus the scenario's metric (final and per evaluation),
    the watched domain's weights, loss and DoGraph factor."""
    from megamix.evaluation.harness import summarise_run
    from megamix.train.metrics import read_metrics

    s = summarise_run(rd, method, seed)
    doms = sc.metric_domains
    pick = (lambda vl: _mean([vl.get(d) for d in doms])) if doms else (lambda vl: _mean(list(vl.values())))
    recs = read_metrics(rd / "metrics.jsonl")
    evals = [r for r in recs if r["kind"] == "eval"]
    res = json.loads((rd / "result.json").read_text())
    s.update(scenario=sc.name, metric=pick(s["valid_loss"]),
             metric_curve=[(r["step"], pick(r["valid_loss"])) for r in evals],
             final_weights=res.get("weights", {}), wall_seconds=res.get("wall_seconds"))
    if sc.watch:
        s["watch"] = sc.watch
        s["watch_gram"] = watch_gram(recs, sc.watch)
        s["watch_loss"] = s["valid_loss"].get(sc.watch)
        s["watch_weight"] = [(st, w.get(sc.watch, 0.0)) for st, w in s["weights"]]
        f = rd / WATCH_FILE
        s["watch_factor"] = json.loads(f.read_text()) if f.is_file() else None
    return s
