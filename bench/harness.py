"""What the bench scripts share: the run's model and data built as training builds them, a planner set up from
scratch on the same weights, and the record each script writes."""
from __future__ import annotations

import json
import platform
import sys
import time
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch
from omegaconf import OmegaConf

from src.main import SCHEDULERS, apply_mode, compose, validate
from src.model import LoadedModel, Planner, StepContext, build_model, build_planner
from src.preprocess import PromptFormat, TrainStream, prepare_hub_access
from src.train import Budget, make_autocast, pick_device


@dataclass
class Bench:
    cfg: object                  # the composed, validated config of the run (mode=full, W&B disabled)
    device: torch.device
    autocast: object             # the training loop's autocast context factory
    loaded: LoadedModel
    stream: TrainStream          # the run's training micro-batches, in training order
    initial: dict                # the LoRA weights as built: every planner starts from them
    planner: Planner | None = None   # the planner set up last (its probe hook is removed before the next one)

    def batches(self, steps: int) -> list:
        """The micro-batches of `steps` optimiser steps."""
        accum = self.cfg.training.gradient_accumulation_steps
        return [[self.stream.next() for _ in range(accum)] for _ in range(steps)]


def setup(run: str, overrides: list[str]) -> Bench:
    """Compose the run's config with the overrides (refused as the CLI refuses them) and build its model and data."""
    cfg, explicit = compose([f"run={run}", "results_dir=/tmp/graff-bench", "mode=full", "wandb.mode=disabled",
                             *overrides])
    validate(cfg, explicit)
    apply_mode(cfg, explicit)
    prepare_hub_access([cfg.model.name, cfg.dataset.name])
    t = cfg.training
    device = pick_device(t.device)
    torch.manual_seed(cfg.seed)      # as training does: the LoRA initialisation is drawn from the seeded generator
    loaded = build_model(cfg.model, t.gradient_checkpointing, device)
    stream = TrainStream(cfg.dataset, PromptFormat(loaded.tokenizer), t.micro_batch_size, cfg.dataset.max_tokens,
                         cfg.seed, 1000)
    initial = {n: p.detach().clone() for n, p in loaded.peft.named_parameters() if p.requires_grad}
    return Bench(cfg, device, make_autocast(device, t.mixed_precision), loaded, stream, initial)


def fresh_planner(bench: Bench, kind: str, batches: list, knob_overrides: dict | None = None) -> Planner:
    """The LoRA weights reset to `bench.initial` and a new planner of `kind` built by training's own
    build_planner: the run's settings for that planner when it is the run's own, else its defaults, GRAFF cold
    (no warm start), then `knob_overrides`; the probe's sub-vocabulary from `batches` as the loop picks it."""
    peft, t = bench.loaded.peft, bench.cfg.training
    with torch.no_grad():
        for n, p in peft.named_parameters():
            if n in bench.initial:
                p.copy_(bench.initial[n])
    if bench.planner is not None:
        bench.planner.token_loss.close()
    training = OmegaConf.create(OmegaConf.to_container(t))
    own = OmegaConf.to_container(t.scheduler) if t.scheduler.type == kind else {}
    training.scheduler = OmegaConf.merge(OmegaConf.structured(SCHEDULERS[kind]), own,
                                         {"warm_start_ckpt": None} if kind == "graff" else {}, knob_overrides or {})
    torch.manual_seed(bench.cfg.seed)   # a cold GRAFF's encoder is drawn from it: every planner, every process alike
    bench.planner = build_planner(peft, training, probe_batches=[mb for step in batches[:4] for mb in step])
    return bench.planner


def steps_clock_context(step: int, total: int) -> StepContext:
    """The context of step `step` of a budget of `total` steps (a clock that counts steps, not seconds)."""
    budget = Budget(total, "steps")
    budget.steps_done = step
    budget.last = budget.now()
    return StepContext(step=step, elapsed=budget.last, budget_left=budget.fraction_left(),
                       progress=budget.progress(), steps_left=budget.steps_left())


def write_record(out: str | None, device: torch.device, fields: dict) -> dict:
    """`fields` with the machine, torch version and date; written as JSON to `out` when given."""
    record = {**fields, "device": str(device),
              "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor()
              or platform.machine(), "threads": torch.get_num_threads(), "torch": torch.__version__,
              "date": time.strftime("%Y-%m-%d")}
    if out:
        Path(out).write_text(json.dumps(record, indent=2) + "\n")
        print(f"wrote {out}")
    return record
