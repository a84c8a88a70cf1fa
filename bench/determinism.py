"""Determinism of the training step: the same steps twice from the same state and seed, compared bit for bit.

    uv run python bench/determinism.py [--run RUN_ID] [--steps N] [--planners a,b] [--out FILE] [override ...]

For each planner, runs `--steps` optimiser steps (src.train's `optimiser_step`, the loop's own step) twice: both
times from the same LoRA weights, with the same batches, after `torch.manual_seed(seed)` (LoRA dropout draws
from it), and with a clock that reads `step x 1 s`, so that nothing depends on timing (planners that read the
clock are deterministic only given the clock: see README, "When things go wrong").  It records the largest
difference between the two runs' losses, learning rates and final LoRA weights: 0.0 means bit-identical.
On a CPU this is what tests/test_robustness.py asserts for a whole run; on a GPU it measures what cuBLAS, the
attention kernels and atomics do to it (bench/gpu_checks.sh runs it there).
"""
from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch
from omegaconf import OmegaConf

from src.main import PLANNER_KNOBS, apply_mode, compose, validate
from src.model import PLANNERS, StepContext, TokenLoss, adapter_graph, build_model, frequent_tokens
from src.preprocess import PromptFormat, TrainStream, prepare_hub_access
from src.train import make_autocast, optimiser_step, pick_device


class StepClock:
    """Stands in for the budget clock: reads whatever the loop below sets (seconds), never the wall clock."""
    def __init__(self):
        self.now = 0.0

    def elapsed(self) -> float:
        return self.now


def run_once(cfg, loaded, kind, batches, initial, device, autocast):
    """`len(batches)` optimiser steps from `initial`; returns the losses, the η_t and the final LoRA weights."""
    with torch.no_grad():
        for n, p in loaded.peft.named_parameters():
            if n in initial:
                p.copy_(initial[n])
    torch.manual_seed(cfg.seed)
    t = cfg.training
    lm = TokenLoss(loaded.peft)
    params = [p for p in loaded.peft.parameters() if p.requires_grad]
    knobs = OmegaConf.masked_copy(t.scheduler, list(PLANNER_KNOBS[kind]))
    knobs.update({"warm_start_ckpt": None} if kind == "graff" else {})
    planner = PLANNERS[kind](knobs, t.optimizer, lm, params, adapter_graph(loaded.peft))
    optimizer = planner.make_optimizer()
    lm.probe_ids = frequent_tokens([mb for step in batches[:4] for mb in step], t.probe_vocab).to(device) \
        if planner.uses_probe else None
    clock = StepClock()
    losses, etas = [], []
    for i, micro in enumerate(batches):
        clock.now = float(i)
        ctx = StepContext(step=i, elapsed_s=clock.now, budget_s=len(batches) + 1.0, horizon_s=len(batches) + 1.0)
        result = optimiser_step(lm, planner, optimizer, params, micro, device, autocast, t.clip_grad_norm, ctx,
                                clock, False)
        losses.append(result.loss)
        etas.append(result.eta)
    lm.core.model.layers[0]._forward_hooks.clear()
    final = {n: p.detach().float().cpu().clone() for n, p in loaded.peft.named_parameters() if n in initial}
    return losses, etas, final


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run", default="proposed-iter1-tiny-synthetic")
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--planners", default="constant,graff")
    parser.add_argument("--out", default=None)
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args()
    cfg, explicit = compose([f"run={args.run}", "results_dir=/tmp/graff-bench", "mode=full", "wandb.mode=disabled",
                             *args.overrides])
    validate(cfg, explicit)
    apply_mode(cfg, explicit)
    prepare_hub_access([cfg.model.name, cfg.dataset.name])
    device = pick_device(cfg.training.device)
    autocast = make_autocast(device, cfg.training.mixed_precision)
    t = cfg.training
    loaded = build_model(cfg.model, t.gradient_checkpointing, device)
    stream = TrainStream(cfg.dataset, PromptFormat(loaded.tokenizer), t.micro_batch_size, cfg.dataset.max_tokens,
                         cfg.seed, 1000)
    batches = [[stream.next() for _ in range(t.gradient_accumulation_steps)] for _ in range(args.steps)]
    initial = {n: p.detach().clone() for n, p in loaded.peft.named_parameters() if p.requires_grad}
    rows = []
    for kind in args.planners.split(","):
        (l1, e1, w1), (l2, e2, w2) = (run_once(cfg, loaded, kind, batches, initial, device, autocast)
                                      for _ in range(2))
        row = {"planner": kind, "losses": [l1, l2], "etas": [e1, e2],
               "max_loss_diff": max(abs(a - b) for a, b in zip(l1, l2)),
               "max_eta_diff": max(abs(a - b) for a, b in zip(e1, e2)),
               "max_weight_diff": max(float((w1[n] - w2[n]).abs().max()) for n in w1)}
        row["bit_identical"] = row["max_loss_diff"] == row["max_eta_diff"] == row["max_weight_diff"] == 0.0
        rows.append(row)
        print(f"{kind:10s} {'bit-identical' if row['bit_identical'] else 'DIFFERENT':14s} | largest difference: "
              f"loss {row['max_loss_diff']:.3g}, η {row['max_eta_diff']:.3g}, LoRA weight "
              f"{row['max_weight_diff']:.3g} after {args.steps} steps", flush=True)
    record = {"run": args.run, "overrides": args.overrides, "steps": args.steps, "device": str(device),
              "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor()
              or platform.machine(), "torch": torch.__version__, "date": time.strftime("%Y-%m-%d"),
              "results": rows}
    if args.out:
        Path(args.out).write_text(json.dumps(record, indent=2) + "\n")
        print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
