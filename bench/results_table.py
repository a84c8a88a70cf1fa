"""Print the README's results table (Markdown) from compact run records, nothing else.

    uv run python bench/export_record.py results/bench/time bench/results/embedded/time   # embedded_benchmark.py does this
    uv run python bench/results_table.py bench/results/embedded/time
    uv run python bench/results_table.py --reference ablation-uniform bench/results/embedded/time   # Δ vs that arm
    uv run python bench/results_table.py --seeds 1-5 bench/results/embedded/time   # only those seeds' records
    uv run python bench/results_table.py --tuning bench/results/embedded/tuning.json   # the tuning trials

The records (one JSON per run and seed, written by bench/export_record.py and committed to git) are the only
input: no W&B folder, no checkpoint, no number typed by hand.  Every statistic comes from src.evaluate's own
functions (the primary value's rule, t-intervals, paired t and Wilcoxon tests with Holm's correction, McNemar
per seed, the detectable difference), so the table and `aggregated_metrics.json` agree.
"""
from __future__ import annotations

import json
import re
import statistics
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from src import evaluate as ev  # noqa: E402  (after the path: the bench scripts run from anywhere)

FORMAT = "graff-compact-record/1"
EM = "em_at_budget"          # the compared EM: the final evaluation's, at B (src.evaluate.COMPARED)
FRACTIONS = (0.10, 0.50, 0.85, 0.99)   # of the budget spent, where η is read: early, middle, decay, the end


class TableError(Exception):
    """Bad input: one line on stderr, exit code 2."""


# ----------------------------------------------------------------------------------------------------
# Reading the records
# ----------------------------------------------------------------------------------------------------
def read_records(records_dir: Path) -> list[dict]:
    if not records_dir.is_dir():
        raise TableError(f"{records_dir} is not a folder of compact records (bench/export_record.py writes them)")
    records = []
    for path in sorted(records_dir.glob("*.json")):
        try:
            record = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError) as err:
            raise TableError(f"{path} cannot be read as JSON ({err})") from None
        if not isinstance(record, dict) or record.get("format") != FORMAT:
            raise TableError(f"{path} is not a compact run record ({FORMAT}); write it with bench/export_record.py")
        records.append(record)
    if not records:
        raise TableError(f"no compact record (*.json) in {records_dir}")
    return records


def parse_seeds(text: str) -> list[int]:
    """The seeds `text` names: a range, a list or both ("1-5", "1,3,7", "1-3,7"); ValueError if it names none.
    bench/embedded_benchmark.py reads its --seeds with it too."""
    seeds: list[int] = []
    for part in text.split(","):
        lo, _, hi = part.partition("-")
        seeds += [s for s in range(int(lo), int(hi or lo) + 1) if s not in seeds]
    if not seeds:
        raise ValueError(f"{text} names no seed")
    return seeds


def select_seeds(records: list[dict], text: str) -> list[dict]:
    """Only the records of the seeds `text` names (`parse_seeds`): a table of a protocol's seeds from a folder that
    holds more."""
    try:
        wanted = set(parse_seeds(text))
    except ValueError:
        raise TableError(f"--seeds {text}: give the seeds as a range or a list, e.g. 1-5 or 1,3,7") from None
    kept = [r for r in records if r.get("seed") in wanted]
    if not kept:
        raise TableError(f"--seeds {text}: no record of those seeds")
    return kept


def arm_order(arm: str) -> tuple:
    """Proposed first, then ablations and others, then baselines; numbers in names compared as numbers."""
    kind = 0 if ev.is_proposed(arm) else 2 if ev.is_baseline(arm) else 1
    return (kind, [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", arm)])


# ----------------------------------------------------------------------------------------------------
# The table
# ----------------------------------------------------------------------------------------------------
def fmt(value, spec="{:.1f}") -> str:
    return "–" if value is None else spec.format(value)


def interval(stats: dict, spec="{:.1f}") -> str:
    ci = stats.get("ci95")
    return f"{fmt(stats['mean'], spec)} [{fmt(ci[0], spec)}, {fmt(ci[1], spec)}]" if ci else fmt(stats["mean"], spec)


def mean(values: list) -> float | None:
    values = [v for v in values if v is not None]
    return sum(values) / len(values) if values else None


def what_was_measured(summaries: list[dict]) -> tuple[str, str]:
    """(the EM's label, the loss's label), naming the split, its size and the budget the records share."""
    def values(key):
        return sorted({str(s.get(key)) for s in summaries if s.get(key) is not None}) or ["?"]
    split, n = "/".join(values(ev.EVAL_SPLIT)), "/".join(values(ev.EVAL_N_PROBLEMS))
    units = sorted({str(s.get(ev.BUDGET_UNIT, "minutes")) for s in summaries})   # a run without one: minutes
    budget = (f"B = {'/'.join(values(ev.BUDGET_STEPS))} optimiser steps" if units == ["steps"] else
              f"B = {'/'.join(f'{float(b):g}' for b in values(ev.BUDGET_MINUTES) if b != '?') or '?'} min"
              if units == ["minutes"] else "B")
    return f"strict {split} EM at {budget} ({n} problems, %)", f"{split} loss at {budget}"


def logged_mean(record: dict, column: str) -> float | None:
    """Mean of a train-history column over the record's logged rows (evenly spaced over the run's steps)."""
    history = record.get("train_history") or {}
    if column not in history.get("columns", []):
        return None
    i = history["columns"].index(column)
    return mean([row[i] for row in history.get("rows", [])])


def lr_at_fractions(record: dict) -> list[float] | None:
    """The logged η where FRACTIONS of the budget are spent, interpolated linearly in the budget left between the
    record's logged rows (a schedule's shape in four numbers); None without those columns."""
    history = record.get("train_history") or {}
    columns = history.get("columns", [])
    if ev.LR not in columns or ev.BUDGET_LEFT not in columns:
        return None
    i, j = columns.index(ev.BUDGET_LEFT), columns.index(ev.LR)
    rows = sorted((row[i], row[j]) for row in history.get("rows", []) if row[i] is not None and row[j] is not None)
    if not rows:
        return None
    left, lr = zip(*rows)
    return [float(np.interp(1.0 - f, left, lr)) for f in FRACTIONS]


def build_table(records: list[dict], reference_arm: str | None = None) -> str:
    """The tables; the paired comparison is against the best proposed arm, or against `reference_arm` (a method
    token, e.g. an ablation, to compare it with the baselines)."""
    arms: dict[str, dict[int, dict]] = {}
    planner: dict[str, str] = {}
    mean_lr: dict[str, list] = {}
    lr_shape: dict[str, list] = {}
    for record in records:
        arms.setdefault(record["arm"], {})[int(record["seed"])] = record["summary"]
        mean_lr.setdefault(record["arm"], []).append(logged_mean(record, ev.LR))
        if (shape := lr_at_fractions(record)) is not None:
            lr_shape.setdefault(record["arm"], []).append(shape)
        planner[record["arm"]] = ((record.get("config") or {}).get("scheduler") or {}).get("type") or "–"
    order = sorted(arms, key=arm_order)
    arms = {a: arms[a] for a in order}
    label, suffix = ev.short_labels(order)
    tables = {a: ev.arm_table(s) for a, s in arms.items()}
    if reference_arm is not None:
        matches = [a for a in order if label[a] == reference_arm or a == reference_arm]
        if not matches:
            raise TableError(f"--reference {reference_arm}: no such arm among the records ({', '.join(label.values())})")
        reference = matches[0]
    else:
        best = ev.best_arm(tables, ev.is_proposed, EM)
        reference = best["run_id"] if best else None
    baselines = [a for a in order if ev.is_baseline(a)]
    others = [a for a in order if not ev.is_baseline(a) and a != reference]
    # two Holm families: the baselines (the analysis' family, and its spread and power), the ablations and others
    stats = ev.seed_statistics(arms, reference, baselines)
    families = [f for f, group in ((stats, baselines), (ev.seed_statistics(arms, reference, others), others)) if group]

    run = f"run (`<token>{suffix}`)" if suffix else "run"
    em_label, loss_label = what_was_measured([s for seeds in arms.values() for s in seeds.values()])
    lines = [f"| {run} | planner | EM at B per seed (%) | mean [95% CI] | loss at B, mean [95% CI] "
             f"| optimiser steps, mean | mean η (logged), mean | planner time share "
             f"| η (logged) at {', '.join(f'{100 * f:.0f}' for f in FRACTIONS)}% of B, median over seeds |",
             "|---|---|---|---|---|---|---|---|---|"]
    for arm in order:
        t = tables[arm]
        per_seed = ", ".join(fmt(row[EM]) for row in t["seeds"].values())
        share = mean([row["planner_time_fraction"] for row in t["seeds"].values()])
        steps = mean([row["steps"] for row in t["seeds"].values()])
        shape = ", ".join(f"{statistics.median(column):.1e}" for column in zip(*lr_shape[arm])) \
            if arm in lr_shape else "–"
        lines.append(f"| {label[arm]} | {planner[arm]} | {per_seed} | {interval(t[EM])} "
                     f"| {interval(t['loss'], '{:.4g}')} | {fmt(steps, '{:.0f}')} | {fmt(mean(mean_lr[arm]), '{:.3g}')} "
                     f"| {fmt(share if share is None else 100 * share, '{:.1f}%')} | {shape} |")
    if reference is None:
        lines += ["", "No proposed arm (run id containing 'proposed') with an EM at B: no paired comparison."]
    else:
        lines += ["", f"| vs {label[reference]} (Δ = {label[reference]} − run, paired by seed) | seeds "
                      f"| Δ EM, mean [95% CI] (points) | paired t p (Holm) | Wilcoxon p (Holm) "
                      f"| Δ loss at B, mean [95% CI] | paired t p (Holm) | Wilcoxon p (Holm) "
                      f"| McNemar p < {ev.ALPHA:g}, seeds |", "|---|---|---|---|---|---|---|---|---|"]
        for family in families:
            for arm, em in family["paired"][EM].items():
                loss = family["paired"]["loss"][arm]
                significant, tested = ev.mcnemar_count(family["mcnemar_per_seed"][arm])
                lines.append(
                    f"| {label[arm]} | {em['n']} | {interval({'mean': em['mean_difference'], 'ci95': em['ci95']})} "
                    f"| {fmt(em['t_p_holm'], '{:.2g}')} | {fmt(em['wilcoxon_p_holm'], '{:.2g}')} "
                    f"| {interval({'mean': loss['mean_difference'], 'ci95': loss['ci95']}, '{:.3g}')} "
                    f"| {fmt(loss['t_p_holm'], '{:.2g}')} | {fmt(loss['wilcoxon_p_holm'], '{:.2g}')} "
                    f"| {significant} of {tested} |")
        which = "the best proposed arm" if reference_arm is None else "the reference arm"
        lines += ["", f"Δ is {label[reference]} ({which}) minus the run, over the seeds both have "
                      f"(EM: positive favours {label[reference]}; loss: negative favours it). p-values are "
                      f"Holm-corrected across the baselines, and separately across the other arms (ablations); "
                      f"paired t: scipy ttest_rel; Wilcoxon signed-rank: scipy, exact for so few seeds (its "
                      f"smallest two-sided p with n seeds is 2/2^n). McNemar: the final evaluation's per-problem "
                      f"correctness, seed by seed, uncorrected."]
    lines += ["", "Seed-to-seed spread: " + ev.spread_sentence(stats["power"], EM, label=em_label) + "; "
              + ev.spread_sentence(stats["power"], "loss", unit="", label=loss_label) + "."]
    sources = sorted({row["primary_source"] for t in tables.values() for row in t["seeds"].values()})
    lines += ["", f"EM is {em_label}. The analysis' primary value (strict EM at the 30-min mark, at B for a shorter "
                  f"wall-clock budget; none for a step budget): " + "; ".join(sources) + "."]
    return "\n".join(lines) + "\n"


def tuning_table(path: Path) -> str:
    """Every tuning trial of bench/embedded_benchmark.py's tune phase, per arm, from its tuning.json."""
    try:
        tuning = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise TableError(f"{path} cannot be read as the tune phase's JSON ({err})") from None
    lines = ["| arm | study | trial: validation EM (%) with its values | best |", "|---|---|---|---|"]
    for arm in sorted(tuning, key=arm_order):
        t = tuning[arm]
        trials = "; ".join(f"{x['number']}: {x['value']:.1f} ("
                           + ", ".join(f"{k}={v:.3g}" for k, v in x["params"].items()) + ")"
                           for x in sorted(t["trials"], key=lambda x: x["number"]))
        lines.append(f"| {arm} | {t['study']} | {trials} | {t['best_value']:.1f} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str]) -> int:
    try:
        if len(argv) == 2 and argv[0] == "--tuning":
            print(tuning_table(Path(argv[1])), end="")
            return 0
        options, rest = {}, list(argv)
        while len(rest) > 2 and rest[0] in ("--reference", "--seeds") and rest[0] not in options:
            options[rest[0]], rest = rest[1], rest[2:]
        if len(rest) != 1:
            raise TableError("usage: bench/results_table.py [--reference ARM] [--seeds 1-5] <records_dir> | "
                             "--tuning <tuning.json>")
        records = read_records(Path(rest[0]))
        if "--seeds" in options:
            records = select_seeds(records, options["--seeds"])
        print(build_table(records, options.get("--reference")), end="")
    except TableError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
