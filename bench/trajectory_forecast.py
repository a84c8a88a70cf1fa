"""Terminal-loss forecast for a learning-rate planner, and the planner rule that uses it.

Self-contained (torch, numpy, scipy.optimize.nnls); nothing here runs a model.

    TrajectoryForecast   a few-mode noisy-quadratic surrogate of the run's own loss trajectory, fitted online
                         (non-negative least squares), rolled out in closed form under a candidate future
                         schedule: L̂_T(η_t..η_{T−1}), differentiable in the schedule
    TerminalPlanner      log η_t = log η_0 + w·[b_t, log(b_t + ε), 1], w trained by Adam on L̂_T(w) every
                         `every` steps, with a trust region and bounds (the design measured in
                         bench/noisy_quadratic.py)
    gradient_check()     autograd ∂L̂_T/∂w against central finite differences (for a unit test)
    momentum_moments()   stationary moments of momentum SGD on a unit quadratic (for the hypergradient rows)

The surrogate
-------------
K modes with fixed curvatures κ_1 < … < κ_K, log-spaced so that η_ref·κ spans `span` (default
[0.1/horizon, 1]: from modes that barely move within the run to modes at the edge of stability).  Mode k carries
a loss share e_k(τ) ≥ 0 that evolves, under the LRs actually applied, like the expected loss of one coordinate of
SGD on a quadratic with gradient noise:

    e_k(τ+1) = (1 − η_τκ_k)² e_k(τ) + r(η_τκ_k)·η_τ² n_k,     e_k(0) = a_k,      ℓ(τ) ≈ L∞ + Σ_k e_k(τ)

(r = 1 for plain SGD; with momentum β it corrects the stationary variance, see momentum_moments).  Unknowns
θ = (L∞, a, n) ≥ 0: irreducible loss, initial loss per mode, noise injected per mode.  For a given LR history
e_k(τ) = a_k Φ_k(τ) + n_k Ψ_k(τ), where Φ, Ψ follow the same recursion from (1, 0); every observation is therefore
LINEAR in θ and the fit is one non-negative least-squares problem:

    loss rows          ℓ_τ                       ≈ L∞ + Σ_k a_k Φ_k(τ) + n_k Ψ_k(τ)
    floor rows         η_τ·T_τ / (4(1 − c_τ))    ≈ Σ_k n_k · r η_τ / (κ_k (2 − η_τκ_k))
    hypergradient rows ∂ℓ_{τ+1}/∂η_τ             ≈ Σ_k −2κ_k(1 − η_τκ_k)(e_k(τ) − e*_k(τ)) + η_τ n_k G(η_τκ_k)
                                                   (optional, off by default: see below)

Floor rows: T = Σ_i (v̂_i − m̂_i²)/(√v̂_i + ε) is a gradient-noise temperature read from the optimiser's moments
(AdamW's exp_avg, exp_avg_sq; for SGD Σ_i (v̂_i − m̂_i²) from EMAs kept for the purpose), c_τ = (1−β)/(1+β) the
share of the noise variance still in m̂² (β of the EMA m̂).  Reason: with preconditioner P = 1/√v̂ and per-coordinate
gradient-noise variance σ_i² ≈ (v̂_i − m̂_i²)/(1 − c), a coordinate of curvature h settles at E[x²] ≈ ηPσ²/(2h),
i.e. a loss share ηPσ²/4 whatever h is, so the whole equilibrium noise floor at LR η is ηT/(4(1 − c)) — measured,
not fitted (checked on the noisy quadratic: within 5-10 % for SGD and Adam, bench/nq_lab/tau_floor.py).  In the
surrogate the same floor is Σ_k n_k times the equilibrium of the recursion per unit n_k.  This row is what separates
the noise floor (which moves with η) from L∞ (which does not) while η has been constant.

Rows are averaged in bins of `bin` steps; loss rows are weighted by 1/(noise std) estimated from successive
differences (robust median), floor rows by 1/(tau_rel·value); a small ridge on the column-normalised a, n (not on
L∞).  NNLS on ≤ 1 + 2K = 33 columns and ≤ horizon/bin rows: ~1 ms.

The forecast.  From the fitted state e(t) = aΦ(t) + nΨ(t), the loss after the remaining steps under future LRs
η_t..η_{T−1} is

    L̂_T = L∞ + Σ_k [ e_k(t) Π_τ (1 − η_τκ_k)² + n_k Σ_τ r η_τ² Π_{τ'>τ} (1 − η_τ'κ_k)² ],

computed with cumulative sums of log(1 − ηκ)² (O(n_rem·K), no Python loop), differentiable in η (autograd).

Hypergradient rows (measured one-step hypergradient −⟨g_{τ+1}, u_τ⟩ = ∂ℓ_{τ+1}/∂η_τ).  Exact for SGD.  For a
momentum method the stationary value is η·n·G(ηκ) with G ≈ (1−β1)/(1+β1) (not 2/(2−ηκ) as for SGD): momentum
averages the noise out of u_τ, so the hypergradient sees ~5 % of the noise term at β1 = 0.9, and the small
difference of two large terms in the SGD form is badly biased for Adam (measured 2.6-3.9× too large,
bench/nq_lab/hg_stationary.py).  The rows here use e − e* (content above the equilibrium e*) so that the stationary
part is exactly ηnG.  Even so they made the Adam planner worse on the testbed (1.03-1.11 → 1.08-1.68 × linear
decay) and did not help SGD, so they are off by default (use_hypergrad=False).
"""
from __future__ import annotations

import math

import numpy as np
import torch
from scipy.optimize import nnls


def momentum_moments(a: np.ndarray, beta: float) -> tuple[np.ndarray, np.ndarray]:
    """Stationary moments of one coordinate of momentum SGD on a unit quadratic (curvature 1, preconditioner 1,
    gradient-noise variance 1, step a = ηκ):  m_t = β m_{t−1} + (1−β)(x_t + ξ_t),  x_{t+1} = x_t − a m_t.
    Returns (r, G): r = E[x²] relative to plain SGD's a/(2 − a); G = E[m_t²], so that the stationary one-step
    hypergradient of a mode with noise injection n is η·n·G.  β = 0: r = 1, G = 2/(2 − a); β = 0.9: G ≈ 0.053.
    Solves the 2×2 discrete Lyapunov equation Σ = AΣAᵀ + bbᵀ of the state (x_t, m_{t−1}) exactly (3 unknowns),
    elementwise in a."""
    a = np.asarray(a, dtype=np.float64)
    if beta == 0.0:
        return np.ones_like(a), 2.0 / (2.0 - a)
    b1 = 1.0 - beta
    A11, A12, A21, A22 = 1.0 - a * b1, -a * beta, b1 * np.ones_like(a), beta * np.ones_like(a)
    B1, B2 = -a * b1, b1 * np.ones_like(a)
    M = np.zeros(a.shape + (3, 3))                    # unknowns S11, S12, S22 of S = A S Aᵀ + b bᵀ
    M[..., 0, 0], M[..., 0, 1], M[..., 0, 2] = 1 - A11 * A11, -2 * A11 * A12, -A12 * A12
    M[..., 1, 0], M[..., 1, 1], M[..., 1, 2] = -A11 * A21, 1 - (A11 * A22 + A12 * A21), -A12 * A22
    M[..., 2, 0], M[..., 2, 1], M[..., 2, 2] = -A21 * A21, -2 * A21 * A22, 1 - A22 * A22
    rhs = np.stack([B1 * B1, B1 * B2, B2 * B2], -1)
    S11, S12, S22 = np.moveaxis(np.linalg.solve(M, rhs[..., None])[..., 0], -1, 0)
    Em2 = b1 * b1 * S11 + 2 * b1 * beta * S12 + beta * beta * S22 + b1 * b1
    return S11 / (a / (2.0 - a)), Em2


class TrajectoryForecast:
    """Online fit of the few-mode surrogate and its differentiable terminal-loss forecast (module docstring).

    observe(step, eta, loss, hypergrad=None, temperature=None)
        after step `step` ran with LR `eta`: `loss` is the mini-batch loss measured at θ_step (before the step);
        `temperature` T = Σ_i (v̂_i − m̂_i²)/(√v̂_i + ε) from the optimiser's moments (None if unknown);
        `hypergrad` the measured ∂ℓ_step/∂η_{step−1} = −⟨g_step, u_{step−1}⟩ (None if unknown; used only with
        use_hypergrad=True).  One call per step, in order.
    refit() -> dict            refit θ on the whole history; diagnostics (chi2 ≈ 1 for a fit within the noise)
    terminal_loss(eta_future)  L̂_T (0-d tensor) for the LRs of the remaining steps (1-D tensor, any length ≥ 1),
                               differentiable in eta_future; valid after a refit with `ready` True
    ready                      a fit exists, is finite and its loss residuals are < max_chi2 × the noise

    Knobs: eta_ref (the LR scale the curvature grid is built around: the run's η_0), horizon (steps the budget
    is expected to buy; only sets the grid and buffer sizes), n_modes, span (η_ref·κ range), bin, ridge,
    tau_beta (β of the EMA behind m̂ in T), tau_rel (relative error assumed for the floor rows), momentum (β1 of
    the optimiser, for the hypergradient rows), use_tau, use_hypergrad, hg_weight, max_chi2.
    History is kept in numpy buffers (O(K) work per step); only the forecast is torch."""

    def __init__(self, eta_ref: float, horizon: int, n_modes: int = 16, span: tuple[float, float] | None = None,
                 bin: int = 5, ridge: float = 1e-4, use_tau: bool = True, tau_beta: float = 0.9,
                 tau_rel: float = 0.1, use_hypergrad: bool = False, momentum: float = 0.0, hg_weight: float = 1.0,
                 max_chi2: float = 25.0):
        self.eta_ref, self.horizon, self.bin, self.ridge = float(eta_ref), int(horizon), int(bin), float(ridge)
        self.use_tau, self.c_tau, self.tau_rel = use_tau, (1.0 - tau_beta) / (1.0 + tau_beta), float(tau_rel)
        self.use_hypergrad, self.momentum, self.hg_weight = use_hypergrad, float(momentum), float(hg_weight)
        self.max_chi2 = float(max_chi2)
        lo, hi = span if span is not None else (0.1 / max(horizon, 1), 1.0)
        self.kappa_np = np.logspace(math.log10(lo), math.log10(hi), n_modes) / self.eta_ref
        self.kappa = torch.from_numpy(self.kappa_np.copy())
        self.K = K = n_modes
        self._a_tab = np.logspace(-7, math.log10(1.95), 400)          # r(a), G(a) tabulated over a = ηκ
        self._r_tab, self._G_tab = momentum_moments(self._a_tab, self.momentum)
        self.phi, self.psi = np.ones(K), np.zeros(K)                   # Φ(τ), Ψ(τ) of the step about to run
        cap = max(horizon, 16) + 1
        self.PHI, self.PSI = np.zeros((cap, K)), np.zeros((cap, K))   # per step τ: Φ(τ), Ψ(τ)
        self.ETA = np.zeros(cap)                                       # η_τ
        self.LOSS, self.TAU, self.HG = (np.full(cap, np.nan) for _ in range(3))   # ℓ_τ, T_τ, ∂ℓ_{τ+1}/∂η_τ
        self.n = 0
        self.theta_np: np.ndarray | None = None                        # (1 + 2K,): L∞, a, n
        self.theta: torch.Tensor | None = None
        self.ready = False
        self.diag: dict[str, float] = {}

    # -- history --------------------------------------------------------------------------------------------
    def _grow(self) -> None:
        for name in ("PHI", "PSI", "ETA", "LOSS", "TAU", "HG"):
            a = getattr(self, name)
            setattr(self, name, np.concatenate([a, np.full_like(a, 0.0 if name in ("PHI", "PSI", "ETA") else np.nan)]))

    def _r(self, a: np.ndarray) -> np.ndarray:
        return np.interp(np.log(np.clip(a, 1e-7, 1.95)), np.log(self._a_tab), self._r_tab)

    def _r_torch(self, a: torch.Tensor) -> torch.Tensor:
        """r(a) as a differentiable piecewise-linear interpolation in log a (1 for plain SGD)."""
        if self.momentum == 0.0:
            return torch.ones_like(a)
        lt = torch.from_numpy(np.log(self._a_tab))
        rt = torch.from_numpy(self._r_tab)
        la = torch.log(a.clamp(1e-7, 1.95))
        i = torch.searchsorted(lt, la.detach().contiguous()).clamp(1, lt.numel() - 1)
        w = (la - lt[i - 1]) / (lt[i] - lt[i - 1])
        return rt[i - 1] + w * (rt[i] - rt[i - 1])

    def _G(self, a: np.ndarray) -> np.ndarray:
        return np.interp(np.log(np.clip(a, 1e-7, 1.95)), np.log(self._a_tab), self._G_tab)

    def observe(self, step: int, eta: float, loss: float, hypergrad: float | None = None,
                temperature: float | None = None) -> None:
        i = self.n
        if i == self.PHI.shape[0]:
            self._grow()
        if hypergrad is not None and math.isfinite(hypergrad) and i > 0:
            self.HG[i - 1] = hypergrad
        self.PHI[i], self.PSI[i], self.ETA[i] = self.phi, self.psi, eta
        if math.isfinite(loss):
            self.LOSS[i] = loss
        if temperature is not None and math.isfinite(temperature) and temperature > 0:
            self.TAU[i] = temperature
        a = eta * self.kappa_np
        f = np.minimum((1.0 - a) ** 2, 1e3)                           # an unstable mode grows; bounded for numerics
        self.phi = np.minimum(f * self.phi, 1e30)
        self.psi = np.minimum(f * self.psi + eta * eta * self._r(a), 1e30)
        self.n = i + 1

    @property
    def n_obs(self) -> int:
        return self.n

    # -- fit ------------------------------------------------------------------------------------------------
    @staticmethod
    def _noise_level(y: np.ndarray) -> float:
        """Robust per-observation noise std from successive differences (the signal moves slowly)."""
        if y.size < 4:
            return float(np.abs(y).mean()) + 1e-12
        return float(1.4826 * np.median(np.abs(np.diff(y))) / math.sqrt(2.0)) + 1e-12

    def _bin(self, rows: np.ndarray, y: np.ndarray):
        """Means over bins of `bin` consecutive rows (the newest bin complete); per-bin weight √count."""
        n = (rows.shape[0] // self.bin) * self.bin
        if n == 0:
            return rows, y, np.ones(rows.shape[0])
        start = rows.shape[0] - n
        Ab = rows[start:].reshape(-1, self.bin, rows.shape[1]).mean(1)
        yb = y[start:].reshape(-1, self.bin).mean(1)
        return Ab, yb, np.full(Ab.shape[0], math.sqrt(self.bin))

    def refit(self) -> dict:
        """Non-negative least squares for θ = (L∞, a, n) over the binned rows of the whole history."""
        K, t = self.K, self.n
        self.ready = False
        ok = np.isfinite(self.LOSS[:t])
        if ok.sum() < 3 * self.bin:
            return {"ok": 0.0}
        k, eta = self.kappa_np, self.ETA[:t, None]
        A = np.concatenate([np.ones((t, 1)), self.PHI[:t], self.PSI[:t]], 1)
        blocks_A, blocks_y = [], []
        s_l = self._noise_level(self.LOSS[:t][ok])
        Ab, yb, c = self._bin(A[ok], self.LOSS[:t][ok])
        blocks_A.append(Ab * (c / s_l)[:, None])
        blocks_y.append(yb * c / s_l)
        n_loss = Ab.shape[0]
        a = eta * k
        e_eq = eta * self._r(a) / (k * np.maximum(2.0 - a, 1e-3))      # equilibrium content per unit n at η_τ
        okt = np.isfinite(self.TAU[:t])
        if self.use_tau and okt.sum() >= 3 * self.bin:
            F = np.concatenate([np.zeros((t, 1 + K)), e_eq], 1)[okt]
            yF = (self.ETA[:t] * self.TAU[:t] / (4.0 * (1.0 - self.c_tau)))[okt]
            Fb, fb, cf = self._bin(F, yF)
            wf = cf / (self.tau_rel * np.maximum(np.abs(fb), 1e-300))
            blocks_A.append(Fb * wf[:, None])
            blocks_y.append(fb * wf)
        okh = np.isfinite(self.HG[:t])
        if self.use_hypergrad and okh.sum() >= 3 * self.bin:
            lin = -2.0 * k * (1.0 - a)                                   # d/dη of (1 − ηκ)²
            H = np.concatenate([np.zeros((t, 1)), lin * self.PHI[:t], lin * (self.PSI[:t] - e_eq)
                                + eta * self._G(a)], 1)[okh]
            yH = self.HG[:t][okh]
            s_h = self._noise_level(yH)
            Hb, hb, ch = self._bin(H, yH)
            blocks_A.append(Hb * (self.hg_weight * ch / s_h)[:, None])
            blocks_y.append(hb * self.hg_weight * ch / s_h)
        M, rhs = np.concatenate(blocks_A), np.concatenate(blocks_y)
        scale = np.maximum(np.linalg.norm(M, axis=0), 1e-300)
        P = M.shape[1]
        Xs, rr = M / scale, rhs
        if self.ridge > 0:                                               # ridge on the normalised a, n (not L∞)
            Xs = np.concatenate([Xs, math.sqrt(self.ridge * M.shape[0]) * np.eye(P)[1:]])
            rr = np.concatenate([rhs, np.zeros(P - 1)])
        try:
            x, _ = nnls(Xs, rr, maxiter=50 * P)
        except (RuntimeError, ValueError):
            return {"ok": 0.0}
        theta = x / scale
        res = M @ theta - rhs
        chi2 = float((res[:n_loss] ** 2).mean())
        self.theta_np, self.theta = theta, torch.from_numpy(theta.copy())
        self.ready = bool(np.isfinite(theta).all()) and chi2 < self.max_chi2
        e_now = self.state().numpy()
        self.diag = {"ok": float(self.ready), "chi2": chi2, "L_inf": float(theta[0]),
                     "reducible": float(e_now.sum()), "floor_per_eta": float((theta[1 + K:] / k).sum() / 2),
                     "loss_noise": s_l}
        return self.diag

    def state(self) -> torch.Tensor:
        """e(t): the fitted loss share of every mode at the step about to run (K,)."""
        K = self.K
        return torch.from_numpy(self.theta_np[1:1 + K] * self.phi + self.theta_np[1 + K:] * self.psi)

    # -- forecast -------------------------------------------------------------------------------------------
    def terminal_loss(self, eta_future: torch.Tensor, steps: torch.Tensor | None = None) -> torch.Tensor:
        """L̂_T for the remaining steps, differentiable in eta_future.  eta_future (1-D, length ≥ 1): the LR of each
        remaining step, or, with `steps` (same length, positive integers), the LR of each of consecutive blocks of
        steps[c] steps (a block at a constant LR has a closed form, so a long horizon costs O(blocks·K))."""
        K = self.K
        L_inf, n = self.theta[0], self.theta[1 + K:]
        e = self.state()
        eta = eta_future.reshape(-1, 1).to(torch.float64)
        a = eta * self.kappa
        logf = torch.log((1.0 - a) ** 2 + 1e-300)                              # per step of the block, (C, K)
        inj = self._r_torch(a) * eta ** 2                                      # noise injected per step per unit n
        if steps is not None:
            m = steps.reshape(-1, 1).to(torch.float64)
            # a block of m steps: factor f^m; injection Σ_{j<m} f^j = (1 − f^m)/(1 − f) (→ m as f → 1)
            geo = torch.where(logf.abs() > 1e-12, torch.expm1(m * logf) / torch.expm1(logf), m)
            inj, logf = inj * geo, m * logf
        total = logf.sum(0)
        after = total - logf.cumsum(0)                                          # Σ over later blocks
        # an unstable schedule (ηκ > 2 for long) gives a huge but finite forecast, never inf·0 = nan
        total, after = total.clamp(max=60.0), after.clamp(max=60.0)
        noise = (inj * torch.exp(after)).sum(0)                                 # (K,)
        return L_inf + (e * torch.exp(total) + n * noise).sum()

    def predict_history(self) -> np.ndarray:
        """The fitted loss at every observed step (diagnostics)."""
        return np.concatenate([np.ones((self.n, 1)), self.PHI[:self.n], self.PSI[:self.n]], 1) @ self.theta_np


class Adam:
    """torch.optim.Adam's update (β = (0.9, 0.999), ε = 1e-8) for one tensor, without importing torch.optim
    (whose first import pulls in torch._dynamo: ~20 s on this machine).  state_dict() carries over episodes."""

    def __init__(self, p: torch.Tensor, lr: float, betas=(0.9, 0.999), eps: float = 1e-8, state: dict | None = None):
        self.p, self.lr, self.betas, self.eps = p, lr, betas, eps
        st = state or {}
        self.m = st.get("m", torch.zeros_like(p)).clone()
        self.v = st.get("v", torch.zeros_like(p)).clone()
        self.k = st.get("k", 0)

    def zero_grad(self) -> None:
        self.p.grad = None

    @torch.no_grad()
    def step(self) -> None:
        b1, b2 = self.betas
        g = self.p.grad
        self.k += 1
        self.m.mul_(b1).add_(g, alpha=1 - b1)
        self.v.mul_(b2).addcmul_(g, g, value=1 - b2)
        self.p.sub_(self.lr * (self.m / (1 - b1 ** self.k)) / ((self.v / (1 - b2 ** self.k)).sqrt() + self.eps))

    def state_dict(self) -> dict:
        return {"m": self.m.clone(), "v": self.v.clone(), "k": self.k}


class _InwardClamp(torch.autograd.Function):
    """clamp(x, lo, hi) whose gradient passes where a descent step would move x back inside [lo, hi] (or x is
    inside or on the bound), and is 0 where it would push x further out.  A plain clamp has zero gradient outside,
    so a planner whose LR starts above the cap could never bring it down."""

    @staticmethod
    def forward(ctx, x, lo, hi):
        ctx.save_for_backward(x)
        ctx.lo, ctx.hi = lo, hi
        return x.clamp(lo, hi)

    @staticmethod
    def backward(ctx, g):
        (x,) = ctx.saved_tensors
        inside = (x >= ctx.lo) & (x <= ctx.hi)
        inward = ((x > ctx.hi) & (g > 0)) | ((x < ctx.lo) & (g < 0))     # descent (−g) moves x toward [lo, hi]
        return torch.where(inside | inward, g, torch.zeros_like(g)), None, None


def soft_clamp(x: torch.Tensor, lo: float, hi: float) -> torch.Tensor:
    """clamp(x, lo, hi) with the inward gradient of _InwardClamp."""
    return _InwardClamp.apply(x, lo, hi)


class TerminalPlanner:
    """log η_t = log η_0 + w·r_t,  r_t = [b_t, log(b_t + ε), 1]  (w = (ρ, κ, c)), i.e.
    η(b) = η_0 e^c (b + ε)^κ e^{ρb}, b = fraction of the budget left; w trained by Adam on L̂_T(w).

    Update rule (every `every` steps once `min_steps` steps have been observed, never at the last step):
      1. refit the forecast; skip the update if it is not `ready` (fallback: keep w);
      2. L̂_T(w) = forecast of the final loss with future LRs η(b; w) for the remaining steps (b from the current
         value down to 0; the steps grouped into ≤ `blocks` blocks at the LR of their middle, each block in closed
         form); g = ∂[L̂_T / (L̂_T − L̂∞)]/∂w (scale-free; Adam is anyway);
      3. `inner` Adam steps (lr `lr`, β = (0.9, 0.999)) on w;
      4. trust region: scale Δw so that max over the remaining b (block middles) of |Δ log η(b)| ≤ `trust`;
      5. bounds: κ ∈ kappa_range, ρ ∈ rho_range; log η/η_0 ∈ log_mult_range and η ≤ eta_max (the LR is clamped
         when used; the clamp lets gradients through at the bound itself).
    `warmup` multiplies η by (t+1)/warmup for the first steps (as the reference schedules do)."""

    def __init__(self, eta0: float, horizon: int, w0=None, lr: float = 0.02, every: int = 10, inner: int = 1,
                 trust: float = 0.1, eps: float = 0.01, kappa_range=(0.0, 4.0), rho_range=(-8.0, 8.0),
                 log_mult_range=(math.log(1e-3), math.log(10.0)), min_steps: int = 50, warmup: int = 0,
                 eta_max: float = math.inf, blocks: int = 64, forecast_kw: dict | None = None,
                 adam_state: dict | None = None):
        self.eta0, self.T, self.every, self.inner, self.trust = float(eta0), int(horizon), every, inner, trust
        self.blocks = int(blocks)
        self.eps, self.kappa_range, self.rho_range, self.lmr = eps, kappa_range, rho_range, log_mult_range
        self.min_steps, self.warmup, self.eta_max = min_steps, warmup, eta_max
        w = torch.zeros(3, dtype=torch.float64) if w0 is None else torch.as_tensor(w0, dtype=torch.float64)
        self.w = w.clone().requires_grad_(True)
        self.opt = Adam(self.w, lr=lr, state=adam_state)
        self.fc = TrajectoryForecast(min(eta0, eta_max), horizon, **(forecast_kw or {}))   # grid around the LRs used
        self.n_updates, self.n_skipped = 0, 0
        self.last_forecast = float("nan")

    def features(self, b: torch.Tensor) -> torch.Tensor:
        return torch.stack([b, torch.log(b + self.eps), torch.ones_like(b)], -1)

    def _hi(self) -> float:
        return min(self.lmr[1], math.log(self.eta_max / self.eta0))

    def log_mult(self, b: torch.Tensor, w: torch.Tensor | None = None) -> torch.Tensor:
        return soft_clamp(self.features(b) @ (self.w if w is None else w), self.lmr[0], self._hi())

    def budget_left(self, step: int) -> float:
        return 1.0 - step / self.T

    def eta(self, step: int) -> float:
        """η for step `step` (plain floats: no graph)."""
        b = self.budget_left(step)
        w = self.w.detach().tolist()
        z = w[0] * b + w[1] * math.log(b + self.eps) + w[2]
        e = self.eta0 * math.exp(min(max(z, self.lmr[0]), self._hi()))
        if self.warmup > 0 and step < self.warmup:
            e *= (step + 1) / self.warmup
        return e

    def future_b(self, step: int) -> torch.Tensor:
        return 1.0 - torch.arange(step, self.T, dtype=torch.float64) / self.T

    def future_blocks(self, step: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The remaining steps in at most `blocks` consecutive blocks: (b at each block's middle, steps per block)."""
        n_rem = self.T - step
        size = max(1, math.ceil(n_rem / self.blocks))
        starts = torch.arange(step, self.T, size, dtype=torch.float64)
        counts = torch.clamp(self.T - starts, max=size)
        return 1.0 - (starts + (counts - 1) / 2) / self.T, counts

    def observe(self, step: int, eta: float, loss: float, hypergrad: float | None = None,
                temperature: float | None = None) -> None:
        self.fc.observe(step, eta, loss, hypergrad, temperature)
        if step + 1 >= self.min_steps and (step + 1) % self.every == 0 and step + 1 < self.T:
            self.update(step + 1)

    def update(self, next_step: int) -> None:
        self.fc.refit()
        if not self.fc.ready:
            self.n_skipped += 1
            return
        b, counts = self.future_blocks(next_step)
        w_old = self.w.detach().clone()
        for _ in range(self.inner):
            self.opt.zero_grad()
            L = self.fc.terminal_loss(self.eta0 * torch.exp(self.log_mult(b)), counts)
            scale = max(float(L.detach()) - float(self.fc.theta[0]), 1e-300)
            (L / scale).backward()
            if not torch.isfinite(self.w.grad).all():
                self.n_skipped += 1
                with torch.no_grad():
                    self.w.copy_(w_old)
                return
            self.opt.step()
        with torch.no_grad():
            dw = self.w - w_old
            change = float((self.features(b) @ dw).abs().max())
            if change > self.trust:
                dw *= self.trust / change
            w_new = w_old + dw
            w_new[0].clamp_(*self.rho_range)
            w_new[1].clamp_(*self.kappa_range)
            self.w.copy_(w_new)
        self.last_forecast = float(L.detach())
        self.n_updates += 1


def gradient_check(seed: int = 0, n_modes: int = 6, horizon: int = 60, steps: int = 30, h: float = 1e-6,
                   momentum: float = 0.9) -> float:
    """Largest relative difference between autograd's ∂L̂_T/∂w and central finite differences, on a small problem:
    a forecast fitted to a synthetic noisy history (loss, temperature and hypergradient rows), future LRs
    η_0 e^{w·r(b)}, per step and in blocks.  A correct gradient gives ~1e-8; a test can assert < 1e-5."""
    g = torch.Generator().manual_seed(seed)
    fc = TrajectoryForecast(eta_ref=0.1, horizon=horizon, n_modes=n_modes, bin=2, use_hypergrad=True,
                            momentum=momentum)
    loss = 1.0
    for t in range(steps):
        eta = 0.1 * (1.0 - 0.5 * t / steps)
        noise = 0.01 * float(torch.randn(1, generator=g))
        fc.observe(t, eta, 0.2 + loss + noise, hypergrad=-0.5 * loss + 0.05 * float(torch.randn(1, generator=g)),
                   temperature=0.3)
        loss *= 0.97
    fc.refit()
    assert fc.theta is not None
    planner = TerminalPlanner(0.1, horizon, blocks=7)
    worst = 0.0
    for b, counts in ((planner.future_b(steps), None), planner.future_blocks(steps)):   # per step; in blocks
        w = torch.tensor([0.3, 0.7, -0.2], dtype=torch.float64, requires_grad=True)

        def f(w_):
            return fc.terminal_loss(0.1 * torch.exp(planner.features(b) @ w_), counts)

        f(w).backward()
        fd = torch.zeros(3, dtype=torch.float64)
        for i in range(3):
            e = torch.zeros(3, dtype=torch.float64)
            e[i] = h
            with torch.no_grad():
                fd[i] = (f(w + e) - f(w - e)) / (2 * h)
        worst = max(worst, float(((w.grad - fd).abs() / fd.abs().clamp(min=1e-12)).max()))
    return worst


if __name__ == "__main__":
    print("gradient check, max relative error:", gradient_check())
