"""Entry point: compose the configuration, apply the mode, run the Optuna search and/or the training run.

    uv run python -u -m src.main run=<run_id> results_dir=<path> mode=trial|full [hydra overrides]

Sections
  1. The configuration schema (types only; every value lives in config/config.yaml and the run files)
  2. Method, planner and search-space tables
  3. Composing (Hydra) and validating: every mistake is one line naming the problem and the fix
  4. Modes
  5. Optuna search: a persistent study shared by restarts and workers, then one final run logged to W&B
  6. The command line

Merge order: config/config.yaml < config/runs/<run_id>.yaml < command line.  A run id with a `-seed<N>` suffix
and no file of its own runs the file without the suffix with `seed=N` (e.g. proposed-iter1-tiny-synthetic-seed1).
torch is imported only once the configuration is valid, so a mistake is reported in about a second.
"""
from __future__ import annotations

import difflib
import fcntl
import itertools
import json
import math
import os
import random
import re
import socket
import sys
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional

from omegaconf import MISSING, DictConfig, ListConfig, OmegaConf

REPO_ROOT = Path(__file__).resolve().parent.parent
CONFIG_DIR = REPO_ROOT / "config"
RUNS_DIR = CONFIG_DIR / "runs"


class ConfigError(Exception):
    """A mistake in the configuration or the command line (printed as one line, exit code 2)."""


# ----------------------------------------------------------------------------------------------------
# 1. The configuration schema
# ----------------------------------------------------------------------------------------------------
# Hydra/OmegaConf check every value against these types when the run file and the command line are merged, and
# refuse keys that are not declared here.  No defaults here: config/config.yaml holds one for every key.
@dataclass
class LoraConfig:
    r: int = MISSING
    alpha: float = MISSING
    dropout: float = MISSING
    target_modules: List[str] = MISSING
    modules_to_save: List[str] = MISSING        # fully trained modules besides the adapters (embedded runs)


@dataclass
class EmbeddedConfig:                            # architecture of the config-built Qwen3 (model.name=embedded)
    layers: int = MISSING
    hidden: int = MISSING
    heads: int = MISSING
    kv_heads: int = MISSING
    head_dim: int = MISSING
    intermediate: int = MISSING
    vocab_size: int = MISSING                    # target size of the locally trained BPE tokenizer
    max_positions: int = MISSING
    init_seed: int = MISSING


@dataclass
class ModelConfig:
    name: str = MISSING                          # hub id, local folder, or "embedded"
    dtype: str = MISSING                         # float32 | bfloat16 | float16 (weights)
    parameter_count: Optional[str] = MISSING     # nominal size ("0.6B"); checked against the loaded model
    lora: LoraConfig = field(default_factory=LoraConfig)
    embedded: EmbeddedConfig = field(default_factory=EmbeddedConfig)


@dataclass
class SyntheticConfig:                           # the embedded data set (dataset.name=synthetic)
    difficulty: int = MISSING                    # arithmetic steps per problem
    train_size: int = MISSING
    test_size: int = MISSING
    seed: int = MISSING


@dataclass
class DatasetConfig:
    name: str = MISSING                          # hub id, local folder of <split>.jsonl, or "synthetic"
    config_name: Optional[str] = MISSING         # hub configuration ("main" for openai/gsm8k)
    train_split: str = MISSING
    eval_split: str = MISSING
    max_tokens: int = MISSING                    # longest training sequence (prompt + answer); longer rows skipped
    streaming: bool = MISSING
    shuffle_buffer: int = MISSING
    contamination_path: Optional[str] = MISSING  # optional GSM8K-format JSONL (e.g. GSM1k), evaluated at the end
    synthetic: SyntheticConfig = field(default_factory=SyntheticConfig)


@dataclass
class OptimizerConfig:
    type: str = MISSING                          # adamw (Schedule-Free uses its AdamW variant)
    lr_init: float = MISSING
    betas: List[float] = MISSING
    weight_decay: float = MISSING


@dataclass
class SchedulerConfig:
    """`type` picks the planner; each planner reads only its own knobs (PLANNER_KNOBS)."""
    type: str = MISSING
    warmup_fraction: float = MISSING
    decay_fraction: float = MISSING
    min_lr_ratio: float = MISSING
    warmup_steps: int = MISSING
    curvature_ema: float = MISSING
    lr_mult_range: List[float] = MISSING
    difficulty_ema: float = MISSING
    difficulty_power: float = MISSING
    weight_range: List[float] = MISSING
    controller_lr: float = MISSING
    baseline_decay: float = MISSING
    entropy_bonus: float = MISSING
    init_std: float = MISSING
    outer_lr: float = MISSING
    stability_guard: float = MISSING
    warm_start_ckpt: Optional[str] = MISSING
    save_ckpt: Optional[str] = MISSING
    hidden_dim: int = MISSING
    gnn_rounds: int = MISSING
    use_edges: bool = MISSING
    use_budget: bool = MISSING
    freeze: bool = MISSING
    jvp_sequences: int = MISSING


@dataclass
class TrainingConfig:
    budget_minutes: float = MISSING              # wall-clock budget B, evaluations included
    global_batch_size: int = MISSING             # must equal micro_batch_size × gradient_accumulation_steps
    micro_batch_size: int = MISSING
    gradient_accumulation_steps: int = MISSING
    total_steps: int = MISSING                   # safety cap on optimiser steps
    max_epochs: int = MISSING
    mixed_precision: str = MISSING               # bf16 | fp32
    gradient_checkpointing: bool = MISSING
    clip_grad_norm: float = MISSING              # 0 = no clipping
    device: str = MISSING                        # auto | cpu | cuda
    probe_vocab: int = MISSING                   # sub-vocabulary of the first-layer entropy probe
    max_bad_steps: int = MISSING                 # consecutive non-finite steps before the run stops
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)


@dataclass
class EvaluationConfig:
    interval_steps: int = MISSING                # 0 = only the start, marks and the end
    metrics: List[str] = MISSING                 # exact_match (strict and flexible are both logged)
    max_problems: Optional[int] = MISSING        # null = the whole dev split
    periodic_problems: Optional[int] = MISSING   # fixed random subset for step-0 and periodic evaluations (null: all)
    batch_size: int = MISSING
    max_new_tokens: int = MISSING
    at_start: bool = MISSING                     # evaluate the untrained model at step 0 (counted in the budget)
    marks_minutes: List[int] = MISSING           # dev EM at these wall-clock marks inside the budget
    split: str = MISSING                         # test | validation (the trials of a search use validation)


@dataclass
class CheckpointingConfig:
    enabled: bool = MISSING
    interval_minutes: float = MISSING


@dataclass
class OptunaConfig:
    n_trials: int = MISSING
    direction: str = MISSING
    search_space: Dict[str, Any] = field(default_factory=dict)   # name -> {type, low, high} or {type, choices}
    storage: Optional[str] = MISSING             # null = sqlite:///<results_dir>/optuna/<run_id>.db
    study_name: Optional[str] = MISSING          # null = the run id
    pruner: str = MISSING                        # none | median
    heartbeat_s: int = MISSING                   # a trial whose worker is silent 4× this long is failed and retried


@dataclass
class WandbConfig:
    entity: Optional[str] = MISSING
    project: str = MISSING
    mode: str = MISSING                          # online | offline | disabled (set from `mode`)
    init_timeout_s: float = MISSING              # an online start that takes longer falls back to offline
    finish_timeout_s: float = MISSING            # an online run waits this long for its upload at the end


@dataclass
class TrialConfig:                               # what mode=trial shrinks the run to
    steps: int = MISSING
    eval_problems: int = MISSING


@dataclass
class Config:
    run: str = MISSING
    mode: str = MISSING
    results_dir: str = MISSING
    run_id: str = MISSING
    method: str = MISSING
    seed: int = MISSING
    model: ModelConfig = field(default_factory=ModelConfig)
    dataset: DatasetConfig = field(default_factory=DatasetConfig)
    training: TrainingConfig = field(default_factory=TrainingConfig)
    evaluation: EvaluationConfig = field(default_factory=EvaluationConfig)
    checkpointing: CheckpointingConfig = field(default_factory=CheckpointingConfig)
    optuna: OptunaConfig = field(default_factory=OptunaConfig)
    wandb: WandbConfig = field(default_factory=WandbConfig)
    trial: TrialConfig = field(default_factory=TrialConfig)


# ----------------------------------------------------------------------------------------------------
# 2. Method, planner and search-space tables
# ----------------------------------------------------------------------------------------------------
# The method token of a run id fixes its planner (SPEC §5), so a run id always means the same method.
METHOD_PLANNER = {
    "proposed": "graff", "comparative-1": "reactor", "comparative-2": "bats", "comparative-3": "salelr",
    "comparative-4": "constant", "comparative-5": "cosine", "comparative-6": "linear", "comparative-7": "wsd",
    "comparative-8": "schedulefree", "ablation-noedges": "graff", "ablation-nobudget": "graff",
    "ablation-frozenw": "graff", "pretrain": "graff",
}
# What each ablation must switch off (and what the full method must keep on).
ABLATION_FLAGS = {"ablation-noedges": ("use_edges", False), "ablation-nobudget": ("use_budget", False),
                  "ablation-frozenw": ("freeze", True)}
# The training.scheduler keys each planner reads.  A run file may set only these (and `type`).
PLANNER_KNOBS: dict[str, tuple[str, ...]] = {
    "constant": (),
    "cosine": ("warmup_fraction", "min_lr_ratio"),
    "linear": ("warmup_fraction",),
    "wsd": ("warmup_fraction", "decay_fraction", "min_lr_ratio"),
    "schedulefree": ("warmup_steps",),
    "salelr": ("curvature_ema", "lr_mult_range"),
    "bats": ("difficulty_ema", "difficulty_power", "weight_range"),
    "reactor": ("controller_lr", "baseline_decay", "entropy_bonus", "lr_mult_range", "init_std"),
    "graff": ("outer_lr", "stability_guard", "warm_start_ckpt", "save_ckpt", "hidden_dim", "gnn_rounds", "use_edges",
              "use_budget", "freeze", "curvature_ema", "jvp_sequences", "lr_mult_range"),
}
# The seed's short search-space names and the config paths they tune.  Full dotted paths work too.
SEARCH_ALIASES = {
    "adapter_lr_init": "training.optimizer.lr_init",
    "graff_outer_lr": "training.scheduler.outer_lr",
    "controller_lr": "training.scheduler.controller_lr",
    "lora_r": "model.lora.r",
}
# Sections read only under a condition: setting one of their keys otherwise would do nothing, so it is refused.
CONDITIONAL = {
    "model.embedded": (lambda c: c.model.name == "embedded", "model.name is not 'embedded'"),
    "dataset.synthetic": (lambda c: c.dataset.name == "synthetic", "dataset.name is not 'synthetic'"),
}


# ----------------------------------------------------------------------------------------------------
# 3. Composing and validating
# ----------------------------------------------------------------------------------------------------
def available_runs() -> list[str]:
    return sorted(p.stem for p in RUNS_DIR.glob("*.yaml"))


def resolve_run_id(run: str) -> tuple[str, int | None]:
    """(run file id, seed from a `-seed<N>` suffix or None)."""
    if (RUNS_DIR / f"{run}.yaml").is_file():
        return run, None
    match = re.fullmatch(r"(.+)-seed(\d+)", run)
    if match and (RUNS_DIR / f"{match.group(1)}.yaml").is_file():
        return match.group(1), int(match.group(2))
    close = difflib.get_close_matches(run, available_runs(), n=1)
    hint = f" (did you mean {close[0]}?)" if close else ""
    raise ConfigError(f"unknown run id '{run}'{hint}: choose one of {', '.join(available_runs())} "
                      f"(files in config/runs/), optionally with a -seed<N> suffix")


def _leaf_paths(node, prefix: str = "") -> list[str]:
    if isinstance(node, dict):
        out = []
        for key, value in node.items():
            out += _leaf_paths(value, f"{prefix}{key}.") if isinstance(value, dict) and value else [f"{prefix}{key}"]
        return out
    return [prefix.rstrip(".")]


def _schema_keys(path: str) -> list[str]:
    """Keys the schema declares at a dotted path (for 'did you mean')."""
    node = OmegaConf.structured(Config)
    for part in [p for p in path.split(".") if p]:
        node = node[part] if isinstance(node, DictConfig) and part in node else None
        if node is None:
            return []
    return list(node.keys()) if isinstance(node, DictConfig) else []


def explain_hydra_error(err: Exception, source: str) -> str:
    """Turn Hydra/OmegaConf's multi-line composition error into one line that names the problem and the fix."""
    text = str(err)
    cause = err.__cause__
    if cause is not None and getattr(cause, "full_key", None):
        text = f"{text}\n{cause}"
    full_key = re.search(r"full_key: (\S+)", text)
    key = full_key.group(1) if full_key else ""
    if "not in" in text or "Could not override" in text or "Could not append" in text:
        if not key:
            found = re.search(r"override '([^']+)'", text) or re.search(r"Key '([^']+)'", text)
            key = found.group(1) if found else "?"
        parent, _, leaf = key.rpartition(".")
        close = difflib.get_close_matches(leaf, _schema_keys(parent), n=1)
        hint = f"did you mean {(parent + '.') if parent else ''}{close[0]}?" if close else \
            "see config/config.yaml for the keys that exist"
        return f"{source}: unknown key '{key}': {hint}"
    conv = re.search(r"Value '(.*?)' (?:of type '(\w+)' )?could not be converted to (\w+)", text)
    if conv:
        return f"{source}: {key} = {conv.group(1)!r} is not a valid {conv.group(3).lower()}; give a {conv.group(3).lower()}"
    if "Missing mandatory value" in text:
        return f"{source}: {key} has no value; set it (e.g. {key}=...)"
    lines = [ln.strip() for ln in text.splitlines() if ln.strip() and not ln.strip().startswith(("full_key",
                                                                                                "object_type",
                                                                                                "reference_type"))]
    detail = lines[-1] if lines else type(err).__name__
    return f"{source}: {detail}" + (f" (at {key})" if key else "")


def parse_cli(argv: list[str]) -> tuple[str, list[str]]:
    """The run id and the remaining Hydra overrides (validated by Hydra's override grammar)."""
    from hydra.core.override_parser.overrides_parser import OverridesParser
    try:
        overrides = OverridesParser.create().parse_overrides(argv)
    except Exception as err:
        first = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise ConfigError(f"command line: cannot parse the overrides ({first}); use key=value, e.g. "
                          f"run=<run_id> results_dir=<path> mode=trial") from None
    run = [o for o in overrides if o.key_or_group == "run"]
    if not run:
        raise ConfigError(f"command line: run=<run_id> is missing; choose one of {', '.join(available_runs())}")
    return str(run[-1].value()), [a for a in argv if not a.split("=", 1)[0].lstrip("+~") == "run"]


def compose(argv: list[str]) -> tuple[DictConfig, set[str]]:
    """config.yaml < run file < command line, typed and struct.  Also returns the keys the user set explicitly
    (run file and command line), which validation checks for unused settings."""
    from hydra import compose as hydra_compose, initialize_config_dir
    from hydra.core.config_store import ConfigStore
    from hydra.core.global_hydra import GlobalHydra

    run, rest = parse_cli(argv)
    base_id, seed = resolve_run_id(run)
    run_file = RUNS_DIR / f"{base_id}.yaml"
    try:
        run_yaml = OmegaConf.to_container(OmegaConf.load(run_file))
    except Exception as err:
        raise ConfigError(f"{run_file}: not valid YAML ({str(err).splitlines()[0]}); fix the file") from None
    if not isinstance(run_yaml, dict):
        raise ConfigError(f"{run_file}: must be a mapping of config keys; fix the file")
    run_yaml.pop("defaults", None)   # Hydra's include list (presets), not a config key
    explicit = set(_leaf_paths(run_yaml)) | {a.split("=", 1)[0].lstrip("+~") for a in rest}
    overrides = [f"+runs@_global_={base_id}", f"run={run}"] + rest
    ConfigStore.instance().store(name="graff_schema", node=Config)
    GlobalHydra.instance().clear()
    try:
        with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base=None):
            cfg = hydra_compose(config_name="config", overrides=overrides)
    except Exception as err:
        source = f"config/runs/{base_id}.yaml" if f"runs/{base_id}" in str(err) else "command line"
        raise ConfigError(explain_hydra_error(err, source)) from None
    if seed is not None:
        if "seed" in explicit:
            raise ConfigError(f"command line: run id {run} already sets seed={seed}; drop seed=... or the suffix")
        cfg.seed = seed
    cfg.run_id = run if seed is not None else cfg.run_id
    return cfg, explicit


def _check(ok: bool, message: str) -> None:
    if not ok:
        raise ConfigError(message)


def resolve_search_path(name: str, cfg: DictConfig) -> str:
    path = SEARCH_ALIASES.get(name, name)
    try:
        OmegaConf.select(cfg, path, throw_on_missing=True)
        exists = OmegaConf.select(cfg, path, default="__absent__") != "__absent__"
    except Exception:
        exists = False
    if not exists:
        raise ConfigError(f"optuna.search_space.{name}: '{path}' is not a config path; use a dotted path from "
                          f"config/config.yaml or one of the names {', '.join(SEARCH_ALIASES)}")
    if path.startswith("training.scheduler.") and path.split(".")[-1] not in PLANNER_KNOBS[cfg.training.scheduler.type]:
        raise ConfigError(f"optuna.search_space.{name}: '{path}' is not read by scheduler "
                          f"'{cfg.training.scheduler.type}'; search a knob it reads: "
                          f"{', '.join(PLANNER_KNOBS[cfg.training.scheduler.type]) or '(none)'}")
    return path


def validate(cfg: DictConfig, explicit: set[str]) -> None:
    """Value checks the types cannot express.  Each failure is one line naming the key and the fix."""
    t, s, e, o = cfg.training, cfg.training.scheduler, cfg.evaluation, cfg.optuna
    _check(cfg.mode in ("trial", "full"), f"mode={cfg.mode} is not a mode: use mode=trial or mode=full")
    base_id = cfg.run_id.split("-seed")[0] if re.search(r"-seed\d+$", cfg.run_id) else cfg.run_id
    _check(base_id in (cfg.run, cfg.run.split("-seed")[0]),
           f"config/runs/{cfg.run}.yaml: run_id is '{cfg.run_id}' but the file is named {cfg.run}.yaml; make them "
           f"match")
    _check(cfg.method in METHOD_PLANNER, f"method={cfg.method} is unknown: use one of {', '.join(METHOD_PLANNER)}")
    _check(cfg.run_id.startswith(cfg.method + "-"),
           f"run id {cfg.run_id} does not start with its method '{cfg.method}'; rename the run or fix `method`")
    _check(s.type in PLANNER_KNOBS, f"training.scheduler.type={s.type} is not a scheduler: use one of "
                                    f"{', '.join(PLANNER_KNOBS)}")
    _check(METHOD_PLANNER[cfg.method] == s.type,
           f"method {cfg.method} uses scheduler '{METHOD_PLANNER[cfg.method]}', not '{s.type}'; fix "
           f"training.scheduler.type or the method")
    for method, (flag, value) in ABLATION_FLAGS.items():
        if cfg.method == method:
            _check(s[flag] == value, f"{method} needs training.scheduler.{flag}={str(value).lower()}; set it")
        elif s.type == "graff" and cfg.method in ("proposed", "pretrain"):
            _check(s[flag] != value, f"{cfg.method} runs the full GRAFF: training.scheduler.{flag} must be "
                                     f"{str(not value).lower()} (ablations have their own method token)")
    # keys set but not used
    for key in sorted(explicit):
        if key.startswith("training.scheduler.") and key.count(".") == 2:
            knob = key.split(".")[-1]
            if knob != "type" and knob not in PLANNER_KNOBS[s.type]:
                raise ConfigError(f"{key} is set but scheduler '{s.type}' does not read it; remove it (scheduler "
                                  f"'{s.type}' reads: {', '.join(PLANNER_KNOBS[s.type]) or 'only optimizer.lr_init'})")
        for section, (used, why) in CONDITIONAL.items():
            if key.startswith(section + ".") and not used(cfg):
                raise ConfigError(f"{key} is set but {why}, so it is not used; remove it")
    # model and data
    _check(cfg.model.dtype in ("float32", "bfloat16", "float16"),
           f"model.dtype={cfg.model.dtype}: use float32, bfloat16 or float16")
    _check(cfg.model.lora.r >= 1 and cfg.model.lora.alpha > 0 and 0 <= cfg.model.lora.dropout < 1,
           "model.lora: r must be ≥ 1, alpha > 0 and 0 ≤ dropout < 1")
    _check(len(cfg.model.lora.target_modules) > 0, "model.lora.target_modules is empty: name the projections")
    _check(cfg.dataset.max_tokens >= 8, "dataset.max_tokens must be ≥ 8")
    _check(cfg.dataset.shuffle_buffer >= 1, "dataset.shuffle_buffer must be ≥ 1")
    if cfg.dataset.name == "synthetic":
        syn = cfg.dataset.synthetic
        _check(syn.difficulty >= 1 and syn.train_size >= 1 and syn.test_size >= 1,
               "dataset.synthetic: difficulty, train_size and test_size must be ≥ 1")
    if cfg.dataset.contamination_path:
        _check(Path(cfg.dataset.contamination_path).expanduser().is_file(),
               f"dataset.contamination_path={cfg.dataset.contamination_path} does not exist; give a GSM8K-format "
               f"JSONL file or null")
    # training
    _check(t.budget_minutes > 0, f"training.budget_minutes={t.budget_minutes} must be > 0 (wall-clock minutes)")
    _check(t.micro_batch_size >= 1 and t.gradient_accumulation_steps >= 1,
           "training.micro_batch_size and gradient_accumulation_steps must be ≥ 1")
    _check(t.global_batch_size == t.micro_batch_size * t.gradient_accumulation_steps,
           f"training.global_batch_size={t.global_batch_size} but micro_batch_size × gradient_accumulation_steps = "
           f"{t.micro_batch_size * t.gradient_accumulation_steps}; make them agree")
    _check(t.total_steps >= 1 and t.max_epochs >= 1, "training.total_steps and max_epochs must be ≥ 1")
    _check(t.mixed_precision in ("bf16", "fp32"), f"training.mixed_precision={t.mixed_precision}: use bf16 or fp32")
    _check(t.device in ("auto", "cpu", "cuda"), f"training.device={t.device}: use auto, cpu or cuda")
    _check(t.clip_grad_norm >= 0, "training.clip_grad_norm must be ≥ 0 (0 = no clipping)")
    _check(t.probe_vocab >= 2 and t.max_bad_steps >= 1, "training.probe_vocab must be ≥ 2 and max_bad_steps ≥ 1")
    opt = t.optimizer
    _check(opt.type == "adamw", f"training.optimizer.type={opt.type}: only adamw is implemented (Schedule-Free "
                                f"is scheduler.type=schedulefree)")
    _check(opt.lr_init > 0, f"training.optimizer.lr_init={opt.lr_init} must be > 0")
    _check(len(opt.betas) == 2 and all(0 <= b < 1 for b in opt.betas),
           "training.optimizer.betas must be two numbers in [0, 1)")
    _check(opt.weight_decay >= 0, "training.optimizer.weight_decay must be ≥ 0")
    validate_knobs(s)
    # evaluation, checkpoints, search, tracking
    _check(list(e.metrics) == ["exact_match"], f"evaluation.metrics={list(e.metrics)}: only [exact_match] is "
                                               f"computed (strict and flexible are both logged)")
    _check(e.max_problems is None or e.max_problems >= 1, "evaluation.max_problems must be ≥ 1 or null")
    _check(e.periodic_problems is None or e.periodic_problems >= 1, "evaluation.periodic_problems must be ≥ 1 or null")
    _check(e.batch_size >= 1 and e.max_new_tokens >= 1 and e.interval_steps >= 0,
           "evaluation: batch_size and max_new_tokens must be ≥ 1, interval_steps ≥ 0")
    _check(all(m >= 1 for m in e.marks_minutes), "evaluation.marks_minutes must be whole minutes ≥ 1")
    _check(cfg.checkpointing.interval_minutes > 0, "checkpointing.interval_minutes must be > 0")
    _check(o.n_trials >= 0, "optuna.n_trials must be ≥ 0")
    _check(o.direction in ("maximize", "minimize"), f"optuna.direction={o.direction}: use maximize or minimize")
    _check(o.pruner in ("none", "median"), f"optuna.pruner={o.pruner}: use none or median")
    _check(o.heartbeat_s >= 1, "optuna.heartbeat_s must be ≥ 1")
    for name, spec in o.search_space.items():
        resolve_search_path(name, cfg)
        _check(isinstance(spec, DictConfig) and "type" in spec and set(spec) <= {"type", "low", "high", "choices"},
               f"optuna.search_space.{name} must be a mapping with `type` and low/high or choices, e.g. "
               f"{{type: loguniform, low: 1.0e-4, high: 1.0e-2}}")
        spec = OmegaConf.merge({"low": None, "high": None, "choices": None}, spec)
        _check(spec.type in ("loguniform", "uniform", "int", "categorical"),
               f"optuna.search_space.{name}.type={spec.type}: use loguniform, uniform, int or categorical")
        if spec.type == "categorical":
            _check(bool(spec.choices), f"optuna.search_space.{name}: categorical needs a non-empty `choices` list")
        else:
            _check(spec.low is not None and spec.high is not None and spec.low < spec.high,
                   f"optuna.search_space.{name}: {spec.type} needs low < high")
            _check(spec.type != "loguniform" or spec.low > 0, f"optuna.search_space.{name}: loguniform needs low > 0")
    _check(cfg.wandb.mode in ("online", "offline", "disabled"),
           f"wandb.mode={cfg.wandb.mode}: use online, offline or disabled")
    for key in ("init_timeout_s", "finish_timeout_s"):
        _check(cfg.wandb[key] > 0, f"wandb.{key}={cfg.wandb[key]} must be > 0 (seconds)")
    _check(cfg.trial.steps >= 1 and cfg.trial.eval_problems >= 1, "trial.steps and trial.eval_problems must be ≥ 1")


def validate_knobs(s: DictConfig) -> None:
    used = PLANNER_KNOBS[s.type]

    def need(knob: str, ok: bool, rule: str) -> None:
        if knob in used:
            _check(ok, f"training.scheduler.{knob}={s[knob]}: {rule}")

    need("warmup_fraction", 0 <= s.warmup_fraction < 1, "must be in [0, 1)")
    need("decay_fraction", 0 < s.decay_fraction <= 1 - (s.warmup_fraction if "warmup_fraction" in used else 0),
         "must be in (0, 1 − warmup_fraction]")
    need("min_lr_ratio", 0 <= s.min_lr_ratio <= 1, "must be in [0, 1]")
    need("warmup_steps", s.warmup_steps >= 0, "must be ≥ 0")
    need("curvature_ema", 0 <= s.curvature_ema < 1, "must be in [0, 1)")
    need("lr_mult_range", len(s.lr_mult_range) == 2 and 0 < s.lr_mult_range[0] <= 1 <= s.lr_mult_range[1],
         "must be [low, high] with 0 < low ≤ 1 ≤ high")
    need("difficulty_ema", 0 <= s.difficulty_ema < 1, "must be in [0, 1)")
    need("difficulty_power", s.difficulty_power >= 0, "must be ≥ 0")
    need("weight_range", len(s.weight_range) == 2 and 0 < s.weight_range[0] <= 1 <= s.weight_range[1],
         "must be [low, high] with 0 < low ≤ 1 ≤ high")
    need("controller_lr", s.controller_lr > 0, "must be > 0")
    need("baseline_decay", 0 <= s.baseline_decay < 1, "must be in [0, 1)")
    need("entropy_bonus", s.entropy_bonus >= 0, "must be ≥ 0")
    need("init_std", s.init_std > 0, "must be > 0")
    need("outer_lr", s.outer_lr > 0, "must be > 0")
    need("stability_guard", 0 < s.stability_guard <= 2, "must be in (0, 2] (2 is the edge of stability)")
    need("hidden_dim", s.hidden_dim >= 1, "must be ≥ 1")
    need("gnn_rounds", s.gnn_rounds >= 1, "must be ≥ 1")
    need("jvp_sequences", s.jvp_sequences >= 0, "must be ≥ 0 (0 = no token hypergradient)")


def check_results_dir(path: Path) -> None:
    import tempfile
    try:
        path.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=path):    # a probe of its own: workers starting together share the folder
            pass
    except OSError as err:
        raise ConfigError(f"results_dir={path} is not writable ({err.strerror}); choose a folder you can write to")


# ----------------------------------------------------------------------------------------------------
# 4. Modes
# ----------------------------------------------------------------------------------------------------
def apply_mode(cfg: DictConfig, explicit: set[str]) -> None:
    """Set in code, before any W&B call (SPEC §4).  trial: W&B disabled, no search, one epoch, `trial.steps`
    optimiser steps, `trial.eval_problems` dev problems, no checkpoints.  full: W&B online (the run falls back to
    offline by itself without a key or network), unless the command line chose a W&B mode."""
    if cfg.mode == "trial":
        cfg.wandb.mode = "disabled"
        cfg.optuna.n_trials = 0
        cfg.training.max_epochs = 1
        cfg.training.total_steps = min(cfg.training.total_steps, cfg.trial.steps)
        limit = cfg.evaluation.max_problems
        cfg.evaluation.max_problems = min(limit, cfg.trial.eval_problems) if limit else cfg.trial.eval_problems
        cfg.checkpointing.enabled = False
    elif "wandb.mode" not in explicit:
        cfg.wandb.mode = "online"


# ----------------------------------------------------------------------------------------------------
# 5. Optuna search
# ----------------------------------------------------------------------------------------------------
# One persistent study per run id, in a database that every worker started with the same command shares (several
# processes, or several machines with a server database).  Optuna runs the trials (Study.optimize), records a
# heartbeat for each running trial, and fails a trial whose heartbeat stopped (its worker died), which is then
# queued again with the same parameters.  What Optuna leaves to its caller is done here: creating a new database
# safely when several workers start at once, stopping at exactly n_trials, and one final run per study.
WORKER = f"{socket.gethostname()}:{os.getpid()}"
POLL_S = 1.0            # how often a worker with nothing to run looks at the study again


class TrialFailed(Exception):
    """Raised by the objective so that Optuna records the trial as failed and the search goes on (Optuna's
    `catch`): its training failed (user attribute `error`: the reason), or it lies beyond n_trials (`surplus`)."""


def storage_url(cfg: DictConfig) -> str:
    if cfg.optuna.storage:
        return cfg.optuna.storage
    folder = Path(cfg.results_dir) / "optuna"
    folder.mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{folder.resolve() / (cfg.run_id + '.db')}"


def shown_url(url: str) -> str:
    """The storage URL without its password, for printing and for the final run's W&B config."""
    from sqlalchemy.engine import make_url
    return make_url(url).render_as_string(hide_password=True)


def sqlite_file(url: str) -> Path | None:
    """The database file of an SQLite URL; None for a server database (or SQLite in memory)."""
    from sqlalchemy.engine import make_url
    from sqlalchemy.exc import ArgumentError
    try:
        parsed = make_url(url)
    except ArgumentError:
        raise ConfigError(f"optuna.storage={url} is not a database URL; give one such as "
                          f"postgresql://user:password@host/database, or null for an SQLite file in results_dir") \
            from None
    if parsed.get_backend_name() != "sqlite" or parsed.database in (None, "", ":memory:"):
        return None
    return Path(parsed.database)


@contextmanager
def file_lock(path: Path):
    """An exclusive lock between the processes of this machine (released when the file closes, also by a death)."""
    try:
        handle = path.open("a")
    except OSError as err:
        raise ConfigError(f"optuna.storage: cannot create {path} ({err.strerror}); give an SQLite path in a folder "
                          f"you can write to") from None
    with handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        yield


def _reason(err: BaseException) -> str:
    """The first line of an error's message (Optuna wraps database errors in a generic one: then its cause's)."""
    from optuna.exceptions import StorageInternalError
    if isinstance(err, StorageInternalError) and err.__cause__ is not None:
        err = err.__cause__
    return (str(err).strip().splitlines() or [type(err).__name__])[0]


def queue_again(study, trial) -> None:
    """Queue a trial whose worker stopped (killed: heartbeat gone; or interrupted) to run again with the same
    parameters: Optuna's RetryHeartbeatStaleTrialCallback, at most twice per trial.  Not a trial that had already
    failed with a recorded reason or been refused as surplus: its worker died while recording that, and it stays
    as it is (counted, or not)."""
    from optuna.storages import RetryHeartbeatStaleTrialCallback
    if not {"error", "surplus"} & trial.user_attrs.keys():
        RetryHeartbeatStaleTrialCallback(max_retry=2)(study, trial)


def open_study(cfg: DictConfig, url: str, name: str):
    """Create the study, or load it if it exists, with heartbeats (a trial silent for 4 heartbeats is dead).

    Optuna creates the tables of a new database without a lock, so two workers that start together on a new
    database collide ('table ... already exists', 'UNIQUE constraint failed: alembic_version.version_num').  On an
    SQLite file the workers of the machine take turns under a file lock beside it.  On a server database (several
    machines, no shared lock) a worker that loses that race tries again: the winner has created the tables by then.
    A file that SQLite or Optuna cannot read is a one-line error naming it and the fix."""
    import optuna
    import sqlalchemy.exc
    from optuna.storages import RDBStorage

    def create():
        storage = RDBStorage(url, heartbeat_interval=cfg.optuna.heartbeat_s, grace_period=4 * cfg.optuna.heartbeat_s,
                             heartbeat_stale_trial_callback=queue_again)
        pruner = optuna.pruners.MedianPruner(n_warmup_steps=1) if cfg.optuna.pruner == "median" \
            else optuna.pruners.NopPruner()
        return optuna.create_study(study_name=name, storage=storage, direction=cfg.optuna.direction,
                                   sampler=optuna.samplers.TPESampler(seed=cfg.seed), pruner=pruner,
                                   load_if_exists=True)

    # what an unreadable database raises: SQLAlchemy's errors (Optuna wraps some), Optuna's schema-version check
    # (RuntimeError), a missing driver (ImportError)
    unreadable = (sqlalchemy.exc.SQLAlchemyError, optuna.exceptions.StorageInternalError, RuntimeError, ImportError)
    path = sqlite_file(url)
    if path is not None:
        with file_lock(path.with_name(path.name + ".lock")):
            try:
                return create()
            except unreadable as err:
                raise ConfigError(f"{path} is not a readable Optuna study ({_reason(err)}); delete it (or move it "
                                  f"away) to start the search over") from None
    for attempt in range(5):
        try:
            return create()
        except (sqlalchemy.exc.IntegrityError, sqlalchemy.exc.ProgrammingError) as err:   # the race, or a real fault
            error = err
            time.sleep(0.2 + random.random())
        except unreadable as err:
            error = err
            break
    raise ConfigError(f"optuna.storage={shown_url(url)}: cannot open the study ({_reason(error)}); check the URL and "
                      f"that the database server is running (PostgreSQL needs its driver: uv sync --extra postgres)")


def counts(trial) -> bool:
    """A trial that counts toward n_trials: complete, pruned, or failed with a recorded reason."""
    from optuna.trial import TrialState
    if trial.state in (TrialState.COMPLETE, TrialState.PRUNED):
        return True
    return trial.state == TrialState.FAIL and "error" in trial.user_attrs


def holds_a_place(trial) -> bool:
    """A trial that counts or still may: running, or queued (a dead worker's trial waiting to run again)."""
    from optuna.trial import TrialState
    return counts(trial) or trial.state in (TrialState.RUNNING, TrialState.WAITING)


def within_target(trials, number: int, n_trials: int) -> bool:
    """The exact-count rule: trial `number` may run only if fewer than n_trials of the trials numbered before it
    hold a place (count, run, or wait in the queue).  A trial refused is recorded as failed with user attribute
    `surplus`, without running.

    Why it is exact: the storage numbers a study's trials atomically in the order they are created (0, 1, 2, ...),
    whichever worker creates them.  A trial that counts in the end holds a place from its creation on: the only
    trials that give a place up are those that will never count (failed because their worker died, whose copy
    queued with the same parameters is a new, later trial; or refused as surplus).  So when the highest-numbered
    trial that counts checked this rule, every other trial that counts was already there and held a place, and the
    rule let it run only if they were fewer than n_trials.  Hence never more than n_trials trials count, however
    many workers race for the last places and whenever one is killed.  Never fewer either: a worker with nothing
    to run waits until every trial holding a place has finished (or died and been queued again, then runs it)."""
    return sum(holds_a_place(t) for t in trials if t.number < number) < n_trials


def room_for_a_trial(trials, n_trials: int) -> bool:
    """Whether starting a trial now can be useful: a place is free, or a queued trial waits to be run."""
    from optuna.trial import TrialState
    return sum(holds_a_place(t) for t in trials) < n_trials or any(t.state == TrialState.WAITING for t in trials)


def suggest(trial, cfg: DictConfig) -> dict:
    """The trial's values for the search space (a queued trial keeps the values it was queued with)."""
    for name, spec in cfg.optuna.search_space.items():
        spec = OmegaConf.merge({"low": None, "high": None, "choices": None}, spec)
        if spec.type == "categorical":
            trial.suggest_categorical(name, list(spec.choices))
        elif spec.type == "int":
            trial.suggest_int(name, int(spec.low), int(spec.high))
        else:
            trial.suggest_float(name, float(spec.low), float(spec.high), log=spec.type == "loguniform")
    return trial.params


def with_params(cfg: DictConfig, params: dict) -> DictConfig:
    out = OmegaConf.create(OmegaConf.to_container(cfg))
    out = OmegaConf.merge(OmegaConf.structured(Config), out)
    for name, value in params.items():
        OmegaConf.update(out, resolve_search_path(name, cfg), value, merge=False)
    return out


def run_search(cfg: DictConfig) -> tuple[DictConfig | None, dict]:
    """Run the trials still missing from the persistent study (see `within_target` for the count).  Returns cfg
    with the best parameters and what the final run records about the search, or (None, {}) when another worker
    does the study's final run."""
    import warnings

    import optuna
    from optuna.exceptions import UpdateFinishedTrialError
    from optuna.storages import RetryHeartbeatStaleTrialCallback, fail_stale_trials
    from optuna.trial import TrialState
    from src.train import NonFiniteTraining, train

    optuna.logging.set_verbosity(optuna.logging.ERROR)   # one line of ours per trial instead of Optuna's log
    warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)   # heartbeats, retries
    url, name, n = storage_url(cfg), cfg.optuna.study_name or cfg.run_id, cfg.optuna.n_trials
    study = open_study(cfg, url, name)
    print(f"search: study '{name}' in {shown_url(url)} | target {n} trials | "
          f"{sum(counts(t) for t in study.get_trials(deepcopy=False))} already there", flush=True)
    current = {}        # the trial this worker runs until Optuna has recorded it, and whether its objective returned

    def objective(trial):
        current.update(number=trial.number, returned=False)
        if not within_target(study.get_trials(deepcopy=False), trial.number, n):
            trial.set_user_attr("surplus", True)
            study.stop()
            current["returned"] = True
            raise TrialFailed(f"trial {trial.number} lies beyond the {n} trials of the search")
        trial_cfg = with_params(cfg, suggest(trial, cfg))
        trial_cfg.evaluation.split = "validation"      # trials select on validation problems, never the test split
        trial_cfg.wandb.mode = "disabled"              # trials are silent in W&B (SPEC §12)
        trial_cfg.checkpointing.enabled = False
        trial_cfg.run_id = f"{cfg.run_id}-trial{trial.number}"

        def report(step, model_time, em):
            trial.report(em, step=max(int(model_time), 0))
            if trial.should_prune():
                raise optuna.TrialPruned()

        try:
            value = train(trial_cfg, on_evaluation=report).final_em
        except optuna.exceptions.OptunaError:         # pruned, or the trial was finished elsewhere meanwhile
            current["returned"] = True
            raise
        except (NonFiniteTraining, RuntimeError, MemoryError) as err:   # OOM, NaN: recorded, the search goes on
            current["returned"] = True
            trial.set_user_attr("error", _reason(err)[:300])
            raise TrialFailed(_reason(err)) from err
        except KeyboardInterrupt:                     # the next run of the command runs it again
            queue_again(study, next(t for t in study.get_trials(deepcopy=False) if t.number == trial.number))
            raise
        current["returned"] = True
        return value

    def print_progress(study, trial):
        current.clear()                               # Optuna recorded the trial
        if "surplus" in trial.user_attrs:
            return
        if trial.state == TrialState.COMPLETE:
            outcome = f"EM {trial.value:.2f}%"
        elif trial.state == TrialState.PRUNED:
            outcome = "pruned"
        else:
            outcome = f"failed ({trial.user_attrs.get('error', 'no reason recorded')})"
        retry_of = RetryHeartbeatStaleTrialCallback.retried_trial_number(trial)
        best = _best(study)
        print(f"trial {trial.number}" + (f" (retry of trial {retry_of})" if retry_of is not None else "")
              + f": {outcome} | " + ", ".join(f"{k}={_fmt(v)}" for k, v in trial.params.items())
              + (f" | best {best.value:.2f}% (trial {best.number})" if best else " | best: none yet"), flush=True)

    def stop_when_every_place_is_taken(study, trial):
        if not room_for_a_trial(study.get_trials(deepcopy=False), n):
            study.stop()

    waiting_said = False
    while True:
        trials = study.get_trials(deepcopy=False)
        if sum(counts(t) for t in trials) >= n:
            break
        if room_for_a_trial(trials, n):
            current.clear()
            try:
                study.optimize(objective, catch=(TrialFailed,),
                               callbacks=[print_progress, stop_when_every_place_is_taken])
            except (ValueError, UpdateFinishedTrialError):
                # Optuna refused to record this worker's result because the trial had been finished by another
                # worker meanwhile: it took the trial as dead (a late heartbeat) and queued it again, or, on SQLite,
                # took the same queued trial at the same instant (SQLite has no row locks).  The count is intact.
                trial = next((t for t in study.get_trials(deepcopy=False) if t.number == current.get("number")), None)
                if not current.get("returned") or trial is None or not trial.state.is_finished():
                    raise
                print(f"search: trial {trial.number} was finished by another worker meanwhile ({trial.state.name}); "
                      f"this worker's result for it is dropped", flush=True)
            continue
        # Every place is held by a trial running in another worker: wait for it to finish, or for its heartbeat to
        # stop (its worker died: it is failed and queued again, and this worker runs it).
        if not waiting_said:
            running = [t.number for t in trials if t.state == TrialState.RUNNING]
            print(f"search: waiting for trial(s) {', '.join(map(str, running))} running in other workers (a trial "
                  f"silent for {4 * cfg.optuna.heartbeat_s} s is taken as dead and run again)", flush=True)
            waiting_said = True
        time.sleep(POLL_S)
        fail_stale_trials(study)

    best = _best(study)
    if best is None:
        raise ConfigError(f"search '{name}' has no completed trial (all failed or were pruned); see the trial "
                          f"lines above, fix the cause, and re-run the same command")
    print(f"search done: best trial {best.number} with EM {best.value:.2f}% | "
          + ", ".join(f"{k}={_fmt(v)}" for k, v in best.params.items()), flush=True)
    owner = claim_final_run(url, name)
    if owner is not None:
        print(f"search complete; the final run is done by worker {owner}")
        return None, {}
    final = with_params(cfg, best.params)
    final.optuna.study_name = name
    final.optuna.storage = shown_url(url)
    counted = [t for t in study.get_trials(deepcopy=False) if counts(t)]
    info = {"search/study": name, "search/best_trial": best.number, "search/best_value": best.value,
            "search/trials_complete": sum(t.state == TrialState.COMPLETE for t in counted),
            "search/trials_failed_or_pruned": sum(t.state != TrialState.COMPLETE for t in counted),
            **{f"search/best/{k}": v for k, v in best.params.items()}}
    return final, info


def claim_final_run(url: str, name: str) -> str | None:
    """Make this worker the one that does the study's final run: None if it is, else the worker that is.

    The claim is a study named '<study>:final-run:<k>' in the same database.  A study name is unique there, so of
    several workers creating it at once exactly one succeeds, on SQLite and on a server alike; its user attribute
    `worker` names the owner.  The owner keeps the claim while it lives.  A claim of this same process (a re-run in
    it) stays valid; one of a dead process of this host (killed during the final run) passes, atomically again, to
    whoever creates claim k+1, and that final run resumes from its checkpoint (or says it already finished).  A
    worker on another host is taken to be alive."""
    import optuna
    storage = optuna.storages.RDBStorage(url)
    for k in itertools.count():
        marker = f"{name}:final-run:{k}"
        try:
            optuna.create_study(study_name=marker, storage=storage).set_user_attr("worker", WORKER)
            return None
        except optuna.exceptions.DuplicatedStudyError:
            owner = optuna.load_study(study_name=marker, storage=storage).user_attrs.get("worker")
        if owner == WORKER:
            return None
        if owner is None or _worker_alive(owner):
            return owner or "another worker (starting)"


def _worker_alive(owner: str) -> bool:
    """Whether a worker "host:pid" is still running (workers on other hosts are assumed alive)."""
    host, _, pid = owner.rpartition(":")
    if host != socket.gethostname():
        return True
    try:
        os.kill(int(pid), 0)
        return True
    except ProcessLookupError:
        return False
    except (PermissionError, ValueError):
        return True


def _best(study):
    """The best complete trial, or None."""
    try:
        return study.best_trial
    except ValueError:              # no complete trial yet
        return None


def _fmt(value) -> str:
    return f"{value:.3g}" if isinstance(value, float) else str(value)


# ----------------------------------------------------------------------------------------------------
# 6. The command line
# ----------------------------------------------------------------------------------------------------
def run(argv: list[str]) -> int:
    from src.preprocess import route_warnings_to_stdout
    route_warnings_to_stdout()
    cfg, explicit = compose(argv)
    validate(cfg, explicit)
    apply_mode(cfg, explicit)
    cfg.results_dir = str(Path(cfg.results_dir).expanduser().resolve())
    check_results_dir(Path(cfg.results_dir))
    from src.preprocess import prepare_hub_access
    prepare_hub_access([cfg.model.name, cfg.dataset.name])
    from src.train import train
    search_info = {}
    if cfg.optuna.n_trials > 0:
        cfg, search_info = run_search(cfg)
        if cfg is None:
            return 0
    outcome = train(cfg, search_info=search_info)
    return 0 if outcome.status in ("finished", "already_finished") else 1


def main() -> None:
    from src.preprocess import UserError   # light import: no torch
    try:
        code = run(sys.argv[1:])
    except (ConfigError, UserError) as err:
        print(f"error: {err}", file=sys.stderr)
        code = 2
    except KeyboardInterrupt:
        print("error: interrupted; re-run the same command to resume from the last checkpoint", file=sys.stderr)
        code = 130
    sys.exit(code)


if __name__ == "__main__":
    main()
