"""The configuration: every run file composes, each planner's settings are a typed group, run files hold only what
differs from what they would get anyway, and the W&B destination follows its precedence (fast: no torch)."""
from pathlib import Path

import pytest
import yaml
from omegaconf import OmegaConf

from src import main as entry
from tests.helpers import REPO

RUNS = sorted(p.stem for p in (Path(REPO) / "config" / "runs").glob("*.yaml"))
SEED_RUNS = {"proposed-iter1-Qwen3-0.6B-gsm8k", "comparative-1-iter1-Qwen3-0.6B-gsm8k"}   # the seed's files, verbatim


@pytest.mark.parametrize("mode", ["trial", "full"])
def test_every_run_file_composes_and_validates(mode):
    for run in RUNS:
        cfg, explicit = entry.compose([f"run={run}", "results_dir=/tmp/graff-config-test", f"mode={mode}"])
        entry.validate(cfg, explicit)
        assert cfg.run_id == run and cfg.training.scheduler.type == entry.METHOD_PLANNER[cfg.method]


def test_each_planner_gets_its_own_typed_group_and_nothing_else():
    for run in RUNS:
        cfg, _ = entry.compose([f"run={run}", "mode=trial"])
        kind = cfg.training.scheduler.type
        assert sorted(k for k in cfg.training.scheduler if k != "type") == sorted(entry.knobs_of(kind)), run


def test_a_seed_suffix_sets_the_seed_of_the_same_file():
    cfg, _ = entry.compose(["run=comparative-6-iter1-tiny-synthetic-seed7", "mode=trial"])
    assert cfg.seed == 7 and cfg.run_id == "comparative-6-iter1-tiny-synthetic-seed7"


def _without_run_file(run: str):
    """What a run file's keys would be without the file: schema defaults < config.yaml < its presets."""
    text = yaml.safe_load((Path(REPO) / "config" / "runs" / f"{run}.yaml").read_text())
    kind = (text.get("training", {}).get("scheduler", {}) or {}).get("type") or entry.METHOD_PLANNER[text["method"]]
    base = OmegaConf.structured(entry.Config)
    base.training.scheduler = OmegaConf.structured(entry.SCHEDULERS[kind])
    base = OmegaConf.merge(base, {"wandb": yaml.safe_load((Path(REPO) / "config" / "config.yaml").read_text())["wandb"]})
    for include in text.get("defaults", []):
        if isinstance(include, str) and include.startswith("/presets/"):
            name = include.split("@")[0].removeprefix("/presets/")
            base = OmegaConf.merge(base, OmegaConf.load(Path(REPO) / "config" / "presets" / f"{name}.yaml"))
    return text, base


@pytest.mark.parametrize("run", [r for r in RUNS if r not in SEED_RUNS])
def test_a_run_file_holds_only_what_differs(run):
    text, base = _without_run_file(run)
    text.pop("defaults", None)
    repeats = []
    for key in entry._leaf_paths(text):
        if key in ("run_id", "method") or key.startswith("optuna.search_space"):
            continue
        if OmegaConf.select(base, key, default="<absent>") == OmegaConf.select(OmegaConf.create(text), key):
            repeats.append(key)
    assert not repeats, f"{run} repeats what it would get anyway: {repeats}"


def test_the_wandb_destination_is_config_then_environment_then_command_line(monkeypatch):
    base = yaml.safe_load((Path(REPO) / "config" / "config.yaml").read_text())["wandb"]
    assert base == {"entity": "gengaru617-personal", "project": "2025-1108-1"}
    run = "comparative-4-iter1-tiny-synthetic"
    monkeypatch.delenv("WANDB_ENTITY", raising=False)
    monkeypatch.delenv("WANDB_PROJECT", raising=False)
    cfg, _ = entry.compose([f"run={run}", "mode=full"])
    assert (cfg.wandb.entity, cfg.wandb.project) == ("gengaru617-personal", "2025-1108-1")
    monkeypatch.setenv("WANDB_ENTITY", "someone")
    monkeypatch.setenv("WANDB_PROJECT", "elsewhere")
    cfg, _ = entry.compose([f"run={run}", "mode=full"])
    assert (cfg.wandb.entity, cfg.wandb.project) == ("someone", "elsewhere")
    cfg, _ = entry.compose([f"run={run}", "mode=full", "wandb.project=mine"])
    assert (cfg.wandb.entity, cfg.wandb.project) == ("someone", "mine")


def test_the_seed_run_files_compose_as_the_seed_wrote_them():
    """The pipeline may supply the seed's run files verbatim (no defaults list, every key spelt out)."""
    for run in SEED_RUNS:
        text = yaml.safe_load((Path(REPO) / "config" / "runs" / f"{run}.yaml").read_text())
        assert "defaults" not in text and text["training"]["scheduler"]["type"] in entry.SCHEDULERS
        cfg, explicit = entry.compose([f"run={run}", "mode=full"])
        entry.validate(cfg, explicit)
        assert cfg.model.lora.r == 64 and cfg.training.optimizer.lr_init == 2e-4


def test_a_knob_of_another_planner_is_refused_by_the_schema():
    with pytest.raises(entry.ConfigError, match="scheduler 'linear' does not read it"):
        entry.compose(["run=comparative-6-iter1-tiny-synthetic", "mode=trial", "training.scheduler.outer_lr=1"])
    with pytest.raises(entry.ConfigError, match="'training.scheduler.outer_lr' is not read by scheduler 'linear'"):
        cfg, _ = entry.compose(["run=comparative-6-iter1-tiny-synthetic", "mode=trial",
                                "+optuna.search_space.graff_outer_lr={type: uniform, low: 0.1, high: 1}"])
        entry.validate(cfg, set())


ABLATION_SWITCH = {"ablation-greedy": {"objective"}, "ablation-uniform": {"token_multipliers"},
                   "ablation-frozenw": {"freeze"}, "ablation-nobudget": {"use_budget"},
                   "ablation-noedges": {"use_edges"}}


@pytest.mark.parametrize("suffix", ["iter1-tiny-synthetic", "iter1-Qwen3-0.6B-gsm8k"])
@pytest.mark.parametrize("arm", sorted(ABLATION_SWITCH))
def test_an_ablation_differs_from_graff_only_in_its_switch(arm, suffix):
    """What an ablation measures is its switch alone: every other GRAFF setting (the token multipliers' bound and
    sequences included) is the proposed run's; only the tuned knobs and the warm-start file may differ."""
    proposed, _ = entry.compose([f"run=proposed-{suffix}", "mode=full"])
    ablation, _ = entry.compose([f"run={arm}-{suffix}", "mode=full"])
    mine, theirs = (OmegaConf.to_container(c.training.scheduler) for c in (ablation, proposed))
    differ = {k for k in mine if mine[k] != theirs[k]} - {"outer_lr", "warm_start_ckpt"}
    assert differ == ABLATION_SWITCH[arm]
