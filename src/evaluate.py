"""Independent analysis of finished (or running) runs: metrics, figures, comparison and significance tests.

    uv run python -m src.evaluate results_dir=<path> run_ids='["run-1", "run-2"]'

Reads each run from its local W&B record under `{results_dir}/wandb/` when there is one (offline runs, and the
local copy an online run also writes), otherwise through `wandb.Api()` with the entity and project of
config/config.yaml, overridable by WANDB_ENTITY / WANDB_PROJECT (also when an online run's local copy lacks steps
the server holds: see load_run).  On a fresh machine results_dir need not exist: it is created and every run is
read from the W&B API.  Imports nothing from src/ and no torch: it runs on a CPU machine in about a second, and
train.py imports its metric names and AUC from here.

Writes
  {results_dir}/{run_id}/metrics.json             history, summary, config and derived metrics of the run
  {results_dir}/{run_id}/{run_id}_{topic}.pdf      learning_curve, em_vs_time, lr_trajectory, eta_vs_budget,
                                                   planner_internals
  {results_dir}/comparison/aggregated_metrics.json primary metric, metrics by run, best proposed/baseline, gap,
                                                   where each run's primary value comes from, seed groups,
                                                   per-seed table, paired tests across seeds (Holm), McNemar per
                                                   seed, seed-to-seed spread and the detectable difference
  {results_dir}/comparison/comparison_{topic}.pdf  em_bar, em_boxplot, em_vs_time, lr_trajectories, eta_vs_budget
  {results_dir}/comparison/metrics_table.{csv,md}

The primary metric is what its name says: strict dev EM at the 30-minute mark of the wall-clock budget (a run
with a shorter budget, e.g. the 5-minute embedded runs, contributes its EM at B, and the JSON says so per run).

A run id also stands for its seed replicates: runs named `<run_id>-seed<N>` found beside it are grouped with it
(seed N; the run id itself is seed 0).  A seed fixes LoRA initialisation, data order and evaluation subset, so
arms are compared seed by seed (paired).  A missing run, a run without evaluations, a run still in progress or a
metric missing in some runs gives one line of explanation; the rest goes on.
"""
from __future__ import annotations

import json
import math
import os
import re
import struct
import sys
import zlib
from dataclasses import dataclass, field
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent

# ----------------------------------------------------------------------------------------------------
# Metric names
# ----------------------------------------------------------------------------------------------------
# Every name train.py logs, defined once here: train.py imports them, so the training and the analysis cannot
# drift apart (this module stays torch-free; tests/ checks train.py uses these).
# History, every optimiser step
LOSS, LR, GRAD_NORM, TOKENS_PER_S = "train/loss", "train/lr", "train/grad_norm", "train/tokens_per_s"
STEP_TIME, SKIPPED, EPOCH = "train/step_time_s", "train/skipped_steps", "train/epoch"
PLANNER_TIME, PLANNER_FRACTION = "train/planner_time_s", "train/planner_fraction"   # the planner's own cost
ELAPSED, BUDGET_LEFT = "time/elapsed_s", "time/budget_left"   # seconds spent; fraction of the budget left, 1 -> 0
ENERGY, PEAK_MEM = "energy/joules", "memory/peak_gib"
DATA_SKIPPED_BAD, DATA_SKIPPED_LONG = "data/skipped_bad_rows", "data/skipped_long_rows"
DATA_SKIPPED_VALIDATION = "data/skipped_validation_rows"      # training rows held out as the validation split
PLANNER_PREFIX = "planner/"                                   # the planner's internals: planner/<name>
# History, every evaluation
EM, EM_FLEX = "eval/exact_match", "eval/exact_match_flexible"          # strict (primary) and flexible, percent
EVAL_AT, EVAL_DURATION = "eval/model_time_s", "eval/duration_s"          # clock time of the evaluated model
EVAL_PROBLEMS = "eval/problems"                                          # problems in this evaluation
EVAL_LOSS = "eval/loss"              # teacher-forced mean answer-token loss on the evaluated problems
# Summary: the run as a whole
FINAL_EM, FINAL_EM_FLEX = "final/exact_match", "final/exact_match_flexible"
BEST_EM, AUC = "best/exact_match", "final/auc_em_over_b"
FINAL_LOSS = "final/loss"            # EVAL_LOSS at the final evaluation: loss at B, a lower-variance secondary metric
FINAL_CORRECT, PROBLEM_DIGEST = "final/correct_strict", "final/problem_digest"   # per-problem 0/1, problem set id
FINAL_ELAPSED, FINAL_MODEL_TIME = "final/elapsed_s", "final/model_time_s"
CONTAM_EM, CONTAM_EM_FLEX = "contamination/exact_match", "contamination/exact_match_flexible"
CONTAM_PROBLEMS = "contamination/n_problems"
STEPS, MEAN_STEP_TIME = "train/steps", "train/mean_step_time_s"
BUDGET_MINUTES, BUDGET_UNIT, BUDGET_STEPS = "budget/minutes", "budget/unit", "budget/steps"
BUDGET_UNITS = ("minutes", "steps")  # a wall-clock budget, or a step-matched control (its budget in BUDGET_STEPS)
EVAL_SPLIT, EVAL_SPLITS = "eval/split", ("test", "validation")   # which split the evaluations used
EVAL_N_PROBLEMS = "eval/n_problems"
SPEED_PROBE = "machine/speed_probe_s"   # seconds of a fixed compute probe before the run: machine drift made visible
ENERGY_AVAILABLE, ENERGY_SOURCE, MEMORY_KIND = "energy/available", "energy/source", "memory/kind"
DATA_DEVICE, DATA_EPOCHS = "data/device", "data/epochs_completed"
MODEL_PARAMS, MODEL_TRAINABLE = "model/parameters", "model/trainable_parameters"
STATUS = "status"
PRIMARY_MARK_MIN = 30                  # the primary metric's mark (minutes of wall-clock budget)


def em_at_mark(minutes: float) -> str:
    """Summary name of the strict dev EM at a mark of the budget: final/em_at_30min."""
    return f"final/em_at_{minutes:g}min"


def auc_over_budget(points: list[tuple[float, float]], budget_s: float) -> float | None:
    """(1/B)∫_0^B EM(t) dt, EM linear between evaluations (t = clock time of the evaluated model) and held at its
    last value until B; before the first evaluation EM is taken as that evaluation's value.  Percent; None without
    evaluations or without a positive budget."""
    if not points or budget_s <= 0:
        return None
    pts = sorted(points)
    area, (t_prev, e_prev) = pts[0][0] * pts[0][1], pts[0]
    for t, e in pts[1:]:
        area += (t - t_prev) * (e + e_prev) / 2
        t_prev, e_prev = t, e
    return (area + max(budget_s - t_prev, 0.0) * e_prev) / budget_s


# ----------------------------------------------------------------------------------------------------
# What is compared
# ----------------------------------------------------------------------------------------------------
PRIMARY_METRIC = "Exact-match accuracy at 30 min wall-clock."
PRIMARY_KEY = "dev_em_primary"          # strict dev EM at the 30-min mark (at B for a budget under 30 min)
SECONDARY_KEY = "dev_loss_at_budget"    # FINAL_LOSS, lower is better

# Summary metrics compared across runs: name in aggregated_metrics.json -> (summary key, higher is better)
SUMMARY_METRICS = {
    "dev_em_at_budget": (FINAL_EM, True),
    "dev_em_flexible_at_budget": (FINAL_EM_FLEX, True),
    "dev_em_30min": (em_at_mark(30), True),
    "dev_em_60min": (em_at_mark(60), True),
    "dev_loss_at_budget": (FINAL_LOSS, False),
    "auc_em_over_b": (AUC, True),
    "best_dev_em": (BEST_EM, True),
    "energy_joules": (ENERGY, False),
    "peak_memory_gib": (PEAK_MEM, False),
    "contamination_em": (CONTAM_EM, True),
    "budget_minutes": (BUDGET_MINUTES, None),
    "train_steps": (STEPS, None),
    "mean_step_time_s": (MEAN_STEP_TIME, False),
    "machine_speed_probe_s": (SPEED_PROBE, None),
    "planner_time_fraction": (PLANNER_FRACTION, False),   # planner's own time / training-step time
}
BOOTSTRAP_RESAMPLES = 10_000
ALPHA, POWER = 0.05, 0.80               # significance level (two-sided) and power of the detectable difference


class EvaluateError(Exception):
    """Bad arguments: one line on stderr, exit code 2."""


# ----------------------------------------------------------------------------------------------------
# Reading W&B records
# ----------------------------------------------------------------------------------------------------
@dataclass
class RunRecord:
    run_id: str
    history: list[dict] = field(default_factory=list)   # one dict per step, keyed by metric name (+ "_step")
    summary: dict = field(default_factory=dict)
    config: dict = field(default_factory=dict)
    source: str = ""
    finished: bool = False
    note: str = ""                                       # one line the analysis should say about this record


def read_wandb_file(path: Path) -> tuple[list, dict, dict, bool]:
    """Parse one `.wandb` transaction log (LevelDB-log framing of protobuf Records): history rows, summary, config,
    whether the run wrote its exit record.  See the shared notes on W&B offline runs."""
    from wandb.proto import wandb_internal_pb2 as pb
    data = path.read_bytes()
    if len(data) < 7 and b":W&B"[:len(data)] == data[:4]:
        return [], {}, {}, False    # torn before its header was complete (a process killed at once): nothing in it
    if data[:4] != b":W&B":
        raise ValueError(f"{path} is not a W&B record")
    payloads, pos, block, pending = [], 7, 32768, b""
    while pos + 7 <= len(data):
        left = block - (pos % block)
        if left < 7:            # block tail padding
            pos += left
            continue
        crc, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        chunk = data[pos + 7:pos + 7 + length]
        pos += 7 + length
        if len(chunk) < length or zlib.crc32(chunk, zlib.crc32(bytes([kind]))) & 0xFFFFFFFF != crc:
            break               # a torn tail (the run is still writing, or crashed): keep what is complete
        if kind == 1:
            payloads.append(chunk)
        elif kind == 2:
            pending = chunk
        elif kind == 3:
            pending += chunk
        elif kind == 4:
            payloads.append(pending + chunk)
            pending = b""
    history, summary, config, finished = [], {}, {}, False
    for payload in payloads:
        record = pb.Record()
        try:
            record.ParseFromString(payload)
        except Exception:
            continue
        which = record.WhichOneof("record_type")
        if which == "history":
            history.append({_item_key(i): _item_value(i) for i in record.history.item})
        elif which == "summary":
            for item in record.summary.update:
                summary[_item_key(item)] = _item_value(item)
            for item in record.summary.remove:
                summary.pop(_item_key(item), None)
        elif which == "run":
            for item in record.run.config.update:
                config[_item_key(item)] = _item_value(item)
        elif which == "config":
            for item in record.config.update:
                config[_item_key(item)] = _item_value(item)
            for item in record.config.remove:
                config.pop(_item_key(item), None)
        elif which == "exit":
            finished = True
    config.pop("_wandb", None)
    return history, summary, config, finished


def _item_key(item) -> str:
    return "/".join(item.nested_key) if item.nested_key else item.key


def _item_value(item):
    kind = item.WhichOneof("value") if "value" in [o.name for o in item.DESCRIPTOR.oneofs] else None
    if kind and kind != "value_json":
        return getattr(item, kind)
    try:
        return json.loads(item.value_json)
    except (json.JSONDecodeError, TypeError):
        return item.value_json


_FOLDER_RE = re.compile(r"^(?:offline-)?run-(\d{8}_\d{6})-(.+?)(?:-(\d+))?$")


def run_folders(results_dir: Path) -> list[tuple[str, int, str, Path]]:
    """(timestamp, same-second counter, run id, folder) of every W&B run folder under results_dir/wandb.
    W&B names a folder run-<time>-<id> (offline-run-... offline) and appends -1, -2 for another process of the
    same id within the same second; the .wandb file inside is always run-<id>.wandb."""
    out = []
    for folder in (results_dir / "wandb").glob("*run-*"):
        match = _FOLDER_RE.match(folder.name)
        if not match or not folder.is_dir():
            continue
        stamp, rest, counter = match.group(1), match.group(2), match.group(3)
        for run_id, n in ((f"{rest}-{counter}", 0), (rest, int(counter or 0))) if counter else ((rest, 0),):
            if (folder / f"run-{run_id}.wandb").is_file():
                out.append((stamp, n, run_id, folder))
                break
    return sorted(out)


def local_segments(results_dir: Path, run_id: str) -> list[Path]:
    """The run's `.wandb` files, oldest first (a resumed run has one per process)."""
    return [folder / f"run-{run_id}.wandb" for _, _, rid, folder in run_folders(results_dir) if rid == run_id]


def merge_segments(segments: list[tuple[list, dict, dict, bool]]) -> tuple[list, dict, dict, bool]:
    """Join the records of one run id written by successive processes.  A later segment that starts at step s0
    supersedes every earlier row at step ≥ s0 (a resume re-trains from its checkpoint; a fresh start at step 0
    replaces everything), so the merged history has no gap and no duplicate step."""
    rows: dict[int, dict] = {}
    summary, config, finished = {}, {}, False
    for history, seg_summary, seg_config, seg_finished in segments:
        steps = [int(r["_step"]) for r in history if "_step" in r]
        if steps:
            start = min(steps)
            rows = {s: r for s, r in rows.items() if s < start}
            if start == 0:
                summary = {}
        for row in history:
            if "_step" in row:
                rows.setdefault(int(row["_step"]), {}).update(row)
        summary.update(seg_summary)
        config = seg_config or config
        finished = seg_finished
    return [rows[s] for s in sorted(rows)], summary, config, finished


def load_run(results_dir: Path, run_id: str, entity, project) -> RunRecord | str:
    """A RunRecord, or a one-line reason it could not be read.

    The local record comes first.  If it lacks steps inside its range (a process killed before W&B wrote its last
    rows to disk, while an online run had already uploaded them, so the resumed run could not record them again),
    an online run is read from the W&B server instead when the server's copy is complete; otherwise the local
    record is used and its `note` names the missing steps."""
    files = local_segments(results_dir, run_id)
    if not files:
        remote = load_from_api(run_id, entity, project)
        return remote if isinstance(remote, RunRecord) else (
            f"{run_id}: no local W&B record under {results_dir / 'wandb'} and the W&B API could not provide it "
            f"({remote}); check the run id, or sync the run")
    segments = []
    for f in files:
        try:
            segments.append(read_wandb_file(f))
        except (OSError, ValueError) as err:
            return f"{run_id}: cannot read {f} ({err})"
    history, summary, config, finished = merge_segments(segments)
    local = RunRecord(run_id, history, summary, config, f"local W&B record ({len(files)} file(s))", finished)
    gap = missing_steps(history)
    if not gap:
        return local
    lacking = f"the local record lacks steps {step_spans(gap)} (written by a process killed before they reached disk)"
    if all(f.parent.name.startswith("offline-") for f in files):
        local.note = f"{run_id}: {lacking}"
        return local
    remote = load_from_api(run_id, entity, project)
    if isinstance(remote, RunRecord) and not missing_steps(remote.history) and remote.history:
        remote.note = f"{run_id}: {lacking}; read from the W&B server instead, whose copy is complete"
        return remote
    why = remote if isinstance(remote, str) else "its copy lacks steps too"
    local.note = f"{run_id}: {lacking}; the W&B server could not fill them ({why}); metrics use the local record"
    return local


def wandb_target() -> tuple[str | None, str | None]:
    """Entity and project of the W&B runs: config/config.yaml's wandb.entity / wandb.project, each overridden by the
    environment variable WANDB_ENTITY / WANDB_PROJECT when that is set and not empty (training follows the same
    rule).  An entity of None means the default entity of the API key."""
    import yaml
    try:
        wandb_cfg = (yaml.safe_load((REPO_ROOT / "config" / "config.yaml").read_text()) or {}).get("wandb") or {}
    except (OSError, yaml.YAMLError):
        wandb_cfg = {}
    entity = os.environ.get("WANDB_ENTITY") or wandb_cfg.get("entity") or None
    project = os.environ.get("WANDB_PROJECT") or wandb_cfg.get("project") or None
    return entity, project


def load_from_api(run_id: str, entity, project) -> RunRecord | str:
    """The run as the W&B server holds it (`api.run(f"{entity}/{project}/{run_id}")`: every history row through
    scan_history, the summary, the config), or the first line of why it could not be read."""
    if not project:
        return "no W&B project configured (wandb.project in config/config.yaml, or WANDB_PROJECT)"
    try:
        import wandb
        api = wandb.Api(timeout=20)
        path = f"{entity or api.default_entity}/{project}/{run_id}"
        run = api.run(path)
        history = [dict(row) for row in run.scan_history()]
        return RunRecord(run_id, history, dict(run.summary._json_dict), dict(run.config), f"W&B API ({path})",
                         run.state == "finished")
    except Exception as err:
        return (str(err).splitlines() or [type(err).__name__])[0][:160]


def missing_steps(history: list[dict]) -> list[int]:
    """Steps absent between the first and the last step of a history."""
    steps = {int(r["_step"]) for r in history if "_step" in r}
    return sorted(set(range(min(steps), max(steps) + 1)) - steps) if steps else []


def step_spans(steps: list[int]) -> str:
    """[3, 4, 5, 9] -> "3-5, 9"."""
    spans: list[list[int]] = []
    for s in steps:
        if spans and s == spans[-1][1] + 1:
            spans[-1][1] = s
        else:
            spans.append([s, s])
    return ", ".join(f"{a}" if a == b else f"{a}-{b}" for a, b in spans)


# ----------------------------------------------------------------------------------------------------
# Derived metrics
# ----------------------------------------------------------------------------------------------------
def series(history: list[dict], y: str, x: str = "_step") -> tuple[list[float], list[float]]:
    pts = [(float(r[x]), float(r[y])) for r in history if _num(r.get(x)) and _num(r.get(y))]
    return [p[0] for p in pts], [p[1] for p in pts]


def _num(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def primary_em(summary: dict) -> tuple[float | None, str]:
    """The run's primary value, strict dev EM at the 30-minute mark of its wall-clock budget, and where it comes
    from: "em_at_30min" (the summary's final/em_at_30min: a 30-min run's final EM, a 60-min run's EM at the mark),
    "em_at_budget: budget 5 min < 30 min" (a shorter budget contributes its EM at B), or "none: <why>" with a None
    value.  A longer run without an EM at the mark gets None, never its final EM (that is EM at another time)."""
    final, mark = summary.get(FINAL_EM), summary.get(em_at_mark(PRIMARY_MARK_MIN))
    if summary.get(BUDGET_UNIT, "minutes") == "steps":
        steps = summary.get(BUDGET_STEPS)
        return None, (f"none: step-matched control (budget {_fmt(steps)} optimiser steps), no wall-clock mark; "
                      f"its EM at B is in dev_em_at_budget")
    budget = summary.get(BUDGET_MINUTES)
    if not _num(budget):
        return None, "none: the run's budget is unknown (no budget/minutes in its summary)"
    if budget >= PRIMARY_MARK_MIN:
        if _num(mark):
            return float(mark), "em_at_30min"
        if budget == PRIMARY_MARK_MIN and _num(final):       # B is the mark: the final evaluation is at 30 min
            return float(final), "em_at_budget: budget 30 min = the 30-min mark"
        return None, (f"none: budget {budget:g} min but no EM logged at the 30-min mark "
                      f"({'the run has not reached it' if not _num(final) else 'its final EM is at B, not at 30 min'})")
    if _num(final):
        return float(final), f"em_at_budget: budget {budget:g} min < 30 min"
    return None, f"none: budget {budget:g} min < 30 min and no final EM (no final evaluation yet)"


def derived_metrics(rec: RunRecord) -> dict:
    """The comparison metrics of one run; absent values are None (never 0)."""
    out = {}
    for name, (key, _) in SUMMARY_METRICS.items():
        value = rec.summary.get(key)
        out[name] = float(value) if _num(value) else None
    if out["auc_em_over_b"] is None and out["budget_minutes"]:
        t, em = series(rec.history, EM, EVAL_AT)
        out["auc_em_over_b"] = auc_over_budget(list(zip(t, em)), 60 * out["budget_minutes"])
    _, tps = series(rec.history, TOKENS_PER_S)
    out["tokens_per_s"] = sum(tps) / len(tps) if tps else None
    out[PRIMARY_KEY] = primary_em(rec.summary)[0]
    return out


def bootstrap_ci(correct: list[int], resamples: int = BOOTSTRAP_RESAMPLES, seed: int = 0) -> tuple[float, float]:
    """95% percentile bootstrap interval of EM (percent) over problems."""
    import numpy as np
    arr = np.asarray(correct, dtype=float)
    rng = np.random.default_rng(seed)
    means = arr[rng.integers(0, len(arr), size=(resamples, len(arr)))].mean(1) * 100
    return float(np.percentile(means, 2.5)), float(np.percentile(means, 97.5))


def mcnemar_test(a: list[int], b: list[int]) -> dict:
    """McNemar's test on paired per-problem correctness: exact binomial test when the discordant pairs are few
    (< 25), the chi-square test with continuity correction otherwise (statsmodels)."""
    from statsmodels.stats.contingency_tables import mcnemar
    both = sum(1 for x, y in zip(a, b) if x and y)
    only_a = sum(1 for x, y in zip(a, b) if x and not y)
    only_b = sum(1 for x, y in zip(a, b) if y and not x)
    neither = len(a) - both - only_a - only_b
    exact = only_a + only_b < 25
    result = mcnemar([[both, only_a], [only_b, neither]], exact=exact, correction=True)
    return {"n": len(a), "both_correct": both, "only_first": only_a, "only_second": only_b, "neither": neither,
            "statistic": float(result.statistic), "p_value": float(result.pvalue),
            "test": "exact binomial" if exact else "chi-square with continuity correction"}


def seed_stats(values: list[float]) -> dict:
    """Mean, sample standard deviation and a 95% t-interval across seeds (None where too few values)."""
    from scipy import stats
    n = len(values)
    if n == 0:
        return {"n": 0, "mean": None, "std": None, "ci95": None}
    mean = sum(values) / n
    if n < 2:
        return {"n": n, "mean": mean, "std": None, "ci95": None}
    std = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1))
    half = stats.t.ppf(1 - ALPHA / 2, n - 1) * std / math.sqrt(n)
    return {"n": n, "mean": mean, "std": std, "ci95": [mean - half, mean + half]}


def is_proposed(run_id: str) -> bool:
    return "proposed" in run_id


def is_baseline(run_id: str) -> bool:
    return "comparative" in run_id or "baseline" in run_id


# ----------------------------------------------------------------------------------------------------
# Statistics across seeds (also bench/results_table.py's, on compact records)
# ----------------------------------------------------------------------------------------------------
# An arm is a run id with its seed replicates, given as {seed: summary}.  A seed fixes LoRA initialisation, data
# order and evaluation subset, so two arms are compared on the seeds both have, seed by seed: the paired
# difference removes what the seed alone does.  Differences are reference − other (the reference is the best
# proposed arm): positive is better for EM, negative is better for the loss.
COMPARED = {"primary": ("strict dev EM at 30 min (%)", True), "loss": ("dev loss at B", False),
            "em_at_budget": ("strict EM at B (%)", True)}    # EM at B: also a step-matched control's (no 30-min mark)
_SEED_RE = re.compile(r"^(.+)-seed(\d+)$")


def seed_of(run_id: str) -> tuple[str, int]:
    """(arm, seed) of a run id: `<id>` is seed 0 of arm <id>, `<id>-seed<N>` is seed N."""
    match = _SEED_RE.match(run_id)
    return (match.group(1), int(match.group(2))) if match else (run_id, 0)


def seed_values(arm: dict[int, dict], metric: str) -> dict[int, float]:
    """{seed: value} of "primary" (primary_em), "loss" (final/loss) or "em_at_budget" (final/exact_match) over the
    seeds that have one."""
    out = {}
    for seed, summary in arm.items():
        value = primary_em(summary)[0] if metric == "primary" else summary.get(
            FINAL_LOSS if metric == "loss" else FINAL_EM)
        if _num(value):
            out[seed] = float(value)
    return out


def arm_table(arm: dict[int, dict]) -> dict:
    """One arm, seed by seed (primary value and its source, loss at B, steps, planner share, machine probe,
    split), and across seeds (mean, std, t-interval of the primary value and of the loss)."""
    seeds = {}
    for seed in sorted(arm):
        summary = arm[seed]
        value, source = primary_em(summary)
        seeds[str(seed)] = {"primary": value, "primary_source": source,
                            "loss": _float_or_none(summary.get(FINAL_LOSS)),
                            "em_at_budget": _float_or_none(summary.get(FINAL_EM)),
                            "steps": _float_or_none(summary.get(STEPS)),
                            "planner_time_fraction": _float_or_none(summary.get(PLANNER_FRACTION)),
                            "speed_probe_s": _float_or_none(summary.get(SPEED_PROBE)),
                            "eval_split": summary.get(EVAL_SPLIT)}
    return {"seeds": seeds, **{m: seed_stats(list(seed_values(arm, m).values())) for m in COMPARED}}


def detectable_difference(std: float | None, n: int, alpha: float = ALPHA, power: float = POWER) -> float | None:
    """The smallest true mean paired difference a two-sided paired t-test on n seeds detects with the given
    power, given the standard deviation of the paired differences: statsmodels' one-sample t power solved for the
    standardised effect, times that standard deviation.  None below two seeds or without a spread."""
    if std is None or n < 2:
        return None
    from statsmodels.stats.power import TTestPower
    effect = TTestPower().solve_power(effect_size=None, nobs=n, alpha=alpha, power=power, alternative="two-sided")
    return float(effect) * std


def paired_difference(ref: dict[int, float], other: dict[int, float]) -> dict:
    """ref − other over the seeds both have: mean with a 95% t-interval, paired t-test and Wilcoxon signed-rank
    test (scipy; two-sided), and the detectable difference at this spread and number of seeds."""
    import warnings
    from scipy import stats
    seeds = sorted(set(ref) & set(other))
    diffs = [ref[s] - other[s] for s in seeds]
    spread = seed_stats(diffs)
    out = {"n": len(seeds), "seeds": seeds, "differences": diffs, "mean_difference": spread["mean"],
           "std_difference": spread["std"], "ci95": spread["ci95"], "t_statistic": None, "t_p_value": None,
           "wilcoxon_statistic": None, "wilcoxon_p_value": None,
           "detectable_difference": detectable_difference(spread["std"], len(seeds)), "note": None}
    if len(seeds) < 2:
        out["note"] = f"{len(seeds)} seed(s) in common: no paired test"
        return out
    a, b = [ref[s] for s in seeds], [other[s] for s in seeds]
    notes = []
    with warnings.catch_warnings():        # degenerate inputs are named in the note instead
        warnings.simplefilter("ignore")
        if spread["std"] > 0:
            t = stats.ttest_rel(a, b)
            out["t_statistic"], out["t_p_value"] = float(t.statistic), float(t.pvalue)
        else:
            notes.append("the difference is the same on every seed: the paired t-test is undefined")
        if any(d != 0 for d in diffs):
            w = stats.wilcoxon(a, b, zero_method="wilcox", method="auto")
            if math.isfinite(w.pvalue):
                out["wilcoxon_statistic"], out["wilcoxon_p_value"] = float(w.statistic), float(w.pvalue)
        else:
            notes.append("every difference is 0: the Wilcoxon test is undefined")
    out["note"] = "; ".join(notes) or None
    return out


def holm(p_values: dict[str, float | None]) -> dict[str, float | None]:
    """Holm-corrected p-values across a family (statsmodels multipletests); None stays None."""
    from statsmodels.stats.multitest import multipletests
    keys = [k for k, p in p_values.items() if p is not None]
    out: dict[str, float | None] = {k: None for k in p_values}
    if keys:
        adjusted = multipletests([p_values[k] for k in keys], alpha=ALPHA, method="holm")[1]
        out.update({k: float(p) for k, p in zip(keys, adjusted)})
    return out


def paired_vs_reference(arms: dict[str, dict[int, dict]], reference: str, others: list[str]) -> dict:
    """For the primary metric and the loss at B: reference − other for each of `others`, with the t-test's and the
    Wilcoxon test's p-values Holm-corrected across `others` (one family per metric and test)."""
    out = {}
    for metric in COMPARED:
        ref = seed_values(arms[reference], metric)
        rows = {o: paired_difference(ref, seed_values(arms[o], metric)) for o in others}
        for test in ("t", "wilcoxon"):
            adjusted = holm({o: r[f"{test}_p_value"] for o, r in rows.items()})
            for o, r in rows.items():
                r[f"{test}_p_holm"] = adjusted[o]
        out[metric] = rows
    return out


def mcnemar_by_seed(ref: dict[int, dict], other: dict[int, dict]) -> dict[str, dict]:
    """McNemar's test seed by seed on the final evaluation's per-problem correctness (final/correct_strict), for
    the seeds where both evaluated the same problems (same final/problem_digest and count); else the reason."""
    out = {}
    for seed in sorted(set(ref) & set(other)):
        a, b = ref[seed], other[seed]
        bits_a, bits_b = a.get(FINAL_CORRECT), b.get(FINAL_CORRECT)
        if not (isinstance(bits_a, str) and bits_a and isinstance(bits_b, str) and bits_b):
            out[str(seed)] = {"skipped": "no per-problem record (final/correct_strict) in one of the two"}
        elif a.get(PROBLEM_DIGEST) != b.get(PROBLEM_DIGEST) or len(bits_a) != len(bits_b):
            out[str(seed)] = {"skipped": "not evaluated on the same problems (problem digest differs)"}
        else:
            out[str(seed)] = mcnemar_test([int(c) for c in bits_a], [int(c) for c in bits_b])
    return out


def mcnemar_count(by_seed: dict[str, dict]) -> tuple[int, int]:
    """(seeds with p < α, seeds tested)."""
    tested = [t for t in by_seed.values() if "p_value" in t]
    return sum(t["p_value"] < ALPHA for t in tested), len(tested)


def spread_and_power(tables: dict[str, dict], paired: dict[str, dict[str, dict]]) -> dict:
    """Seed-to-seed spread (each arm's std across seeds, each paired difference's std) and the smallest paired
    difference the protocol detects at POWER, two-sided α = ALPHA: the paired differences' std pooled over the
    compared arms (weighted by degrees of freedom), at the number of seeds most pairs share."""
    out = {"alpha": ALPHA, "power": POWER, "test": "paired t-test, two-sided",
           "method": "detectable difference = statsmodels TTestPower effect size at (n seeds, alpha, power) "
                     "× std of the paired differences (pooled over the arms compared with the reference)"}
    for metric in COMPARED:
        rows = {o: r for o, r in paired.get(metric, {}).items() if r["std_difference"] is not None}
        dof = sum(r["n"] - 1 for r in rows.values())
        pooled = math.sqrt(sum((r["n"] - 1) * r["std_difference"] ** 2 for r in rows.values()) / dof) if dof else None
        counts = [r["n"] for r in rows.values()]
        n = max(set(counts), key=lambda c: (counts.count(c), c)) if counts else 0
        out[metric] = {"arm_std": {a: t[metric]["std"] for a, t in tables.items()},
                       "paired_difference_std": {o: r["std_difference"] for o, r in rows.items()},
                       "pooled_paired_difference_std": pooled, "n_seeds": n,
                       "detectable_difference": detectable_difference(pooled, n)}
    return out


def seed_statistics(arms: dict[str, dict[int, dict]], reference: str | None, compared: list[str]) -> dict:
    """Everything across seeds: per-arm tables, paired differences of the reference against each compared arm
    (Holm across them), McNemar per seed, spread and detectable difference."""
    tables = {a: arm_table(seeds) for a, seeds in arms.items()}
    compared = [c for c in compared if c in arms and c != reference]
    paired = paired_vs_reference(arms, reference, compared) if reference in arms and compared else {}
    mcnemar = {c: mcnemar_by_seed(arms[reference], arms[c]) for c in compared} if reference in arms else {}
    return {"per_seed": tables, "paired": paired, "mcnemar_per_seed": mcnemar,
            "power": spread_and_power(tables, paired)}


def best_arm(values: dict[str, dict], select, metric: str = "primary") -> dict | None:
    """{"run_id", "value"} of the selected arm with the highest primary value (EM: higher is better), from
    {run id: {"value": ...}} (the analysis' seed groups) or {run id: arm_table(...)} (its `metric`'s mean)."""
    def value(entry):
        return entry["value"] if "value" in entry else entry[metric]["mean"]
    cands = [(r, value(e)) for r, e in values.items() if select(r) and value(e) is not None]
    if not cands:
        return None
    run_id, best = max(cands, key=lambda c: c[1])
    return {"run_id": run_id, "value": best}


def spread_sentence(power: dict, metric: str = "primary", unit: str = " points", label: str | None = None) -> str:
    """One line on the seed-to-seed spread and the detectable difference, for the printed summary and the table
    (`label` names the metric; COMPARED's name by default)."""
    label = label or COMPARED[metric][0]
    entry = power.get(metric) or {}
    stds = sorted(v for v in (entry.get("arm_std") or {}).values() if v is not None)
    arms = f"std across seeds per arm {stds[0]:.3g}-{stds[-1]:.3g}{unit}" if stds else "no arm has two seeds"
    pooled, n, mde = entry.get("pooled_paired_difference_std"), entry.get("n_seeds"), entry.get("detectable_difference")
    if pooled is None or mde is None:
        return f"{label}: {arms}; no paired differences over two or more seeds: no detectable difference"
    return (f"{label}: {arms}; std of the paired differences {pooled:.3g}{unit} (pooled); with {n} "
            f"seeds a paired t-test (two-sided, α = {power['alpha']:g}) detects a true mean difference of "
            f"{mde:.3g}{unit} with {power['power']:.0%} power")


def _float_or_none(value) -> float | None:
    return float(value) if _num(value) else None


# ----------------------------------------------------------------------------------------------------
# Figures
# ----------------------------------------------------------------------------------------------------
def _plt():
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def run_figures(rec: RunRecord, out: Path) -> list[Path]:
    plt = _plt()
    paths = []
    step, loss = series(rec.history, LOSS)
    e_step, em = series(rec.history, EM)
    if step or e_step:
        fig, ax = plt.subplots(figsize=(7, 4))
        if step:
            ax.plot(step, loss, color="tab:blue", lw=0.8, label="train loss (answer tokens)")
            ax.set_ylabel("train loss")
        ax.set_xlabel("optimiser step")
        if e_step:
            ax2 = ax.twinx()
            ax2.plot(e_step, em, "o-", color="tab:red", label="dev EM strict (%)")
            ax2.set_ylabel("dev EM strict (%)")
            ax2.annotate(f"final {em[-1]:.1f}%", (e_step[-1], em[-1]), textcoords="offset points", xytext=(-6, -14),
                         ha="right", fontsize=8, color="tab:red")       # below-left: clear of the title and axis
            handles = ax.get_legend_handles_labels()[0] + ax2.get_legend_handles_labels()[0]
            ax.legend(handles, [h.get_label() for h in handles], loc="center right")
        ax.set_title(f"Learning curve: {rec.run_id}")
        paths.append(_save(fig, out / f"{rec.run_id}_learning_curve.pdf"))
    t, em_t = series(rec.history, EM, EVAL_AT)
    _, flex_t = series(rec.history, EM_FLEX, EVAL_AT)
    if t:
        fig, ax = plt.subplots(figsize=(7, 4))
        ax.plot([x / 60 for x in t], em_t, "o-", label="strict (#### N)")
        if len(flex_t) == len(t):
            ax.plot([x / 60 for x in t], flex_t, "s--", alpha=0.7, label="flexible (last number)")
        budget = rec.summary.get("budget/minutes")
        if _num(budget):
            ax.axvline(budget, color="grey", ls=":", label=f"budget B = {budget:g} min")
        ax.set_xlabel("wall-clock time of the evaluated model (min)")
        ax.set_ylabel("dev exact match (%)")
        ax.set_title(f"EM against wall-clock time: {rec.run_id}")
        ax.legend()
        paths.append(_save(fig, out / f"{rec.run_id}_em_vs_time.pdf"))
    t_lr, lr = series(rec.history, LR, ELAPSED)
    if t_lr:
        fig, ax = plt.subplots(figsize=(7, 4))
        ax.plot([x / 60 for x in t_lr], lr, lw=0.9)
        ax.set_yscale("log")
        ax.set_xlabel("wall-clock time (min)")
        ax.set_ylabel("learning rate η_t")
        ax.set_title(f"LR trajectory: {rec.run_id}")
        paths.append(_save(fig, out / f"{rec.run_id}_lr_trajectory.pdf"))
    left, lr_left = series(rec.history, LR, BUDGET_LEFT)
    if left:
        # η against the share of the budget left, read from 1 to 0: a decay learned to end with the budget shows
        # as a curve reaching its low at the right edge, whatever the run's speed or budget length
        fig, ax = plt.subplots(figsize=(7, 4))
        ax.plot(left, lr_left, lw=0.9)
        ax.set_yscale("log")
        ax.set_xlim(1.0, 0.0)
        ax.set_xlabel("fraction of the budget left (time/budget_left)")
        ax.set_ylabel("learning rate η_t")
        ax.set_title(f"η against the budget left: {rec.run_id}")
        paths.append(_save(fig, out / f"{rec.run_id}_eta_vs_budget.pdf"))
    keys = sorted({k for r in rec.history for k in r if k.startswith("planner/") and _num(r[k])})
    if keys:
        cols = 3
        rows = math.ceil(len(keys) / cols)
        fig, axes = plt.subplots(rows, cols, figsize=(12, 2.6 * rows), squeeze=False)
        for ax, key in zip(axes.flat, keys):
            x, y = series(rec.history, key)
            ax.plot(x, y, lw=0.8)
            ax.ticklabel_format(axis="y", useOffset=False)     # a constant 1 ± 1e-7 reads as 1, not as noise
            lo, hi = min(y), max(y)
            if hi - lo <= 1e-6 * max(abs(lo), abs(hi), 1e-12):
                ax.set_ylim(lo - 0.05 * max(abs(lo), 1e-3), hi + 0.05 * max(abs(hi), 1e-3))
            ax.set_title(key, fontsize=9)
            ax.set_xlabel("step", fontsize=8)
        for ax in list(axes.flat)[len(keys):]:
            ax.axis("off")
        fig.suptitle(f"Planner internals: {rec.run_id}")
        paths.append(_save(fig, out / f"{rec.run_id}_planner_internals.pdf"))
    return paths


def short_labels(run_ids: list[str]) -> tuple[dict[str, str], str]:
    """Run ids without their common suffix (e.g. '-iter1-tiny-synthetic'), for legible axes; the suffix goes in the title."""
    if len(run_ids) < 2:
        return {r: r for r in run_ids}, ""
    suffix = os.path.commonprefix([r[::-1] for r in run_ids])[::-1]
    suffix = suffix[suffix.find("-"):] if "-" in suffix else ""
    if any(len(r) == len(suffix) for r in run_ids):
        suffix = ""
    return {r: r[: len(r) - len(suffix)] if suffix else r for r in run_ids}, suffix


def comparison_figures(records: dict[str, list[RunRecord]], primary: dict[str, dict], out: Path) -> list[Path]:
    plt = _plt()
    paths = []
    ids = [r for r in records if primary.get(r, {}).get("value") is not None]
    colors = {r: ("tab:red" if is_proposed(r) else "tab:blue" if is_baseline(r) else "tab:grey") for r in records}
    label, suffix = short_labels(list(records))
    of_runs = f" (run ids end in {suffix})" if suffix else ""
    for r, recs in records.items():       # name the planner beside the method token: "comparative-1 (reactor)"
        kind = ((recs[0].config.get("training") or {}).get("scheduler") or {}).get("type") if recs else None
        if kind and kind not in label[r]:
            label[r] += f" ({kind})"
    if ids:
        fig, ax = plt.subplots(figsize=(max(6, 0.9 * len(ids)), 4.5))
        values = [primary[r]["value"] for r in ids]
        # EM lives in [0, 100]: the drawn interval is clipped there (a t-interval over two seeds easily leaves it)
        cis = [[min(max(c, 0.0), 100.0) for c in (primary[r]["ci95"] or [values[i]] * 2)] for i, r in enumerate(ids)]
        lows = [max(values[i] - ci[0], 0.0) for i, ci in enumerate(cis)]
        highs = [max(ci[1] - values[i], 0.0) for i, ci in enumerate(cis)]
        ax.bar(range(len(ids)), values, color=[colors[r] for r in ids], yerr=[lows, highs], capsize=4, alpha=0.85)
        for i, r in enumerate(ids):         # every seed as a point, the mean as a number beside the bar
            seeds = primary[r]["seed_values"]
            if len(seeds) > 1:
                ax.scatter([i] * len(seeds), seeds, color="black", s=10, zorder=3)
            ax.annotate(f"{values[i]:.1f}", (i + 0.42, values[i]), ha="right", va="bottom", fontsize=7)
        ax.set_ylim(0, 104)
        ax.set_xticks(range(len(ids)), [label[r] for r in ids], rotation=35, ha="right", fontsize=8)
        ax.set_ylabel("dev EM strict at 30 min (%)\n(at B for a budget < 30 min)")
        ax.set_title(f"Primary: EM at 30 min{of_runs}: mean, seeds (points), 95% CI (t-interval over seeds if several, "
                     f"else bootstrap over problems; clipped to [0, 100])\nred proposed, blue baselines, grey others", fontsize=9)
        paths.append(_save(fig, out / "comparison_em_bar.pdf"))
        fig, ax = plt.subplots(figsize=(max(6, 0.9 * len(ids)), 4.5))
        data = [primary[r]["seed_values"] for r in ids]
        ax.boxplot(data, tick_labels=[label[r] for r in ids])
        for i, vals in enumerate(data, start=1):
            ax.scatter([i] * len(vals), vals, color=colors[ids[i - 1]], zorder=3, s=14)
        ax.set_xticks(range(1, len(ids) + 1), [label[r] for r in ids], rotation=35, ha="right", fontsize=8)
        ax.set_ylabel("dev EM strict at 30 min (%)\n(at B for a budget < 30 min)")
        ax.set_title(f"Primary: EM at 30 min across seeds{of_runs} (points: seeds)", fontsize=9)
        paths.append(_save(fig, out / "comparison_em_boxplot.pdf"))
    # One colour and line style per run id (its seeds share them), enough distinct ones for a dozen methods.
    palette = plt.get_cmap("tab20").colors
    styles = {r: (palette[(2 * i) % 20 + (i // 10) % 2], ("-", "--", ":")[(i // 20) % 3])
              for i, r in enumerate(records)}
    overlays = {   # topic: (y, x, x scale, x label, y label, log y, x reversed, title)
        "em_vs_time": (EM, EVAL_AT, 1 / 60, "wall-clock time (min)", "dev EM strict (%)", False, False,
                       "EM against wall-clock time"),
        "lr_trajectories": (LR, ELAPSED, 1 / 60, "wall-clock time (min)", "learning rate η_t", True, False,
                            "LR trajectories"),
        "eta_vs_budget": (LR, BUDGET_LEFT, 1.0, "fraction of the budget left (time/budget_left)",
                          "learning rate η_t", True, True, "η against the budget left"),
    }
    for topic, (y, x, scale, xlabel, ylabel, logy, reverse, title) in overlays.items():
        fig, ax = plt.subplots(figsize=(9.5, 4.5))
        drawn = 0
        for run_id, recs in records.items():
            color, ls = styles[run_id]
            for k, rec in enumerate(recs):
                xs, ys = series(rec.history, y, x)
                if xs:
                    seeds = f" ({len(recs)} seeds)" if len(recs) > 1 else ""
                    ax.plot([v * scale for v in xs], ys, ls, marker="o" if y == EM else None, ms=3, lw=1, alpha=0.85,
                            color=color, label=label[run_id] + seeds if k == 0 else None)
                    drawn += 1
        if drawn:
            ax.set_xlabel(xlabel)
            ax.set_ylabel(ylabel)
            if logy:
                ax.set_yscale("log")
            if reverse:
                ax.set_xlim(1.0, 0.0)
            ax.set_title(title + of_runs, fontsize=10)
            ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0), frameon=False)
            paths.append(_save(fig, out / f"comparison_{topic}.pdf"))
        else:
            plt.close(fig)
    return paths


def _save(fig, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, bbox_inches="tight")     # legends placed beside the axes stay in
    _plt().close(fig)
    return path


# ----------------------------------------------------------------------------------------------------
# The analysis
# ----------------------------------------------------------------------------------------------------
def replicate_ids(results_dir: Path, run_id: str, entity=None, project=None) -> list[str]:
    """The run id itself and its `-seed<N>` replicates: those recorded locally, or, when the run has no local
    record at all, the members of its W&B group (train.py groups a run with its seed replicates)."""
    pattern = re.compile(rf"{re.escape(run_id)}(-seed\d+)?")
    local = {rid for _, _, rid, _ in run_folders(results_dir) if pattern.fullmatch(rid)}
    if not local and project:
        try:
            import wandb
            api = wandb.Api(timeout=20)
            runs = api.runs(f"{entity or api.default_entity}/{project}", filters={"group": run_id})
            local = {r.id for r in runs if pattern.fullmatch(r.id)}
        except Exception:   # no key or no network: load_run reports the run as missing
            pass
    return [run_id] + sorted(local - {run_id})


def analyse(results_dir: Path, run_ids: list[str]) -> dict:
    entity, project = wandb_target()
    comparison = results_dir / "comparison"
    comparison.mkdir(parents=True, exist_ok=True)      # results_dir too, on a fresh machine (runs from the API)
    notes: list[str] = []
    records: dict[str, list[RunRecord]] = {}
    arms: dict[str, dict[int, dict]] = {}             # run id -> {seed: summary}
    sources: dict[str, str] = {}                      # every run (seeds included) -> where its primary value is from
    metrics: dict[str, dict[str, float]] = {}
    primary: dict[str, dict] = {}
    for run_id in run_ids:
        recs = []
        replicates = replicate_ids(results_dir, run_id, entity, project)
        for rid in replicates:
            loaded = load_run(results_dir, rid, entity, project)
            if isinstance(loaded, str):
                if rid == run_id and len(replicates) == 1:
                    notes.append(loaded)
                    print(f"skipped: {loaded}")
                continue
            recs.append(loaded)
            if loaded.note:
                notes.append(loaded.note)
                print(f"note: {loaded.note}")
        if not recs:
            continue
        records[run_id] = recs
        arms[run_id] = {seed_of(r.run_id)[1]: r.summary for r in recs}
        out = results_dir / run_id
        out.mkdir(parents=True, exist_ok=True)
        per_seed = {r.run_id: derived_metrics(r) for r in recs}
        main_rec = recs[0]
        status = "finished" if main_rec.finished and FINAL_EM in main_rec.summary else \
            "in_progress" if not main_rec.finished else "finished_without_final_evaluation"
        if not series(main_rec.history, EM)[0]:
            notes.append(f"{run_id}: no evaluation logged yet ({status})")
            print(f"note: {run_id} has no evaluation logged yet ({status}); its EM metrics are absent")
        elif status != "finished":
            notes.append(f"{run_id}: {status}; its metrics are provisional")
            print(f"note: {run_id} is {status.replace('_', ' ')}; metrics are provisional")
        for rec in recs:
            sources[rec.run_id] = primary_em(rec.summary)[1]
            if sources[rec.run_id].startswith("none") and series(rec.history, EM)[0]:
                notes.append(f"{rec.run_id}: no primary value ({sources[rec.run_id]})")
                print(f"note: {rec.run_id} has no primary value ({sources[rec.run_id]})")
        combined = {}
        for name in per_seed[main_rec.run_id]:
            values = [m[name] for m in per_seed.values() if m.get(name) is not None]
            combined[name] = sum(values) / len(values) if values else None
            if values:
                metrics.setdefault(name, {})[run_id] = combined[name]
        primary_values = [m[PRIMARY_KEY] for m in per_seed.values() if m.get(PRIMARY_KEY) is not None]
        entry = {"value": combined.get(PRIMARY_KEY), "seed_values": primary_values, "seed_runs": list(per_seed),
                 "ci95": None, "ci_method": None, "bootstrap_ci95": None}
        bits = main_rec.summary.get(FINAL_CORRECT)
        if isinstance(bits, str) and bits:
            entry["bootstrap_ci95"] = list(bootstrap_ci([int(c) for c in bits]))
        # the bootstrap is over the final evaluation's problems: an interval of the primary value only where the
        # final evaluation is the primary one (budget ≤ 30 min), not for a 60-min run's EM at 30 min
        final_is_primary = sources[main_rec.run_id].startswith("em_at_budget") or (
            sources[main_rec.run_id] == "em_at_30min" and main_rec.summary.get(BUDGET_MINUTES) == PRIMARY_MARK_MIN)
        if len(primary_values) >= 2:
            entry.update(seed_stats(primary_values), ci_method="t-interval across seeds")
            entry["value"] = entry["mean"]
        elif entry["bootstrap_ci95"] and final_is_primary and entry["value"] is not None:
            entry["ci95"] = entry["bootstrap_ci95"]
            entry["ci_method"] = f"bootstrap over {len(bits)} problems ({BOOTSTRAP_RESAMPLES} resamples)"
        primary[run_id] = entry
        figures = run_figures(main_rec, out)
        payload = {"run_id": run_id, "status": status, "source": main_rec.source, "note": main_rec.note or None,
                   "metrics": combined, "primary_metric_source": {r.run_id: sources[r.run_id] for r in recs},
                   "seeds": per_seed if len(recs) > 1 else None, "primary": entry,
                   "summary": main_rec.summary, "config": main_rec.config, "history": main_rec.history,
                   "figures": [p.name for p in figures]}
        (out / "metrics.json").write_text(json.dumps(payload, indent=2, default=str))
        print(f"{run_id}: {status} | primary (EM at 30 min) {_fmt(entry['value'])} | {len(figures)} figures -> {out}")

    best_p, best_b = best_arm(primary, is_proposed), best_arm(primary, is_baseline)
    if best_p is None:
        notes.append("no proposed run (run id containing 'proposed') with a primary value: best_proposed and gap "
                     "are null")
    if best_b is None:
        notes.append("no baseline run (run id containing 'comparative' or 'baseline') with a primary value: "
                     "best_baseline and gap are null")
    gap = None
    if best_p and best_b:
        if best_b["value"] == 0:
            notes.append("best baseline EM is 0: the relative gap is undefined (null)")
        else:
            gap = (best_p["value"] - best_b["value"]) / best_b["value"] * 100   # EM is maximised: sign as is
    reference = best_p["run_id"] if best_p else None
    across = seed_statistics(arms, reference, [r for r in arms if is_baseline(r)])
    significance = first_seed_mcnemar(across["mcnemar_per_seed"], reference, notes)
    significance["mcnemar_per_seed"] = {
        b: {"seeds": by_seed, "significant": mcnemar_count(by_seed)[0], "tested": mcnemar_count(by_seed)[1],
            "alpha": ALPHA} for b, by_seed in across["mcnemar_per_seed"].items()}
    significance["paired_vs_best_proposed"] = {
        "reference": reference, "difference": "reference − baseline over the seeds both have (EM: positive favours "
        "the reference; loss: negative favours it)", "holm": "p-values Holm-corrected across the baselines, per "
        "metric and test (statsmodels multipletests)", "t_test": "scipy.stats.ttest_rel, two-sided",
        "wilcoxon": "scipy.stats.wilcoxon, two-sided, zero differences dropped, method 'auto' (exact null "
        "distribution up to 50 pairs; with ties or zeros, all permutations up to 13)", **across["paired"]}
    notes += consistency_notes(across["per_seed"])
    budgets = metrics.get("budget_minutes", {})
    aggregated = {
        "primary_metric": PRIMARY_METRIC,
        "metrics": metrics,
        "best_proposed": best_p,
        "best_baseline": best_b,
        "gap": gap,
        "primary_metric_key": PRIMARY_KEY,
        "primary_metric_note": ("value compared: strict dev EM (percent) at the 30-minute mark of the wall-clock "
                                "budget (summary final/em_at_30min); a run whose budget is under 30 min contributes "
                                "its EM at B, a longer run without an EM at 30 min none; primary_metric_source says "
                                "which, per run; the mean across seeds where a run has several; "
                                + ("budgets (min): " + ", ".join(f"{r}={v:g}" for r, v in budgets.items())
                                   if budgets else "budgets unknown")),
        "primary_metric_source": sources,
        "seed_groups": {r: {k: v for k, v in e.items() if k not in ("value", "bootstrap_ci95")}
                        for r, e in primary.items()},
        "bootstrap_ci95": {r: e["bootstrap_ci95"] for r, e in primary.items()},
        "per_seed": across["per_seed"],
        "significance": significance,
        "power": across["power"],
        "notes": notes,
    }
    (comparison / "aggregated_metrics.json").write_text(json.dumps(aggregated, indent=2))
    write_table(metrics, comparison)
    figs = comparison_figures(records, primary, comparison)
    print(f"comparison: {len(records)} runs, {len(figs)} figures -> {comparison}")
    print_summary(aggregated)
    return aggregated


def consistency_notes(tables: dict[str, dict]) -> list[str]:
    """What makes runs less comparable than they look: different evaluation splits, a machine that drifted."""
    notes = []
    splits = {row["eval_split"] for t in tables.values() for row in t["seeds"].values() if row["eval_split"]}
    if len(splits) > 1:
        notes.append(f"the runs were evaluated on different splits ({', '.join(sorted(splits))}): their EM values "
                     f"are not comparable")
    probes = [row["speed_probe_s"] for t in tables.values() for row in t["seeds"].values() if row["speed_probe_s"]]
    if probes and max(probes) > 1.1 * min(probes):
        notes.append(f"the machine speed probe ranges over {min(probes):.3g}-{max(probes):.3g} s across runs "
                     f"(x{max(probes) / min(probes):.2f}): runs on a slower machine had fewer steps in the same budget")
    return notes


def print_summary(agg: dict) -> None:
    """The comparison in a few lines: best arms and gap, paired differences with Holm p, McNemar per seed, spread."""
    best_p, best_b = agg["best_proposed"], agg["best_baseline"]
    if best_p and best_b:
        print(f"primary (EM at 30 min, at B for a budget < 30 min): best proposed {best_p['run_id']} "
              f"{best_p['value']:.2f}% vs best baseline {best_b['run_id']} {best_b['value']:.2f}%: gap "
              f"{_fmt(agg['gap'])}%")
    paired = agg["significance"]["paired_vs_best_proposed"]
    for baseline, row in paired.get("primary", {}).items():
        ci = f" [{row['ci95'][0]:.2f}, {row['ci95'][1]:.2f}]" if row["ci95"] else ""
        mc = agg["significance"]["mcnemar_per_seed"].get(baseline, {})
        print(f"  {paired['reference']} − {baseline}: {_fmt(row['mean_difference'])} points{ci} over "
              f"{row['n']} seed(s) | paired t p (Holm) {_fmt(row.get('t_p_holm'))} | Wilcoxon p (Holm) "
              f"{_fmt(row.get('wilcoxon_p_holm'))} | McNemar p < {ALPHA:g} on {mc.get('significant', 0)} of "
              f"{mc.get('tested', 0)} seeds" + (f" | {row['note']}" if row["note"] else ""))
    print("seed-to-seed spread: " + spread_sentence(agg["power"], "primary"))
    print("                     " + spread_sentence(agg["power"], "loss", unit=""))


def first_seed_mcnemar(by_baseline: dict[str, dict[str, dict]], reference: str | None, notes: list[str]) -> dict:
    """McNemar of the best proposed run against each baseline on the first seed both have (the key earlier
    analyses wrote; mcnemar_per_seed holds every seed); a pair that cannot be tested gets a note."""
    out = {}
    for baseline, by_seed in by_baseline.items():
        if not by_seed:
            notes.append(f"{baseline}: no seed in common with {reference}; no McNemar test")
            continue
        seed, test = min(by_seed.items(), key=lambda item: int(item[0]))
        if "p_value" in test:
            out[baseline] = {**test, "pair": [reference, baseline], "seed": int(seed)}
        else:
            notes.append(f"{baseline}: {test['skipped']} (seed {seed}, against {reference}); no McNemar test")
    return {"mcnemar_vs_best_proposed": out}


def write_table(metrics: dict[str, dict[str, float]], out: Path) -> None:
    names = list(metrics)
    runs = sorted({r for m in metrics.values() for r in m})
    rows = [[r] + [_fmt(metrics[n].get(r)) for n in names] for r in runs]
    (out / "metrics_table.csv").write_text("\n".join(",".join(row) for row in [["run_id"] + names] + rows) + "\n")
    md = ["| run_id | " + " | ".join(names) + " |", "|" + "---|" * (len(names) + 1)]
    md += ["| " + " | ".join(row) + " |" for row in rows]
    (out / "metrics_table.md").write_text("\n".join(md) + "\n")


def _fmt(v) -> str:
    return "" if v is None else f"{v:.4g}" if isinstance(v, float) else str(v)


# ----------------------------------------------------------------------------------------------------
# Command line
# ----------------------------------------------------------------------------------------------------
def parse_args(argv: list[str]) -> tuple[Path, list[str]]:
    args = {}
    for arg in argv:
        if "=" not in arg:
            raise EvaluateError(f"argument '{arg}' is not key=value: use results_dir=<path> run_ids='[\"id-1\", ...]'")
        key, value = arg.split("=", 1)
        if key not in ("results_dir", "run_ids"):
            raise EvaluateError(f"unknown argument '{key}': use results_dir=<path> run_ids='[\"id-1\", ...]'")
        args[key] = value
    missing = [k for k in ("results_dir", "run_ids") if k not in args]
    if missing:
        raise EvaluateError(f"missing {' and '.join(missing)}: use results_dir=<path> run_ids='[\"id-1\", ...]'")
    try:
        run_ids = json.loads(args["run_ids"])
    except json.JSONDecodeError:
        raise EvaluateError(f"run_ids={args['run_ids']} is not a JSON list: quote it, e.g. "
                            f"run_ids='[\"proposed-iter1-tiny-synthetic\"]'") from None
    if not isinstance(run_ids, list) or not run_ids or not all(isinstance(r, str) and r for r in run_ids):
        raise EvaluateError("run_ids must be a non-empty JSON list of run id strings, e.g. run_ids='[\"id-1\"]'")
    results_dir = Path(args["results_dir"]).expanduser()
    if results_dir.exists() and not results_dir.is_dir():
        raise EvaluateError(f"results_dir={results_dir} is a file, not a folder: give the folder the training runs "
                            f"used (a missing one is created and the runs are read from the W&B API)")
    return results_dir, list(dict.fromkeys(run_ids))


def main() -> None:
    try:
        results_dir, run_ids = parse_args(sys.argv[1:])
        try:      # a fresh machine: nothing local yet, every run comes from the W&B API
            results_dir.mkdir(parents=True, exist_ok=True)
        except OSError as err:
            raise EvaluateError(f"results_dir={results_dir} cannot be created ({err.strerror})") from None
        analyse(results_dir, run_ids)
    except EvaluateError as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
