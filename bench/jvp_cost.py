"""What GRAFF's token hypergradient costs: the per-token JVP d_i = ⟨v, ∇ℓ_i⟩ against a no-grad forward.

    uv run python bench/jvp_cost.py [--run RUN_ID] [--sequences N] [--repeats R] [--out FILE] [override ...]

Times, on `--sequences` training sequences of the run's data and model (built as training builds them):
  * a no-grad forward of the per-token losses (the floor: what the sequences cost without derivatives);
  * `src.model.per_token_jvp`, the product GRAFF uses: forward mode, torch.func.jvp over the trainable
    parameters;
  * forward mode with every parameter and floating buffer dual (frozen ones with real zero tangents), which
    avoids most of the "efficient zero tensor" tangents torch creates where a differentiated tensor meets a
    constant one;
  * reverse-over-reverse, J v = ∂/∂u ⟨Jᵀu, v⟩ (one forward and two backward passes: more than the method's one
    backward pass per step allows, measured as the alternative).
All three must agree (their largest difference relative to the largest |J v| is recorded: fp32 rounding for an
fp32 model, bf16's for a bf16 one); v is a random direction (the cost does not depend on it).  It also times
one elementwise add with an efficient zero tensor against a plain one, the per-op price of the zero tangents.
"""
from __future__ import annotations

import argparse
import time

import torch
from harness import setup, write_record
from torch.nn.attention import SDPBackend, sdpa_kernel

from src.model import TokenLoss, per_token_jvp


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
    parser.add_argument("--sequences", type=int, default=None, help="default: the run's jvp_sequences")
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--out", default=None)
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args()
    bench = setup(args.run, args.overrides)
    device = bench.device
    n_seq = args.sequences or bench.cfg.training.scheduler.jvp_sequences
    batch = bench.stream.next().select(slice(0, n_seq)).to(device)
    lm = TokenLoss(bench.loaded.peft)
    lm.eval()
    named = [(n, q) for n, q in lm.named_parameters() if q.requires_grad]
    gen = torch.Generator(device="cpu").manual_seed(0)
    v = {n: torch.randn(q.shape, generator=gen).to(q) for n, q in named}
    args_lm = (batch.input_ids, batch.attention_mask, batch.answer_mask)

    def forward():
        with torch.no_grad():
            return lm(*args_lm, checkpoint_head=False)

    def all_dual():
        primals = {n: q.detach() for n, q in lm.named_parameters()}
        primals.update({n: b for n, b in lm.named_buffers() if b.is_floating_point()})
        tangents = {n: v[n] if n in v else torch.zeros_like(q) for n, q in primals.items()}
        with sdpa_kernel([SDPBackend.MATH]):
            return torch.func.jvp(lambda p: torch.func.functional_call(lm, p, args_lm, {"checkpoint_head": False}),
                                  (primals,), (tangents,))[1]

    def reverse_over_reverse():
        params = [q for _, q in named]
        with torch.enable_grad(), sdpa_kernel([SDPBackend.MATH]):
            losses = lm(*args_lm, checkpoint_head=False)                                  # ℓ (n,)
            u = torch.zeros_like(losses, requires_grad=True)
            grads = torch.autograd.grad(losses, params, grad_outputs=u, create_graph=True)   # Jᵀu
            inner = sum((g * v[n]).sum() for (n, _), g in zip(named, grads))               # ⟨Jᵀu, v⟩
            return torch.autograd.grad(inner, u)[0]                                         # J v

    t_fwd, _ = timed(forward, args.repeats, device)
    t_jvp, d = timed(lambda: per_token_jvp(lm, batch, v), args.repeats, device)
    t_dual, d_dual = timed(all_dual, args.repeats, device)
    t_rr, d_rr = timed(reverse_over_reverse, args.repeats, device)
    scale = float(d.abs().max())
    diff = max(float((d - d_dual).abs().max()), float((d - d_rr).abs().max())) / max(scale, 1e-30)

    x = torch.randn(256, 256, device=device)
    zero = torch._efficientzerotensor((256, 256), device=device)
    t_add, _ = timed(lambda: x + x, 1000, device)
    t_zadd, _ = timed(lambda: zero + x, 1000, device)

    rows = {"no_grad_forward_s": t_fwd, "per_token_jvp_s": t_jvp, "all_dual_jvp_s": t_dual,
            "reverse_over_reverse_s": t_rr, "largest_relative_difference": diff,
            "add_plain_us": t_add * 1e6, "add_efficient_zero_tensor_us": t_zadd * 1e6}
    for key, value in rows.items():
        print(f"{key:32s} {value:.6g}")
    print(f"per_token_jvp / no-grad forward: {t_jvp / t_fwd:.1f}x; reverse-over-reverse / per_token_jvp: "
          f"{t_rr / t_jvp:.2f}x")
    write_record(args.out, device, {"run": args.run, "overrides": args.overrides, "sequences": n_seq,
                                    "answer_tokens": batch.n_answer_tokens, "repeats": args.repeats,
                                    "results": rows})


if __name__ == "__main__":
    main()
