"""Optuna search from the run files (issue 6): persistent, resumable, shared by workers, silent in W&B."""
import os
import signal
import subprocess
import sys
import time

import pytest

from src import evaluate as ev
from src import main as entry
from tests.helpers import REPO, inject_nan

pytestmark = pytest.mark.integration

RUN = "comparative-4-iter1-tiny-synthetic"
SMALL = ["mode=full", "wandb.mode=offline", "training.budget_minutes=0.05", "evaluation.max_problems=16",
         "evaluation.interval_steps=0", "checkpointing.interval_minutes=1"]


def trials(results, name=RUN):
    import optuna
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.load_study(study_name=name, storage=f"sqlite:///{results / 'optuna' / (name + '.db')}")
    return study.get_trials(deepcopy=False)


def wandb_run_ids(results):
    return sorted({rid for _, _, rid, _ in ev.run_folders(results)})


def clean_env():
    return {k: v for k, v in os.environ.items() if k != "WANDB_SERVICE"}


def test_the_seed_short_names_map_to_config_paths():
    cfg, explicit = entry.compose(["run=proposed-iter1-Qwen3-0.6B-gsm8k", "results_dir=/tmp/x", "mode=trial"])
    paths = {name: entry.resolve_search_path(name, cfg) for name in cfg.optuna.search_space}
    assert paths == {"adapter_lr_init": "training.optimizer.lr_init", "graff_outer_lr": "training.scheduler.outer_lr",
                     "lora_r": "model.lora.r"}
    tuned = entry.with_params(cfg, {"adapter_lr_init": 3e-4, "lora_r": 32, "graff_outer_lr": 2e-3})
    assert tuned.training.optimizer.lr_init == 3e-4 and tuned.model.lora.r == 32
    assert tuned.training.scheduler.outer_lr == 2e-3


def test_a_search_space_path_that_is_not_a_config_path_is_refused_before_training(tmp_path):
    with pytest.raises(entry.ConfigError, match="'adapter_lr' is not a config path"):
        cfg, explicit = entry.compose([f"run={RUN}", f"results_dir={tmp_path}", "mode=full",
                                       "+optuna.search_space.adapter_lr={type: uniform, low: 0.1, high: 1}"])
        entry.validate(cfg, explicit)
    assert not (tmp_path / "optuna").exists()


def test_three_trials_then_one_final_run_logged_to_wandb(tmp_path, capsys):
    assert entry.run([f"run={RUN}", f"results_dir={tmp_path}", "optuna.n_trials=3", *SMALL]) == 0
    out = capsys.readouterr().out
    done = [t for t in trials(tmp_path) if t.state.name == "COMPLETE"]
    assert len(done) == 3 and len({t.number for t in done}) == 3
    assert sum(line.startswith("trial ") for line in out.splitlines()) == 3   # one progress line per trial
    assert wandb_run_ids(tmp_path) == [RUN]                                   # trials are silent in W&B
    [path] = ev.local_segments(tmp_path, RUN)
    _, summary, config, _ = ev.read_wandb_file(path)
    best = max(done, key=lambda t: t.value)
    assert summary["search/best_trial"] == best.number and summary["search/trials_complete"] == 3
    assert config["training"]["optimizer"]["lr_init"] == pytest.approx(best.params["adapter_lr_init"])
    assert config["optuna"]["study_name"] == RUN
    # re-running the finished search runs no trial and no second final run
    assert entry.run([f"run={RUN}", f"results_dir={tmp_path}", "optuna.n_trials=3", *SMALL]) == 0
    assert len(trials(tmp_path)) == 3 and "already finished" in capsys.readouterr().out


@pytest.mark.slow
def test_a_killed_search_resumes_and_runs_only_the_missing_trials(tmp_path):
    cmd = [sys.executable, "-u", "-m", "src.main", f"run={RUN}", f"results_dir={tmp_path}", "optuna.n_trials=3",
           *SMALL]
    first = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=clean_env())
    deadline = time.time() + 240
    while time.time() < deadline:
        try:
            if sum(t.state.name == "COMPLETE" for t in trials(tmp_path)) >= 2:
                break
        except Exception:       # the study does not exist yet
            pass
        time.sleep(0.3)
    first.send_signal(signal.SIGKILL)
    first.wait()
    complete_before = sum(t.state.name == "COMPLETE" for t in trials(tmp_path))
    assert complete_before in (2, 3)
    second = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300, env=clean_env())
    assert second.returncode == 0 and second.stderr == "", second.stderr
    done = [t for t in trials(tmp_path) if t.state.name == "COMPLETE"]
    assert len(done) == 3                                            # 3 trials, not 5
    assert sum(line.startswith("trial ") for line in second.stdout.splitlines()) == 3 - complete_before
    assert wandb_run_ids(tmp_path) == [RUN]


@pytest.mark.slow
def test_two_workers_share_one_sqlite_study(tmp_path):
    cmd = [sys.executable, "-u", "-m", "src.main", f"run={RUN}", f"results_dir={tmp_path}", "optuna.n_trials=4",
           *SMALL]
    workers = [subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                env=clean_env()) for _ in range(2)]
    outputs = [w.communicate(timeout=600) for w in workers]
    assert all(w.returncode == 0 for w in workers), [o[1] for o in outputs]
    assert all(err == "" for _, err in outputs)
    done = [t for t in trials(tmp_path) if t.state.name == "COMPLETE"]
    assert len(trials(tmp_path)) == 4 and len({t.number for t in done}) == 4
    per_worker = [sum(line.startswith("trial ") for line in out.splitlines()) for out, _ in outputs]
    assert sum(per_worker) == 4 and min(per_worker) >= 1                # both workers ran trials
    assert wandb_run_ids(tmp_path) == [RUN] and len(ev.local_segments(tmp_path, RUN)) == 1   # one final run


def test_a_failing_trial_is_recorded_and_the_search_goes_on(tmp_path, monkeypatch, capsys):
    inject_nan(monkeypatch, set(range(1000)))
    with pytest.raises(entry.ConfigError, match="no completed trial"):
        entry.run([f"run={RUN}", f"results_dir={tmp_path}", "optuna.n_trials=2", "training.max_bad_steps=2", *SMALL])
    states = [t.state.name for t in trials(tmp_path)]
    assert states == ["FAIL", "FAIL"] and all("error" in t.user_attrs for t in trials(tmp_path))
    assert capsys.readouterr().out.count("failed (") == 2
