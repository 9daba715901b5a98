"""The bad-input sweep: inputs a new user plausibly gives, each run through the real CLI.

Every case must end with exit code 2 and ONE line on stderr (no traceback) that names the offending file,
field or argument and says how to fix it. ``megamix train`` cases run twice: with ``--dry-run`` (which must
check everything the real run checks) and as a real run (which must refuse before training).

Most cases call :func:`megamix.cli.main` in-process (seconds for the whole sweep); a handful run
``python -m megamix`` as a subprocess to prove the installed entry point behaves the same.

Run ``PYTHONPATH=. python tests/test_bad_inputs.py`` to print the sweep's counts (clear / traceback / accepted /
unclear) for whatever ``megamix`` is importable, e.g. an older checkout on ``PYTHONPATH``.
"""
from __future__ import annotations

import contextlib
import io
import json
import os
import re
import shutil
import subprocess
import sys
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import pytest

ROOT = Path(__file__).resolve().parents[1]

# The base run: a tiny model on the 4-domain test store; a real run that is not refused trains 2 steps.
BASE_YAML = """\
data:
  data_dir: {data}
model:
  n_layer: 1
  n_embd: 32
  n_head: 2
  seq_len: 32
  vocab_size: 50257
train:
  steps: 2
  global_batch_size: 4
  micro_batch_size: 2
  warmup_steps: 0
  eval_every: 0
  eval_batches: 1
  log_every: 1
  checkpoint_every: 0
  out_dir: {tmp}/run
mixing:
  strategy: rnb
  update_every: 1
"""

# words of a fix: every message must say what to do, not only what is wrong
FIX_WORDS = re.compile(r"\b(set|use|run|rebuild|re-?import|pass|fix|remove|rename|choose|create|copy|free|"
                       r"point|start|drop|lower|raise|give|add|must|expected|needs?|e\.g\.|see|check|"
                       r"one of|did you mean|delete|write|edit|resume)\b", re.I)


@dataclass
class Case:
    id: str
    argv: list[str]                      # {tmp} {data} {cfg} are substituted; train cases get --config {cfg}
    names: tuple[str, ...]               # what the one line must name (file, field, argument), substituted
    setup: Callable[[Path, Path], None] | None = None   # (tmp, data) -> None: write the bad files
    env: dict[str, str] = field(default_factory=dict)
    own_data: bool = False               # needs a private copy of the store (it will be corrupted)
    dry: bool = True                     # train: also run with --dry-run
    real: bool = True                    # train: also run for real

    @property
    def is_train(self) -> bool:
        return self.argv[:1] == ["train"]


def _w(rel: str, text: str | bytes) -> Callable[[Path, Path], None]:
    """Setup writing ``{tmp}/rel``."""
    def setup(tmp: Path, data: Path) -> None:
        p = tmp / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        (p.write_bytes if isinstance(text, bytes) else p.write_text)(text)
    return setup


def _mixture(weights: dict, **extra) -> str:
    return json.dumps({"domains": list(weights), "weights": weights, "method": "test", **extra})


def _split_path(data: Path, domain: str, split: str, ext: str) -> Path:
    from megamix.data.store import TokenStore
    return Path(str(TokenStore(data / "tokens").prefix(domain, split)) + ext)


def _corrupt(domain: str, split: str, how: str) -> Callable[[Path, Path], None]:
    def setup(tmp: Path, data: Path) -> None:
        b, i = _split_path(data, domain, split, ".bin"), _split_path(data, domain, split, ".idx")
        if how == "magic":
            i.write_bytes(b"NOTANIDX!" + i.read_bytes()[9:])
        elif how == "truncate_bin":
            b.write_bytes(b.read_bytes()[: b.stat().st_size // 2])
        elif how == "truncate_idx":
            i.write_bytes(i.read_bytes()[:40])
        elif how == "other_index":   # the index of another domain copied over this one
            i.write_bytes(_split_path(data, "changelogs", split, ".idx").read_bytes())
        elif how == "missing_bin":
            b.unlink()
        elif how == "empty_idx":
            i.write_bytes(b"")
    return setup


def _manifest(mutate: Callable[[dict], object] | str, rel: str = "manifest.json") -> Callable[[Path, Path], None]:
    """Setup editing ``tokens/<rel>`` (the store's manifest, or a domain's: ``legal/manifest.json``)."""
    def setup(tmp: Path, data: Path) -> None:
        p = data / "tokens" / rel
        if isinstance(mutate, str):
            p.write_text(mutate)
        else:
            man = json.loads(p.read_text())
            mutate(man)
            p.write_text(json.dumps(man))
    return setup


def _enospc(tmp: Path, data: Path) -> None:
    # The run's files are written atomically (a temporary file, then os.replace), which replaces a symlink
    # instead of writing through it; the checkpoint's model file goes through a fixed temporary name, so that
    # name pointing at /dev/full makes the end-of-run checkpoint (step 2) hit a full device.
    ckpt = tmp / "run" / "checkpoints" / "step_0000002"
    ckpt.mkdir(parents=True)
    os.symlink("/dev/full", ckpt / "model.pt.tmp")


def _old_run(tmp: Path, data: Path) -> None:
    """An earlier run's checkpoint in ``{tmp}/run`` (a new run there must not mix with it)."""
    ckpt = tmp / "run" / "checkpoints" / "step_0000002"
    ckpt.mkdir(parents=True)
    (ckpt / "megamix_rank00000.done.json").write_text(json.dumps({
        "format": 2, "step": 2, "rank": 0, "world_size": 1, "backend": "plain", "run_id": "0" * 32, "files": {}}))
    (ckpt.parent / "latest").write_text("step_0000002")


def T(id: str, sets: list[str], names: tuple[str, ...], **kw) -> Case:
    """A `megamix train` case: the base config plus ``--set`` overrides."""
    argv = ["train"]
    for s in sets:
        argv += ["--set", s]
    return Case(id, argv, names, **kw)


def C(id: str, argv: list[str], names: tuple[str, ...], **kw) -> Case:
    return Case(id, argv, names, **kw)


FOUR = ["changelogs", "code_python", "legal", "manpages"]
MIX = "{tmp}/mix.json"

CASES: list[Case] = [
    # --- the config file -----------------------------------------------------------------------------------
    C("config_missing", ["train", "--config", "{tmp}/nope.yaml", "--dry-run"], ("{tmp}/nope.yaml",)),
    C("config_is_a_directory", ["train", "--config", "{tmp}", "--dry-run"], ("{tmp}",)),
    C("config_yaml_syntax_error", ["train", "--config", "{tmp}/bad.yaml", "--dry-run"], ("{tmp}/bad.yaml", "line"),
      setup=_w("bad.yaml", "train:\n  steps: [1, 2\n  lr: 3\n")),
    C("config_yaml_tab_indent", ["train", "--config", "{tmp}/tab.yaml", "--dry-run"], ("{tmp}/tab.yaml", "line"),
      setup=_w("tab.yaml", "train:\n\tsteps: 3\n")),
    C("config_top_level_list", ["train", "--config", "{tmp}/list.yaml", "--dry-run"], ("{tmp}/list.yaml",),
      setup=_w("list.yaml", "- train\n- model\n")),
    C("config_binary_file", ["train", "--config", "{tmp}/ckpt.pt", "--dry-run"], ("{tmp}/ckpt.pt",),
      setup=_w("ckpt.pt", b"PK\x03\x04\x00\xff\xfe\x80\x81binary")),
    C("config_unknown_section", ["train", "--config", "{tmp}/c.yaml", "--dry-run"], ("trian", "train"),
      setup=_w("c.yaml", "trian:\n  steps: 3\n")),
    C("config_unknown_key", ["train", "--config", "{tmp}/c.yaml", "--dry-run"], ("train.stpes", "steps"),
      setup=_w("c.yaml", "train:\n  stpes: 3\n")),
    C("config_section_not_mapping", ["train", "--config", "{tmp}/c.yaml", "--dry-run"], ("train",),
      setup=_w("c.yaml", "train: 5\n")),
    C("config_value_wrong_type", ["train", "--config", "{tmp}/c.yaml", "--dry-run"], ("train.steps",),
      setup=_w("c.yaml", "train:\n  steps: lots\n")),
    C("config_domains_not_a_list", ["train", "--config", "{tmp}/c.yaml", "--dry-run"], ("data.domains",),
      setup=_w("c.yaml", "data:\n  domains: {a: 1}\n")),
    # --- --set ---------------------------------------------------------------------------------------------
    T("set_unknown_key", ["train.stpes=3"], ("train.stpes", "steps")),
    T("set_unknown_section", ["trian.steps=3"], ("trian",)),
    T("set_without_equals", ["train.steps"], ("train.steps", "=")),
    T("set_int_not_a_number", ["train.steps=many"], ("train.steps",)),
    T("set_bool_not_a_bool", ["train.resume=maybe"], ("train.resume",)),
    T("set_float_not_a_number", ["train.lr=fast"], ("train.lr",)),
    T("set_into_a_leaf", ["train.steps.max=3"], ("train.steps",)),
    T("set_section_to_scalar", ["train=5"], ("train",)),
    T("set_list_yaml_error", ["data.domains=[legal, code_python"], ("data.domains",)),
    T("set_mapping_yaml_error", ["mixture.weights={legal: 0.5"], ("mixture.weights",)),
    # --- train.* -------------------------------------------------------------------------------------------
    T("micro_batch_size_zero", ["train.micro_batch_size=0"], ("train.micro_batch_size",)),
    T("micro_batch_size_negative", ["train.micro_batch_size=-2"], ("train.micro_batch_size",)),
    T("global_batch_size_zero", ["train.global_batch_size=0"], ("train.global_batch_size",)),
    T("global_batch_not_divisible", ["train.global_batch_size=10", "train.micro_batch_size=4"],
      ("train.global_batch_size", "train.micro_batch_size")),
    T("steps_zero", ["train.steps=0"], ("train.steps",)),
    T("checkpoint_every_negative", ["train.checkpoint_every=-5"], ("train.checkpoint_every",)),
    T("eval_every_negative", ["train.eval_every=-1"], ("train.eval_every",)),
    T("log_every_zero", ["train.log_every=0"], ("train.log_every",)),
    T("eval_batches_zero", ["train.eval_batches=0"], ("train.eval_batches",)),
    T("warmup_steps_negative", ["train.warmup_steps=-3"], ("train.warmup_steps",)),
    T("threads_negative", ["train.threads=-1"], ("train.threads",)),
    T("min_lr_ratio_above_one", ["train.min_lr_ratio=2"], ("train.min_lr_ratio",)),
    T("lr_negative", ["train.lr=-1"], ("train.lr",)),
    T("dtype_unknown", ["train.dtype=fp16"], ("train.dtype",)),
    T("device_unknown", ["train.device=tpu"], ("train.device",)),
    T("loss_impl_unknown", ["train.loss_impl=liger"], ("train.loss_impl",)),
    T("out_dir_empty", ["train.out_dir="], ("train.out_dir",)),
    T("out_dir_is_a_file", ["train.out_dir={tmp}/afile"], ("train.out_dir", "{tmp}/afile"),
      setup=_w("afile", "not a directory\n")),
    # --- model.* -------------------------------------------------------------------------------------------
    T("n_head_does_not_divide", ["model.n_head=3"], ("model.n_embd", "model.n_head")),
    T("n_head_zero", ["model.n_head=0"], ("model.n_head",)),
    T("n_layer_zero", ["model.n_layer=0"], ("model.n_layer",)),
    T("seq_len_tiny", ["model.seq_len=4"], ("model.seq_len",)),
    T("vocab_smaller_than_store", ["model.vocab_size=1000"], ("model.vocab_size",)),
    T("seq_len_longer_than_domains", ["model.seq_len=100000"], ("model.seq_len",)),
    # --- mixture.* -----------------------------------------------------------------------------------------
    T("mixture_kind_unknown", ["mixture.kind=doremi"], ("mixture.kind",)),
    T("mixture_file_not_given", ["mixture.kind=file"], ("mixture.file",)),
    T("mixture_file_missing", ["mixture.kind=file", f"mixture.file={MIX}"], (MIX,)),
    T("mixture_file_is_a_directory", ["mixture.kind=file", "mixture.file={tmp}"], ("{tmp}",)),
    T("mixture_file_bad_json", ["mixture.kind=file", f"mixture.file={MIX}"], (MIX,),
      setup=_w("mix.json", '{"weights": {"legal": 0.5,}')),
    T("mixture_file_is_yaml", ["mixture.kind=file", "mixture.file={tmp}/mix.yaml"], ("{tmp}/mix.yaml",),
      setup=_w("mix.yaml", "weights:\n  legal: 0.25\n  code_python: 0.75\n")),
    T("mixture_file_no_weights", ["mixture.kind=file", f"mixture.file={MIX}"], (MIX, "weights"),
      setup=_w("mix.json", json.dumps({"domains": FOUR}))),
    T("mixture_file_negative_weight", ["mixture.kind=file", f"mixture.file={MIX}"], (MIX,),
      setup=_w("mix.json", _mixture({"changelogs": 0.6, "code_python": 0.6, "legal": -0.3, "manpages": 0.1}))),
    T("mixture_file_unknown_domain", ["mixture.kind=file", f"mixture.file={MIX}"], (MIX, "novels"),
      setup=_w("mix.json", _mixture({"changelogs": 0.25, "code_python": 0.25, "legal": 0.25, "novels": 0.25}))),
    T("mixture_file_all_zero", ["mixture.kind=file", f"mixture.file={MIX}"], (MIX,),
      setup=_w("mix.json", _mixture({d: 0.0 for d in FOUR}))),
    T("mixture_file_sum_not_one", ["mixture.kind=file", f"mixture.file={MIX}"], (MIX,),
      setup=_w("mix.json", _mixture({d: 0.3 for d in FOUR}))),
    T("mixture_file_nan_weight", ["mixture.kind=file", f"mixture.file={MIX}"], (MIX,),
      setup=_w("mix.json", '{"weights": {"changelogs": NaN, "code_python": 0.5, "legal": 0.25, '
                           '"manpages": 0.25}}')),
    T("mixture_file_bad_max_drift", ["mixture.kind=file", f"mixture.file={MIX}"], (MIX, "max_drift"),
      setup=_w("mix.json", _mixture({d: 0.25 for d in FOUR}, meta={"max_drift": 5}))),
    T("mixture_explicit_negative", ["mixture.kind=explicit",
                                    "mixture.weights={legal: 1.2, code_python: -0.2}"], ("mixture.weights",)),
    T("mixture_explicit_unknown_domain", ["mixture.kind=explicit", "mixture.weights={novels: 1.0}"],
      ("mixture.weights", "novels")),
    T("mixture_temperature_zero", ["mixture.kind=temperature", "mixture.temperature=0"], ("mixture.temperature",)),
    # --- mixing.*, projection.*, loader.* ------------------------------------------------------------------
    T("strategy_unknown", ["mixing.strategy=doremi"], ("mixing.strategy",)),
    T("update_every_zero", ["mixing.update_every=0"], ("mixing.update_every",)),
    T("min_weight_above_one", ["mixing.min_weight=1.5"], ("mixing.min_weight",)),
    T("min_weight_infeasible_for_domains", ["mixing.min_weight=0.4"], ("mixing.min_weight",)),
    T("ema_one", ["mixing.ema=1"], ("mixing.ema",)),
    T("dograph_objective_unknown", ["mixing.strategy=dograph", "mixing.dograph_objective=entropy"],
      ("mixing.dograph_objective",)),
    T("projection_k1_zero", ["projection.k1=0"], ("projection.k1",)),
    T("projection_backend_unknown", ["projection.backend=cuda"], ("projection.backend",)),
    T("projection_u_method_unknown", ["projection.u_method=cublas"], ("projection.u_method",)),
    T("projection_u_method_tiled_on_cpu", ["projection.u_method=tiled", "train.device=cpu"],
      ("projection.u_method=tiled", "train.device=cpu")),
    T("loader_max_epochs_negative", ["loader.max_epochs=-1"], ("loader.max_epochs",)),
    # --- data.* and the token store ------------------------------------------------------------------------
    T("data_dir_missing", ["data.data_dir={tmp}/nodata"], ("{tmp}/nodata",)),
    T("data_dir_is_a_file", ["data.data_dir={tmp}/afile"], ("{tmp}/afile",), setup=_w("afile", "x\n")),
    T("data_dir_without_token_store", ["data.data_dir={tmp}/emptydata"], ("{tmp}/emptydata",),
      setup=lambda tmp, data: (tmp / "emptydata").mkdir()),
    T("eval_data_dir_missing", ["data.eval_data_dir={tmp}/noeval"], ("{tmp}/noeval",)),
    T("domain_not_in_store", ["data.domains=[legal, novels]"], ("novels",)),
    T("domains_listed_twice", ["data.domains=[legal, code_python, legal]"], ("data.domains", "legal")),
    T("domain_name_with_slash", ["data.domains=[code/python]"], ("code/python",)),
    T("valid_fraction_too_big", ["data.valid_fraction=0.7"], ("data.valid_fraction",)),
    T("manifest_bad_json", [], ("manifest.json",), own_data=True, setup=_manifest('{"domains": ')),
    T("domain_manifest_bad_json", [], ("legal", "manifest.json"), own_data=True,
      setup=_manifest('{"format": 2,', "legal/manifest.json")),
    T("manifest_does_not_match_bin", [], ("legal",), own_data=True,
      setup=_manifest(lambda m: m.update(train_tokens=m["train_tokens"] + 1000), "legal/manifest.json")),
    T("idx_wrong_magic", [], ("legal", "train.idx"), own_data=True, setup=_corrupt("legal", "train", "magic")),
    T("idx_truncated", [], ("legal", "train.idx"), own_data=True, setup=_corrupt("legal", "train", "truncate_idx")),
    T("idx_empty", [], ("legal", "train.idx"), own_data=True, setup=_corrupt("legal", "train", "empty_idx")),
    T("bin_truncated", [], ("legal", "train.bin"), own_data=True, setup=_corrupt("legal", "train", "truncate_bin")),
    T("bin_missing", [], ("legal", "train.bin"), own_data=True, setup=_corrupt("legal", "train", "missing_bin")),
    T("idx_does_not_match_bin", [], ("legal", "train"), own_data=True,
      setup=_corrupt("legal", "train", "other_index")),
    T("valid_split_corrupt", [], ("manpages", "valid.idx"), own_data=True,
      setup=_corrupt("manpages", "valid", "magic")),
    # --- devices and launch geometry -----------------------------------------------------------------------
    T("device_cuda_without_gpu", ["train.device=cuda"], ("train.device",)),
    T("deepspeed_zero_stage_unknown", ["deepspeed.enabled=true", "deepspeed.zero_stage=5"],
      ("deepspeed.zero_stage",)),
    T("deepspeed_backend_unknown", ["deepspeed.enabled=true", "deepspeed.backend=mpi"], ("deepspeed.backend",)),
    T("deepspeed_nccl_without_gpu", ["deepspeed.enabled=true", "deepspeed.backend=nccl"], ("deepspeed.backend",)),
    T("deepspeed_offload_zero0", ["deepspeed.enabled=true", "deepspeed.zero_stage=0",
                                  "deepspeed.offload_optimizer=true"], ("deepspeed.offload_optimizer",)),
    T("compile_with_zero3", ["deepspeed.enabled=true", "deepspeed.zero_stage=3", "model.compile=true"],
      ("model.compile", "deepspeed.zero_stage")),
    T("world_size_env_not_a_number", [], ("WORLD_SIZE",), env={"WORLD_SIZE": "two", "RANK": "0"}),
    T("rank_env_beyond_world_size", [], ("RANK", "WORLD_SIZE"), env={"WORLD_SIZE": "2", "RANK": "2"}),
    T("global_batch_not_divisible_by_ranks", ["deepspeed.enabled=true", "train.global_batch_size=6",
                                              "train.micro_batch_size=1"],
      ("train.global_batch_size",), env={"WORLD_SIZE": "4", "RANK": "0"}, real=False),
    # a rank other than 0 whose rank 0 reported nothing (it failed alone): it still prints its error
    T("data_dir_missing_on_rank_1_of_2", ["data.data_dir={tmp}/nodata"], ("{tmp}/nodata",),
      env={"WORLD_SIZE": "2", "RANK": "1", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "29500"}),
    # --- a DeepSpeed config file (deepspeed.config), e.g. one of the Hugging Face templates ---------------------
    T("deepspeed_config_auto_megamix_cannot_fill", ["deepspeed.enabled=true", "deepspeed.config={tmp}/ds.json"],
      ("zero_optimization.stage3_max_live_parameters", "{tmp}/ds.json"),
      setup=_w("ds.json", json.dumps({"zero_optimization": {"stage": "auto", "stage3_max_live_parameters": "auto"}}))),
    T("deepspeed_config_stage_differs", ["deepspeed.enabled=true", "deepspeed.config={tmp}/ds.json"],
      ("zero_optimization.stage", "deepspeed.zero_stage", "{tmp}/ds.json"),
      setup=_w("ds.json", json.dumps({"train_batch_size": "auto", "zero_optimization": {"stage": 3}}))),
    # --- the disk fills up ---------------------------------------------------------------------------------
    T("disk_full", ["train.resume=false"], ("{tmp}/run", "space"), setup=_enospc, dry=False),
    # --- one run per out_dir -------------------------------------------------------------------------------
    T("new_run_over_an_earlier_runs_checkpoints", ["train.resume=false"],
      ("{tmp}/run", "step_0000002", "--overwrite", "train.out_dir"), setup=_old_run),
    # --- megamix data --------------------------------------------------------------------------------------
    C("import_empty_parquet", ["data", "import", "--data-dir", "{tmp}/d", "--domain", "web", "--from",
                               "{tmp}/empty.parquet"], ("{tmp}/empty.parquet",), setup=_w("empty.parquet", b"")),
    C("import_not_a_parquet", ["data", "import", "--data-dir", "{tmp}/d", "--domain", "web", "--from",
                               "{tmp}/x.parquet"], ("{tmp}/x.parquet",), setup=_w("x.parquet", "a,b\n1,2\n")),
    C("import_domain_with_slash", ["data", "import", "--data-dir", "{tmp}/d", "--domain", "web/en", "--from",
                                   "{tmp}/docs.jsonl"], ("web/en",), setup=_w("docs.jsonl", '{"text": "hello"}\n')),
    C("import_domain_dotdot", ["data", "import", "--data-dir", "{tmp}/d", "--domain", "..", "--from",
                               "{tmp}/docs.jsonl"], ("'..'",), setup=_w("docs.jsonl", '{"text": "hello"}\n')),
    C("import_domain_empty", ["data", "import", "--data-dir", "{tmp}/d", "--domain", "", "--from",
                              "{tmp}/docs.jsonl"], ("--domain",), setup=_w("docs.jsonl", '{"text": "hello"}\n')),
    C("import_source_missing", ["data", "import", "--data-dir", "{tmp}/d", "--domain", "web", "--from",
                                "{tmp}/nope.jsonl"], ("{tmp}/nope.jsonl",)),
    C("import_directory_as_file", ["data", "import", "--data-dir", "{tmp}/d", "--domain", "web", "--from",
                                   "{tmp}/folder.jsonl"], ("{tmp}/folder.jsonl",),
      setup=lambda tmp, data: (tmp / "folder.jsonl").mkdir()),
    C("import_bad_json_line", ["data", "import", "--data-dir", "{tmp}/d", "--domain", "web", "--from",
                               "{tmp}/docs.jsonl"], ("{tmp}/docs.jsonl",),
      setup=_w("docs.jsonl", '{"text": "hello"}\n{"text": "unterminated\n')),
    C("import_binary_jsonl", ["data", "import", "--data-dir", "{tmp}/d", "--domain", "web", "--from",
                              "{tmp}/docs.jsonl"], ("{tmp}/docs.jsonl", "UTF-8"),
      setup=_w("docs.jsonl", b'{"text": "ok"}\n\xff\xfe\x00garbage\n')),
    C("import_wrong_text_field", ["data", "import", "--data-dir", "{tmp}/d", "--domain", "web", "--from",
                                  "{tmp}/docs.jsonl"], ("{tmp}/docs.jsonl", "--text-field"),
      setup=_w("docs.jsonl", '{"content": "hello"}\n')),
    C("import_megatron_prefix_missing", ["data", "import", "--data-dir", "{tmp}/d", "--domain", "web", "--format",
                                         "megatron", "--from", "{tmp}/web_text_document"],
      ("{tmp}/web_text_document",)),
    C("import_data_dir_is_a_file", ["data", "import", "--data-dir", "{tmp}/afile", "--domain", "web", "--from",
                                    "{tmp}/docs.jsonl"], ("{tmp}/afile",),
      setup=lambda tmp, data: (_w("afile", "x")(tmp, data), _w("docs.jsonl", '{"text": "hi"}\n')(tmp, data))),
    C("tokenize_empty_data_dir", ["data", "tokenize", "--data-dir", "{tmp}"], ("{tmp}",)),
    C("build_unknown_domain", ["data", "build", "--offline", "--data-dir", "{tmp}/d", "--domains", "novelz"],
      ("novelz",)),
    C("stats_missing_data_dir", ["data", "stats", "--data-dir", "{tmp}/nodata"], ("{tmp}/nodata",)),
    # --- other commands ------------------------------------------------------------------------------------
    C("report_missing_run_dir", ["report", "{tmp}/norun"], ("{tmp}/norun",)),
    C("report_file_as_run_dir", ["report", "{tmp}/afile"], ("{tmp}/afile",), setup=_w("afile", "x")),
    C("mix_simulate_snapshot_missing", ["mix", "simulate", "--snapshot", "{tmp}/s.npz"], ("{tmp}/s.npz",)),
    C("mix_simulate_snapshot_not_npz", ["mix", "simulate", "--snapshot", "{tmp}/s.npz"], ("{tmp}/s.npz",),
      setup=_w("s.npz", "not a numpy archive")),
    C("config_command_unknown_key", ["config", "--set", "mixing.stratgy=rnb"], ("mixing.stratgy", "strategy")),
    # --- the command line itself ---------------------------------------------------------------------------
    C("unknown_flag", ["train", "--dryrun"], ("--dryrun",)),
    C("unknown_command", ["trian"], ("trian",)),
    C("required_argument_missing", ["data", "import", "--from", "x.jsonl"], ("--domain",)),
    C("argument_not_an_int", ["data", "import", "--domain", "w", "--from", "x.jsonl", "--max-docs", "many"],
      ("--max-docs",)),
]

# run through `python -m megamix` as well (one per kind of failure path)
SUBPROCESS_CASES = ["config_yaml_syntax_error", "idx_wrong_magic", "disk_full"]


# ------------------------------------------------------------------------------------------------ running
@dataclass
class Outcome:
    rc: int | None
    stdout: str
    stderr: str
    raised: str | None = None    # an exception escaped main() (a traceback for the user)


def _subst(s: str, tmp: Path, data: Path, cfg: Path) -> str:
    return s.replace("{tmp}", str(tmp)).replace("{data}", str(data)).replace("{cfg}", str(cfg))


def prepare(case: Case, tmp: Path, store_root: Path, dry: bool) -> tuple[list[str], tuple[str, ...], dict]:
    """Write the case's files under ``tmp``; return (argv, names, env)."""
    data = store_root
    if case.own_data:
        data = tmp / "data"
        shutil.copytree(store_root, data)
    cfg = tmp / "base.yaml"
    cfg.write_text(BASE_YAML.format(data=data, tmp=tmp))
    if case.setup:
        case.setup(tmp, data)
    argv = [_subst(a, tmp, data, cfg) for a in case.argv]
    if case.is_train and "--config" not in argv:
        argv[1:1] = ["--config", str(cfg)]
    if case.is_train and dry and "--dry-run" not in argv:
        argv.append("--dry-run")
    if case.is_train and not dry:
        argv = [a for a in argv if a != "--dry-run"] + ["--no-progress"]
    names = tuple(_subst(n, tmp, data, cfg) for n in case.names)
    return argv, names, dict(case.env)


def run_in_process(argv: list[str], env: dict, cwd: Path) -> Outcome:
    from megamix.cli import main

    out, err = io.StringIO(), io.StringIO()
    saved_env = {k: os.environ.get(k) for k in env}
    old_cwd = os.getcwd()
    os.environ.update(env)
    os.chdir(cwd)
    raised = None
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            try:
                rc = main(argv)
            except SystemExit as e:
                if isinstance(e.code, str):
                    print(e.code, file=sys.stderr)
                    rc = 1
                else:
                    rc = int(e.code or 0)
            except BaseException:  # noqa: BLE001 - this is what the user would see as a traceback
                raised = traceback.format_exc()
                rc = 1
    finally:
        os.chdir(old_cwd)
        for k, v in saved_env.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
    stderr = err.getvalue() + (raised or "")
    return Outcome(rc, out.getvalue(), stderr, raised)


def run_subprocess(argv: list[str], env: dict, cwd: Path) -> Outcome:
    full_env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""), **env}
    p = subprocess.run([sys.executable, "-m", "megamix", *argv], capture_output=True, text=True, cwd=cwd,
                       env=full_env, timeout=300)
    return Outcome(p.returncode, p.stdout, p.stderr)


def problems(o: Outcome, names: tuple[str, ...]) -> list[str]:
    """Why an outcome is not a clear error (empty list = clear)."""
    lines = [ln for ln in o.stderr.splitlines() if ln.strip()]
    why = []
    if o.raised or "Traceback" in o.stderr:
        why.append("traceback")
    if o.rc == 0:
        why.append("accepted (exit 0)")
    elif o.rc != 2:
        why.append(f"exit code {o.rc}")
    if len(lines) != 1:
        why.append(f"{len(lines)} lines on stderr")
    elif not lines[0].startswith("megamix"):
        why.append("the line does not start with 'megamix' (progress output in front of it?)")
    msg = " ".join(lines)
    missing = [n for n in names if n.lower() not in msg.lower()]
    if missing:
        why.append(f"does not name {missing}")
    if lines and not FIX_WORDS.search(msg):
        why.append("says no fix")
    return why


def classify(o: Outcome, names: tuple[str, ...]) -> str:
    why = problems(o, names)
    if not why:
        return "clear"
    if "traceback" in why:
        return "traceback"
    if o.rc == 0:
        return "accepted"
    return "unclear"


def _variants() -> list[tuple[Case, bool]]:
    out = []
    for c in CASES:
        if c.is_train:
            if c.dry:
                out.append((c, True))
            if c.real:
                out.append((c, False))
        else:
            out.append((c, False))
    return out


def _vid(v: tuple[Case, bool]) -> str:
    c, dry = v
    return c.id + ("[dry-run]" if c.is_train and dry else "[run]" if c.is_train else "")


# ------------------------------------------------------------------------------------------------ tests
@pytest.fixture(scope="module")
def store_root(tmp_path_factory):
    """The data_dir of a real 4-domain token store (never modified: corrupting cases copy it)."""
    from megamix.data.testing import build_tiny_store
    return build_tiny_store(tmp_path_factory.mktemp("bad_inputs_store")).parent


def test_sweep_size():
    ids = [c.id for c in CASES]
    assert len(ids) == len(set(ids))
    assert len(CASES) >= 62
    for required in ("idx_wrong_magic", "bin_truncated", "idx_does_not_match_bin", "mixture_file_bad_json",
                     "mixture_file_negative_weight", "mixture_file_unknown_domain", "mixture_file_all_zero",
                     "config_yaml_syntax_error", "config_missing", "set_unknown_key", "set_int_not_a_number",
                     "micro_batch_size_zero", "global_batch_not_divisible", "import_empty_parquet",
                     "import_domain_with_slash", "import_directory_as_file", "config_is_a_directory",
                     "disk_full", "checkpoint_every_negative", "eval_every_negative", "data_dir_missing",
                     "domain_not_in_store", "strategy_unknown", "device_cuda_without_gpu"):
        assert required in ids


@pytest.mark.parametrize("variant", _variants(), ids=_vid)
def test_bad_input_is_one_clear_line(variant, store_root, tmp_path):
    case, dry = variant
    if case.id == "device_cuda_without_gpu":
        import torch
        if torch.cuda.is_available():
            pytest.skip("a CUDA device is visible")
    argv, names, env = prepare(case, tmp_path, store_root, dry)
    o = run_in_process(argv, env, tmp_path)
    why = problems(o, names)
    assert not why, f"{argv}: {why}\n--- stderr ---\n{o.stderr[-3000:]}"
    if case.id == "disk_full":   # it trains, then its first checkpoint hits the full device: none is published
        assert not (tmp_path / "run" / "checkpoints" / "latest").exists(), "a failed checkpoint must not be latest"
    elif case.setup is _old_run:  # refused: the earlier run's checkpoint is left as it was, nothing new written
        assert sorted(p.name for p in (tmp_path / "run" / "checkpoints").iterdir()) == ["latest", "step_0000002"]
        assert not (tmp_path / "run" / "run.json").exists()
    elif case.is_train and not dry:
        assert not (tmp_path / "run" / "checkpoints").exists(), "a refused run must not train"


def test_bad_inputs_through_python_m_megamix(store_root, tmp_path):
    by_id = {c.id: c for c in CASES}
    for cid in SUBPROCESS_CASES:
        case = by_id[cid]
        d = tmp_path / cid
        d.mkdir()
        argv, names, env = prepare(case, d, store_root, dry=case.dry)
        o = run_subprocess(argv, env, d)
        assert not problems(o, names), f"{cid}: {argv}: {problems(o, names)}\n{o.stderr[-3000:]}"


# ------------------------------------------------------------------------------------------------ counts
def sweep_counts(root: Path) -> dict:
    """Run every case (in-process) and count the outcomes; used for the README's numbers."""
    from megamix.data.testing import build_tiny_store

    store = build_tiny_store(root / "store").parent
    counts: dict[str, int] = {}
    detail = []
    for i, (case, dry) in enumerate(_variants()):
        tmp = root / f"case{i:03d}"
        tmp.mkdir()
        argv, names, env = prepare(case, tmp, store, dry)
        o = run_in_process(argv, env, tmp)
        kind = classify(o, names)
        counts[kind] = counts.get(kind, 0) + 1
        last = (o.stderr.strip().splitlines() or [""])[-1]
        detail.append((_vid((case, dry)), kind, last[:160]))
    return {"cases": len(CASES), "variants": len(detail), "counts": counts, "detail": detail}


if __name__ == "__main__":
    import tempfile

    os.environ.setdefault("TRITON_INTERPRET", "1")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    with tempfile.TemporaryDirectory() as d:
        res = sweep_counts(Path(d))
    for vid, kind, last in res["detail"]:
        print(f"{kind:9s} {vid:45s} {last}")
    print(json.dumps({k: v for k, v in res.items() if k != "detail"}))
