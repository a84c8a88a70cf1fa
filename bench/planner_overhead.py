"""Planner overhead: time per optimiser step and the share spent inside the planner, for each planner.

    uv run python bench/planner_overhead.py [--run RUN_ID] [--steps N] [--warmup N] [--planners a,b]
                                           [--no-variants] [--out FILE] [override ...]

Builds the run's model and data exactly as training does (src.main composes the config, src.train's
`optimiser_step` runs the step), then times `--steps` optimiser steps per planner after `--warmup` warm-up steps,
on the same batches for every planner.  Before any of them, `--warmup` steps with fixed LR warm the device up
(on a GPU, the first planner's steps were twice as slow without this).  With GRAFF among the planners it also
times GRAFF with the greedy objective, with the token products on 4 sequences (the version before session 9), with
them at every update (token_every=1, the version before session 15) and without token multipliers (m ≡ 1), unless
`--no-variants`.
GRAFF's planner work is periodic (every `update_every` steps): use `--steps` of several periods to average it; its
rows also give the planner's median milliseconds by position in the cycle (the update step u, u+1, the others).
"planner share" is the time inside the planner's calls (the first-layer probe, token weights, plan, after_step),
measured by the loop's own stopwatch (synchronised on a GPU).

On a GPU, the Qwen3-0.6B architecture is timed without the hub on a local folder of the same shape (random
weights, the full 151,936-word vocabulary; timing does not depend on the weights), as bench/gpu_checks.sh does:
    uv run python bench/qwen3_shape.py --out .cache/qwen3-0.6b-shape
    uv run python bench/planner_overhead.py --run proposed-iter1-Qwen3-0.6B-gsm8k \
        model.name=.cache/qwen3-0.6b-shape dataset.name=synthetic
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch

from harness import fresh_planner, setup, steps_clock_context, write_record

from src.train import optimiser_step

ALL = ["constant", "cosine", "linear", "wsd", "schedulefree", "salelr", "bats", "reactor", "graff"]


def now(device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter()


def measure(bench, kinds, steps, warmup, graff_variants):
    batches = bench.batches(steps + warmup)
    t = bench.cfg.training
    rows = []
    for kind, label, overrides in [("constant", None, {})] + [(k, k, {}) for k in kinds] + graff_variants:
        planner = fresh_planner(bench, kind, batches, overrides)
        total = planner_s = 0.0
        tokens = 0
        by_position = {"u": [], "u+1": [], "other": []}     # GRAFF's update cycle: the update step u, then u+1
        for i, micro in enumerate(batches):
            start = now(bench.device)
            result = optimiser_step(planner, micro, bench.device, bench.autocast, t.clip_grad_norm,
                                    steps_clock_context(i, len(batches)))
            if i >= warmup:
                total += now(bench.device) - start
                planner_s += result.planner_s
                tokens += result.tokens
                if kind == "graff":
                    position = "u" if planner.is_update_step(i) else "u+1" if planner.is_update_step(i - 1) else "other"
                    by_position[position].append(result.planner_s)
        if label is None:   # the device warm-up
            continue
        row = {"planner": label, "step_s": total / steps, "planner_share": planner_s / total,
               "tokens_per_s": tokens / total}
        split = ""
        if kind == "graff":
            row["planner_ms_median"] = {k: 1000 * statistics.median(v) for k, v in by_position.items() if v}
            split = "   planner ms (median) " + ", ".join(f"{k} {v:.1f}" for k, v in row["planner_ms_median"].items())
        rows.append(row)
        print(f"{label:28s} {total / steps * 1000:8.1f} ms/step   planner {100 * planner_s / total:5.1f}%   "
              f"{tokens / total:10,.0f} tok/s{split}", flush=True)
    return rows


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run", default="proposed-iter1-tiny-synthetic")
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--planners", default=",".join(ALL))
    parser.add_argument("--no-variants", action="store_true",
                        help="time GRAFF as configured only")
    parser.add_argument("--out", default=None)
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args()
    bench = setup(args.run, args.overrides)
    variants = [("graff", "graff (objective=greedy)", {"objective": "greedy"}),
                ("graff", "graff (token_sequences=4)", {"token_sequences": 4}),
                ("graff", "graff (token_every=1)", {"token_every": 1}),
                ("graff", "graff (m ≡ 1)", {"token_multipliers": False})] \
        if "graff" in args.planners and not args.no_variants else []
    rows = measure(bench, args.planners.split(","), args.steps, args.warmup, variants)
    write_record(args.out, bench.device, {"run": args.run, "overrides": args.overrides, "steps": args.steps,
                                          "warmup": args.warmup, "results": rows})


if __name__ == "__main__":
    main()
