"""Write compact per-run records: what the README's results table needs, small enough to commit to git.

    uv run python bench/export_record.py <results_dir> <out_dir> [run_id ...]

For each run id and its `-seed<N>` replicates (without run ids: every run recorded under <results_dir>/wandb)
this writes <out_dir>/<run_id>.json, read through src.evaluate's own loaders (the local W&B record, or the W&B
API where there is none): the run id, its arm and seed, the config that matters (planner type and knobs,
optimiser, budget), the summary's final/*, train/*, budget/*, machine/* and eval/split values (final/correct_strict
included), the evaluation history and a downsampled train-loss and η history.  The embedded benchmark runs over
several sittings: these records are committed, the W&B folders and checkpoints are not, and
bench/results_table.py rebuilds the table from the records alone.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from src import evaluate as ev  # noqa: E402  (after the path: the bench scripts run from anywhere)

FORMAT = "graff-compact-record/1"
MAX_POINTS = 200                              # per downsampled curve
SUMMARY_PREFIXES = ("final/", "train/", "budget/", "machine/")
SUMMARY_KEYS = (ev.EVAL_SPLIT, ev.EVAL_N_PROBLEMS, ev.STATUS)
TRAIN_COLUMNS = ("_step", ev.ELAPSED, ev.BUDGET_LEFT, ev.LOSS, ev.LR)
EVAL_COLUMNS = ("_step", ev.EVAL_AT, ev.EM, ev.EVAL_PROBLEMS, ev.EVAL_LOSS)


class ExportError(Exception):
    """Bad arguments: one line on stderr, exit code 2."""


def downsample(rows: list[dict], limit: int = MAX_POINTS) -> list[dict]:
    """At most `limit` rows, evenly spaced in the row order, the first and the last always kept (rows are picked,
    never averaged: every value written is one the run logged)."""
    if len(rows) <= limit:
        return rows
    picks = sorted({round(i * (len(rows) - 1) / (limit - 1)) for i in range(limit)})
    return [rows[i] for i in picks]


def curve_value(value):
    """A curve's number at float32 precision (the shortest decimal that reads back as the same float32), which
    keeps a 200-point curve at a few kB; the values training computes in float32 (the loss) are exact."""
    import numpy as np
    return float(str(np.float32(value))) if isinstance(value, float) else value


def config_subset(config: dict) -> dict:
    """The config values that say what the run was: planner and its knobs, optimiser, budget, model, data, seed."""
    training = config.get("training") or {}
    return {"run_id": config.get("run_id"), "method": config.get("method"), "seed": config.get("seed"),
            "scheduler": training.get("scheduler"), "optimizer": training.get("optimizer"),
            "budget_minutes": training.get("budget_minutes"), "budget_steps": training.get("budget_steps"),
            "total_steps": training.get("total_steps"), "global_batch_size": training.get("global_batch_size"),
            "model": (config.get("model") or {}).get("name"),
            "dataset": (config.get("dataset") or {}).get("name"),
            "eval_split": (config.get("dataset") or {}).get("eval_split")}


def compact_record(rec: ev.RunRecord) -> dict:
    arm, seed = ev.seed_of(rec.run_id)
    summary = {k: v for k, v in sorted(rec.summary.items())
               if (k.startswith(SUMMARY_PREFIXES) or k in SUMMARY_KEYS) and not isinstance(v, (dict, list))}
    # The planner's share of the training time, the run's own mean from its full history (Σ planner time / Σ step
    # time over the steps that ran): until the tracker flushed the last step before writing the summary, W&B's
    # summary held the last step's share under this key.
    timed = [row for row in rec.history if ev._num(row.get(ev.PLANNER_TIME)) and ev._num(row.get(ev.STEP_TIME))]
    if timed and sum(row[ev.STEP_TIME] for row in timed) > 0:
        summary[ev.PLANNER_FRACTION] = (sum(row[ev.PLANNER_TIME] for row in timed)
                                        / sum(row[ev.STEP_TIME] for row in timed))
    evals = [[row.get(c) for c in EVAL_COLUMNS] for row in rec.history if ev._num(row.get(ev.EM))]
    train = [row for row in rec.history if ev._num(row.get(ev.LOSS)) and ev._num(row.get(ev.LR))]
    return {
        "format": FORMAT,
        "run_id": rec.run_id, "arm": arm, "seed": seed, "finished": rec.finished, "source": rec.source,
        "note": rec.note or None,
        "config": config_subset(rec.config),
        "summary": summary,
        "eval_history": {"columns": list(EVAL_COLUMNS), "rows": evals},
        "train_history": {"columns": list(TRAIN_COLUMNS), "of_rows": len(train),
                          "sampling": f"at most {MAX_POINTS} logged rows, evenly spaced, first and last kept; "
                                      f"values at float32 precision",
                          "rows": [[curve_value(row.get(c)) for c in TRAIN_COLUMNS] for row in downsample(train)]},
    }


def dumps(record: dict) -> str:
    """One top-level key a line: readable in a diff, compact inside (the curves stay on one line each)."""
    compact = {"separators": (",", ":"), "ensure_ascii": False}
    lines = [f"  {json.dumps(k)}: {json.dumps(v, **compact)}" for k, v in record.items()]
    return "{\n" + ",\n".join(lines) + "\n}\n"


def export(results_dir: Path, out_dir: Path, run_ids: list[str]) -> list[Path]:
    entity, project = ev.wandb_target()
    if not run_ids:
        run_ids = sorted({rid for _, _, rid, _ in ev.run_folders(results_dir)})
        if not run_ids:
            raise ExportError(f"no W&B run under {results_dir / 'wandb'}: name the run ids to read from the W&B API")
    wanted = list(dict.fromkeys(r for rid in run_ids for r in ev.replicate_ids(results_dir, rid, entity, project)))
    records = []
    for rid in wanted:
        loaded = ev.load_run(results_dir, rid, entity, project)
        if isinstance(loaded, str):
            print(f"skipped: {loaded}")
            continue
        if loaded.note:
            print(f"note: {loaded.note}")
        records.append(compact_record(loaded))
    out_dir.mkdir(parents=True, exist_ok=True)      # only now: a run that cannot be read writes nothing
    paths = []
    for record in records:
        path = out_dir / f"{record['run_id']}.json"
        path.write_text(dumps(record))
        paths.append(path)
        em = record["summary"].get(ev.FINAL_EM)
        print(f"{record['run_id']}: seed {record['seed']} | EM at B {ev._fmt(em)} | "
              f"{len(record['eval_history']['rows'])} evaluations | {path.stat().st_size / 1024:.1f} kB -> {path}")
    return paths


def main(argv: list[str]) -> int:
    try:
        if len(argv) < 2 or any(a.startswith("-") for a in argv):
            raise ExportError("usage: bench/export_record.py <results_dir> <out_dir> [run_id ...]")
        results_dir, out_dir = Path(argv[0]), Path(argv[1])
        if results_dir.exists() and not results_dir.is_dir():
            raise ExportError(f"results_dir {results_dir} is a file, not a folder")
        if out_dir.exists() and not out_dir.is_dir():
            raise ExportError(f"out_dir {out_dir} is a file, not a folder")
        export(results_dir, out_dir, argv[2:])
    except ExportError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
