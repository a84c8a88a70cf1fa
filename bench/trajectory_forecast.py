"""Terminal-loss forecast for a learning-rate planner: a few-mode noisy-quadratic surrogate of the run's own
loss trajectory, fitted online, rolled out under a candidate future schedule, differentiable in that schedule.

Self-contained (torch + scipy.optimize.nnls); nothing here calls the model.  `TrajectoryForecast` is the forecast,
`TerminalPlanner` the planner rule that trains the decoder row w by Adam on the forecast, `gradient_check` a
finite-difference check of the forecast's gradient (for a unit test).

The surrogate (why it has this form: see the module docstring of bench/noisy_quadratic.py and docs/method.md)
-------------------------------------------------------------------------------------------------------------
K modes with fixed curvatures κ_1 < ... < κ_K (log-spaced; fixed relative to the reference LR η_ref so that
η_ref·κ spans [1/(10·horizon), 1]).  Mode k carries a loss share e_k(τ) ≥ 0 that evolves under the applied LRs as
the expected loss of one coordinate of SGD on a quadratic with gradient noise:

    e_k(τ+1) = (1 − η_τ κ_k)² e_k(τ) + η_τ² n_k,          e_k(0) = a_k,
    loss(τ) = L∞ + Σ_k e_k(τ),

with unknowns L∞ ≥ 0 (irreducible loss), a_k ≥ 0 (initial loss per mode), n_k ≥ 0 (noise injected per mode).
For a given LR history, e_k(τ) = a_k Φ_k(τ) + n_k Ψ_k(τ) with Φ, Ψ computed by the same recursion, so every
observation is LINEAR in θ = (L∞, a, n):

    loss row         ℓ_τ            ≈ L∞ + Σ_k a_k Φ_k(τ) + n_k Ψ_k(τ)
    hypergradient    ∂ℓ_{τ+1}/∂η_τ  ≈ Σ_k −2κ_k(1 − η_τκ_k)(a_k Φ_k(τ) + n_k Ψ_k(τ)) + 2 η_τ n_k

The second row is what the one-step hypergradient −⟨g_{τ+1}, u_τ⟩ measures (without L∞: it separates the noise
floor, which moves with η, from the irreducible loss, which does not).  θ is the non-negative least-squares
solution over all rows (each kind weighted by the inverse of its noise level, estimated from successive
differences), a small ridge, rows averaged in bins of `bin` steps.

Forecast: from the current state e(t), the loss after the remaining steps with future LRs η_t..η_{T−1} is

    L̂_T = L∞ + Σ_k [ e_k(t) Π_τ (1 − η_τκ_k)² + n_k Σ_τ η_τ² Π_{τ'>τ} (1 − η_τ'κ_k)² ],

computed in closed form with cumulative sums of log(1 − ηκ)² (O(n_rem·K), no loop), differentiable in η.
"""
from __future__ import annotations

import math

import numpy as np
import torch
from scipy.optimize import nnls


def momentum_moments(a: np.ndarray, beta: float) -> tuple[np.ndarray, np.ndarray]:
    """Stationary moments of one coordinate of momentum SGD on a unit quadratic (curvature 1, preconditioner 1,
    gradient-noise variance 1, step a = ηκ):  m_t = β m_{t−1} + (1−β)(x_t + ξ_t),  x_{t+1} = x_t − a m_t.
    Returns (r, G): r = E[x²] relative to plain SGD's a/(2 − a), G = E[m_t²] (the stationary one-step hypergradient
    is η·n·G per mode, n the mode's noise injection).  β = 0: r = 1, G = 2/(2 − a).  Solves the 2×2 discrete
    Lyapunov equation Σ = AΣAᵀ + bbᵀ for the state (x_t, m_{t−1}) in closed form (3 unknowns), elementwise in a."""
    a = np.asarray(a, dtype=np.float64)
    if beta == 0.0:
        return np.ones_like(a), 2.0 / (2.0 - a)
    b1 = 1.0 - beta
    A11, A12, A21, A22 = 1.0 - a * b1, -a * beta, b1 * np.ones_like(a), beta * np.ones_like(a)
    B1, B2 = -a * b1, b1 * np.ones_like(a)
    # unknowns S11, S12, S22:  S = A S Aᵀ + b bᵀ
    M = np.zeros(a.shape + (3, 3))
    M[..., 0, 0] = 1 - A11 * A11; M[..., 0, 1] = -2 * A11 * A12; M[..., 0, 2] = -A12 * A12
    M[..., 1, 0] = -A11 * A21; M[..., 1, 1] = 1 - (A11 * A22 + A12 * A21); M[..., 1, 2] = -A12 * A22
    M[..., 2, 0] = -A21 * A21; M[..., 2, 1] = -2 * A21 * A22; M[..., 2, 2] = 1 - A22 * A22
    rhs = np.stack([B1 * B1, B1 * B2, B2 * B2], -1)
    S11, S12, S22 = np.moveaxis(np.linalg.solve(M, rhs[..., None])[..., 0], -1, 0)
    Em2 = b1 * b1 * S11 + 2 * b1 * beta * S12 + beta * beta * S22 + b1 * b1
    return S11 / (a / (2.0 - a)), Em2


class TrajectoryForecast:
    """Online fit of the few-mode surrogate and its differentiable terminal-loss forecast.

    observe(step, eta, loss, hypergrad=None, temperature=None)
        step `step` ran with LR `eta`; `loss` is the mini-batch loss measured at θ_step (before the step),
        `hypergrad` the measured ∂ℓ_step/∂η_{step−1} = −⟨g_step, u_{step−1}⟩ (None if unknown), `temperature`
        the optimiser's gradient-noise temperature τ = Σ_i (v̂_i − m̂_i²)/(√v̂_i + ε) (Adam; SGD: Σ_i (v̂_i − m̂_i²))
        from EMAs with β = tau_beta of the gradients so far (None if unknown)
    refit() -> dict                      refit θ on the recent history (see `window`); returns diagnostics
    terminal_loss(eta_future) -> Tensor  L̂_T for the LRs of the remaining steps (1-D, differentiable)
    ready                                a fit exists and passed the sanity checks

    History is kept in numpy buffers (O(K) work per step); only the forecast is torch.

    The fit window.  The surrogate's curvatures are fixed, but an adaptive optimiser's effective curvatures
    (Pᵢhᵢ, P = 1/√v̂) drift while v̂ adapts; the first part of the run is then not described by the same modes.
    The fit therefore uses the steps from s = max(min_start, (1 − window)·t) on, with the state at s free:
    e_k(τ) = e_k(s)·Φ_k(s→τ) + n_k·Ψ_k(s→τ), unknowns (L∞, e(s), n)."""

    def __init__(self, eta_ref: float, horizon: int, n_modes: int = 16, span: tuple[float, float] | None = None,
                 bin: int = 5, ridge: float = 1e-4, use_hypergrad: bool = True, hg_weight: float = 1.0,
                 momentum: float = 0.0, use_tau: bool = True, tau_beta: float = 0.9, tau_rel: float = 0.1,
                 floor_shape: str = "free", window: float = 1.0, min_start: int = 0, max_chi2: float = 25.0,
                 anchor_inf: bool = True, loss_weight: float = 1.0, signal_shape: str = "free",
                 eq_start: bool = False, alphas=(-1.0, -0.5, 0.0, 0.5, 1.0, 1.5), inf_ridge: float = 0.0):
        self.eta_ref, self.horizon, self.bin, self.ridge = float(eta_ref), int(horizon), int(bin), float(ridge)
        self.use_hypergrad, self.hg_weight = use_hypergrad, float(hg_weight)
        self.momentum = float(momentum)
        self._a_tab = np.logspace(-7, math.log10(1.95), 400)     # tables of r(a), G(a) over a = ηκ
        self._r_tab, self._G_tab = momentum_moments(self._a_tab, self.momentum)
        self.use_tau, self.c_tau, self.tau_rel = use_tau, (1.0 - tau_beta) / (1.0 + tau_beta), float(tau_rel)
        self.floor_shape, self.window, self.min_start = floor_shape, float(window), int(min_start)
        self.max_chi2, self.anchor_inf, self.loss_weight = float(max_chi2), anchor_inf, float(loss_weight)
        self.signal_shape, self.eq_start, self.alphas = signal_shape, eq_start, tuple(alphas)
        self.inf_ridge = float(inf_ridge)
        lo, hi = span if span is not None else (0.1 / max(horizon, 1), 1.0)
        self.kappa_np = np.logspace(math.log10(lo), math.log10(hi), n_modes) / self.eta_ref
        self.kappa = torch.from_numpy(self.kappa_np.copy())
        K = self.K = n_modes
        self.log_phi = np.zeros(K)                          # log Φ(τ), Ψ(τ) (from step 0) of the step about to run
        self.psi = np.zeros(K)
        cap = max(horizon, 16) + 1
        self.LP, self.PS = np.zeros((cap, K)), np.zeros((cap, K))     # per step τ: log Φ(τ), Ψ(τ)
        self.ETA, self.LOSS = np.zeros(cap), np.full(cap, np.nan)     # η_τ, ℓ_τ
        self.HG, self.TAU = np.full(cap, np.nan), np.full(cap, np.nan)   # ∂ℓ_{τ+1}/∂η_τ, τ-temperature at τ
        self.n = 0                                           # steps recorded
        self.theta_np: np.ndarray | None = None              # (1 + 2K,): L∞, e(s), n
        self.theta: torch.Tensor | None = None
        self._state: np.ndarray | None = None                # e(t) of the latest fit
        self.ready = False
        self.diag: dict[str, float] = {}

    # -- history --------------------------------------------------------------------------------------------
    def _grow(self) -> None:
        for name in ("LP", "PS"):
            a = getattr(self, name)
            setattr(self, name, np.concatenate([a, np.zeros_like(a)]))
        for name in ("ETA", "LOSS", "HG", "TAU"):
            a = getattr(self, name)
            setattr(self, name, np.concatenate([a, np.full_like(a, np.nan if name != "ETA" else 0.0)]))

    def observe(self, step: int, eta: float, loss: float, hypergrad: float | None = None,
                temperature: float | None = None) -> None:
        """Record one step (steps in order, one call each; `step` is only used to pair the hypergradient)."""
        i = self.n
        if i == self.LP.shape[0]:
            self._grow()
        if hypergrad is not None and math.isfinite(hypergrad) and i > 0:
            self.HG[i - 1] = hypergrad
        self.LP[i], self.PS[i], self.ETA[i] = self.log_phi, self.psi, eta
        self.LOSS[i] = loss if math.isfinite(loss) else np.nan
        if temperature is not None and math.isfinite(temperature) and temperature > 0:
            self.TAU[i] = temperature
        f = np.minimum((1.0 - eta * self.kappa_np) ** 2, 1e3)  # (an unstable mode grows; bounded for numerics)
        self.log_phi = np.minimum(self.log_phi + np.log(np.maximum(f, 1e-300)), 60.0)
        self.psi = np.minimum(f * self.psi + eta * eta * self._r(eta * self.kappa_np), 1e30)
        self.n = i + 1

    def _r(self, a: np.ndarray) -> np.ndarray:
        return np.interp(np.log(np.clip(a, 1e-7, 1.95)), np.log(self._a_tab), self._r_tab)

    def _G(self, a: np.ndarray) -> np.ndarray:
        return np.interp(np.log(np.clip(a, 1e-7, 1.95)), np.log(self._a_tab), self._G_tab)

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

    def window_start(self) -> int:
        return min(max(self.min_start, int((1.0 - self.window) * self.n)), max(self.n - 3 * self.bin, 0))

    def refit(self) -> dict:
        """Non-negative least squares for θ = (L∞, e(s), n) over the binned rows of the window.  With a window
        (window < 1) and anchor_inf, L∞ is taken from a fit over the whole history first (a long history
        separates the irreducible loss from slow modes better than a short one)."""
        s = self.window_start()
        if s > 0 and self.anchor_inf:
            d0 = self._fit(0, None)
            if not self.ready:
                return d0
            return self._fit(s, float(self.theta_np[0]))
        return self._fit(s, None)

    def _fit(self, s: int, L_fixed: float | None) -> dict:
        K, t = self.K, self.n
        if t - s < 3 * self.bin:
            self.ready = False
            return {"ok": 0.0}
        k = self.kappa_np
        R = np.exp(np.minimum(self.LP[s:t] - self.LP[s], 0.0))          # Φ(s→τ), (m, K)
        Q = self.PS[s:t] - self.PS[s] * R                                # Ψ(s→τ)
        eta = self.ETA[s:t, None]
        blocks_A, blocks_y = [], []
        ok = np.isfinite(self.LOSS[s:t])
        A = np.concatenate([np.ones((t - s, 1)), R, Q], 1)[ok]
        yL = self.LOSS[s:t][ok]
        s_l = self._noise_level(yL)
        Ab, yb, c = self._bin(A, yL)
        blocks_A.append(Ab * (self.loss_weight * c / s_l)[:, None])
        blocks_y.append(yb * self.loss_weight * c / s_l)
        n_loss = Ab.shape[0]
        if self.use_hypergrad:
            okh = np.isfinite(self.HG[s:t])
            if okh.sum() >= 3 * self.bin:
                a = eta * k
                lin = -2.0 * k * (1.0 - a)                               # d/dη of (1 − ηκ)²
                e_eq = eta * self._r(a) / (k * np.maximum(2.0 - a, 1e-3))  # equilibrium content per unit n
                # progress on the content above equilibrium + the stationary hypergradient η·n·G(ηκ)
                H = np.concatenate([np.zeros((t - s, 1)), lin * R, lin * (Q - e_eq) + eta * self._G(a)], 1)[okh]
                yH = self.HG[s:t][okh]
                s_h = self._noise_level(yH)
                Hb, hb, ch = self._bin(H, yH)
                blocks_A.append(Hb * (self.hg_weight * ch / s_h)[:, None])
                blocks_y.append(hb * self.hg_weight * ch / s_h)
        if self.use_tau:
            okt = np.isfinite(self.TAU[s:t])
            if okt.sum() >= 3 * self.bin:
                F = np.zeros((t - s, 1 + 2 * K))
                F[:, 1 + K:] = eta * self._r(eta * k) / (k * np.maximum(2.0 - eta * k, 1e-3))  # floor per unit n
                F = F[okt]
                yF = (eta[:, 0] * self.TAU[s:t] / (4.0 * (1.0 - self.c_tau)))[okt]
                Fb, fb, cf = self._bin(F, yF)
                wf = cf / (self.tau_rel * np.maximum(np.abs(fb), 1e-300))
                blocks_A.append(Fb * wf[:, None])
                blocks_y.append(fb * wf)
        M = np.concatenate(blocks_A)
        rhs = np.concatenate(blocks_y)
        if L_fixed is not None:                        # L∞ given: move it to the right-hand side
            rhs = rhs - M[:, 0] * L_fixed
            M = M.copy()
            M[:, 0] = 0.0
        # θ = T x: the parametrisation (signal at the window start: free per mode or a power law A·r^α; floor
        # shares n_k/κ_k: free or flat; with `eq_start` the noise content at s is taken at equilibrium with η_s)
        r = k / math.sqrt(k[0] * k[-1])
        e_eq_s = self.ETA[s] * self._r(self.ETA[s] * k) / (k * np.maximum(2.0 - self.ETA[s] * k, 1e-3))
        Tn = np.eye(K) if self.floor_shape == "free" else k[:, None]          # n = Tn·x_n
        cands = []
        for al in (self.alphas if self.signal_shape == "power" else (None,)):
            Te = np.eye(K) if al is None else (r ** al)[:, None]              # e_s = Te·x_e (+ e_eq∘n)
            pe, pn = Te.shape[1], Tn.shape[1]
            T = np.zeros((1 + 2 * K, 1 + pe + pn))
            T[0, 0] = 1.0
            T[1:1 + K, 1:1 + pe] = Te
            T[1 + K:, 1 + pe:] = Tn
            if self.eq_start:
                T[1:1 + K, 1 + pe:] = e_eq_s[:, None] * Tn
            cands.append((al, T))
        best = None
        for al, T in cands:
            X = M @ T
            scale = np.maximum(np.linalg.norm(X, axis=0), 1e-300)
            Xs = X / scale
            P = Xs.shape[1]
            if self.ridge > 0:                         # ridge on the column-normalised e, n (and L∞ × inf_ridge)
                Rg = np.eye(P)
                Rg[0, 0] = math.sqrt(self.inf_ridge)
                Xs = np.concatenate([Xs, math.sqrt(self.ridge * M.shape[0]) * Rg])
                rr = np.concatenate([rhs, np.zeros(P)])
            else:
                rr = rhs
            try:
                x, rn = nnls(Xs, rr, maxiter=50 * P)
            except (RuntimeError, ValueError):
                continue
            if best is None or rn < best[0]:
                best = (rn, T @ (x / scale), al)
        if best is None:
            self.ready = False
            return {"ok": 0.0}
        theta = best[1]
        if L_fixed is not None:
            theta[0] = L_fixed
            rhs = rhs + M[:, 0] * 0.0
        res = M @ theta - rhs
        chi2 = float((res[:n_loss] ** 2).mean()) / self.loss_weight ** 2   # ≈ 1 for a fit within the loss noise
        self.theta_np = theta
        self.theta = torch.from_numpy(theta.copy())
        Rt = np.exp(np.minimum(self.log_phi - self.LP[s], 0.0))
        Qt = self.psi - self.PS[s] * Rt
        self._state = theta[1:1 + K] * Rt + theta[1 + K:] * Qt
        self.ready = bool(np.isfinite(theta).all()) and chi2 < self.max_chi2
        self.diag = {"ok": float(self.ready), "chi2": chi2, "L_inf": float(theta[0]), "start": float(s),
                     "alpha": float("nan") if best[2] is None else best[2],
                     "reducible": float(self._state.sum()), "floor_per_eta": float((theta[1 + K:] / k).sum() / 2),
                     "loss_noise": s_l}
        return self.diag

    def state(self) -> torch.Tensor:
        """e(t): the fitted loss share of every mode at the latest observed step (K,)."""
        return torch.from_numpy(self._state.copy())

    # -- forecast -------------------------------------------------------------------------------------------
    def terminal_loss(self, eta_future: torch.Tensor) -> torch.Tensor:
        """L̂_T for LRs η_t..η_{T−1} of the remaining steps (1-D, any length ≥ 1): differentiable in eta_future."""
        K = self.K
        L_inf, n = self.theta[0], self.theta[1 + K:]
        e = self.state()
        eta = eta_future.reshape(-1, 1).to(torch.float64)
        logf = torch.log((1.0 - eta * self.kappa) ** 2 + 1e-300)              # (n_rem, K)
        total = logf.sum(0)
        after = total - logf.cumsum(0)                                          # Σ_{τ'>τ} log f_τ'
        # an unstable schedule (ηκ > 2 for long) gives a huge but finite forecast, never inf·0 = nan
        total, after = total.clamp(max=60.0), after.clamp(max=60.0)
        noise = (eta ** 2 * torch.exp(after)).sum(0)                            # (K,)
        return L_inf + (e * torch.exp(total) + n * noise).sum()


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


def soft_clamp(x: torch.Tensor, lo: float, hi: float) -> torch.Tensor:
    """clamp(x, lo, hi) whose gradient is 1 on the boundary itself (so a w sitting on a bound can leave it)."""
    return x - torch.relu(x - hi) + torch.relu(lo - x)


class TerminalPlanner:
    """log η_t = log η_0 + w·r_t,  r_t = [b_t, log(b_t + ε), 1]  (w = (ρ, κ, c)),
    i.e. η(b) = η_0 e^c (b + ε)^κ e^{ρ b}, with w trained by Adam on the forecast terminal loss L̂_T(w).

    Every `every` steps (once `min_steps` have been observed): refit the forecast; if the fit is sane, take
    `inner` Adam steps on L̂_T(w) where the future LRs are η(b_τ; w) for the remaining steps; each outer update
    is limited to max_b |Δ log η(b)| ≤ `trust` over the remaining b (trust region), κ is kept in `kappa_range`,
    log η/η_0 in `log_mult_range` (the LR itself is clamped, so the gradient vanishes outside).
    The gradient is normalised by L̂_T's reducible part (scale-free) before Adam (which is scale-free anyway)."""

    def __init__(self, eta0: float, horizon: int, w0=None, lr: float = 0.05, every: int = 10, inner: int = 1,
                 trust: float = 0.2, eps: float = 0.01, kappa_range=(0.0, 4.0), rho_range=(-8.0, 8.0),
                 log_mult_range=(math.log(1e-3), math.log(10.0)), min_steps: int = 50, warmup: int = 0,
                 eta_max: float = math.inf, forecast_kw: dict | None = None, adam_state: dict | None = None):
        self.eta0, self.T, self.every, self.inner, self.trust = float(eta0), int(horizon), every, inner, trust
        self.eps, self.kappa_range, self.rho_range, self.lmr = eps, kappa_range, rho_range, log_mult_range
        self.min_steps, self.warmup, self.eta_max = min_steps, warmup, eta_max
        self.w = torch.zeros(3, dtype=torch.float64) if w0 is None else torch.as_tensor(w0, dtype=torch.float64).clone()
        self.w.requires_grad_(True)
        self.opt = Adam(self.w, lr=lr, state=adam_state)
        self.fc = TrajectoryForecast(eta0, horizon, **(forecast_kw or {}))
        self.n_updates, self.n_skipped = 0, 0
        self.last_forecast = float("nan")

    def features(self, b: torch.Tensor) -> torch.Tensor:
        return torch.stack([b, torch.log(b + self.eps), torch.ones_like(b)], -1)

    def log_mult(self, b: torch.Tensor, w: torch.Tensor | None = None) -> torch.Tensor:
        w = self.w if w is None else w
        hi = min(self.lmr[1], math.log(self.eta_max / self.eta0))
        return soft_clamp(self.features(b) @ w, self.lmr[0], hi)

    def budget_left(self, step: int) -> float:
        return 1.0 - step / self.T

    def eta(self, step: int) -> float:
        b = self.budget_left(step)
        w = self.w.detach().tolist()
        z = w[0] * b + w[1] * math.log(b + self.eps) + w[2]
        hi = min(self.lmr[1], math.log(self.eta_max / self.eta0))
        e = self.eta0 * math.exp(min(max(z, self.lmr[0]), hi))
        if self.warmup > 0 and step < self.warmup:
            e *= (step + 1) / self.warmup
        return e

    def future_b(self, step: int) -> torch.Tensor:
        return 1.0 - torch.arange(step, self.T, dtype=torch.float64) / self.T

    def observe(self, step: int, eta: float, loss: float, hypergrad: float | None = None,
                temperature: float | None = None) -> None:
        self.fc.observe(step, eta, loss, hypergrad, temperature)
        if step + 1 >= self.min_steps and (step + 1) % self.every == 0 and step + 1 < self.T:
            self.update(step + 1)

    def update(self, next_step: int) -> None:
        diag = self.fc.refit()
        if not self.fc.ready:
            self.n_skipped += 1
            return
        b = self.future_b(next_step)
        w_old = self.w.detach().clone()
        for _ in range(self.inner):
            self.opt.zero_grad()
            eta = self.eta0 * torch.exp(self.log_mult(b))
            L = self.fc.terminal_loss(eta)
            scale = max(float(L.detach()) - float(self.fc.theta[0]), 1e-300)
            (L / scale).backward()
            if not torch.isfinite(self.w.grad).all():
                self.n_skipped += 1
                return
            self.opt.step()
        with torch.no_grad():
            dw = self.w - w_old
            change = (self.features(b) @ dw).abs().max()
            if change > self.trust:
                dw *= self.trust / change
            w_new = w_old + dw
            w_new[0].clamp_(*self.rho_range)
            w_new[1].clamp_(*self.kappa_range)
            self.w.copy_(w_new)
        self.last_forecast = float(L.detach())
        self.n_updates += 1


def gradient_check(seed: int = 0, n_modes: int = 6, horizon: int = 60, steps: int = 30, h: float = 1e-6) -> float:
    """Largest relative difference between autograd's ∂L̂_T/∂w and central finite differences, on a small problem:
    a forecast fitted to a synthetic noisy history, future LRs η_0 e^{w·r(b)}.  A correct gradient gives ~1e-7."""
    g = torch.Generator().manual_seed(seed)
    fc = TrajectoryForecast(eta_ref=0.1, horizon=horizon, n_modes=n_modes, bin=2)
    loss = 1.0
    for t in range(steps):
        eta = 0.1 * (1.0 - 0.5 * t / steps)
        noise = 0.01 * float(torch.randn(1, generator=g))
        fc.observe(t, eta, 0.2 + loss + noise, hypergrad=-0.5 * loss + 0.05 * float(torch.randn(1, generator=g)))
        loss *= 0.97
    fc.refit()
    assert fc.theta is not None
    planner = TerminalPlanner(0.1, horizon)
    b = planner.future_b(steps)
    w = torch.tensor([0.3, 0.7, -0.2], dtype=torch.float64, requires_grad=True)

    def f(w_):
        return fc.terminal_loss(0.1 * torch.exp(planner.features(b) @ w_))

    f(w).backward()
    fd = torch.zeros(3, dtype=torch.float64)
    for i in range(3):
        e = torch.zeros(3, dtype=torch.float64)
        e[i] = h
        with torch.no_grad():
            fd[i] = (f(w + e) - f(w - e)) / (2 * h)
    return float(((w.grad - fd).abs() / fd.abs().clamp(min=1e-12)).max())


if __name__ == "__main__":
    print("gradient check, max relative error:", gradient_check())
