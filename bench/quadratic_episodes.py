"""GRAFF's pre-training on the noisy quadratic: one planner run through several whole budgets, as the warm start
does (`training.episodes`), and what each episode's schedule looks like.

    uv run python bench/quadratic_episodes.py [--episodes 6] [--steps 600] [--out bench/results/quadratic_episodes.txt]

The planner starts cold (W = 0) with η_0 = linear decay's tuned peak (bench/results/quadratic_planners.txt) and the
pre-training's outer lr 0.02; between episodes it forgets the run (`start_episode`: h = 0, fresh forecast) and
keeps W, the encoder and Adam's moments, like the embedded pre-training.  Reported per episode: η/η_0 at 5, 25,
50 and 90% of the budget and at its end, the true excess loss at the end relative to tuned linear decay, and W_0's
bias, decay exponent κ, ρ and the norm of its h̄ coefficients.  Asks: does what W learns in one episode set a
sensible start for the next?  Both spans of the terminal forecast (docs/method.md): `episode` (the whole budget
re-planned under W, the default) and `remaining` (only the budget left, the earlier version).
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from quadratic_planners import Quadratic, finish  # noqa: E402

SETTINGS = {(1.5, 1e-2): 3.12e-2, (1.0, 1e-2): 1.56e-2}   # (p, noise): linear decay's tuned peak (600 steps)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--episodes", type=int, default=6)
    parser.add_argument("--steps", type=int, default=600)
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    torch.set_num_threads(1)
    start = time.perf_counter()
    lines = [f"# GRAFF (terminal objective) through {args.episodes} budgets of {args.steps} steps, cold start, outer lr"
             f" 0.02, seed 0; η/η_0 at fractions of the budget; final excess loss / tuned linear decay's"]
    for ((p, noise), peak), span in ((setting, span) for setting in SETTINGS.items()
                                     for span in ("episode", "remaining")):
        q = Quadratic(p, noise, seed=0, steps=args.steps)
        linear = q.run("linear", peak, warmup_fraction=0.05)
        planner, x = q.planner("graff", peak, warmup_fraction=0.05, outer_lr=0.02, token_sequences=0,
                               stability_guard=1.9, span=span)
        lines.append(f"p={p:g} noise={noise:g}, η_0 = {peak:g}, span {span}; episode: η/η_0 at 5% 25% 50% 90% end |"
                     f" excess/linear | bias κ ρ |w_h|")
        print(lines[-1], flush=True)
        for ep in range(args.episodes):
            if ep:
                planner.start_episode()
            excess, etas = q.episode(planner, x)
            w0 = planner.net.W[0].detach()
            at = [etas[min(int(f * args.steps), args.steps - 1)] / peak for f in (0.05, 0.25, 0.5, 0.9, 1.0)]
            lines.append(f"  {ep}: " + " ".join(f"{v:6.3f}" for v in at) + f" | {excess / linear:6.3f} | "
                         f"{float(w0[-1]):6.3f} {float(w0[-2]):6.3f} {float(w0[-3]):6.3f} {float(w0[:-3].norm()):6.3f}")
            print(lines[-1], flush=True)
    finish(lines, start, args.out, f"bench/quadratic_episodes.py --episodes {args.episodes} --steps {args.steps}")


if __name__ == "__main__":
    main()
