"""A short full run of embedded runs (budget, W&B offline record) followed by `evaluate` on them."""
import json
import subprocess
import sys

import pytest

from src import evaluate as ev
from src import main as entry
from src import train as tr
from src.preprocess import synthetic_problem
from tests.helpers import REPO

BUDGET_MIN = 0.5


def test_metric_names_are_defined_once_in_evaluate_and_train_writes_none_of_its_own():
    import re
    from pathlib import Path
    source = (Path(REPO) / "src" / "train.py").read_text()
    own = re.findall(r'"((?:train|eval|final|best|time|budget|machine|energy|memory|data|contamination|model)/[a-z_]+)"',
                     source)
    assert own == [], f"train.py spells metric names itself: {own}; define them in src/evaluate.py"
    assert tr.FINAL_EM is ev.FINAL_EM and tr.auc_over_budget is ev.auc_over_budget
    assert ev.SUMMARY_METRICS["dev_em_30min"][0] == ev.em_at_mark(30)


def test_offline_record_round_trip_with_the_installed_wandb(tmp_path):
    import wandb
    run = wandb.init(mode="offline", project="graff-test", id="rt-1", dir=str(tmp_path), config={"a": 1, "b": {"c": 2}},
                     settings=wandb.Settings(console="off", silent=True))
    for step in range(1, 40):
        run.log({"train/loss": 1.0 / step, "train/lr": 0.1}, step=step)
        if step % 10 == 0:
            run.log({"eval/exact_match": float(step)}, step=step)
    run.summary["final/exact_match"] = 42.5
    run.summary["final/correct_strict"] = "0110"
    run.finish()
    wandb.teardown()          # finish() may return before the file is complete; teardown waits (as train.py does)
    [path] = ev.local_segments(tmp_path, "rt-1")
    history, summary, config, finished = ev.read_wandb_file(path)
    steps = [r["_step"] for r in history]
    assert steps == list(range(1, 40)) and finished
    assert history[9]["eval/exact_match"] == 10.0 and history[9]["train/loss"] == pytest.approx(0.1)
    assert summary["final/exact_match"] == 42.5 and summary["final/correct_strict"] == "0110"
    assert config["a"] == 1 and config["b"] == {"c": 2}


def test_resumed_segments_merge_without_gap_or_duplicate():
    first = ([{"_step": s, "x": "old"} for s in range(0, 8)], {"k": 1}, {}, False)
    second = ([{"_step": s, "x": "new"} for s in range(5, 12)], {"k": 2}, {}, True)
    history, summary, _, finished = ev.merge_segments([first, second])
    assert [r["_step"] for r in history] == list(range(12))
    assert [r["x"] for r in history] == ["old"] * 5 + ["new"] * 7
    assert summary == {"k": 2} and finished
    fresh = ([{"_step": s, "x": "fresh"} for s in range(0, 3)], {"k": 3}, {}, True)
    history, summary, _, _ = ev.merge_segments([first, second, fresh])    # a re-run from scratch replaces all
    assert [r["x"] for r in history] == ["fresh"] * 3 and summary == {"k": 3}


@pytest.fixture(scope="module")
def two_full_runs(tmp_path_factory):
    results = tmp_path_factory.mktemp("full")
    outputs = {}
    mp = pytest.MonkeyPatch()
    mp.delenv("WANDB_API_KEY", raising=False)
    import random
    rng = random.Random(5)                      # a local GSM1k stand-in: the contamination check's second set
    gsm1k = results / "gsm1k.jsonl"
    gsm1k.write_text("".join(json.dumps(synthetic_problem(rng, 2)) + "\n" for _ in range(12)))
    for run_id, extra in (("comparative-5-iter1-tiny-synthetic", [f"dataset.contamination_path={gsm1k}"]),
                          ("comparative-4-iter1-tiny-synthetic", ["evaluation.periodic_problems=50"])):
        import io
        from contextlib import redirect_stdout
        buffer = io.StringIO()
        with redirect_stdout(buffer):
            code = entry.run([f"run={run_id}", f"results_dir={results}", "mode=full",
                              f"training.budget_minutes={BUDGET_MIN}", "evaluation.interval_steps=20",
                              "evaluation.max_problems=100", *extra])   # of the 1,000: the final one fits in B
        assert code == 0
        outputs[run_id] = buffer.getvalue()
    mp.undo()
    return results, outputs


@pytest.mark.integration
def test_full_run_stops_at_the_budget_and_logs_offline(two_full_runs):
    results, outputs = two_full_runs
    run_id = "comparative-5-iter1-tiny-synthetic"
    assert "logging offline instead" in outputs[run_id] and "wandb sync" in outputs[run_id]
    [path] = ev.local_segments(results, run_id)
    history, summary, config, finished = ev.read_wandb_file(path)
    assert finished and config["run_id"] == run_id and config["training"]["budget_minutes"] == BUDGET_MIN
    budget = 60 * BUDGET_MIN
    step_times = [r[tr.STEP_TIME] for r in history if tr.STEP_TIME in r]
    eval_times = [r[tr.EVAL_DURATION] for r in history if tr.EVAL_DURATION in r]
    # the budget includes evaluation: the run ends within one optimiser step of B (the final evaluation's reserve
    # is an estimate, so it may end a little before B, or past it by less than a step)
    assert summary["final/elapsed_s"] <= budget + max(step_times)
    assert budget - summary["final/elapsed_s"] <= max(step_times) + max(eval_times)
    for key in (tr.LOSS, tr.LR, tr.GRAD_NORM, tr.TOKENS_PER_S, tr.ELAPSED, tr.BUDGET_LEFT):
        assert all(key in r for r in history if tr.STEP_TIME in r), key
    evals = [r for r in history if tr.EM in r]
    assert len(evals) >= 3 and all(tr.EM_FLEX in r and tr.ELAPSED in r for r in evals)
    assert evals[0]["_step"] == 0                               # the untrained model, at step 0
    assert summary[tr.FINAL_EM] == evals[-1][tr.EM]
    assert len(summary[tr.FINAL_CORRECT]) == summary["eval/n_problems"] == 100      # evaluation.max_problems
    losses = [r[tr.LOSS] for r in history if tr.LOSS in r]
    assert sum(losses[-10:]) / 10 < sum(losses[:10]) / 10      # it learns
    assert "energy/joules" not in summary and summary["energy/available"] is False   # CPU: absent, never 0
    assert summary["contamination/n_problems"] == 12 and 0 <= summary[tr.CONTAM_EM] <= 100     # logged apart
    assert "contamination set: EM" in outputs[run_id]
    # run-level values written as the summary survive W&B writing the last step's row (same key, per-step value)
    timed = [r for r in history if tr.STEP_TIME in r and tr.PLANNER_TIME in r]
    mean_share = sum(r[tr.PLANNER_TIME] for r in timed) / sum(r[tr.STEP_TIME] for r in timed)
    assert summary[tr.PLANNER_FRACTION] == pytest.approx(mean_share, rel=1e-6)


@pytest.mark.integration
def test_periodic_evaluations_use_the_subset_and_the_final_one_the_whole_split(two_full_runs):
    results, _ = two_full_runs
    [path] = ev.local_segments(results, "comparative-4-iter1-tiny-synthetic")
    history, summary, _, _ = ev.read_wandb_file(path)
    sizes = [r[tr.EVAL_PROBLEMS] for r in history if tr.EVAL_PROBLEMS in r]
    assert sizes[0] == 50 and sizes[-1] == 100 and set(sizes[:-1]) == {50}
    assert len(summary[tr.FINAL_CORRECT]) == 100


@pytest.mark.integration
def test_evaluate_writes_every_file_for_the_runs(two_full_runs):
    results, _ = two_full_runs
    ids = ["comparative-5-iter1-tiny-synthetic", "comparative-4-iter1-tiny-synthetic", "proposed-iter1-missing"]
    proc = subprocess.run([sys.executable, "-m", "src.evaluate", f"results_dir={results}", f"run_ids={json.dumps(ids)}"],
                          cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr == ""
    assert "proposed-iter1-missing" in proc.stdout             # a missing run: one line, the rest goes on
    for run_id in ids[:2]:
        folder = results / run_id
        metrics = json.loads((folder / "metrics.json").read_text())
        assert metrics["status"] == "finished" and metrics["history"] and metrics["config"]["run_id"] == run_id
        for topic in ("learning_curve", "em_vs_time", "lr_trajectory"):
            assert (folder / f"{run_id}_{topic}.pdf").stat().st_size > 1000
    agg = json.loads((results / "comparison" / "aggregated_metrics.json").read_text())
    assert agg["primary_metric"] == "Exact-match accuracy at 30 min wall-clock."
    assert set(agg) >= {"primary_metric", "metrics", "best_proposed", "best_baseline", "gap"}
    assert agg["best_proposed"] is None and agg["gap"] is None  # no proposed run: null and a note, not a crash
    assert any("no proposed run" in n for n in agg["notes"])
    assert agg["best_baseline"]["run_id"] in ids[:2]
    values = agg["metrics"]["dev_em_at_budget"]
    assert agg["best_baseline"]["value"] == max(values.values())
    assert agg["metrics"]["budget_minutes"][ids[0]] == BUDGET_MIN
    assert ids[0] in agg["metrics"]["contamination_em"] and ids[1] not in agg["metrics"]["contamination_em"]
    for topic in ("em_bar", "em_boxplot", "em_vs_time", "lr_trajectories"):
        assert (results / "comparison" / f"comparison_{topic}.pdf").is_file()
    assert (results / "comparison" / "metrics_table.md").read_text().startswith("| run_id |")
    assert ids[1] not in agg["significance"]["mcnemar_vs_best_proposed"]


@pytest.mark.parametrize("args, message", [
    (["results_dir=pyproject.toml", 'run_ids=["a"]'], "is a file, not a folder"),
    (["results_dir=.", "run_ids=[a, b]"], "not a JSON list"),
    (["results_dir=.", 'run_ids={"a": 1}'], "non-empty JSON list"),
    (["results_dir=."], "missing run_ids"),
    ([".", '["a"]'], "not key=value"),
    (["results_dir=.", 'run_ids=["a"]', "verbose=1"], "unknown argument"),
])
def test_evaluate_refuses_bad_arguments_in_one_line(args, message):
    proc = subprocess.run([sys.executable, "-m", "src.evaluate", *args], cwd=REPO, capture_output=True, text=True,
                          timeout=60)
    assert proc.returncode == 2
    assert len(proc.stderr.strip().splitlines()) == 1 and message in proc.stderr and "Traceback" not in proc.stderr


# --- every run starts in full mode by itself: a warm-started GRAFF run produces its pre-trained planner ------------
SHRUNK_PRETRAINING = ["training.budget_steps=6", "training.episodes=2", "evaluation.max_problems=8"]


@pytest.mark.integration
@pytest.mark.parametrize("run_id", ["proposed-iter1-tiny-synthetic", "ablation-frozenw-iter1-tiny-synthetic",
                                    "proposed-iter1-Qwen3-0.6B-gsm8k"])
def test_a_warm_started_run_starts_in_full_mode_from_an_empty_results_dir(run_id, tmp_path, capsys):
    """The pipeline's command, nothing before it: the run finds (or produces, once, outside its budget) the
    pre-trained planner its run file names, and its summary says which one it used."""
    from tests.helpers import STANDIN_MODEL, gsm8k_folder
    pretraining = list(SHRUNK_PRETRAINING)
    extra = ["training.budget_minutes=0.3", "evaluation.max_problems=16", "evaluation.interval_steps=0"]
    if "Qwen3" in run_id:           # the hub is unreachable: a local stand-in of the model and of GSM8K
        data = gsm8k_folder(tmp_path / "gsm8k")
        pretraining += [f"dataset.name={data}", *[o for o in STANDIN_MODEL if o != "model.name=embedded"]]
        extra = [*STANDIN_MODEL, f"dataset.name={data}", "training.budget_minutes=1", "evaluation.max_problems=16",
                 "evaluation.interval_steps=0", "optuna.n_trials=0"]
    overrides = "[" + ",".join(f'"{o}"' for o in pretraining) + "]"
    results = tmp_path / "results"
    code = entry.run([f"run={run_id}", f"results_dir={results}", "mode=full", "wandb.mode=offline",
                      f"training.scheduler.pretrain_overrides={overrides}", *extra])
    out = capsys.readouterr().out
    assert code == 0 and "warm start: " in out and "done: " in out
    [path] = ev.local_segments(results, run_id)
    _, summary, _, finished = ev.read_wandb_file(path)
    assert finished and summary["warm_start/checkpoint"].endswith(".pt")
    assert summary["warm_start/pretraining_run"].startswith("pretrain-iter1-")


def test_a_summary_value_outlives_the_last_logged_step_under_the_same_key(tmp_path, monkeypatch):
    """W&B writes the last step's row at finish() and sets the summary from it: the tracker writes that row first,
    so the run's mean planner share is what the record keeps, not the last step's (an update step: 11%)."""
    from omegaconf import OmegaConf
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    cfg = OmegaConf.create({"run_id": "t-seed1", "wandb": {"mode": "offline", "entity": None, "project": "p",
                                                           "init_timeout_s": 60, "finish_timeout_s": 60}})
    tracker = tr.Tracker(cfg, tmp_path)
    tracker.start({"a": 1})
    tracker.summary({tr.MODEL_PARAMS: 5})
    for step in range(1, 6):
        tracker.log({tr.PLANNER_FRACTION: step / 10, tr.LOSS: 1.0}, step=step)
    tracker.summary({tr.PLANNER_FRACTION: 0.123})
    tracker.finish()
    [path] = ev.local_segments(tmp_path, "t-seed1")
    history, summary, _, finished = ev.read_wandb_file(path)
    assert finished and summary[tr.PLANNER_FRACTION] == 0.123 and summary[tr.MODEL_PARAMS] == 5
    assert [row["_step"] for row in history] == [1, 2, 3, 4, 5]         # no extra row
