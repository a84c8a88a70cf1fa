"""Entry point: compose the configuration, apply the mode, prepare the warm start, run the search and the run.

    uv run python -u -m src.main run=<run_id> results_dir=<path> mode=trial|full [key=value ...]

Sections
  1. The configuration schema: every key with its type, default and meaning, declared once, here
  2. Methods: the planner of each method token, the ablations' switches, the search's short names
  3. Composing (Hydra) and validating: every mistake is one line naming the problem and the fix
  4. Modes
  5. The warm start: GRAFF's pre-trained planner, produced once and cached when a run needs it
  6. Optuna search: a persistent study shared by restarts and workers, then one final run logged to W&B
  7. The command line

Merge order: the schema's defaults < config/config.yaml < a preset (config/presets/) < config/runs/<run_id>.yaml <
the command line.  A run id with a `-seed<N>` suffix and no file of its own runs the file without the suffix with
`seed=N` (e.g. proposed-iter1-tiny-synthetic-seed1).  torch is imported only once the configuration is valid, so a
mistake is reported in about a second.
"""
from __future__ import annotations

import difflib
import fcntl
import hashlib
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
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional

from omegaconf import MISSING, DictConfig, ListConfig, OmegaConf

REPO_ROOT = Path(__file__).resolve().parent.parent
CONFIG_DIR = REPO_ROOT / "config"
RUNS_DIR = CONFIG_DIR / "runs"


class ConfigError(Exception):
    """A mistake in the configuration or the command line (printed as one line, exit code 2)."""


# ----------------------------------------------------------------------------------------------------
# 1. The configuration schema
# ----------------------------------------------------------------------------------------------------
# Every key, its type, its default and what it means, once.  The defaults are the seed's experiment (Qwen3-0.6B,
# LoRA r=64 on GSM8K, a 30-minute budget); config/presets/tiny-synthetic.yaml holds the embedded default's values
# and the run files hold only what differs.  OmegaConf checks every value against these types when the files and
# the command line are merged and refuses keys that are not declared.  Value rules a type cannot express are
# declared with the field (`rule`) or, for the rest of the config, in `validate`.
def rule(default: Any, ok: Callable[[Any], bool], text: str) -> Any:
    """A field with its validity rule: `ok(value)` must hold, else the run is refused with `text`."""
    extra = {"metadata": {"ok": ok, "rule": text}}
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda: type(default)(default), **extra)
    return field(default=default, **extra)


def in_unit(v) -> bool:
    return 0 <= v < 1


def is_range(v) -> bool:
    return len(v) == 2 and 0 < v[0] <= 1 <= v[1]


@dataclass
class LoraConfig:
    r: int = 64
    alpha: float = 16
    dropout: float = 0.05
    target_modules: List[str] = field(default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj",
                                                               "up_proj", "down_proj"])
    modules_to_save: List[str] = field(default_factory=list)   # fully trained modules besides the adapters


@dataclass
class EmbeddedConfig:            # the config-built Qwen3 (model.name=embedded); read only then
    layers: int = 4
    hidden: int = 128
    heads: int = 4
    kv_heads: int = 2
    head_dim: int = 32
    intermediate: int = 512
    vocab_size: int = 512        # target size of the locally trained BPE tokenizer
    max_positions: int = 512
    init_seed: int = 0


@dataclass
class ModelConfig:
    name: str = "Qwen/Qwen3-0.6B"              # hub id, local model folder, or "embedded"
    dtype: str = "bfloat16"                    # weights: float32 | bfloat16 | float16
    parameter_count: Optional[str] = "0.6B"    # nominal size; the loaded model must be within 2x of it (null: no check)
    lora: LoraConfig = field(default_factory=LoraConfig)
    embedded: EmbeddedConfig = field(default_factory=EmbeddedConfig)


@dataclass
class SyntheticConfig:           # the embedded data set (dataset.name=synthetic); read only then
    difficulties: List[int] = field(default_factory=lambda: [1, 2, 3, 4])   # arithmetic steps, mixed evenly
    train_size: int = 20000
    test_size: int = 1000
    seed: int = 0                # train, validation and test come from three streams derived from it
    length_profile: str = "short"   # short | gsm8k (GSM8K's question and answer lengths, for speed measurements)


@dataclass
class DatasetConfig:
    name: str = "openai/gsm8k"                 # hub id, local folder of <split>.jsonl, or "synthetic"
    config_name: Optional[str] = "main"        # hub configuration
    train_split: str = "train"
    eval_split: str = "test"                   # the reported split
    max_tokens: int = 2048                     # longest training sequence (prompt + answer); longer rows skipped
    streaming: bool = True
    shuffle_buffer: int = 10000
    contamination_path: Optional[str] = None   # optional GSM8K-format JSONL (e.g. GSM1k), evaluated after the budget
    validation_size: int = 256                 # the validation split (what a search selects on): held out of the
                                               # training split, or the synthetic task's / a folder's own
    synthetic: SyntheticConfig = field(default_factory=SyntheticConfig)


@dataclass
class OptimizerConfig:
    type: str = "adamw"                        # Schedule-Free brings its own AdamW variant
    lr_init: float = 2.0e-4                    # η_0: the peak (or only) learning rate every planner starts from
    betas: List[float] = field(default_factory=lambda: [0.9, 0.98])
    weight_decay: float = 0.01


# -- the planners' own settings: one typed group per planner (`training.scheduler`), chosen by the method token ------
@dataclass
class ConstantConfig:            # comparative-4: fixed LR
    type: str = "constant"


@dataclass
class CosineConfig:              # comparative-5: warmup, then cosine decay over the wall-clock budget
    type: str = "cosine"
    warmup_fraction: float = rule(0.05, in_unit, "must be in [0, 1)")
    min_lr_ratio: float = rule(0.0, lambda v: 0 <= v <= 1, "must be in [0, 1]")


@dataclass
class LinearConfig:              # comparative-6: warmup, then linear decay to 0 at the end of the budget
    type: str = "linear"
    warmup_fraction: float = rule(0.05, in_unit, "must be in [0, 1)")


@dataclass
class WSDConfig:                 # comparative-7: warmup-stable-decay on wall-clock time
    type: str = "wsd"
    warmup_fraction: float = rule(0.05, in_unit, "must be in [0, 1)")
    decay_fraction: float = rule(0.2, lambda v: 0 < v <= 1, "must be in (0, 1 − warmup_fraction]")
    min_lr_ratio: float = rule(0.0, lambda v: 0 <= v <= 1, "must be in [0, 1]")


@dataclass
class ScheduleFreeConfig:        # comparative-8: Schedule-Free AdamW
    type: str = "schedulefree"
    warmup_steps: int = rule(20, lambda v: v >= 0, "must be ≥ 0")


@dataclass
class SALeLRConfig:              # comparative-3: η scaled by the inverse of the curvature estimate
    type: str = "salelr"
    curvature_ema: float = rule(0.98, in_unit, "must be in [0, 1)")
    lr_mult_range: List[float] = rule([0.1, 10.0], is_range, "must be [low, high] with 0 < low ≤ 1 ≤ high")


@dataclass
class BATSConfig:                # comparative-2: token weights from difficulty measured after the backward pass
    type: str = "bats"
    difficulty_ema: float = rule(0.9, in_unit, "must be in [0, 1)")
    difficulty_power: float = rule(1.0, lambda v: v >= 0, "must be ≥ 0")
    weight_range: List[float] = rule([0.25, 4.0], is_range, "must be [low, high] with 0 < low ≤ 1 ≤ high")


@dataclass
class REACTORConfig:             # comparative-1: REINFORCE controller of the LR multiplier
    type: str = "reactor"
    controller_lr: float = rule(1.0e-4, lambda v: v > 0, "must be > 0")
    baseline_decay: float = rule(0.99, in_unit, "must be in [0, 1)")
    entropy_bonus: float = rule(0.01, lambda v: v >= 0, "must be ≥ 0")
    lr_mult_range: List[float] = rule([0.1, 10.0], is_range, "must be [low, high] with 0 < low ≤ 1 ≤ high")
    init_std: float = rule(0.1, lambda v: v > 0, "must be > 0")


@dataclass
class GraffConfig:               # proposed, its ablations and its pre-training (docs/method.md)
    type: str = "graff"
    objective: str = rule("terminal", lambda v: v in ("terminal", "greedy"),
                          "use terminal (the loss at the end of the budget) or greedy (the next step's loss)")
    # what the terminal forecast rolls out: the whole episode re-planned under W (its past steps too, from the
    # fitted start) or only the remaining budget (the earlier version, kept to measure the change)
    span: str = rule("episode", lambda v: v in ("episode", "remaining"),
                     "use episode (the whole budget re-planned under W) or remaining (only the budget left)")
    outer_lr: float = rule(1.0e-3, lambda v: v > 0, "must be > 0")            # Adam's lr for W and the encoder
    update_every: int = rule(10, lambda v: v >= 2, "must be ≥ 2 (steps between outer updates)")
    warmup_fraction: float = rule(0.05, in_unit, "must be in [0, 1)")       # linear warmup, as the schedules
    stability_guard: float = rule(1.9, lambda v: 0 < v <= 2, "must be in (0, 2] (2 is the edge of stability)")
    # a planner checkpoint to start from: a path, or a file name that the pre-training run saving it produces
    warm_start_ckpt: Optional[str] = None
    pretrain_overrides: List[str] = field(default_factory=list)   # key=value changes to that pre-training run
    save_ckpt: Optional[str] = None            # the pre-training run saves the planner under this file name
    hidden_dim: int = rule(16, lambda v: v >= 1, "must be ≥ 1")
    gnn_rounds: int = rule(2, lambda v: v >= 1, "must be ≥ 1")
    use_edges: bool = True                     # false: ablation (a), a per-node MLP instead of message passing
    use_budget: bool = True                    # false: ablation (b), no budget feature
    freeze: bool = False                       # true: ablation (c), W and the encoder never change
    token_multipliers: bool = True             # false: ablation (e), m ≡ 1 (every answer token weighs the same)
    curvature_ema: float = rule(0.95, in_unit, "must be in [0, 1)")          # over one estimate per update
    # sequences of an update step whose per-token products train the token rows (two extra no-grad forwards of
    # them every update_every steps: the multipliers' whole cost beyond the probe)
    token_sequences: int = rule(1, lambda v: v >= 0, "must be ≥ 0 (0 = no token-multiplier gradient)")
    # the token products are measured at every token_every-th update only (1: every update): their two forwards
    # are a third of the planner's cost on the embedded model, so every second update keeps the planner within 2%
    # of a step; between them W_{1:K} gets no gradient
    token_every: int = rule(2, lambda v: v >= 1, "must be ≥ 1 (1 = the token products at every update)")
    # |log m_{t,i}| ≤ token_bound before normalising: how far one token's weight may move from the others'
    token_bound: float = rule(0.5, lambda v: v > 0, "must be > 0 (a bound on |log m|; token_multipliers: false "
                                                   "for m ≡ 1)")
    # |W_0[:D]·h̄| ≤ state_bound: the run's state moves η within e^{±state_bound} of the learned budget schedule
    state_bound: float = rule(0.7, lambda v: v > 0, "must be > 0 (a bound on the state's log-LR modulation)")
    lr_mult_range: List[float] = rule([1.0e-3, 10.0], is_range, "must be [low, high] with 0 < low ≤ 1 ≤ high")


SCHEDULERS: dict[str, type] = {
    "constant": ConstantConfig, "cosine": CosineConfig, "linear": LinearConfig, "wsd": WSDConfig,
    "schedulefree": ScheduleFreeConfig, "salelr": SALeLRConfig, "bats": BATSConfig, "reactor": REACTORConfig,
    "graff": GraffConfig,
}


@dataclass
class TrainingConfig:
    budget_minutes: float = 30.0               # wall-clock budget B, evaluations included
    budget_steps: Optional[int] = None         # a budget of optimiser steps instead (evaluations then cost nothing)
    global_batch_size: int = 64                # must equal micro_batch_size × gradient_accumulation_steps
    micro_batch_size: int = 8
    gradient_accumulation_steps: int = 8
    total_steps: int = 2000                    # safety cap on optimiser steps; the budget normally stops first
    episodes: int = 1                          # >1: run the budget this many times on fresh adapters (pre-training)
    max_epochs: int = 1000
    mixed_precision: str = "bf16"              # bf16 | fp32 (autocast dtype of the forward pass)
    gradient_checkpointing: bool = True
    compile_layers: bool = False               # torch.compile each decoder layer (a GPU speed-up; compiles at the first
                                               # steps, inside the budget; config/presets/gpu-fast.yaml)
    clip_grad_norm: float = 1.0                # 0 = no clipping
    device: str = "auto"                       # auto | cpu | cuda
    probe_vocab: int = 4096                    # sub-vocabulary of the first-layer entropy probe
    max_bad_steps: int = 20                    # consecutive non-finite steps before the run stops
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    scheduler: Any = MISSING                   # one of SCHEDULERS, chosen from the run's method token


@dataclass
class EvaluationConfig:
    split: str = "test"                        # test (dataset.eval_split, reported) | validation (a search's trials)
    interval_steps: int = 100                  # periodic evaluations every this many steps (0: none)
    metrics: List[str] = field(default_factory=lambda: ["exact_match"])   # strict and flexible are both logged
    max_problems: Optional[int] = None         # null: the whole split (GSM8K test: 1,319) at the marks and the end
    periodic_problems: Optional[int] = 256     # step-0 and periodic evaluations use this fixed random subset
    batch_size: int = 256
    max_new_tokens: int = 256
    engine: str = "merged"                     # generate | merged | static: how the greedy completions are computed
                                               # (the same completions; src/train.py, section 4, EVAL_ENGINES)
    at_start: bool = True                      # evaluate the untrained model at step 0 (counted in the budget)
    marks_minutes: List[int] = field(default_factory=lambda: [30, 60])   # dev EM at these wall-clock marks


@dataclass
class CheckpointingConfig:
    enabled: bool = True
    interval_minutes: float = 5.0


@dataclass
class OptunaConfig:
    n_trials: int = 0
    direction: str = "maximize"
    search_space: Dict[str, Any] = field(default_factory=dict)   # name -> {type, low, high} or {type, choices}
    storage: Optional[str] = None              # null: sqlite:///<results_dir>/optuna/<run_id>.db; or a database URL
    study_name: Optional[str] = None           # null: the run id
    pruner: str = "none"                       # none | median (pruning on early EM biases a budget comparison)
    heartbeat_s: int = 30                      # a trial whose worker is silent for 4x this long is failed and retried
    final_run: bool = True                     # after the trials, one run with the best values (false: tuning only)


@dataclass
class WandbConfig:
    entity: Optional[str] = MISSING            # in config/config.yaml; WANDB_ENTITY / the command line override it
    project: str = MISSING                     # in config/config.yaml; WANDB_PROJECT / the command line override it
    mode: str = "online"                       # online | offline | disabled (set from `mode`)
    init_timeout_s: float = 60.0               # an online start that takes longer goes on offline
    finish_timeout_s: float = 120.0            # an online run waits this long for its upload at the end


@dataclass
class TrialConfig:               # what mode=trial shrinks a run to
    steps: int = 24                            # optimiser steps: enough for every planner's learning paths to run
    eval_problems: int = 8
    # a warm-started GRAFF run's pre-training, at trial size (a trial that passes gets past the full run's set-up)
    pretrain_overrides: List[str] = field(default_factory=lambda: [
        "model.parameter_count=null", "model.embedded.layers=2", "model.embedded.hidden=64", "model.embedded.heads=2",
        "model.embedded.kv_heads=1", "model.embedded.head_dim=32", "model.embedded.intermediate=128",
        "model.lora.r=4", "evaluation.max_problems=8", "training.global_batch_size=8", "training.micro_batch_size=4",
        "training.gradient_accumulation_steps=2"])


@dataclass
class Config:
    run: str = MISSING                         # run id: config/runs/<run>.yaml (a -seed<N> suffix sets the seed)
    mode: str = MISSING                        # trial | full
    results_dir: str = "results"
    run_id: str = MISSING                      # set by the run file; must equal its file name
    method: str = MISSING                      # proposed | comparative-<k> | ablation-* | pretrain (section 2)
    seed: int = 0
    model: ModelConfig = field(default_factory=ModelConfig)
    dataset: DatasetConfig = field(default_factory=DatasetConfig)
    training: TrainingConfig = field(default_factory=TrainingConfig)
    evaluation: EvaluationConfig = field(default_factory=EvaluationConfig)
    checkpointing: CheckpointingConfig = field(default_factory=CheckpointingConfig)
    optuna: OptunaConfig = field(default_factory=OptunaConfig)
    wandb: WandbConfig = field(default_factory=WandbConfig)
    trial: TrialConfig = field(default_factory=TrialConfig)


# ----------------------------------------------------------------------------------------------------
# 2. Methods
# ----------------------------------------------------------------------------------------------------
# The method token of a run id fixes its planner, so a run id always means the same method.
METHOD_PLANNER = {
    "proposed": "graff", "comparative-1": "reactor", "comparative-2": "bats", "comparative-3": "salelr",
    "comparative-4": "constant", "comparative-5": "cosine", "comparative-6": "linear", "comparative-7": "wsd",
    "comparative-8": "schedulefree", "ablation-noedges": "graff", "ablation-nobudget": "graff",
    "ablation-frozenw": "graff", "ablation-greedy": "graff", "ablation-uniform": "graff", "pretrain": "graff",
}
# What each ablation must switch (and what the full method must keep).  The pre-training may use either objective:
# the greedy ablation's planner is pre-trained greedily too.
ABLATION_FLAGS = {"ablation-noedges": ("use_edges", False), "ablation-nobudget": ("use_budget", False),
                  "ablation-frozenw": ("freeze", True), "ablation-greedy": ("objective", "greedy"),
                  "ablation-uniform": ("token_multipliers", False)}
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


def knobs_of(kind: str) -> list[str]:
    """The `training.scheduler` keys planner `kind` reads (its config's fields but `type`)."""
    return [f.name for f in fields(SCHEDULERS[kind]) if f.name != "type"]


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


def _schema_keys(path: str, kind: str) -> list[str]:
    """Keys the schema declares at a dotted path (for 'did you mean')."""
    node = OmegaConf.structured(Config)
    node.training.scheduler = OmegaConf.structured(SCHEDULERS.get(kind, ConstantConfig))
    for part in [p for p in path.split(".") if p]:
        node = node[part] if isinstance(node, DictConfig) and part in node else None
        if node is None:
            return []
    return list(node.keys()) if isinstance(node, DictConfig) else []


def explain_hydra_error(err: Exception, source: str, kind: str) -> str:
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
        if parent == "training.scheduler" and any(leaf in knobs_of(k) for k in SCHEDULERS):
            return (f"{source}: {key} is set but scheduler '{kind}' does not read it; remove it (scheduler '{kind}' "
                    f"reads: {', '.join(knobs_of(kind)) or 'only training.optimizer.lr_init'})")
        close = difflib.get_close_matches(leaf, _schema_keys(parent, kind), n=1)
        hint = f"did you mean {(parent + '.') if parent else ''}{close[0]}?" if close else \
            "see the schema in src/main.py (section 1) for the keys that exist"
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
    if not any(o.key_or_group == "mode" for o in overrides):
        raise ConfigError("command line: mode=trial|full is missing; add mode=trial (a quick check) or mode=full")
    return str(run[-1].value()), [a for a in argv if not a.split("=", 1)[0].lstrip("+~") == "run"]


def register_schema() -> None:
    """The schema and one config group option per planner, for Hydra's composition."""
    from hydra.core.config_store import ConfigStore
    store = ConfigStore.instance()
    store.store(name="graff_schema", node=Config)
    for kind, node in SCHEDULERS.items():
        store.store(group="training/scheduler", name=kind, node=node)


def compose(argv: list[str]) -> tuple[DictConfig, set[str]]:
    """schema < config.yaml < preset < run file < command line, typed and struct.  Also returns the keys the user
    set explicitly (run file and command line), which validation checks for settings that would do nothing.

    The planner's settings group (`training.scheduler`) is the one of the run's method token (or of the run file's
    `training.scheduler.type`), so a run file needs no more than `method:` to get its planner's typed defaults."""
    from hydra import compose as hydra_compose, initialize_config_dir
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
    kind = OmegaConf.select(OmegaConf.create(run_yaml), "training.scheduler.type", default=None) \
        or METHOD_PLANNER.get(str(run_yaml.get("method")), "constant")
    group = kind if kind in SCHEDULERS else "constant"      # an unknown type is reported by validate()
    overrides = [f"training/scheduler={group}", f"+runs@_global_={base_id}", f"run={run}"] + rest
    register_schema()
    GlobalHydra.instance().clear()
    try:
        with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base=None):
            cfg = hydra_compose(config_name="config", overrides=overrides)
    except Exception as err:
        source = f"config/runs/{base_id}.yaml" if f"runs/{base_id}" in str(err) else "command line"
        raise ConfigError(explain_hydra_error(err, source, kind)) from None
    if seed is not None:
        if "seed" in explicit:
            raise ConfigError(f"command line: run id {run} already sets seed={seed}; drop seed=... or the suffix")
        cfg.seed = seed
    cfg.run_id = run if seed is not None else cfg.run_id
    # The W&B destination: the command line, else WANDB_ENTITY / WANDB_PROJECT, else config/config.yaml.
    for key, env in (("entity", "WANDB_ENTITY"), ("project", "WANDB_PROJECT")):
        if f"wandb.{key}" not in explicit and os.environ.get(env):
            cfg.wandb[key] = os.environ[env]
    missing = sorted(OmegaConf.missing_keys(cfg))
    if missing:
        where = "the run file" if missing[0] in ("run_id", "method") else "the command line"
        raise ConfigError(f"{missing[0]} has no value; set it in {where} (e.g. {missing[0]}=...)")
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
    if exists:
        return path
    kind = cfg.training.scheduler.type
    if path.startswith("training.scheduler."):
        raise ConfigError(f"optuna.search_space.{name}: '{path}' is not read by scheduler '{kind}'; search a knob "
                          f"it reads: {', '.join(knobs_of(kind)) if kind in SCHEDULERS else '(none)'}")
    raise ConfigError(f"optuna.search_space.{name}: '{path}' is not a config path; use a dotted path from the "
                      f"schema (src/main.py) or one of the names {', '.join(SEARCH_ALIASES)}")


def validate_scheduler(s: DictConfig) -> None:
    """The planner's settings against the rules declared with its fields (section 1)."""
    for f in fields(SCHEDULERS[s.type]):
        if "ok" in f.metadata:
            value = s[f.name]
            _check(f.metadata["ok"](value), f"training.scheduler.{f.name}={value}: {f.metadata['rule']}")
    if s.type == "wsd":
        _check(s.decay_fraction <= 1 - s.warmup_fraction,
               f"training.scheduler.decay_fraction={s.decay_fraction}: must be in (0, 1 − warmup_fraction]")


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
    _check(s.type in SCHEDULERS, f"training.scheduler.type={s.type} is not a scheduler: use one of "
                                 f"{', '.join(SCHEDULERS)}")
    _check(METHOD_PLANNER[cfg.method] == s.type,
           f"method {cfg.method} uses scheduler '{METHOD_PLANNER[cfg.method]}', not '{s.type}'; fix "
           f"training.scheduler.type or the method")
    for method, (flag, value) in ABLATION_FLAGS.items():
        if cfg.method == method:
            _check(s[flag] == value, f"{method} needs training.scheduler.{flag}={str(value).lower()}; set it")
        elif s.type == "graff" and cfg.method in ("proposed", "pretrain") and \
                not (cfg.method == "pretrain" and flag == "objective"):
            _check(s[flag] != value, f"{cfg.method} runs the full GRAFF: training.scheduler.{flag} must not be "
                                     f"{str(value).lower()} (ablations have their own method token)")
    validate_scheduler(s)
    for key in sorted(explicit):                # keys set in a section the run does not read
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
    _check(cfg.dataset.validation_size >= 0, "dataset.validation_size must be ≥ 0")
    _check(e.split in ("test", "validation"), f"evaluation.split={e.split}: use test or validation")
    _check(e.split == "test" or cfg.dataset.validation_size > 0,
           "evaluation.split=validation needs dataset.validation_size > 0")
    if cfg.dataset.name == "synthetic":
        syn = cfg.dataset.synthetic
        _check(len(syn.difficulties) > 0 and all(d >= 1 for d in syn.difficulties) and syn.train_size >= 1
               and syn.test_size >= 1, "dataset.synthetic: difficulties must be steps ≥ 1, train_size and test_size ≥ 1")
        _check(syn.length_profile in ("short", "gsm8k"),
               f"dataset.synthetic.length_profile={syn.length_profile}: use short or gsm8k")
    if cfg.dataset.contamination_path:
        _check(Path(cfg.dataset.contamination_path).expanduser().is_file(),
               f"dataset.contamination_path={cfg.dataset.contamination_path} does not exist; give a GSM8K-format "
               f"JSONL file or null")
    # training
    _check(t.budget_minutes > 0, f"training.budget_minutes={t.budget_minutes} must be > 0 (wall-clock minutes)")
    _check(t.budget_steps is None or t.budget_steps >= 1,
           f"training.budget_steps={t.budget_steps} must be ≥ 1 (optimiser steps) or null (a wall-clock budget)")
    _check(t.micro_batch_size >= 1 and t.gradient_accumulation_steps >= 1,
           "training.micro_batch_size and gradient_accumulation_steps must be ≥ 1")
    _check(t.global_batch_size == t.micro_batch_size * t.gradient_accumulation_steps,
           f"training.global_batch_size={t.global_batch_size} but micro_batch_size × gradient_accumulation_steps = "
           f"{t.micro_batch_size * t.gradient_accumulation_steps}; make them agree")
    _check(t.total_steps >= 1 and t.max_epochs >= 1, "training.total_steps and max_epochs must be ≥ 1")
    _check(t.episodes >= 1, "training.episodes must be ≥ 1")
    _check(t.episodes == 1 or (t.budget_steps and s.type == "graff"),
           f"training.episodes={t.episodes}: several episodes pre-train a GRAFF planner on a budget of steps; set "
           f"training.budget_steps, or episodes=1")
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
    _check(bool(cfg.wandb.project), "wandb.project is empty: set it in config/config.yaml, WANDB_PROJECT or "
                                    "wandb.project=...")
    for key in ("init_timeout_s", "finish_timeout_s"):
        _check(cfg.wandb[key] > 0, f"wandb.{key}={cfg.wandb[key]} must be > 0 (seconds)")
    _check(cfg.trial.steps >= 1 and cfg.trial.eval_problems >= 1, "trial.steps and trial.eval_problems must be ≥ 1")


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
    """Set in code, before any W&B call.  trial: W&B disabled, no search, one epoch, `trial.steps` optimiser
    steps (per episode, and at most two episodes), `trial.eval_problems` dev problems, no checkpoints.  full: W&B online (the run falls back to offline by
    itself without a key or network), unless the command line chose a W&B mode."""
    if cfg.mode == "trial":
        cfg.wandb.mode = "disabled"
        cfg.optuna.n_trials = 0
        cfg.training.max_epochs = 1
        cfg.training.total_steps = min(cfg.training.total_steps, cfg.trial.steps)
        cfg.training.episodes = min(cfg.training.episodes, 2)     # a pre-training: the switch of episodes runs once
        limit = cfg.evaluation.max_problems
        cfg.evaluation.max_problems = min(limit, cfg.trial.eval_problems) if limit else cfg.trial.eval_problems
        cfg.checkpointing.enabled = False
    elif "wandb.mode" not in explicit:
        cfg.wandb.mode = "online"


# ----------------------------------------------------------------------------------------------------
# 5. The warm start: GRAFF's pre-trained planner, produced once and cached when a run needs it
# ----------------------------------------------------------------------------------------------------
def pretraining_run(name: str) -> str:
    """The pre-training run (config/runs/pretrain-*.yaml) that saves a planner checkpoint of this file name."""
    found = []
    for path in sorted(RUNS_DIR.glob("pretrain-*.yaml")):
        saves = OmegaConf.select(OmegaConf.load(path), "training.scheduler.save_ckpt", default=None)
        if saves == name:
            found.append(path.stem)
    if not found:
        raise ConfigError(f"training.scheduler.warm_start_ckpt={name}: no pre-training run in config/runs/ saves a "
                          f"file of that name (training.scheduler.save_ckpt); give the path of an existing planner "
                          f"checkpoint, or null to start cold")
    return found[0]


def prepare_warm_start(cfg: DictConfig) -> dict:
    """Point a warm-started GRAFF run at its planner checkpoint, producing it first when it does not exist yet.

    `warm_start_ckpt` is either a path (used as it is) or the file name that a pre-training run saves.  That run
    (with `pretrain_overrides`, and in trial mode at trial size: `trial.pretrain_overrides`, few steps) is composed
    like any run; its checkpoint lives in .cache/graff/<key>/<name>, the key a digest of everything that shapes
    the pre-training, so every run that warm-starts from the same pre-training finds it and a changed pre-training
    gets its own.  The pre-training's time is a one-off shared by those runs: it is not charged to any run's
    budget B; the run's summary records which checkpoint it used and what producing it cost."""
    s = cfg.training.scheduler
    if s.type != "graff" or not s.warm_start_ckpt or cfg.method == "pretrain":
        return {}
    name = str(s.warm_start_ckpt)
    if Path(name).name != name:                 # a path: used as it is (GRAFF refuses it when missing or bad)
        return {"warm_start/checkpoint": str(Path(name).expanduser())}
    run = pretraining_run(name)
    overrides = list(s.pretrain_overrides) + (list(cfg.trial.pretrain_overrides) if cfg.mode == "trial" else [])
    pre, explicit = compose([f"run={run}", f"mode={cfg.mode}", *overrides])
    validate(pre, explicit)
    from src.preprocess import prepare_hub_access
    prepare_hub_access([pre.model.name, pre.dataset.name])
    apply_mode(pre, explicit)
    pre.wandb.mode, pre.checkpointing.enabled, pre.optuna.n_trials = "disabled", False, 0
    from src.model import GRAFF_FORMAT
    from src.preprocess import CACHE_DIR
    from src.train import fingerprint, train
    shaping = json.dumps({"format": GRAFF_FORMAT, "config": fingerprint(pre)}, sort_keys=True, default=str)
    key = hashlib.sha256(shaping.encode()).hexdigest()[:16]
    folder = CACHE_DIR / "graff" / key
    target = folder / name
    info = {"warm_start/checkpoint": str(target), "warm_start/pretraining_run": run, "warm_start/key": key}
    if target.is_file():
        print(f"warm start: {target} (pre-trained by {run}, cached)")
        return {**info, "warm_start/produced_now": False}
    print(f"warm start: {name} not found in the cache; pre-training the planner with {run} first (a one-off, shared "
          f"by every run that warm-starts from it; not charged to any run's budget) -> {target}", flush=True)
    pre.results_dir = str(folder)
    pre.training.scheduler.save_ckpt = str(target)
    start = time.perf_counter()
    train(pre)
    seconds = time.perf_counter() - start
    print(f"warm start: pre-training took {seconds:.1f} s; the run now starts from {target}", flush=True)
    return {**info, "warm_start/produced_now": True, "warm_start/pretraining_s": seconds}


# ----------------------------------------------------------------------------------------------------
# 6. Optuna search
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
        trial_cfg.wandb.mode = "disabled"              # trials are silent in W&B: only the final run is logged
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
    if not cfg.optuna.final_run:
        print("search complete; no final run (optuna.final_run=false)")
        return None, {}
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
    it) stays valid; a claim whose final run finished (user attribute `done`, set by `mark_final_run_done`) stays
    with its owner, dead or alive; one of a dead process of this host that did not finish (killed during the final
    run) passes, atomically again, to whoever creates claim k+1, and that final run resumes from its checkpoint.  A
    worker on another host is taken to be alive."""
    import optuna
    storage = optuna.storages.RDBStorage(url)
    for k in itertools.count():
        marker = f"{name}:final-run:{k}"
        try:
            optuna.create_study(study_name=marker, storage=storage).set_user_attr("worker", WORKER)
            return None
        except optuna.exceptions.DuplicatedStudyError:
            attrs = optuna.load_study(study_name=marker, storage=storage).user_attrs
        owner = attrs.get("worker")
        if owner == WORKER:
            return None
        if attrs.get("done") or owner is None or _worker_alive(owner):
            return owner or "another worker (starting)"


def mark_final_run_done(url: str, name: str) -> None:
    """Record on this worker's claim that the study's final run finished, so that a worker reaching the end of the
    search after this one has exited does not take the claim of a dead process as an unfinished final run."""
    import optuna
    storage = optuna.storages.RDBStorage(url)
    for k in itertools.count():
        try:
            claim = optuna.load_study(study_name=f"{name}:final-run:{k}", storage=storage)
        except KeyError:                  # no claim k: this worker holds none (it ran the final run without one)
            return
        if claim.user_attrs.get("worker") == WORKER:
            claim.set_user_attr("done", True)
            return


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
# 7. The command line
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
    warm = prepare_warm_start(cfg)
    if warm:
        cfg.training.scheduler.warm_start_ckpt = warm["warm_start/checkpoint"]
    search_info, study_at = {}, None         # the search's storage URL and study name
    if cfg.optuna.n_trials > 0:
        study_at = storage_url(cfg), cfg.optuna.study_name or cfg.run_id
        cfg, search_info = run_search(cfg)
        if cfg is None:
            return 0
    outcome = train(cfg, search_info={**warm, **search_info})
    finished = outcome.status in ("finished", "already_finished")
    if finished and study_at:
        mark_final_run_done(*study_at)
    return 0 if finished else 1


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
