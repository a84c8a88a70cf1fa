"""Noisy-quadratic design lab for GRAFF's learning-rate objective (terminal forecast vs greedy hypergradient).

    uv run python bench/noisy_quadratic.py            # the table (bench/results/noisy_quadratic.txt)

Testbed (float64, CPU, vectorised over seeds and schedules)
-----------------------------------------------------------
d modes (200) with curvatures h_i = i^{-p}; initial displacement x_0 = 1 on every mode; mini-batch gradient
g = h∘x + σ∘ξ with σ_i² = noise·h_i (gradient covariance proportional to the Hessian, as in the noisy quadratic
model of Zhang et al. 2019, where noise ~ 1/batch size); excess loss L(x) = ½ Σ h_i x_i².  The planner never sees
L(x): it sees the mini-batch loss ℓ_t = L∞ + L(x_t) + ⟨σ∘ξ_t, x_t⟩ + obs·L(x_0)·ζ_t (ξ, ζ standard normal; the
⟨σ∘ξ, x⟩ term is the mini-batch loss's own noise consistent with its gradient, the ζ term the per-batch variance
of the irreducible part), with L∞ = offset·L(x_0) unknown to it, and the measured one-step hypergradient
∂ℓ_{t+1}/∂η_t = −⟨g_{t+1}, u_t⟩.  Optimisers: SGD, and Adam (β1 = 0.9, β2 = 0.95 by default, bias correction,
ε = 1e-8, no weight decay).  Budget T = 1000 steps.  Reported: the true excess loss L(x_T), averaged over seeds,
divided by that of linear decay with its peak tuned on the same grid; all schedules see the same noise
(common random numbers), so the ratios are paired.

Schedules (each peak tuned on a log grid with ratio 2^{1/3} per setting; 2% linear warm-up for all)
----------------------------------------------------------------------------------------------------
constant, linear (decay to 0), cosine (to 0), wsd (decay over the last 20%, linearly to 0),
greedy-hg: the current GRAFF rule, Adam on log η driven by the measured hypergradient −⟨g_{t+1}, u_t⟩·η_t
           (η_0 and the Adam lr tuned on a grid),
greedy-oracle (SGD only): η_t = argmin_η E[L(x_{t+1}) | x_t] from the true state (capped; cap tuned),
family-oracle: best of η(b) = C·(b + 0.01)^κ·e^{ρ b} over a grid of (C, κ, ρ) (b = fraction of budget left),
terminal-cold: TerminalPlanner (bench/trajectory_forecast.py) from w = 0 (constant η_0 = tuned linear peak),
terminal-warm: from a w pre-trained on other quadratics (episodes of the same planner), outer lr 1e-3.
"""
from __future__ import annotations

import argparse
import math
import sys
import time
from dataclasses import dataclass, replace

import torch

from trajectory_forecast import TerminalPlanner

torch.set_default_dtype(torch.float64)
DT = torch.float64


# ----------------------------------------------------------------------------------------------------
# Testbed
# ----------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Setting:
    p: float = 1.5            # spectrum exponent
    noise: float = 1e-2       # σ_i² = noise·h_i
    opt: str = "sgd"          # "sgd" | "adam"
    d: int = 200
    T: int = 1000
    beta1: float = 0.9
    beta2: float = 0.95
    obs: float = 0.02         # per-step loss observation noise, in units of L(x_0)
    offset: float = 1.0       # L∞ in units of L(x_0)
    x0: str = "ones"          # "ones" | "power" (x_0,i = i^{-1/2})

    @property
    def name(self) -> str:
        lvl = {1e-2: "high", 1e-3: "low"}.get(self.noise, f"{self.noise:g}")
        return f"{self.opt} p={self.p:g} {lvl}"


class Problem:
    """Curvatures, noise scales, initial point and the pre-drawn noise of S seeds (shared by every schedule)."""

    def __init__(self, s: Setting, seeds: list[int]):
        self.s, self.S = s, len(seeds)
        i = torch.arange(1, s.d + 1, dtype=DT)
        self.h = i ** (-s.p)
        self.sigma = (s.noise * self.h).sqrt()
        self.x0 = torch.ones(s.d, dtype=DT) if s.x0 == "ones" else i ** -0.5
        self.L0 = float(0.5 * (self.h * self.x0 ** 2).sum())
        self.L_inf = s.offset * self.L0
        xi, zeta = [], []
        for sd in seeds:
            g = torch.Generator().manual_seed(1000 + sd)
            xi.append(torch.randn(s.T + 1, s.d, generator=g, dtype=DT))
            zeta.append(torch.randn(s.T + 1, generator=g, dtype=DT))
        self.xi = torch.stack(xi, 1)          # (T+1, S, d)
        self.zeta = torch.stack(zeta, 1)      # (T+1, S)


class Sim:
    """C × S runs at once (C schedules, S seeds).  Per step t: `observe()` gives the mini-batch loss at x_t and
    the hypergradient of step t−1; `step(eta)` applies η_t (shape (C, S) or (C, 1))."""

    def __init__(self, prob: Problem, C: int):
        self.P, self.C = prob, C
        s = prob.s
        self.x = prob.x0.expand(C, prob.S, s.d).clone()
        self.m = torch.zeros_like(self.x)
        self.v = torch.zeros_like(self.x)
        self.u = None
        self.t = 0

    def excess(self) -> torch.Tensor:
        return 0.5 * (self.P.h * self.x * self.x).sum(-1)                       # (C, S)

    def observe(self):
        P, t = self.P, self.t
        noise = P.sigma * P.xi[t]                                              # (S, d)
        self.g = P.h * self.x + noise
        loss = P.L_inf + self.excess() + (noise * self.x).sum(-1) + P.s.obs * P.L0 * P.zeta[t]
        hg = -(self.g * self.u).sum(-1) if self.u is not None else None        # ∂ℓ_t/∂η_{t−1}
        return loss, hg

    def step(self, eta: torch.Tensor) -> None:
        s = self.P.s
        k = self.t + 1
        self.m.mul_(s.beta1).add_(self.g, alpha=1 - s.beta1)            # SGD: EMAs kept for the temperature only
        self.v.mul_(s.beta2).addcmul_(self.g, self.g, value=1 - s.beta2)
        mh, vh = self.m / (1 - s.beta1 ** k), self.v / (1 - s.beta2 ** k)
        if s.opt == "sgd":
            u = self.g
            self.tau = (vh - mh * mh).sum(-1)
        else:
            den = vh.sqrt() + 1e-8
            u = mh / den
            self.tau = ((vh - mh * mh) / den).sum(-1)
        self.u = u
        self.x = self.x - eta[..., None] * u
        self.t += 1


def run_fixed(prob: Problem, etas: torch.Tensor) -> torch.Tensor:
    """Final excess loss (C,), averaged over seeds, of C fixed schedules etas (C, T)."""
    sim = Sim(prob, etas.shape[0])
    for t in range(prob.s.T):
        sim.observe()
        sim.step(etas[:, t, None])
    return sim.excess().mean(1)


# ----------------------------------------------------------------------------------------------------
# Schedules
# ----------------------------------------------------------------------------------------------------
WARMUP = 0.02


def multiplier(kind: str, T: int) -> torch.Tensor:
    p = torch.arange(T, dtype=DT) / T                                         # fraction of the budget spent
    warm = torch.clamp((p + 1.0 / T) / WARMUP, max=1.0)
    if kind == "constant":
        m = torch.ones(T, dtype=DT)
    elif kind == "linear":
        m = 1 - p
    elif kind == "cosine":
        m = 0.5 * (1 + torch.cos(math.pi * p))
    elif kind == "wsd":
        m = torch.clamp((1 - p) / 0.2, max=1.0)
    else:
        raise ValueError(kind)
    return warm * m


def family(T: int, C: torch.Tensor, kappa: torch.Tensor, rho: torch.Tensor, eps: float = 0.01) -> torch.Tensor:
    """η(b) = C (b+ε)^κ e^{ρb}, normalised so that η(1) = C; rows for every (C, κ, ρ) given as flat tensors."""
    b = 1 - torch.arange(T, dtype=DT) / T
    log = kappa[:, None] * torch.log((b + eps) / (1 + eps)) + rho[:, None] * (b - 1)
    warm = torch.clamp((torch.arange(T, dtype=DT) + 1) / (WARMUP * T), max=1.0)
    return C[:, None] * torch.exp(log) * warm


def eta_cap(s: Setting) -> float:
    """SGD: the stability guard η·h_max ≤ 1.9 (GRAFF's guard) caps every method's LR; Adam: no cap."""
    return 1.9 if s.opt == "sgd" else math.inf


def lr_grid(s: Setting) -> torch.Tensor:
    """Peak LRs: 2^{k/3} (SGD: 1.9·2^{-k/3}, the guard being the largest)."""
    if s.opt == "sgd":
        return 1.9 * 2.0 ** (-torch.arange(0, 3 * 8 + 1, dtype=DT) / 3)
    return 2.0 ** (torch.arange(-30, -2, dtype=DT) / 3)


def tune_schedule(prob: Problem, kind: str) -> tuple[float, float]:
    """(best final excess, best peak) over the LR grid: every third grid value first, then the neighbours of
    the best one."""
    grid = lr_grid(prob.s)
    mult = multiplier(kind, prob.s.T)[None]

    def score(idx):
        res = run_fixed(prob, grid[idx, None] * mult)
        return torch.where(torch.isfinite(res), res, torch.full_like(res, math.inf))

    coarse = torch.arange(0, grid.numel(), 3)
    res = score(coarse)
    j = int(coarse[int(res.argmin())])
    fine = torch.tensor([i for i in (j - 2, j - 1, j + 1, j + 2) if 0 <= i < grid.numel()], dtype=torch.long)
    res2 = score(fine)
    cand = torch.cat([res, res2])
    idx = torch.cat([coarse, fine])
    i = int(cand.argmin())
    return float(cand[i]), float(grid[idx[i]])


def tune_family(prob: Problem, peak: float) -> tuple[float, tuple]:
    """Grid over (C, κ, ρ) around the linear peak; a second, finer pass around the best point."""
    best = (math.inf, None)
    Cs = (peak * 2.0 ** torch.arange(-2, 3.01, 1.0)).clamp(max=eta_cap(prob.s))
    ks = torch.tensor([0.0, 0.5, 1.0, 1.5, 2.0, 3.0])
    rs = torch.tensor([-2.0, 0.0, 2.0, 4.0])
    for stage in range(2):
        CC, KK, RR = torch.meshgrid(Cs, ks, rs, indexing="ij")
        CC, KK, RR = CC.flatten(), KK.flatten(), RR.flatten()
        res = run_fixed(prob, family(prob.s.T, CC, KK, RR))
        res = torch.where(torch.isfinite(res), res, torch.full_like(res, math.inf))
        i = int(res.argmin())
        if float(res[i]) < best[0]:
            best = (float(res[i]), (float(CC[i]), float(KK[i]), float(RR[i])))
        c, k, r = best[1]
        Cs = (c * 2.0 ** torch.tensor([-0.5, 0.0, 0.5])).clamp(max=eta_cap(prob.s))
        ks = torch.tensor([max(k - 0.25, 0.0), k, k + 0.25])
        rs = torch.tensor([r - 1.0, r, r + 1.0])
    return best


def run_greedy_hg(prob: Problem, eta0s: torch.Tensor, alphas: torch.Tensor) -> torch.Tensor:
    """The current GRAFF rule: Adam (β = 0.9, 0.999) on log η with gradient −⟨g_{t+1}, u_t⟩·η_t, per run."""
    C = eta0s.numel()
    sim = Sim(prob, C)
    log_eta = torch.log(eta0s)[:, None].expand(C, prob.S).clone()
    m = torch.zeros_like(log_eta)
    v = torch.zeros_like(log_eta)
    k = 0
    warm = multiplier("constant", prob.s.T)
    eta = torch.exp(log_eta)
    for t in range(prob.s.T):
        _, hg = sim.observe()
        if hg is not None:
            grad = torch.nan_to_num(hg * eta, nan=0.0)
            k += 1
            m = 0.9 * m + 0.1 * grad
            v = 0.999 * v + 0.001 * grad * grad
            log_eta = log_eta - alphas[:, None] * (m / (1 - 0.9 ** k)) / ((v / (1 - 0.999 ** k)).sqrt() + 1e-12)
            log_eta = log_eta.clamp(torch.log(eta0s)[:, None] + math.log(1e-3), torch.log(eta0s)[:, None] + math.log(10))
            log_eta = log_eta.clamp(max=math.log(eta_cap(prob.s)))
        eta = torch.exp(log_eta) * warm[t]
        sim.step(eta)
    return sim.excess().mean(1)


def tune_greedy_hg(prob: Problem, peak: float) -> tuple[float, tuple]:
    e0 = (peak * 2.0 ** torch.arange(-2, 3.01, 1.0)).clamp(max=eta_cap(prob.s))
    al = torch.tensor([0.003, 0.01, 0.03, 0.1])
    EE, AA = torch.meshgrid(e0, al, indexing="ij")
    res = run_greedy_hg(prob, EE.flatten(), AA.flatten())
    res = torch.where(torch.isfinite(res), res, torch.full_like(res, math.inf))
    i = int(res.argmin())
    return float(res[i]), (float(EE.flatten()[i]), float(AA.flatten()[i]))


def run_greedy_oracle(prob: Problem, caps: torch.Tensor) -> torch.Tensor:
    """SGD: η_t = min(cap, argmin_η E[L(x_t − η g_t) | x_t]) = Σh²x² / Σh(h²x² + σ²), from the true state."""
    sim = Sim(prob, caps.numel())
    h, s2 = prob.h, prob.sigma ** 2
    for t in range(prob.s.T):
        sim.observe()
        x2 = sim.x ** 2
        eta = (h * h * x2).sum(-1) / (h * (h * h * x2 + s2)).sum(-1)
        sim.step(torch.minimum(eta, caps[:, None]))
    return sim.excess().mean(1)


# ----------------------------------------------------------------------------------------------------
# Terminal planner runs
# ----------------------------------------------------------------------------------------------------
def run_planner(prob: Problem, make_planner) -> tuple[float, list]:
    """One planner per seed (its own history), the S seeds simulated together.  Returns the mean final excess
    and the planners (for diagnostics)."""
    sim = Sim(prob, 1)
    planners = [make_planner(j) for j in range(prob.S)]
    for t in range(prob.s.T):
        loss, hg = sim.observe()
        etas = torch.tensor([pl.eta(t) for pl in planners], dtype=DT)
        for j, pl in enumerate(planners):
            pl.observe(t, float(etas[j]), float(loss[0, j]), float(hg[0, j]) if hg is not None else None,
                       float(sim.tau[0, j]) if t > 0 else None)
        sim.step(etas[None])
    ex = sim.excess()[0]
    return float(torch.where(torch.isfinite(ex), ex, torch.full_like(ex, math.inf)).mean()), planners


def default_planner_kw(s: Setting) -> dict:
    fkw = dict(momentum=s.beta1 if s.opt == "adam" else 0.0, tau_beta=s.beta1)
    return dict(lr=0.05, every=10, inner=1, trust=0.2, min_steps=50, warmup=int(WARMUP * s.T), eta_max=eta_cap(s),
                forecast_kw=fkw)


def pretrain(s: Setting, episodes: int, kw: dict, seed: int = 0) -> tuple[torch.Tensor, dict, list]:
    """Run the planner over `episodes` short budgets on quadratics with other spectra, noise levels and seeds
    (p ~ U[1, 2], log10 noise ~ U[-3, -2]), carrying w and Adam's state from one to the next; η_0 of each episode
    is its tuned linear-decay peak (as in the test runs)."""
    g = torch.Generator().manual_seed(12345 + seed)
    w, state, log = None, None, []
    for e in range(episodes):
        p = 1.0 + float(torch.rand(1, generator=g))
        noise = 10 ** (-3 + float(torch.rand(1, generator=g)))
        se = replace(s, p=p, noise=noise)
        prob = Problem(se, [500 + 17 * e + seed])
        _, peak = tune_schedule(prob, "linear")
        final, pls = run_planner(prob, lambda j: TerminalPlanner(peak, se.T, w0=w, adam_state=state, **kw))
        pl = pls[0]
        w, state = pl.w.detach().clone(), pl.opt.state_dict()
        log.append((p, noise, final, w.tolist()))
    return w, state, log


# ----------------------------------------------------------------------------------------------------
# The table
# ----------------------------------------------------------------------------------------------------
SETTINGS = [(1.5, 1e-2), (1.5, 1e-3), (1.0, 1e-2), (2.0, 1e-2)]


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--seeds", type=int, default=4)
    ap.add_argument("--opts", default="sgd,adam")
    ap.add_argument("--episodes", type=int, default=6)
    ap.add_argument("--no-oracle", action="store_true")
    ap.add_argument("--no-warm", action="store_true")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    t_start = time.time()
    rows = []
    for opt in args.opts.split(","):
        base = Setting(opt=opt)
        kw = default_planner_kw(base)
        if not args.no_warm:
            w_pre, st_pre, log = pretrain(base, args.episodes, kw)
            print(f"[{opt}] pre-trained w = (ρ, κ, c) = {[round(v, 3) for v in w_pre.tolist()]}", file=sys.stderr)
        for p, noise in SETTINGS:
            s = replace(base, p=p, noise=noise)
            prob = Problem(s, list(range(args.seeds)))
            lin, peak = tune_schedule(prob, "linear")
            r = {"setting": s.name, "linear": lin, "peak": peak}
            for kind in ("constant", "cosine", "wsd"):
                r[kind] = tune_schedule(prob, kind)[0]
            r["greedy-hg"] = tune_greedy_hg(prob, peak)[0]
            if opt == "sgd":
                caps = torch.cat([lr_grid(s), torch.tensor([math.inf])])
                res = run_greedy_oracle(prob, caps)
                r["greedy-oracle"] = float(res[torch.isfinite(res)].min())
            if not args.no_oracle:
                r["family-oracle"], r["family-w"] = tune_family(prob, peak)
            r["terminal-cold"], pls = run_planner(prob, lambda j: TerminalPlanner(peak, s.T, **kw))
            r["cold-w"] = pls[0].w.detach().tolist()
            if not args.no_warm:
                kw_w = {**kw, "lr": 1e-3}
                r["terminal-warm"], _ = run_planner(prob, lambda j: TerminalPlanner(peak, s.T, w0=w_pre, **kw_w))
            rows.append(r)
            print_row(r, header=len(rows) == 1)
    print(f"# {time.time() - t_start:.0f} s, {args.seeds} seeds", file=sys.stderr)


COLS = ["constant", "cosine", "wsd", "greedy-hg", "greedy-oracle", "family-oracle", "terminal-cold", "terminal-warm"]


def print_row(r: dict, header: bool) -> None:
    if header:
        print(f"{'setting':<18}{'linear':>10}" + "".join(f"{c:>15}" for c in COLS))
    cells = "".join(f"{r[c] / r['linear']:>15.3f}" if c in r else f"{'-':>15}" for c in COLS)
    print(f"{r['setting']:<18}{r['linear']:>10.3e}" + cells, flush=True)


if __name__ == "__main__":
    main()
