"""Optuna search from the run files (issue 6): persistent, resumable, shared by workers, silent in W&B.

Most tests replace train() with a stand-in (in this process with monkeypatch, in worker processes with
tests/search_worker.py), so that what they check (trial counts, races, kills, the final run) does not depend on how
fast this machine trains; two tests run the real training.  Nothing here waits on a guess of how long something
takes: a worker is killed once it has recorded that it is inside the trial to be killed, and workers that must
start together wait for each other."""
import json
import os
import pwd
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from glob import glob
from pathlib import Path
from types import SimpleNamespace

import pytest

from src import evaluate as ev
from src import main as entry
from src.preprocess import UserError
from tests.helpers import REPO

pytestmark = pytest.mark.integration

RUN = "comparative-4-iter1-tiny-synthetic"
SMALL = ["mode=full", "wandb.mode=offline", "training.budget_minutes=0.05", "evaluation.max_problems=16",
         "evaluation.interval_steps=0", "checkpointing.interval_minutes=1"]


def study_url(results, name=RUN):
    return f"sqlite:///{results / 'optuna' / (name + '.db')}"


def trials(results=None, name=RUN, url=None):
    import optuna
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.load_study(study_name=name, storage=url or study_url(results, name))
    return study.get_trials(deepcopy=False)


def counted(all_trials):
    return [t for t in all_trials if entry.counts(t)]


def wandb_run_ids(results):
    return sorted({rid for _, _, rid, _ in ev.run_folders(results)})


def clean_env():
    return {k: v for k, v in os.environ.items() if k != "WANDB_SERVICE"}


@pytest.fixture
def fake_train(monkeypatch):
    """train() replaced in this process: records each call's config, returns an EM computed from the learning rate.
    `fail[trial number] = exception` makes that trial raise it."""
    calls, fail = [], {}

    def train(cfg, on_evaluation=None, search_info=None):
        calls.append(SimpleNamespace(cfg=cfg, search_info=search_info))
        number = int(cfg.run_id.rpartition("-trial")[2]) if "-trial" in cfg.run_id else None
        if number in fail:
            raise fail[number]
        return SimpleNamespace(final_em=100 * cfg.training.optimizer.lr_init, steps=1, status="finished")

    monkeypatch.setattr("src.train.train", train)
    return SimpleNamespace(calls=calls, fail=fail,
                           trials=lambda: [c for c in calls if "-trial" in c.cfg.run_id],
                           finals=lambda: [c for c in calls if "-trial" not in c.cfg.run_id])


@pytest.fixture
def nan_loss(monkeypatch):
    """Every training loss is NaN: the fault is injected here, in this process, not by production code."""
    from src.model import TokenLoss
    forward = TokenLoss.forward
    monkeypatch.setattr(TokenLoss, "forward", lambda self, *args, **kw: forward(self, *args, **kw) * float("nan"))


# -- the search space ----------------------------------------------------------------------------------------
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


# -- the real training -----------------------------------------------------------------------------------------
def test_three_trials_then_one_final_run_logged_to_wandb(tmp_path, capsys, monkeypatch):
    import src.train
    splits = []
    real_train = src.train.train

    def spy(cfg, **kw):
        splits.append((cfg.run_id, cfg.evaluation.split))
        return real_train(cfg, **kw)

    monkeypatch.setattr(src.train, "train", spy)
    assert entry.run([f"run={RUN}", f"results_dir={tmp_path}", "optuna.n_trials=3", *SMALL]) == 0
    out = capsys.readouterr().out
    done = [t for t in trials(tmp_path) if t.state.name == "COMPLETE"]
    assert len(done) == 3 and len({t.number for t in done}) == 3
    assert sum(line.startswith("trial ") for line in out.splitlines()) == 3   # one progress line per trial
    assert wandb_run_ids(tmp_path) == [RUN]                                   # trials are silent in W&B
    assert splits == [(f"{RUN}-trial{i}", "validation") for i in range(3)] + [(RUN, "test")]
    [path] = ev.local_segments(tmp_path, RUN)
    _, summary, config, _ = ev.read_wandb_file(path)
    best = max(done, key=lambda t: t.value)
    assert summary["search/best_trial"] == best.number and summary["search/trials_complete"] == 3
    assert config["training"]["optimizer"]["lr_init"] == pytest.approx(best.params["adapter_lr_init"])
    assert config["optuna"]["study_name"] == RUN
    # re-running the finished search runs no trial and no second final run
    assert entry.run([f"run={RUN}", f"results_dir={tmp_path}", "optuna.n_trials=3", *SMALL]) == 0
    assert len(trials(tmp_path)) == 3 and "already finished" in capsys.readouterr().out


def test_a_failing_trial_is_recorded_and_the_search_goes_on(tmp_path, nan_loss, capsys):
    # a budget that always leaves room for the two bad steps that stop a trial, however slow this machine is
    roomy = [a for a in SMALL if not a.startswith("training.budget_minutes")] + [
        "training.budget_minutes=30", "evaluation.at_start=false", "training.max_bad_steps=2"]
    with pytest.raises(entry.ConfigError, match="no completed trial"):
        entry.run([f"run={RUN}", f"results_dir={tmp_path}", "optuna.n_trials=2", *roomy])
    states = [t.state.name for t in trials(tmp_path)]
    assert states == ["FAIL", "FAIL"] and all("non-finite" in t.user_attrs["error"] for t in trials(tmp_path))
    assert capsys.readouterr().out.count("failed (") == 2


# -- one process, train() replaced -----------------------------------------------------------------------------
def test_trials_evaluate_on_validation_silently_and_the_final_run_on_test(tmp_path, fake_train, capsys):
    fake_train.fail[1] = RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB\n(details)")
    assert entry.run([f"run={RUN}", f"results_dir={tmp_path}", "optuna.n_trials=3", *SMALL]) == 0
    for call in fake_train.trials():
        cfg = call.cfg
        assert cfg.evaluation.split == "validation" and cfg.wandb.mode == "disabled"
        assert not cfg.checkpointing.enabled and cfg.run_id.startswith(f"{RUN}-trial")
    [final] = fake_train.finals()
    assert final.cfg.evaluation.split == "test" and final.cfg.wandb.mode == "offline"
    assert final.cfg.optuna.study_name == RUN
    # a failed trial counts toward n_trials, with its reason; the search went on to 3
    assert [(t.state.name, t.user_attrs.get("error")) for t in trials(tmp_path)] == [
        ("COMPLETE", None), ("FAIL", "CUDA out of memory. Tried to allocate 2.00 GiB"), ("COMPLETE", None)]
    out = capsys.readouterr().out
    assert sum(line.startswith("trial ") for line in out.splitlines()) == 3
    assert "trial 1: failed (CUDA out of memory" in out
    best = max((t for t in trials(tmp_path) if t.state.name == "COMPLETE"), key=lambda t: t.value)
    assert final.search_info["search/best_trial"] == best.number
    assert final.search_info["search/trials_complete"] == 2
    assert final.search_info["search/trials_failed_or_pruned"] == 1
    assert final.search_info["search/best/adapter_lr_init"] == best.params["adapter_lr_init"]
    assert final.cfg.training.optimizer.lr_init == best.params["adapter_lr_init"]


def test_a_user_error_in_a_trial_aborts_the_search(tmp_path, fake_train):
    fake_train.fail[0] = UserError("dataset.name=nowhere: no such data set; fix it")
    with pytest.raises(UserError, match="no such data set"):
        entry.run([f"run={RUN}", f"results_dir={tmp_path}", "optuna.n_trials=3", *SMALL])
    [trial] = trials(tmp_path)
    assert trial.state.name == "FAIL" and not entry.counts(trial)          # not counted: it is run again next time
    assert fake_train.finals() == []


def test_the_exact_count_rule():
    from optuna.trial import TrialState

    def trial(number, state, **attrs):
        return SimpleNamespace(number=number, state=getattr(TrialState, state), user_attrs=attrs)

    study = [trial(0, "COMPLETE"), trial(1, "FAIL"),                  # 1: its worker died: queued again as 3
             trial(2, "RUNNING"), trial(3, "WAITING"), trial(4, "FAIL", error="CUDA out of memory"),
             trial(5, "FAIL", surplus=True), trial(6, "PRUNED")]
    assert [entry.counts(t) for t in study] == [True, False, False, False, True, False, True]
    # with n_trials=4: trials 0, 2, 3 and 4 hold the four places; 5 and 6 came too late
    assert [entry.within_target(study, t.number, 4) for t in study] == [True] * 5 + [False] * 2
    assert entry.room_for_a_trial(study, 4)                   # trial 3 waits in the queue for a worker
    study[3].state = TrialState.RUNNING                          # a worker took it: every place is held
    assert not entry.room_for_a_trial(study, 4)


def test_a_queued_trial_beyond_the_target_is_not_run_and_the_worker_waits_for_the_last_one(tmp_path, fake_train,
                                                                                           capsys):
    """n_trials=2: trial 0 is complete, trial 1 runs in another (live) worker, trial 2 waits in the queue.  This
    worker takes trial 2 from the queue, finds it beyond the target and records it as surplus without training,
    then waits for trial 1; when that worker finishes it, the search is complete."""
    import optuna
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    (tmp_path / "optuna").mkdir()
    other = optuna.create_study(study_name=RUN, storage=study_url(tmp_path), direction="maximize")
    other.enqueue_trial({"adapter_lr_init": 0.004})
    first = other.ask()
    first.suggest_float("adapter_lr_init", 1e-3, 1e-2, log=True)
    other.tell(first, 30.0)
    running = other.ask()                     # trial 1: "another worker" runs it
    running.suggest_float("adapter_lr_init", 1e-3, 1e-2, log=True)
    other.enqueue_trial({"adapter_lr_init": 0.002})     # trial 2

    def other_worker_finishes_trial_1():
        deadline = time.time() + 120                    # (a cap, so that a broken search fails instead of hanging)
        while not any(t.number == 2 and t.state.name == "FAIL" for t in trials(tmp_path)) and time.time() < deadline:
            time.sleep(0.05)
        other.tell(running, 40.0)

    finisher = threading.Thread(target=other_worker_finishes_trial_1)
    finisher.start()
    assert entry.run([f"run={RUN}", f"results_dir={tmp_path}", "optuna.n_trials=2", *SMALL]) == 0
    finisher.join()
    states = {t.number: (t.state.name, t.user_attrs.get("surplus")) for t in trials(tmp_path)}
    assert states == {0: ("COMPLETE", None), 1: ("COMPLETE", None), 2: ("FAIL", True)}
    assert fake_train.trials() == [] and len(fake_train.finals()) == 1
    assert fake_train.finals()[0].cfg.training.optimizer.lr_init == pytest.approx(running.params["adapter_lr_init"])
    out = capsys.readouterr().out
    assert "waiting for trial(s) 1 running in other workers" in out
    assert not any(line.startswith("trial ") for line in out.splitlines())


def test_a_trial_finished_by_another_worker_meanwhile_is_dropped_and_the_search_goes_on(tmp_path, fake_train,
                                                                                         monkeypatch, capsys):
    """On SQLite, Optuna can hand one queued trial to two workers at once; the second to finish cannot record it.
    Here 'the other worker' records trial 0 while this worker trains it."""
    import optuna
    import src.train
    fake = src.train.train

    def train(cfg, **kw):
        if cfg.run_id.endswith("-trial0"):
            optuna.load_study(study_name=RUN, storage=study_url(tmp_path)).tell(0, 1.0)
        return fake(cfg, **kw)

    monkeypatch.setattr(src.train, "train", train)
    assert entry.run([f"run={RUN}", f"results_dir={tmp_path}", "optuna.n_trials=2", *SMALL]) == 0
    assert [(t.number, t.state.name) for t in trials(tmp_path)] == [(0, "COMPLETE"), (1, "COMPLETE")]
    assert trials(tmp_path)[0].value == 1.0
    out = capsys.readouterr().out
    assert "trial 0 was finished by another worker meanwhile" in out
    assert [line.split(":")[0] for line in out.splitlines() if line.startswith("trial ")] == ["trial 1"]


def test_an_interrupted_trial_runs_again_with_its_parameters_on_the_next_run(tmp_path, fake_train, capsys):
    fake_train.fail[1] = KeyboardInterrupt()
    with pytest.raises(KeyboardInterrupt):
        entry.run([f"run={RUN}", f"results_dir={tmp_path}", "optuna.n_trials=3", *SMALL])
    assert [t.state.name for t in trials(tmp_path)] == ["COMPLETE", "FAIL", "WAITING"]
    del fake_train.fail[1]
    assert entry.run([f"run={RUN}", f"results_dir={tmp_path}", "optuna.n_trials=3", *SMALL]) == 0
    all_trials = trials(tmp_path)
    assert [t.state.name for t in all_trials] == ["COMPLETE", "FAIL", "COMPLETE", "COMPLETE"]
    assert all_trials[2].params == all_trials[1].params and len(counted(all_trials)) == 3
    assert "trial 2 (retry of trial 1): EM" in capsys.readouterr().out


# -- the study file ------------------------------------------------------------------------------------------
def malformed_study(path: Path) -> None:
    import optuna
    optuna.create_study(study_name="x", storage=f"sqlite:///{path}")
    data = bytearray(path.read_bytes())
    data[100:] = os.urandom(len(data) - 100)          # the SQLite header stays, the pages are noise
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("content", ["random bytes", "text", "malformed SQLite"])
def test_an_unreadable_study_file_is_one_line_naming_it_and_the_fix(tmp_path, content, fake_train, capsys,
                                                                      monkeypatch):
    db = tmp_path / "optuna" / f"{RUN}.db"
    db.parent.mkdir()
    if content == "random bytes":
        db.write_bytes(os.urandom(4096))
    elif content == "text":
        db.write_text("trial,value\n0,31.5\n")
    else:
        malformed_study(db)
    before = db.read_bytes()
    monkeypatch.setattr(sys, "argv", ["src.main", f"run={RUN}", f"results_dir={tmp_path}", "optuna.n_trials=2",
                                      *SMALL])
    with pytest.raises(SystemExit) as exit_:
        entry.main()
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and len(err.splitlines()) == 1, err
    assert str(db) in err and "delete it" in err and "Traceback" not in err
    assert db.read_bytes() == before and fake_train.calls == []             # nothing run, nothing written


def test_an_empty_study_file_is_a_new_study(tmp_path, fake_train):
    """SQLite reads an empty file as an empty database (a worker killed while creating the study leaves one)."""
    (tmp_path / "optuna").mkdir()
    (tmp_path / "optuna" / f"{RUN}.db").write_bytes(b"")
    assert entry.run([f"run={RUN}", f"results_dir={tmp_path}", "optuna.n_trials=2", *SMALL]) == 0
    assert len(counted(trials(tmp_path))) == 2 and len(fake_train.finals()) == 1


# -- several worker processes (tests/search_worker.py: train() replaced) ----------------------------------------
def start_workers(tmp_path, count, *args, env=None, results=None):
    """`count` worker processes; each writes its output to files in tmp_path, its train() calls to tmp_path/calls."""
    record = tmp_path / "calls"
    record.mkdir(exist_ok=True)
    cmd = [sys.executable, "-u", "-m", "tests.search_worker", f"run={RUN}",
           f"results_dir={results or tmp_path / 'results'}", *SMALL, *args]
    workers = []
    for _ in range(count):
        index = len(list(tmp_path.glob("out-*")))
        out, err = (tmp_path / f"out-{index}").open("w"), (tmp_path / f"err-{index}").open("w")
        workers.append(subprocess.Popen(cmd, cwd=REPO, stdout=out, stderr=err, text=True,
                                        env={**clean_env(), "SEARCH_TEST_DIR": str(record), **(env or {})}))
        workers[-1].files = (Path(out.name), Path(err.name))
        out.close()
        err.close()
    return workers


def finish(workers, limit_s=600):
    """Wait for the workers; as soon as one fails (or time is up), stop the others and show what it said."""
    deadline = time.time() + limit_s
    while any(w.poll() is None for w in workers) and time.time() < deadline:
        if any(w.poll() not in (None, 0) for w in workers):
            break
        time.sleep(0.2)
    stopped = [w for w in workers if w.poll() is None]
    for worker in stopped:
        worker.kill()
        worker.wait()
    outputs = [(w.files[0].read_text(), w.files[1].read_text()) for w in workers]
    report = "\n".join(f"worker {i}: " + ("stopped by the test" if w in stopped else f"exit {w.returncode}")
                       + f"\n{err}{out[-2000:]}" for i, (w, (out, err)) in enumerate(zip(workers, outputs))
                       if w in stopped or w.returncode != 0 or err)
    assert not report, report
    return [out for out, _ in outputs]


def calls(tmp_path):
    return [json.loads(p.read_text()) for p in sorted((tmp_path / "calls").glob("call-*.json"))]


def check_one_finished_search(tmp_path, outputs, n, url):
    all_trials = trials(name=RUN, url=url)
    assert len(counted(all_trials)) == n                                    # exact, with workers racing for places
    assert all(t.state.name == "COMPLETE" for t in counted(all_trials))
    assert all(t.state.name == "COMPLETE" or "surplus" in t.user_attrs for t in all_trials)
    trial_calls = [c for c in calls(tmp_path) if "-trial" in c["run_id"]]
    assert sorted(c["run_id"] for c in trial_calls) == sorted(f"{RUN}-trial{t.number}" for t in counted(all_trials))
    assert all(c["split"] == "validation" and c["wandb"] == "disabled" for c in trial_calls)
    assert sum(line.startswith("trial ") for out in outputs for line in out.splitlines()) == n
    finals = [c for c in calls(tmp_path) if c["run_id"] == RUN]
    assert len(finals) == 1 and finals[0]["split"] == "test"                 # exactly one final run
    assert sum("the final run is done by worker" in out for out in outputs) == len(outputs) - 1
    return trial_calls


@pytest.mark.slow
def test_workers_started_at_the_same_instant_share_a_new_sqlite_study(tmp_path):
    """Four workers open a new study within milliseconds of each other (creating a new database raced: one worker
    died with a Traceback), take one trial each, then race for the last places of n_trials=6."""
    workers = start_workers(tmp_path, 4, "optuna.n_trials=6",
                            env={"SEARCH_TEST_OPEN_TOGETHER": "4", "SEARCH_TEST_BARRIER": "4"})
    outputs = finish(workers)
    trial_calls = check_one_finished_search(tmp_path, outputs, 6, study_url(tmp_path / "results"))
    assert len({c["pid"] for c in trial_calls}) == 4                         # every worker ran trials


def test_a_finished_final_run_is_not_run_again_by_a_worker_that_arrives_after_its_owner_exited(tmp_path,
                                                                                                monkeypatch):
    """A worker still waiting for a trial when the owner of the final run finished it and exited (seen on a 2-core
    CI machine: two final runs) leaves it done; one whose owner was killed during it takes it over."""
    import socket
    url = f"sqlite:///{tmp_path / 'study.db'}"
    gone = subprocess.Popen(["true"])
    gone.wait()
    dead = f"{socket.gethostname()}:{gone.pid}"
    monkeypatch.setattr(entry, "WORKER", dead)
    assert entry.claim_final_run(url, "a") is None and entry.claim_final_run(url, "b") is None
    entry.mark_final_run_done(url, "a")                         # a's final run finished; b's owner was killed
    monkeypatch.setattr(entry, "WORKER", f"{socket.gethostname()}:{os.getpid()}")
    assert entry.claim_final_run(url, "a") == dead              # done: no second final run
    assert entry.claim_final_run(url, "b") is None              # unfinished: this worker takes it over
    assert entry.claim_final_run(url, "b") is None              # and keeps it on a re-run in this process


@pytest.mark.slow
def test_a_killed_search_resumes_and_runs_only_the_missing_trials(tmp_path):
    """SIGKILL during trial 2 of 3; the re-run waits for trial 2's heartbeat to stop (4 heartbeats of 1 s), runs it
    again with the same parameters, and nothing else."""
    args = ["optuna.n_trials=3", "optuna.heartbeat_s=1"]
    [first] = start_workers(tmp_path, 1, *args, env={"SEARCH_TEST_BLOCK": "2"})
    blocked = tmp_path / "calls" / f"call-{RUN}-trial2-{first.pid}.json"
    deadline = time.time() + 300
    while not blocked.exists() and first.poll() is None and time.time() < deadline:
        time.sleep(0.1)
    assert blocked.exists(), first.files[1].read_text()
    first.send_signal(signal.SIGKILL)
    first.wait()
    url = study_url(tmp_path / "results")
    assert [t.state.name for t in trials(url=url)] == ["COMPLETE", "COMPLETE", "RUNNING"]

    [second] = start_workers(tmp_path, 1, *args)
    [out] = finish([second])
    all_trials = trials(url=url)
    assert [t.state.name for t in all_trials] == ["COMPLETE", "COMPLETE", "FAIL", "COMPLETE"]   # 3 trials, not 5
    assert all_trials[3].params == all_trials[2].params                      # the killed trial, run again
    assert [line for line in out.splitlines() if line.startswith("trial ")][0].startswith(
        "trial 3 (retry of trial 2): EM")
    assert sum(line.startswith("trial ") for line in out.splitlines()) == 1
    assert sorted(c["run_id"] for c in calls(tmp_path) if c["pid"] == second.pid) == [RUN, f"{RUN}-trial3"]


# -- PostgreSQL: the several-machines path, on a real server ------------------------------------------------------
def postgres_binaries() -> Path | None:
    found = shutil.which("initdb") or next(iter(sorted(glob("/usr/lib/postgresql/*/bin/initdb"))), None)
    return Path(found).resolve().parent if found else None


@pytest.fixture
def postgres_url():
    """A throwaway PostgreSQL server in a temporary folder, reached through a Unix socket (no port to collide on).
    PostgreSQL refuses to run as root: as root it runs as the user `nobody`."""
    binaries = postgres_binaries()
    if binaries is None:
        pytest.skip("PostgreSQL's server programs (initdb, pg_ctl) are not installed; .ci/run installs them")
    run_as = []
    folder = Path(tempfile.mkdtemp(prefix="graff-pg-"))
    if os.geteuid() == 0:
        if shutil.which("runuser") is None:
            pytest.skip("running as root without runuser: no way to start PostgreSQL as an ordinary user")
        nobody = pwd.getpwnam("nobody")
        os.chown(folder, nobody.pw_uid, nobody.pw_gid)
        run_as = ["runuser", "-u", "nobody", "--"]
    data = folder / "data"
    try:
        subprocess.run([*run_as, binaries / "initdb", "-D", data, "-U", "graff", "--auth=trust", "--no-sync",
                        "-E", "UTF8", "--locale=C"], check=True, capture_output=True, timeout=120)
        subprocess.run([*run_as, binaries / "pg_ctl", "-D", data, "-l", folder / "log", "-w", "-t", "60", "-o",
                        f"-k {folder} -c listen_addresses= -c fsync=off", "start"],
                       check=True, capture_output=True, timeout=120)
        yield f"postgresql://graff@/postgres?host={folder}"           # the README's form of URL
    finally:
        subprocess.run([*run_as, binaries / "pg_ctl", "-D", data, "-m", "immediate", "stop"], capture_output=True,
                       timeout=60)
        shutil.rmtree(folder, ignore_errors=True)


@pytest.mark.slow
def test_two_workers_share_one_postgresql_study(tmp_path, postgres_url):
    """Two workers (as on two machines: each its own results folder) open a new study on a PostgreSQL server at the
    same instant, take one trial each, then share the rest of n_trials=4; exactly one does the final run."""
    storage = f"optuna.storage='{postgres_url}'"          # quoted: Hydra would read its '=' as syntax
    workers = [start_workers(tmp_path, 1, "optuna.n_trials=4", storage, results=tmp_path / f"machine{i}",
                             env={"SEARCH_TEST_OPEN_TOGETHER": "2", "SEARCH_TEST_BARRIER": "2"})[0]
               for i in range(2)]
    outputs = finish(workers)
    trial_calls = check_one_finished_search(tmp_path, outputs, 4, postgres_url)
    assert len({c["pid"] for c in trial_calls}) == 2
    assert all(out.startswith("search: study") and " in postgresql://graff@/postgres" in out
               for out in outputs)
