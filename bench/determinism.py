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

import torch
from harness import fresh_planner, setup, steps_clock_context, write_record

from src.train import optimiser_step


def run_once(bench, kind, batches):
    """`len(batches)` optimiser steps from the initial weights; returns the losses, the η_t and the final LoRA
    weights."""
    torch.manual_seed(bench.cfg.seed)
    planner = fresh_planner(bench, kind, batches)
    losses, etas = [], []
    for i, micro in enumerate(batches):
        result = optimiser_step(planner, micro, bench.device, bench.autocast, bench.cfg.training.clip_grad_norm,
                                steps_clock_context(i, len(batches) + 1))
        losses.append(result.loss)
        etas.append(result.eta)
    final = {n: p.detach().float().cpu().clone() for n, p in bench.loaded.peft.named_parameters()
             if n in bench.initial}
    return losses, etas, final


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run", default="proposed-iter1-tiny-synthetic")
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--planners", default="constant,graff")
    parser.add_argument("--out", default=None)
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args()
    bench = setup(args.run, args.overrides)
    batches = bench.batches(args.steps)
    rows = []
    for kind in args.planners.split(","):
        (l1, e1, w1), (l2, e2, w2) = (run_once(bench, kind, batches) for _ in range(2))
        row = {"planner": kind, "losses": [l1, l2], "etas": [e1, e2],
               "max_loss_diff": max(abs(a - b) for a, b in zip(l1, l2)),
               "max_eta_diff": max(abs(a - b) for a, b in zip(e1, e2)),
               "max_weight_diff": max(float((w1[n] - w2[n]).abs().max()) for n in w1)}
        row["bit_identical"] = row["max_loss_diff"] == row["max_eta_diff"] == row["max_weight_diff"] == 0.0
        rows.append(row)
        print(f"{kind:10s} {'bit-identical' if row['bit_identical'] else 'DIFFERENT':14s} | largest difference: "
              f"loss {row['max_loss_diff']:.3g}, η {row['max_eta_diff']:.3g}, LoRA weight "
              f"{row['max_weight_diff']:.3g} after {args.steps} steps", flush=True)
    write_record(args.out, bench.device, {"run": args.run, "overrides": args.overrides, "steps": args.steps,
                                          "results": rows})


if __name__ == "__main__":
    main()
