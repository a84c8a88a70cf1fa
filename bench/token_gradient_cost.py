"""What GRAFF's token-multiplier gradient costs, and how close its finite differences are to the exact product.

    uv run python bench/token_gradient_cost.py [--run RUN_ID] [--sequences N] [--repeats R] [--out FILE] [override ...]

On `--sequences` training sequences of the run's data and model (built as training builds them), with a random
direction v (the cost does not depend on it), times:
  * a no-grad forward of the per-token losses (the floor);
  * `src.model.finite_difference_jvp`, what GRAFF uses every `update_every` steps: d_i ≈ ⟨v, ∇ℓ_i⟩ from two no-grad
    forwards at θ ± δv (δ = FD_STEPS·η, a quarter of a step's movement);
  * `src.model.per_token_jvp`, the exact product by forward mode (GRAFF's first version computed it every step);
and records the largest difference between the two products relative to the largest |d_i|.
"""
from __future__ import annotations

import argparse
import time

import torch
from harness import fresh_planner, setup, write_record

from src.model import FD_STEPS, finite_difference_jvp, per_token_jvp


def timed(fn, repeats: int, device: torch.device) -> tuple[float, object]:
    """Mean seconds per call after two warm-up calls (synchronised on a GPU), and the last result."""
    for _ in range(2):
        out = fn()
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    sync()
    start = time.perf_counter()
    for _ in range(repeats):
        out = fn()
    sync()
    return (time.perf_counter() - start) / repeats, out


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run", default="proposed-iter1-tiny-synthetic")
    parser.add_argument("--sequences", type=int, default=None, help="default: the run's token_sequences")
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--out", default=None)
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args()
    bench = setup(args.run, args.overrides)
    device = bench.device
    n_seq = args.sequences or bench.cfg.training.scheduler.token_sequences
    batches = bench.batches(1)
    planner = fresh_planner(bench, "graff", batches)
    lm, params = planner.token_loss, planner.params
    batch = batches[0][0].select(slice(0, n_seq)).to(device)
    gen = torch.Generator(device="cpu").manual_seed(0)
    v = [torch.randn(q.shape, generator=gen).to(q) for q in params]
    theta = [q.detach().clone() for q in params]
    names = [n for n, q in lm.named_parameters() if q.requires_grad]
    delta = FD_STEPS * float(bench.cfg.training.optimizer.lr_init)

    def forward():
        with torch.no_grad(), lm.no_probe():
            return lm(batch.input_ids, batch.attention_mask, batch.answer_mask, checkpoint_head=False)

    t_fwd, _ = timed(forward, args.repeats, device)
    t_fd, d_fd = timed(lambda: finite_difference_jvp(lm, params, theta, v, batch, delta), args.repeats, device)
    t_jvp, d_jvp = timed(lambda: per_token_jvp(lm, batch, dict(zip(names, v))), args.repeats, device)
    diff = float((d_fd - d_jvp.to(d_fd)).abs().max()) / max(float(d_jvp.abs().max()), 1e-30)
    rows = {"no_grad_forward_s": t_fwd, "finite_difference_s": t_fd, "per_token_jvp_s": t_jvp,
            "largest_relative_difference": diff, "delta": delta}
    for key, value in rows.items():
        print(f"{key:30s} {value:.6g}")
    print(f"finite differences / forward: {t_fd / t_fwd:.1f}x; JVP / finite differences: {t_jvp / t_fd:.1f}x")
    write_record(args.out, device, {"run": args.run, "overrides": args.overrides, "sequences": n_seq,
                                    "answer_tokens": batch.n_answer_tokens, "repeats": args.repeats,
                                    "results": rows})


if __name__ == "__main__":
    main()
