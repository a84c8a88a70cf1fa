"""A search worker for the multi-process tests of test_search.py:

    python -m tests.search_worker run=<run_id> results_dir=<path> ... (the arguments of src.main)

It is src.main with train() replaced by a stand-in that takes a fixed time and returns an EM computed from the
learning rate, so that what those tests check (the trial count, workers starting together, kills, the final run)
does not depend on how fast this machine trains.  Each call of train() is recorded as a JSON file in
$SEARCH_TEST_DIR: run id, pid, evaluation split, W&B mode, checkpointing, learning rate.  Optional controls:

  SEARCH_TEST_TRIAL_S        seconds a trial takes (default 0.2)
  SEARCH_TEST_OPEN_TOGETHER  the worker opens the study only once this many workers are ready to: all of them
                             within milliseconds, which is when creating a new database races
  SEARCH_TEST_BARRIER        a trial waits (300 s at most) until this many workers have started a trial, so that
                             every worker runs at least one
  SEARCH_TEST_BLOCK          the trial with this number never ends (the test kills the worker during it)
"""
import json
import math
import os
import sys
import time
from pathlib import Path
from types import SimpleNamespace

from src import main as entry

DIR = Path(os.environ["SEARCH_TEST_DIR"])


def wait_for(enough, limit_s: float = 300.0) -> None:
    deadline = time.time() + limit_s
    while not enough() and time.time() < deadline:
        time.sleep(0.001)


def fake_train(cfg, on_evaluation=None, search_info=None):
    record = {"run_id": cfg.run_id, "pid": os.getpid(), "split": cfg.evaluation.split, "wandb": cfg.wandb.mode,
              "checkpointing": cfg.checkpointing.enabled, "lr": cfg.training.optimizer.lr_init}
    path = DIR / f"call-{cfg.run_id}-{os.getpid()}.json"
    path.with_suffix(".tmp").write_text(json.dumps(record))
    path.with_suffix(".tmp").replace(path)                  # whole, for the other workers reading it
    is_trial = "-trial" in cfg.run_id
    if is_trial and cfg.run_id.rpartition("-trial")[2] == os.environ.get("SEARCH_TEST_BLOCK"):
        while True:
            time.sleep(1)
    if is_trial and "SEARCH_TEST_BARRIER" in os.environ:
        def workers_with_a_trial():
            return {json.loads(p.read_text())["pid"] for p in DIR.glob("call-*-trial*.json")}
        wait_for(lambda: len(workers_with_a_trial()) >= int(os.environ["SEARCH_TEST_BARRIER"]))
    time.sleep(float(os.environ.get("SEARCH_TEST_TRIAL_S", "0.2")))
    em = 50.0 - 10.0 * abs(math.log10(cfg.training.optimizer.lr_init) + 2.5)
    return SimpleNamespace(final_em=em, steps=1, status="finished", history=[])


def open_together(real_open):
    def opened(cfg, url, name):
        (DIR / f"ready-{os.getpid()}").touch()
        wait_for(lambda: len(list(DIR.glob("ready-*"))) >= int(os.environ["SEARCH_TEST_OPEN_TOGETHER"]))
        return real_open(cfg, url, name)
    return opened


if __name__ == "__main__":
    import src.train
    src.train.train = fake_train
    if "SEARCH_TEST_OPEN_TOGETHER" in os.environ:
        entry.open_study = open_together(entry.open_study)
    sys.argv = ["src.main", *sys.argv[1:]]
    entry.main()
