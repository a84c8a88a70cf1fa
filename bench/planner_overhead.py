"""Planner overhead: time per optimiser step and the share spent inside the planner, for each planner.

    uv run python bench/planner_overhead.py [--run RUN_ID] [--steps N] [--out FILE] [override ...]

Builds the run's model and data exactly as training does (src.main composes the config, src.train's
`optimiser_step` runs the step), then times `--steps` optimiser steps per planner after 5 warm-up steps, on the
same batches for every planner.  "planner share" is the time inside the planner's calls (the first-layer probe,
token weights, plan, after_step), measured by the loop's own stopwatch (synchronised on a GPU).

On a GPU, the Qwen3-0.6B architecture can be timed without the hub by overriding the model to a config-built
Qwen3 of the same shape (random weights; timing does not depend on them), e.g.
    uv run python bench/planner_overhead.py --run proposed-iter1-Qwen3-0.6B-gsm8k model.name=embedded \
        model.parameter_count=null model.embedded.layers=28 model.embedded.hidden=1024 model.embedded.heads=16 \
        model.embedded.kv_heads=8 model.embedded.head_dim=128 model.embedded.intermediate=3072 \
        dataset.name=<folder of GSM8K-format train.jsonl/test.jsonl>
(the embedded tokenizer's vocabulary is small, so the LM head is cheaper than Qwen3's 151,936 words).
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


def measure(cfg, kinds, steps, graff_variants):
    device = pick_device(cfg.training.device)
    autocast = make_autocast(device, cfg.training.mixed_precision)
    t = cfg.training
    loaded = build_model(cfg.model, t.gradient_checkpointing, device)
    fmt = PromptFormat(loaded.tokenizer)
    stream = TrainStream(cfg.dataset, fmt, t.micro_batch_size, cfg.dataset.max_tokens, cfg.seed, 1000)
    batches = [[stream.next() for _ in range(t.gradient_accumulation_steps)] for _ in range(steps + 5)]
    initial = {n: p.detach().clone() for n, p in loaded.peft.named_parameters() if p.requires_grad}
    rows = []
    for kind, label, overrides in [(k, k, {}) for k in kinds] + graff_variants:
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
            if i >= 5:
                total += clock.elapsed() - start
                planner_s += result.planner_s
                tokens += result.tokens
        lm.core.model.layers[0]._forward_hooks.clear()
        rows.append({"planner": label, "step_s": total / steps, "planner_share": planner_s / total,
                     "tokens_per_s": tokens / total})
        print(f"{label:28s} {total / steps * 1000:8.1f} ms/step   planner {100 * planner_s / total:5.1f}%   "
              f"{tokens / total:10,.0f} tok/s", flush=True)
    return rows, device


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run", default="proposed-iter1-tiny-synthetic")
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--planners", default=",".join(ALL))
    parser.add_argument("--out", default=None)
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args()
    cfg, explicit = compose([f"run={args.run}", "results_dir=/tmp/graff-bench", "mode=full", "wandb.mode=disabled",
                             *args.overrides])
    validate(cfg, explicit)
    apply_mode(cfg, explicit)
    prepare_hub_access([cfg.model.name, cfg.dataset.name])
    variants = [("graff", "graff (jvp_sequences=0)", {"jvp_sequences": 0}),
                ("graff", "graff (jvp_sequences=2)", {"jvp_sequences": 2})] if "graff" in args.planners else []
    rows, device = measure(cfg, args.planners.split(","), args.steps, variants)
    record = {"run": args.run, "overrides": args.overrides, "steps": args.steps, "device": str(device),
              "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor()
              or platform.machine(), "threads": torch.get_num_threads(), "torch": torch.__version__,
              "date": time.strftime("%Y-%m-%d"), "results": rows}
    if args.out:
        Path(args.out).write_text(json.dumps(record, indent=2) + "\n")
        print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
