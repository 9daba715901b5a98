"""Pre-flight: check that a run can start, before a model is built or a process group formed.

``megamix train --dry-run`` runs exactly this, and the real run's :class:`~megamix.train.loop.Trainer` is built
on its result (the opened stores and the Mixer), so a dry run checks everything the real run checks at start-up,
and nothing is checked twice:

- the config (``validate()``) and the backend's launch checks: devices, world size, and for DeepSpeed
  the batch geometry (global = micro x world x gradient accumulation) and ZeRO settings;
- the data (:func:`megamix.data.backings.open_store`: ``data.paths`` in place, else ``data.data_dir``; and
  ``data.eval_data_dir``): the folder, the manifests, every ``.bin/.idx`` of every domain split the run reads,
  and the vocabulary against ``model.vocab_size``;
- the domains (in the store, no duplicates, long enough for ``model.seq_len``), the mixture (``mixture.file``
  contents: JSON, domains, weights >= 0 summing to 1, ``meta.max_drift``; explicit weights) and the strategy
  built from it (e.g. a ``mixing.min_weight`` floor that is infeasible for the number of domains): all checked by
  building the run's :class:`~megamix.mixer.Mixer`, which the run then trains with;
- ``train.out_dir`` is a directory or can be created.

Every failure is a :class:`megamix.configbase.ConfigError` naming the field or file and the fix.
"""
from __future__ import annotations

import json
import logging
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from megamix.config import MegamixConfig
from megamix.configbase import ConfigError
from megamix.data.backings import open_store
from megamix.data.store import TokenStore
from megamix.mixer import Mixer
from megamix.train.backend import Backend, make_backend, resolve_device
from megamix.train.model import explicit_vocab, resolve_vocab

log = logging.getLogger("megamix")


@dataclass
class Preflight:
    """What the checks found: the opened store (reuse it for the run), domains and derived geometry."""

    store: Any
    mixer: Any                       # the run's Mixer (megamix.mixer.Mixer), built on the store
    notes: list[str]
    geometry: dict[str, Any]
    ds_config: dict | None = None
    eval_store: Any = None
    eval_domains: list[str] = field(default_factory=list)

    def describe(self) -> list[str]:
        """The derived launch geometry as printable lines (``#`` comments, so the YAML stays valid)."""
        g = self.geometry
        lines = [f"# geometry: global_batch_size {g['global_batch_size']} = micro_batch_size "
                 f"{g['micro_batch_size']} x world_size {g['world_size']} x gradient_accumulation_steps "
                 f"{g['gradient_accumulation_steps']}; {g['tokens_per_step']:,} tokens/step; "
                 f"{len(self.domains)} domains"]
        if "vocab_size" in g:
            lines.append(f"# model.vocab_size: {g['vocab_size']}")
        if self.ds_config is not None:
            lines.append(f"# deepspeed config: {json.dumps(self.ds_config, sort_keys=True)}")
        return lines

    @property
    def domains(self) -> list[str]:
        return self.mixer.domains


def _check_data_dir(data_dir: str, field_name: str) -> Path:
    """``data_dir`` must be a folder holding ``tokens/`` (a clear ConfigError naming ``field_name`` otherwise)."""
    d = Path(data_dir)
    build = f"build one there (`megamix data build --data-dir {d}`) or set {field_name} to the folder holding tokens/"
    if not d.exists():
        raise ConfigError(f"{field_name}={d} does not exist: {build}")
    if not d.is_dir():
        raise ConfigError(f"{field_name}={d} is a file, not a directory: set {field_name} to the folder holding "
                          "tokens/")
    if not (d / "tokens").is_dir():
        raise ConfigError(f"{field_name}={d} has no token store (no tokens/ folder): {build}")
    return d


def _opened(open_fn, where: str):
    """``open_fn()``; the data layer reports bad data as a ConfigError (DataError) already, anything else it raises
    while reading the user's files is named here."""
    try:
        return open_fn()
    except ConfigError:
        raise
    except (ValueError, OSError) as e:
        raise ConfigError(f"{where}: {e}; rebuild the token store (`megamix data tokenize --force`)") from None


def open_run_store(cfg: MegamixConfig):
    """The training store the run reads (``data.paths`` in place, else ``<data.data_dir>/tokens``); :func:`check_run`
    then checks it against the model's vocabulary once ``model.vocab_size`` is settled."""
    if not getattr(cfg.data, "paths", None):
        _check_data_dir(cfg.data.data_dir, "data.data_dir")
    return _opened(lambda: open_store(cfg.data), "data.data_dir="
                   f"{cfg.data.data_dir}")


def open_eval_store(eval_data_dir: str):
    """The store of ``data.eval_data_dir`` (what the loop evaluates on)."""
    d = _check_data_dir(eval_data_dir, "data.eval_data_dir")
    return _opened(lambda: TokenStore(d / "tokens"), f"data.eval_data_dir={d}")


def _check_splits(store, domains: list[str], splits: tuple[str, ...]) -> None:
    """Open every split's files (TokenStore.dataset validates them; cached for the run)."""
    for d in domains:
        for split in splits:
            store.dataset(d, split)


@contextmanager
def _mixture_errors(cfg: MegamixConfig):
    """Name ``mixture.file`` / ``mixture.weights`` and the fix in any error reading the starting mixture."""
    m = cfg.mixture
    where = f"mixture.file={m.file}" if m.kind == "file" else f"mixture (kind={m.kind})"
    fix = ("write it as {\"weights\": {domain: weight, ...}} with one weight >= 0 per training domain, summing to 1 "
           "(`megamix d2v da2` writes one)" if m.kind == "file"
           else "fix mixture.weights / mixture.temperature or use mixture.kind=natural")
    if m.kind == "file" and Path(m.file).is_dir():
        raise ConfigError(f"{where} is a directory; point mixture.file at a mixture JSON file")
    try:
        yield
    except ConfigError:
        raise
    except FileNotFoundError:
        raise ConfigError(f"{where} does not exist; check the path, or use another mixture.kind") from None
    except (ValueError, OSError) as e:
        msg = str(e)
        name = m.file if m.kind == "file" else "mixture.weights"
        raise ConfigError(f"{msg if name in msg else f'{where}: {msg}'}; {fix}") from None


def _settle_vocab(cfg: MegamixConfig, store) -> str:
    """Resolve ``model.vocab_size=auto`` (:func:`megamix.train.model.resolve_vocab`) into the config, so the model,
    ``config.yaml`` and a resume's comparison all see the number; check the store against it (a DataError names
    both numbers and the fix). Returns where the number came from (for the dry run's geometry lines)."""
    vocab, source = resolve_vocab(cfg.model, store)
    auto = explicit_vocab(cfg.model) is None
    cfg.model.vocab_size = vocab
    store.check_vocab(vocab)
    log.debug("megamix: model.vocab_size=%s: %d from %s", "auto" if auto else vocab, vocab, source)
    return f"auto: {vocab} from {source}" if auto else f"{vocab} (model.vocab_size)"


def check_run(cfg: MegamixConfig, backend: Backend | None = None, *, rank: int = 0, world_size: int = 1,
              store: Any = None) -> Preflight:
    """Run every start-up check of a training run (see the module docstring) and build the run's data objects
    (store, Mixer, evaluation store) for it; raise ConfigError on the first problem. Opens no process group and
    builds no model. ``store``: an already open TokenStore (checked against ``model.vocab_size``)."""
    cfg.validate()
    backend = backend or make_backend(cfg, rank, world_size)
    world_size = backend.world_size
    notes = backend.check(cfg)
    if (cfg.projection.enabled and cfg.projection.u_method == "tiled" and cfg.projection.backend == "auto"
            and resolve_device(cfg.train.device).type != "cuda"):
        raise ConfigError(f"projection.u_method=tiled is a Triton kernel but train.device={cfg.train.device} runs on "
                          "the CPU: set projection.u_method=gemm (or fused) there")
    out = Path(cfg.train.out_dir)
    if out.exists() and not out.is_dir():
        raise ConfigError(f"train.out_dir={out} is a file, not a directory; choose another train.out_dir")

    store = open_run_store(cfg) if store is None else store
    vocab_source = _settle_vocab(cfg, store)
    # the Mixer owns the domain checks (in the store, listed once, long enough), the mixture and the strategy
    # (e.g. a min_weight floor infeasible for D domains); the run trains with this one
    with _mixture_errors(cfg):
        mixer = Mixer(cfg, store, rank=backend.rank, world_size=world_size, group=None)
    _opened(lambda: _check_splits(store, mixer.domains, ("train", "valid")), "the token store")

    eval_store, eval_domains = store, mixer.domains
    if cfg.data.eval_data_dir:
        eval_store = open_eval_store(cfg.data.eval_data_dir)
        eval_domains = list(eval_store.domains)
        _opened(lambda: _check_splits(eval_store, eval_domains, ("valid",)),
                f"data.eval_data_dir={cfg.data.eval_data_dir}")

    t = cfg.train
    gas = t.global_batch_size // (t.micro_batch_size * world_size)
    geometry = {"world_size": world_size, "micro_batch_size": t.micro_batch_size, "gradient_accumulation_steps": gas,
                "global_batch_size": t.global_batch_size, "tokens_per_step": t.global_batch_size * cfg.model.seq_len}
    # the DeepSpeed config the backend built in its check (once; "auto" sizes filled in from the hidden size)
    ds_config = getattr(backend, "ds_config", None) if cfg.deepspeed.enabled else None
    geometry["vocab_size"] = vocab_source
    return Preflight(store=store, mixer=mixer, notes=notes, geometry=geometry, ds_config=ds_config,
                     eval_store=eval_store, eval_domains=eval_domains)


__all__ = ["Preflight", "check_run", "open_run_store", "open_eval_store"]
