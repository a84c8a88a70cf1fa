"""Planner overhead: time per optimiser step and the share spent inside the planner, for each planner.

    uv run python bench/planner_overhead.py [--run RUN_ID] [--steps N] [--warmup N] [--planners a,b]
                                           [--no-variants] [--out FILE] [override ...]

Builds the run's model and data exactly as training does (src.main composes the config, src.train's
`optimiser_step` runs the step), then times `--steps` optimiser steps per planner after `--warmup` warm-up steps,
on the same batches for every planner.  Before any of them, `--warmup` steps with fixed LR warm the device up
(on a GPU, the first planner's steps were twice as slow without this).  With GRAFF among the planners it also times GRAFF with fewer JVP
sequences (jvp_sequences 0 and 2), unless `--no-variants`.  "planner share" is the time inside the planner's
calls (the first-layer probe, token weights, plan, after_step), measured by the loop's own stopwatch
(synchronised on a GPU).

On a GPU, the Qwen3-0.6B architecture is timed without the hub on a local folder of the same shape (random
weights, the full 151,936-word vocabulary; timing does not depend on the weights), as bench/gpu_checks.sh does:
    uv run python bench/qwen3_shape.py --out .cache/qwen3-0.6b-shape
    uv run python bench/planner_overhead.py --run proposed-iter1-Qwen3-0.6B-gsm8k \
        model.name=.cache/qwen3-0.6b-shape dataset.name=synthetic
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
from src.train import BudgetClock, make_autocast, optimiser_step, pick_device

ALL = ["constant", "cosine", "linear", "wsd", "schedulefree", "salelr", "bats", "reactor", "graff"]


def measure(cfg, kinds, steps, warmup, graff_variants):
    device = pick_device(cfg.training.device)
    autocast = make_autocast(device, cfg.training.mixed_precision)
    t = cfg.training
    loaded = build_model(cfg.model, t.gradient_checkpointing, device)
    fmt = PromptFormat(loaded.tokenizer)
    stream = TrainStream(cfg.dataset, fmt, t.micro_batch_size, cfg.dataset.max_tokens, cfg.seed, 1000)
    batches = [[stream.next() for _ in range(t.gradient_accumulation_steps)] for _ in range(steps + warmup)]
    initial = {n: p.detach().clone() for n, p in loaded.peft.named_parameters() if p.requires_grad}
    rows = []
    for kind, label, overrides in [("constant", None, {})] + [(k, k, {}) for k in kinds] + graff_variants:
        with torch.no_grad():                                   # every planner starts from the same weights
            for n, p in loaded.peft.named_parameters():
                if n in initial:
                    p.copy_(initial[n])
        lm = TokenLoss(loaded.peft)
        params = [p for p in loaded.peft.parameters() if p.requires_grad]
        knobs = OmegaConf.masked_copy(cfg.training.scheduler, list(PLANNER_KNOBS[kind]))
        knobs.update({"warm_start_ckpt": None} if kind == "graff" else {})
        for key, value in overrides.items():
            knobs[key] = value
        planner = PLANNERS[kind](knobs, t.optimizer, lm, params, adapter_graph(loaded.peft))
        optimizer = planner.make_optimizer()
        lm.probe_ids = frequent_tokens([mb for step in batches[:4] for mb in step], t.probe_vocab).to(device) \
            if planner.uses_probe else None
        clock = BudgetClock(1e9, device)
        total = planner_s = 0.0
        tokens = 0
        for i, micro in enumerate(batches):
            start = clock.elapsed()
            ctx = StepContext(step=i, elapsed_s=start, budget_s=1e9, horizon_s=1e9)
            result = optimiser_step(lm, planner, optimizer, params, micro, device, autocast, t.clip_grad_norm, ctx,
                                    clock, False)
            if i >= warmup:
                total += clock.elapsed() - start
                planner_s += result.planner_s
                tokens += result.tokens
        lm.core.model.layers[0]._forward_hooks.clear()
        if label is None:   # the device warm-up
            continue
        rows.append({"planner": label, "step_s": total / steps, "planner_share": planner_s / total,
                     "tokens_per_s": tokens / total})
        print(f"{label:28s} {total / steps * 1000:8.1f} ms/step   planner {100 * planner_s / total:5.1f}%   "
              f"{tokens / total:10,.0f} tok/s", flush=True)
    return rows, device


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run", default="proposed-iter1-tiny-synthetic")
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--planners", default=",".join(ALL))
    parser.add_argument("--no-variants", action="store_true",
                        help="time GRAFF with its configured jvp_sequences only")
    parser.add_argument("--out", default=None)
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args()
    cfg, explicit = compose([f"run={args.run}", "results_dir=/tmp/graff-bench", "mode=full", "wandb.mode=disabled",
                             *args.overrides])
    validate(cfg, explicit)
    apply_mode(cfg, explicit)
    prepare_hub_access([cfg.model.name, cfg.dataset.name])
    variants = [("graff", "graff (jvp_sequences=0)", {"jvp_sequences": 0}),
                ("graff", "graff (jvp_sequences=2)", {"jvp_sequences": 2})] \
        if "graff" in args.planners and not args.no_variants else []
    rows, device = measure(cfg, args.planners.split(","), args.steps, args.warmup, variants)
    record = {"run": args.run, "overrides": args.overrides, "steps": args.steps, "warmup": args.warmup,
              "device": str(device),
              "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor()
              or platform.machine(), "threads": torch.get_num_threads(), "torch": torch.__version__,
              "date": time.strftime("%Y-%m-%d"), "results": rows}
    if args.out:
        Path(args.out).write_text(json.dumps(record, indent=2) + "\n")
        print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
