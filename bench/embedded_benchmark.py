"""The embedded benchmark: tuning, the comparison over seeds, and a step-matched control, resumable across sittings.

    uv run python bench/embedded_benchmark.py tune  [--arms a,b] [--trials 3]      # phase 1
    uv run python bench/embedded_benchmark.py apply [--arms a,b]                   # tuned values -> run files
    uv run python bench/embedded_benchmark.py eval  [--arms a,b] [--seeds 1-5]     # phase 2
    uv run python bench/embedded_benchmark.py steps [--arms a,b] [--seeds 1-3] [--budget-steps N]   # phase 3
    uv run python bench/results_table.py bench/results/embedded/time               # the README's table

Protocol (bench/README.md has the reasons):
- tune: every arm's main knobs (its run file's `optuna.search_space`: the peak LR for every arm, plus `outer_lr`
  for GRAFF, the controller's LR for REACTOR) are searched with the project's own Optuna search, the same number
  of trials at the same budget for every arm, on the validation split (never the test split) and on the tuning
  seed 100 (never an evaluation seed).  The best values are written to bench/results/embedded/tuning.json.
- apply: writes each tuned arm's best values from tuning.json into its tiny run file, with a comment naming the
  study and its command (nothing typed by hand).
- eval: every arm on every evaluation seed (a seed fixes LoRA initialisation, data order and evaluation subset,
  so arms are paired), arms interleaved within each seed, one run at a time, the run files as committed.
- steps: the same arms with a budget of optimiser steps instead of minutes (`training.budget_steps`): every arm
  gets the same number of steps whatever its overhead, which separates an algorithm's effect from its cost.
Each finished run's compact record (bench/export_record.py) goes to bench/results/embedded/<phase>/<run_id>.json,
the files to commit; the W&B records, checkpoints and logs stay under --results (not committed).  A run whose
record exists is skipped; an interrupted run resumes from its checkpoint when the phase is started again.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import textwrap
import time
from pathlib import Path

from results_table import parse_seeds    # the seed grammar the table's --seeds reads too

REPO = Path(__file__).resolve().parent.parent
RECORDS = REPO / "bench" / "results" / "embedded"
# The table's arms, chosen so that 5 seeds fit about 3 hours of the 2-core machine at the preset's 5-minute budget
# (a run takes about 5.5 minutes with its start and final evaluation: 5 arms x 5 seeds = 25 runs, about 2.3 hours):
# GRAFF, its greedy ablation (the objective's effect), fixed LR, linear decay to the budget's end, and WSD.
ARMS = ["proposed", "ablation-greedy", "comparative-4", "comparative-6", "comparative-7"]
MORE_ARMS = ["ablation-uniform", "ablation-frozenw", "ablation-noedges", "ablation-nobudget", "comparative-1",
             "comparative-2", "comparative-3", "comparative-5", "comparative-8"]   # --arms all adds these
TUNING_SEED = 100
SUFFIX = "-iter1-tiny-synthetic"


def uv_python(*args: str, log: Path) -> int:
    """One process, its output appended to `log` (one run at a time: the machine is the measurement)."""
    log.parent.mkdir(parents=True, exist_ok=True)
    with log.open("a") as out:
        out.write(f"\n$ {' '.join(args)}   # {time.strftime('%Y-%m-%d %H:%M:%S')}\n")
        out.flush()
        return subprocess.call(["uv", "run", "python", "-u", *args], cwd=REPO, stdout=out, stderr=subprocess.STDOUT)


def run_and_record(run_id: str, results: Path, records: Path, overrides: list[str]) -> bool:
    record = records / f"{run_id}.json"
    if record.is_file():
        return False
    print(f"{time.strftime('%H:%M:%S')} {run_id} {' '.join(overrides)}", flush=True)
    code = uv_python("-m", "src.main", f"run={run_id}", f"results_dir={results}", "mode=full", "wandb.mode=offline",
                     *overrides, log=results / "logs" / f"{run_id}.log")
    if code != 0:
        print(f"  {run_id} exited with {code}; see {results / 'logs' / (run_id + '.log')}", flush=True)
        return False
    uv_python("bench/export_record.py", str(results), str(records), run_id, log=results / "logs" / "export.log")
    return True


def tune(args) -> None:
    tuning = RECORDS / "tuning.json"
    done = json.loads(tuning.read_text()) if tuning.is_file() else {}
    for arm in args.arms:
        if arm in done:
            continue
        run_id = f"{arm}{SUFFIX}-seed{TUNING_SEED}"
        print(f"{time.strftime('%H:%M:%S')} tuning {arm}: {args.trials} trials", flush=True)
        command = ["-m", "src.main", f"run={run_id}", f"results_dir={args.results / 'tune'}", "mode=full",
                   "wandb.mode=offline", f"optuna.n_trials={args.trials}", "optuna.final_run=false"]
        if uv_python(*command, log=args.results / "tune" / "logs" / f"{arm}.log") != 0:
            print(f"  tuning {arm} failed; see its log", flush=True)
            continue
        import optuna
        optuna.logging.set_verbosity(optuna.logging.WARNING)
        storage = f"sqlite:///{(args.results / 'tune' / 'optuna' / (run_id + '.db')).resolve()}"
        study = optuna.load_study(study_name=run_id, storage=storage)
        trials = [t for t in study.trials if t.state.name == "COMPLETE"]
        best = max(trials, key=lambda t: t.value)
        done[arm] = {"study": run_id, "storage": storage.replace(str(REPO) + "/", ""), "best_value": best.value,
                     "best_params": best.params, "trials": [{"number": t.number, "value": t.value,
                                                             "params": t.params} for t in trials],
                     "command": "uv run python " + " ".join(command), "date": time.strftime("%Y-%m-%d")}
        RECORDS.mkdir(parents=True, exist_ok=True)
        tuning.write_text(json.dumps(done, indent=1) + "\n")
        print(f"  {arm}: best validation EM {best.value:.1f}% with {best.params}", flush=True)


def apply(args) -> None:
    """Tuned values into the run files: the file's keys are merged with the best trial's (full dotted paths), its
    leading comment kept, and a comment naming the study added; the merged file is composed and validated."""
    from omegaconf import OmegaConf
    sys.path.insert(0, str(REPO))
    from src.main import SEARCH_ALIASES, compose, validate
    done = json.loads((RECORDS / "tuning.json").read_text())
    for arm in args.arms:
        if arm not in done:
            print(f"{arm}: not tuned yet (run the tune phase first); run file left as it is", flush=True)
            continue
        tuned = done[arm]
        path = REPO / "config" / "runs" / f"{arm}{SUFFIX}.yaml"
        lines = path.read_text().splitlines()
        header = [line for line in lines[:next(i for i, line in enumerate(lines) if not line.startswith("#"))]
                  if not line.startswith(("# Tuned:", "#   "))]
        cfg = OmegaConf.create("\n".join(lines))
        for name, value in tuned["best_params"].items():
            OmegaConf.update(cfg, SEARCH_ALIASES.get(name, name), value, force_add=True)
        text = (f"{', '.join(f'{SEARCH_ALIASES.get(k, k)}={v:.4g}' for k, v in tuned['best_params'].items())} from "
                f"study {tuned['study']} ({len(tuned['trials'])} trials, best validation EM {tuned['best_value']:.1f}%, "
                f"{tuned['date']}; bench/results/embedded/tuning.json), made by `uv run python "
                f"bench/embedded_benchmark.py tune` and written here by its `apply` phase.")
        note = textwrap.wrap(text, 116, initial_indent="# Tuned: ", subsequent_indent="#   ", break_on_hyphens=False)
        path.write_text("\n".join(header + note) + "\n" + OmegaConf.to_yaml(cfg))
        validate(*compose([f"run={arm}{SUFFIX}", "mode=full"]))
        print(f"{arm}: {path.relative_to(REPO)} <- {tuned['best_params']}", flush=True)


def evaluate(args, phase: str, overrides: list[str]) -> None:
    records = RECORDS / phase
    for seed in args.seeds:                  # arms interleaved within a seed: drift hits every arm alike
        for arm in args.arms:
            run_and_record(f"{arm}{SUFFIX}-seed{seed}", args.results / phase, records, overrides)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("phase", choices=["tune", "apply", "eval", "steps"])
    parser.add_argument("--arms", default=",".join(ARMS), help="comma-separated method tokens, or 'all'")
    parser.add_argument("--seeds", type=parse_seeds, default="1-5", help="a range or a list: 1-5, 6-8, 1,3")
    parser.add_argument("--trials", type=int, default=3)
    parser.add_argument("--budget-steps", type=int, default=600)
    parser.add_argument("--results", type=Path, default=REPO / "results" / "bench")
    args = parser.parse_args()
    args.arms = ARMS + MORE_ARMS if args.arms == "all" else args.arms.split(",")
    if args.phase == "tune":
        tune(args)
    elif args.phase == "apply":
        apply(args)
    elif args.phase == "eval":
        evaluate(args, "time", [])
    else:
        evaluate(args, "steps", [f"training.budget_steps={args.budget_steps}"])


if __name__ == "__main__":
    sys.exit(main())
