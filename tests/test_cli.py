"""Smoke tests of the real command line: every run file in trial mode, and the fail-fast paths.

Runs whose model or data live on the Hugging Face hub (unreachable here and in CI) run with local stand-ins of
the same kind: `model.name=embedded` with a config-built Qwen3 of the real architecture but two small layers,
and `dataset.name` a local folder of GSM8K-format JSONL files.  Every code path but the download is exercised
(bf16 autocast, gradient checkpointing, gradient accumulation, streaming, the warm-start checkpoint).
"""
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

from src import main as entry

pytestmark = pytest.mark.integration
from tests.helpers import REPO, STANDIN_MODEL, gsm8k_folder

RUN_FILES = sorted(p.stem for p in (Path(REPO) / "config" / "runs").glob("*.yaml"))


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    return tmp_path_factory.mktemp("results")


@pytest.fixture(scope="module")
def gsm8k_standin(tmp_path_factory):
    # enough rows for a trial's steps in one epoch: 24 steps of 8 x 8 sequences, and two such episodes of the
    # planner's pre-training
    return gsm8k_folder(tmp_path_factory.mktemp("gsm8k-standin"), train=3500)


def standins(run_id: str, data: Path) -> list[str]:
    """Stand-ins for what the run would fetch from the hub, read from the run's composed config (its run file,
    presets and the schema's defaults)."""
    cfg, _ = entry.compose([f"run={run_id}", "mode=trial"])
    out = []
    if cfg.model.name != "embedded" and not Path(cfg.model.name).exists():
        out += STANDIN_MODEL
    elif cfg.model.name == "embedded" and cfg.model.embedded.layers > 4:      # the 70 M model, shrunk for CPU time
        out += ["model.parameter_count=null", *[o for o in STANDIN_MODEL if o.startswith("model.embedded.")]]
    if cfg.training.mixed_precision == "bf16":
        # bf16 autocast runs ~10x slower on a CPU than on a GPU: fewer, smaller micro-batches (still accumulated)
        out += ["training.global_batch_size=4", "training.micro_batch_size=2", "training.gradient_accumulation_steps=2"]
    if cfg.dataset.name != "synthetic" and not Path(cfg.dataset.name).exists():
        out += [f"dataset.name={data}"]
    if cfg.training.scheduler.type == "graff" and cfg.training.scheduler.warm_start_ckpt and cfg.method != "pretrain":
        pre, _ = entry.compose([f"run={entry.pretraining_run(cfg.training.scheduler.warm_start_ckpt)}", "mode=trial"])
        if pre.dataset.name != "synthetic":
            out += [f'training.scheduler.pretrain_overrides=["dataset.name={data}"]']   # its pre-training reads GSM8K
    return out


@pytest.mark.parametrize("run_id", RUN_FILES)
def test_every_run_file_runs_in_trial_mode(run_id, results, gsm8k_standin, capfd):
    argv = [f"run={run_id}", f"results_dir={results}", "mode=trial", *standins(run_id, gsm8k_standin)]
    start = time.perf_counter()
    code = entry.run(argv)
    out, err = capfd.readouterr()
    assert code == 0, out + err
    assert err.strip() == "", err                       # the pipeline fails a run on any error text in stderr
    assert "done: " in out
    paths = [line for line in out.splitlines() if line.startswith("planner learning paths run: ")]
    for path in (paths[-1].split(": ", 1)[1].split(", ") if paths else []):
        assert not path.endswith(" 0"), f"trial mode never ran the planner's {path.rsplit(' ', 1)[0]}"
    pretraining = re.findall(r"warm start: pre-training took ([0-9.]+) s", out)   # a one-off, outside the run
    episodes = min(entry.compose([f"run={run_id}", "mode=trial"])[0].training.episodes, 2)
    assert time.perf_counter() - start - sum(map(float, pretraining)) < 60 * episodes   # a minute per episode
    if "warm_start_ckpt" in (Path(REPO) / "config" / "runs" / f"{run_id}.yaml").read_text():
        assert "warm start: " in out                     # found or produced the pre-trained planner by itself
    assert not (Path(results) / "wandb").exists()        # trial mode: W&B disabled


def test_the_real_cli_trial_run_has_a_clean_stderr(tmp_path):
    proc = subprocess.run([sys.executable, "-u", "-m", "src.main", "run=comparative-5-iter1-tiny-synthetic",
                           f"results_dir={tmp_path}", "mode=trial"], cwd=REPO, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr == ""
    assert "final dev EM" in proc.stdout


def test_a_hub_model_without_network_fails_at_once_with_one_line(tmp_path):
    env = {**{k: v for k, v in os.environ.items() if k != "WANDB_SERVICE"}, "HF_HUB_OFFLINE": "1"}
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "src.main", "run=proposed-iter1-Qwen3-0.6B-gsm8k",
                           f"results_dir={tmp_path}", "mode=trial"], cwd=REPO, capture_output=True, text=True,
                          env=env, timeout=300)
    assert proc.returncode != 0
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "unreachable" in lines[0] and "Traceback" not in proc.stderr
    assert time.perf_counter() - start < 60
    assert not any(tmp_path.iterdir()) or not (tmp_path / "wandb").exists()
