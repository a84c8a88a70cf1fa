"""GRAFF (docs/method.md): the decoder's budget coefficients, the terminal objective and its gradient, the guard,
measurement steps, the token-multiplier gradient without a JVP, warm start, frozen W, state."""
import math

import pytest
import torch

from src.model import (GRAFF_FORMAT, RegretMeter, StepContext, finite_difference_jvp, log_lr_multiplier,
                       per_token_jvp, preconditioned_gradient, readout, token_multipliers, unflat)
from src.train import Budget, optimiser_step
from tests.helpers import random_batch

CPU = torch.device("cpu")


def no_autocast():
    return torch.autocast(device_type="cpu", enabled=False)


def run_steps(planner, n, start=0, budget_steps=200, seed=0, check=None, clip=1.0):
    """n optimiser steps of the real step function on a budget of `budget_steps` steps."""
    budget = Budget(budget_steps, "steps", CPU)
    budget.steps_done = start
    results = []
    for t in range(start, start + n):
        budget.last = budget.now()
        ctx = StepContext(step=t, elapsed=budget.last, budget_left=budget.fraction_left(), progress=budget.progress(),
                          steps_left=budget.steps_left())
        results.append(optimiser_step(planner, [random_batch(seed=seed + t)], CPU, no_autocast, clip, ctx))
        budget.steps_done += 1
        if check is not None:
            check(planner)
    return results


class StubForecast:
    """A forecast whose terminal loss rewards progress (the mean η) and penalises a high LR at the end (the noise
    floor): the situation in which decaying to the end of the budget is right."""
    ready = True
    theta = torch.tensor([0.0])                   # its irreducible loss

    def __init__(self, floor: float, lr: float = 1e-2):
        self.floor, self.lr = floor, lr

    def observe(self, *args, **kwargs):
        pass

    def refit(self):
        return {"ok": 1.0}

    def terminal_loss(self, etas, from_start=False):
        x = etas / self.lr
        return 11.0 - x.mean() + self.floor * x[-5:].mean() ** 2


def test_w_and_the_encoder_learn_every_k_steps_and_eta_follows_the_budget_every_step(make_planner):
    planner, *_ = make_planner("graff", update_every=3, outer_lr=0.05)
    planner.forecast = StubForecast(floor=50.0)
    encoder0 = [p.detach().clone() for p in planner.net.gru.parameters()]
    w0 = planner.net.W.detach().clone()
    etas = [r.eta for r in run_steps(planner, 40)]
    assert planner.activity["outer"] >= 10 and planner.activity["curvature"] >= 10
    assert not torch.equal(planner.net.W.detach(), w0)
    assert any(not torch.equal(a, b) for a, b in zip(encoder0, planner.net.gru.parameters()))
    late = etas[30:]                                            # past the warmup and the first terminal updates
    assert len(set(late)) == len(late)                          # η moves every step (b_t does), not only at updates


@pytest.mark.parametrize("use_budget", [True, False])
def test_the_budget_coefficients_learn_a_decay_when_the_end_of_the_budget_pays_for_it(make_planner, use_budget):
    planner, *_ = make_planner("graff", update_every=2, use_budget=use_budget, outer_lr=0.05)
    planner.forecast = StubForecast(floor=200.0)
    run_steps(planner, 100, budget_steps=120)
    kappa = planner.log()["w_budget_kappa"]
    if use_budget:
        assert kappa > 0.1                                      # η(b) = … (b + ε)^κ: a decay to the end
        b = torch.linspace(1, 0, 11)
        curve = torch.exp(readout(planner.h_bar, b) @ planner.net.W[0].detach())
        assert curve[-1] < 0.5 * curve[0]
    else:
        assert kappa == 0.0                                     # without the feature W cannot see the budget


@pytest.mark.parametrize("from_start", [False, True])
def test_the_terminal_objective_gradient_matches_a_finite_difference(from_start):
    """∂L̂_T/∂W through the forecast's rollout with the planner's own future η(b; W) (and, from the start, its
    re-planned past): autograd against central differences, on a forecast fitted to a synthetic noisy history
    (loss, temperature and hypergradient rows)."""
    from src.model import TrajectoryForecast
    g = torch.Generator().manual_seed(0)
    fc = TrajectoryForecast(0.1, 60, n_modes=6, bin=2, use_hypergrad=True, momentum=0.9)
    loss = 1.0
    for t in range(30):
        eta = 0.1 * (1.0 - 0.5 * t / 30)
        fc.observe(t, eta, 0.2 + loss + 0.01 * float(torch.randn(1, generator=g)),
                   hypergrad=-0.5 * loss + 0.05 * float(torch.randn(1, generator=g)), temperature=0.3)
        loss *= 0.97
    fc.refit()
    assert fc.theta is not None
    h_bar = torch.randn(4, dtype=torch.float64, generator=g) * 0.3
    b = torch.linspace(1.0 if from_start else 0.5, 0.0, 60 if from_start else 30, dtype=torch.float64)

    def forecast(w):
        return fc.terminal_loss(0.1 * torch.exp(readout(h_bar, b) @ w), from_start=from_start)

    w = torch.tensor([0.1, -0.2, 0.05, 0.3, 0.3, 0.7, -0.2], dtype=torch.float64, requires_grad=True)
    forecast(w).backward()
    fd = torch.zeros_like(w)
    for i in range(w.numel()):
        e = torch.zeros_like(w)
        e[i] = 1e-6
        with torch.no_grad():
            fd[i] = (forecast(w + e) - forecast(w - e)) / 2e-6
    assert torch.allclose(w.grad, fd, rtol=1e-5, atol=1e-9)


def test_rolled_out_from_its_start_with_the_applied_lrs_the_forecast_lands_on_its_current_state():
    """The whole-episode forecast (span=episode) starts from the fitted start e(0) = a and re-plays the past: with the
    LRs the run applied it must agree with the forecast from the current state e(t) for any future."""
    from src.model import TrajectoryForecast
    g = torch.Generator().manual_seed(1)
    fc = TrajectoryForecast(0.05, 80, n_modes=8, bin=2)
    applied, loss = [], 2.0
    for t in range(40):
        applied.append(0.05 * min(1.0, (t + 1) / 5))
        fc.observe(t, applied[-1], 0.3 + loss + 0.02 * float(torch.randn(1, generator=g)), temperature=0.5)
        loss *= 0.95
    fc.refit()
    future = torch.linspace(0.05, 0.001, 40, dtype=torch.float64)
    whole = fc.terminal_loss(torch.cat([torch.tensor(applied, dtype=torch.float64), future]), from_start=True)
    assert float(whole) == pytest.approx(float(fc.terminal_loss(future)), rel=1e-9)


def test_span_episode_trains_eta_at_the_steps_already_run_and_remaining_does_not(make_planner):
    """With span=episode the objective reaches η at the budget's start (re-planned with the state each step had),
    which is what pre-training needs for the next episode's start; span=remaining sees only the budget left."""
    class StartForecast(StubForecast):
        def terminal_loss(self, etas, from_start=False):    # rewards a high η at the first step of the episode
            return 11.0 - etas[0] / self.lr if from_start else 11.0 + 0.0 * etas.sum()
    start = {}
    for span in ("episode", "remaining"):
        planner, *_ = make_planner("graff", update_every=2, outer_lr=0.05, span=span, token_sequences=0)
        planner.forecast = StartForecast(floor=0.0)
        run_steps(planner, 40)
        start[span] = float(planner.past_etas()[0]) / planner.lr_init      # η at step 0 under the final W
    assert start["episode"] > 1.5 * start["remaining"], start


def test_the_greedy_objective_raises_eta_when_the_loss_keeps_falling_along_the_step(make_planner):
    from src.model import PendingUpdate
    planner, *_ = make_planner("graff", objective="greedy", token_sequences=0, stability_guard=2.0)
    h_bar = torch.randn(planner.cfg.hidden_dim)
    r = readout(h_bar, 0.5)
    ctx = StepContext(step=2, elapsed=1, budget_left=0.5, progress=0.5, steps_left=10)
    for hypergradient, direction in [(-1.0, 1), (+1.0, -1)]:            # −⟨g_{t+1}, u_t⟩ < 0: a larger step helps
        eta = planner.lr_init * torch.exp(planner.net.W[0] @ r)
        planner.pending = PendingUpdate(h_bar=h_bar, eta=eta, readout=r)
        planner.curv.hypergradient = hypergradient
        before = float(planner.net.W[0].detach() @ r)
        planner.outer_update(ctx, 0.5)
        assert (float(planner.net.W[0].detach() @ r) - before) * direction > 0


def test_the_guard_holds_every_step_even_when_the_curvature_jumps(make_planner):
    planner, *_ = make_planner("graff", lr=0.5, update_every=2)
    edge = planner.edge

    def guard_holds(p):
        lam = p.curv.lam_max
        assert lam == 0.0 or p.eta * lam <= 1.9 * edge / 2 * (1 + 1e-5), (p.eta, lam)

    run_steps(planner, 8, check=guard_holds)
    assert planner.curv.lam_max > 0
    real_observe = planner.curv.observe

    def jumping_observe():                                      # the estimate jumps 100× between updates
        ok = real_observe()
        planner.curv.num_ema = 100.0 * abs(planner.curv.num_ema) + 1.0
        planner.curv.den_ema = abs(planner.curv.den_ema) + 1e-12
        return ok

    planner.curv.observe = jumping_observe
    run_steps(planner, 6, start=8, check=guard_holds)


def test_measurement_steps_are_unweighted_and_the_others_reweighted(make_planner):
    planner, *_ = make_planner("graff", update_every=4, freeze=True)
    with torch.no_grad():
        planner.net.W[1:] = 3.0
    seen = {}
    real = planner.weigh_tokens

    def spy(tokens):
        m = real(tokens)
        seen[tokens.step] = None if m is None else float(m.std())
        return m

    planner.weigh_tokens = spy
    run_steps(planner, 10)
    measured = {t for t in seen if planner.is_measurement_step(t)}
    assert measured == {1, 2, 5, 6, 9}
    assert all(seen[t] is None for t in measured) and all(seen[t] > 0.05 for t in seen if t not in measured)


def test_without_token_multipliers_every_token_weighs_one_and_the_token_rows_never_move(make_planner):
    """Ablation (e), `token_multipliers: false`: m ≡ 1 at every step (weigh_tokens returns None), W_{1:K} neither
    used nor trained, while η is still planned and W_0 still learns; the full method logs the spread of m."""
    planner, *_ = make_planner("graff", update_every=2, token_multipliers=False)
    planner.forecast = StubForecast(floor=50.0)
    with torch.no_grad():
        planner.net.W[1:] = 3.0
    w_tok, w_eta = planner.net.W[1:].detach().clone(), planner.net.W[0].detach().clone()
    seen = []
    real = planner.weigh_tokens
    planner.weigh_tokens = lambda tokens: seen.append(real(tokens)) or seen[-1]
    run_steps(planner, 24)                              # the forecast is followed from step MIN_STEPS = 20 on
    assert len(seen) == 24 and all(m is None for m in seen)
    assert torch.equal(planner.net.W[1:].detach(), w_tok) and not torch.equal(planner.net.W[0].detach(), w_eta)
    assert "token_gradient" not in planner.activity and planner.activity["outer"] >= 2
    assert "m_std" not in planner.log()

    full, *_ = make_planner("graff", update_every=4, freeze=True)
    with torch.no_grad():
        full.net.W[1:] = 3.0
    run_steps(full, 6)                                  # steps 3 and 4 are weighted, 5 is an update step
    assert full.log()["m_std"] > 0.05


def test_the_state_moves_log_eta_only_within_its_band_around_the_budget_schedule():
    """log(η/lr_init) = [ρ, κ, c]·[b, log(b + ε), 1] + clamp(W_0[:D]·h̄, ±state_bound): a state part far outside the
    band (a pre-trained W meeting a state it never saw) moves η by at most e^{±bound}; inside it, the map is W_0·r
    exactly; outside, the gradient still reaches W_0's state part where descent moves it back into the band."""
    h_bar, w0 = torch.full((4,), 0.5), torch.tensor([3.0, 3.0, 3.0, 3.0, 0.2, 0.3, 0.1], requires_grad=True)
    r = readout(h_bar, torch.tensor([1.0, 0.5, 0.0]))                 # (3, D+3)
    budget_part = r[:, -3:] @ w0[-3:].detach()
    assert torch.allclose(log_lr_multiplier(r, w0, 0.7), budget_part + 0.7)          # the state part: 6.0 -> 0.7
    (-log_lr_multiplier(r, w0, 0.7)).sum().backward()     # descent on −log η pushes it further out: no gradient
    assert torch.equal(w0.grad[:4], torch.zeros(4)) and torch.all(w0.grad[-3:] != 0)
    w0.grad = None
    log_lr_multiplier(r, w0, 0.7).sum().backward()        # descent on log η brings it back inside: gradient passes
    assert torch.all(w0.grad[:4] > 0)
    small = torch.tensor([0.1, 0.0, 0.0, 0.0, 0.2, 0.3, 0.1])
    assert torch.allclose(log_lr_multiplier(r, small, 0.7), r @ small)                 # inside the band: W_0·r


def test_a_pre_trained_state_part_cannot_send_eta_past_its_band(make_planner):
    """In the planner: with W_0's state part huge, every step's η stays within e^{state_bound} of the schedule."""
    planner, *_ = make_planner("graff", update_every=2, freeze=True, warmup_fraction=0.0, state_bound=0.5,
                               lr_mult_range=[1e-3, 100.0])
    with torch.no_grad():
        planner.net.W[0] = 0.0
        planner.net.W[0, :-3] = 50.0                                  # the schedule part: η = lr_init
    etas = []
    run_steps(planner, 8, check=lambda p: etas.append(p.eta / p.lr_init))
    assert all(math.exp(-0.5) - 1e-6 <= e <= math.exp(0.5) + 1e-6 for e in etas)
    assert any(abs(e - 1.0) > 0.3 for e in etas)                      # and the state does move it


@pytest.mark.parametrize("bound", [0.5, 2.0])
def test_token_multipliers_average_to_one_over_their_micro_batch_within_their_bound(bound):
    """Mean 1 (they reweight, never rescale); no two tokens further apart than e^{2β}, however large the scores,
    and the bound is what limits them (a score 10x larger barely moves the spread)."""
    phi = torch.randn(30, 2)
    m = token_multipliers(torch.tensor([1.5, -0.7]), phi, bound)
    assert m.mean().item() == pytest.approx(1.0, abs=1e-6) and m.std() > 0.1
    huge = token_multipliers(torch.tensor([150.0, -70.0]), phi, bound)
    assert huge.max() / huge.min() <= math.exp(2 * bound) + 1e-4
    assert huge.max() / huge.min() > math.exp(2 * bound) * 0.95


def test_the_finite_difference_token_products_match_the_exact_jvp_and_restore_the_weights(make_planner):
    """d_i = ⟨P g, ∇ℓ_i(θ_t)⟩ by two no-grad forwards equals the forward-mode JVP and n separate backward passes."""
    planner, optimizer, lm, params = make_planner("graff", lr=1e-3)
    run_steps(planner, 3)                                       # Adam state exists
    batch = random_batch(n=4, seed=11)
    losses = lm(batch.input_ids, batch.attention_mask, batch.answer_mask)
    losses.mean().backward(retain_graph=True)                   # g_{t+1} in .grad
    direction = unflat(preconditioned_gradient(params, optimizer), params)
    reference = torch.stack([sum((g * d).sum() for g, d in zip(torch.autograd.grad(losses[i], params,
                                                                                 retain_graph=True), direction))
                             for i in range(losses.numel())])
    theta = [p.detach().clone() for p in params]
    fd = finite_difference_jvp(lm, params, theta, direction, batch, delta=1e-4)
    assert all(torch.equal(a, b) for a, b in zip(theta, params))           # restored bit for bit
    names = [n for n, q in lm.named_parameters() if q.requires_grad]
    exact = per_token_jvp(lm, batch, dict(zip(names, direction)))
    assert torch.allclose(exact, reference.detach(), rtol=1e-3, atol=1e-6)
    assert torch.allclose(fd, exact, rtol=1e-2, atol=1e-3 * float(exact.abs().max()))


def test_the_token_products_step_along_p_g_of_u_plus_1_as_adamw_holds_it_then(make_planner):
    """The direction kept by the curvature pair (g_{u+1} and the preconditioner read after step u) is what the
    optimiser's state gives at u+1: shared, not read twice, and not stale."""
    planner, optimizer, lm, params = make_planner("graff", update_every=3)
    seen = []
    coefficients = planner.token_coefficients

    def check(sample):
        seen.append(torch.equal(planner.curv.preconditioned_next_gradient(),
                                preconditioned_gradient(params, optimizer)))
        return coefficients(sample)

    planner.token_coefficients = check
    run_steps(planner, 9)
    assert len(seen) >= 2 and all(seen)


def test_the_token_rows_learn_from_the_one_step_signal(make_planner):
    planner, *_ = make_planner("graff", update_every=2, token_sequences=4, token_every=1)
    planner.forecast = StubForecast(floor=0.0)
    w_tok = planner.net.W[1:].detach().clone()
    run_steps(planner, 8)
    assert planner.activity["token_gradient"] >= 3
    assert not torch.equal(planner.net.W[1:].detach(), w_tok)


@pytest.mark.parametrize("token_every, measured_at", [(1, [2, 4, 6, 8, 10, 12, 14]), (3, [2, 8, 14])])
def test_token_every_measures_the_token_products_at_every_nth_update_only(make_planner, token_every, measured_at):
    """Updates at u = 1, 3, 5, ... (k = 2), the products at u + 1 of every token_every-th one: their two forwards
    are the cost that token_every divides."""
    planner, *_ = make_planner("graff", update_every=2, token_every=token_every)
    planner.forecast = StubForecast(floor=0.0)
    counts = []
    run_steps(planner, 15, check=lambda p: counts.append(p.activity["token_gradient"]))
    assert [t for t in range(1, 15) if counts[t] > counts[t - 1]] == measured_at
    assert planner.activity["curvature"] == 7              # the other measurements still run at every update


def test_frozen_w_never_changes_while_the_model_trains(make_planner):
    planner, optimizer, lm, params = make_planner("graff", freeze=True, update_every=2)
    w0 = {n: p.detach().clone() for n, p in planner.net.named_parameters()}
    theta0 = [p.detach().clone() for p in params]
    run_steps(planner, 8)
    assert all(torch.equal(w0[n], p) for n, p in planner.net.named_parameters())
    assert any(not torch.equal(a, b) for a, b in zip(theta0, params))
    assert set(planner.activity) == {"curvature"}


def test_a_warm_start_transfers_across_model_sizes_and_keeps_the_configured_outer_lr(make_planner, tmp_path):
    small, *_ = make_planner("graff", layers=2, update_every=2, outer_lr=0.05, save_ckpt=str(tmp_path / "w.pt"))
    small.forecast = StubForecast(floor=50.0)
    run_steps(small, 6)
    small.finish(tmp_path)
    big, *_ = make_planner("graff", layers=5, outer_lr=2e-4, warm_start_ckpt=str(tmp_path / "w.pt"))
    assert big.graph.n_nodes != small.graph.n_nodes
    for (n, a), (_, b) in zip(small.net.named_parameters(), big.net.named_parameters()):
        assert torch.equal(a, b), n
    assert all(g["lr"] == 2e-4 for g in big.outer.param_groups)            # the run's outer_lr, not the saved one
    assert big.outer.state_dict()["state"].keys() == small.outer.state_dict()["state"].keys()   # Adam's moments


def test_a_missing_incompatible_or_unreadable_checkpoint_is_refused(make_planner, tmp_path):
    from src.preprocess import UserError
    with pytest.raises(UserError, match="does not exist"):
        make_planner("graff", warm_start_ckpt=str(tmp_path / "none.pt"))
    small, *_ = make_planner("graff", save_ckpt=str(tmp_path / "w.pt"))
    small.finish(tmp_path)
    assert torch.load(tmp_path / "w.pt")["format"] == GRAFF_FORMAT
    with pytest.raises(UserError, match="hidden_dim"):
        make_planner("graff", warm_start_ckpt=str(tmp_path / "w.pt"), hidden_dim=8)
    (tmp_path / "junk.pt").write_text("not a checkpoint")
    with pytest.raises(UserError, match="unreadable"):
        make_planner("graff", warm_start_ckpt=str(tmp_path / "junk.pt"))


def test_a_new_episode_forgets_the_run_and_keeps_what_was_learned(make_planner):
    planner, *_ = make_planner("graff", update_every=2)
    planner.forecast = StubForecast(floor=50.0)
    run_steps(planner, 6)
    w, outer = planner.net.W.detach().clone(), planner.outer.state_dict()["state"]
    planner.start_episode()
    assert torch.equal(planner.net.W.detach(), w) and planner.outer.state_dict()["state"].keys() == outer.keys()
    assert planner.h.abs().sum() == 0 and planner.curv.lam_max == 0.0 and planner.pending is None


def test_the_state_survives_a_save_load_round_trip(make_planner):
    planner, *_ = make_planner("graff", update_every=2)
    run_steps(planner, 5)
    state = planner.state_dict()
    other, *_ = make_planner("graff", seed=3, update_every=2)
    other.load_state_dict(state)
    for (n, a), (_, b) in zip(planner.net.named_parameters(), other.net.named_parameters()):
        assert torch.equal(a, b), n
    assert torch.equal(planner.h, other.h) and other.curv.lam_max == planner.curv.lam_max
    assert len(planner.past) == 5 and torch.equal(torch.stack(other.past), torch.stack(planner.past))


def test_the_regret_is_the_running_average_above_the_best_loss_per_unit_of_budget():
    meter = RegretMeter()
    for loss in (4.0, 2.0, 3.0):
        meter.add(loss)
    assert meter.value(elapsed=4.0) == pytest.approx((3.0 - 2.0) / 4.0)   # L̄_T = 3, L_best = 2, time_T = 4


def test_a_passing_curvature_spike_lowers_eta_only_while_it_lasts(make_planner):
    """The guard clamps η every step; it never moves W.  (It used to project W_0 in place: one noisy λ̂ at the start
    of a warmup then lowered η for the rest of the run, measured at half the level of the same run under a time
    budget.)  Here λ̂ jumps far above the guard for a few steps and falls back: η is capped meanwhile and returns."""
    planner, *_ = make_planner("graff", update_every=100, token_sequences=0, warmup_fraction=0.0)
    with torch.no_grad():
        planner.net.W[0, -1] = 1.0                                 # η = e·lr_init (W_0·r = 1)
    run_steps(planner, 3)                                          # the update step 1 and its pair at step 2
    w0 = planner.net.W.detach().clone()
    planner.curv.num_ema, planner.curv.den_ema = 0.0, 1.0          # λ̂ = 0: no guard
    run_steps(planner, 2, start=3)
    free = planner.eta
    assert free == pytest.approx(math.e * planner.lr_init, rel=1e-5) and planner.last["guard_binds"] == 0.0
    planner.curv.num_ema = 1e4 * planner.edge / planner.lr_init    # the spike: λ̂ = 10^4·edge/lr_init
    run_steps(planner, 3, start=5)
    assert planner.eta * planner.curv.lam_max <= 1.9 * planner.edge / 2 * (1 + 1e-5) and planner.eta < free / 100
    assert planner.last["guard_binds"] == 1.0
    planner.curv.num_ema = 0.0                                     # it has passed
    run_steps(planner, 3, start=8)
    assert planner.eta == pytest.approx(free, rel=1e-5) and planner.last["guard_binds"] == 0.0
    assert torch.equal(planner.net.W.detach(), w0)                 # no outer update ran, and the guard moved nothing


def test_the_budget_the_decoder_sees_runs_out_where_training_ends_not_where_b_does(make_planner):
    """Under a wall-clock budget the final evaluation's reserve comes after training: B's fraction left is still
    about 0.07 at the last step.  GRAFF's b_t is the training budget left (1 − progress, what the schedules decay
    over), so a learned decay (b + ε_b)^κ reaches its end where training does, as in the step-budget episodes the
    planner is pre-trained on."""
    planner, *_ = make_planner("graff", update_every=100, token_sequences=0, warmup_fraction=0.0)
    with torch.no_grad():
        planner.net.W[0, -2] = 1.0                                  # κ = 1: η = lr_init·(b + ε_b)
    ctx = StepContext(step=3, elapsed=280.0, budget_left=0.07, progress=1.0, steps_left=0.0, loss=1.0)
    for p in planner.params:
        p.grad = torch.zeros_like(p)
    eta = planner.plan(ctx)
    assert planner.log()["budget_left"] == 0.0
    assert eta == pytest.approx(planner.lr_init * 0.01, rel=1e-4)   # not lr_init·(0.07 + 0.01)
    ctx = StepContext(step=4, elapsed=140.0, budget_left=0.5, progress=0.4, steps_left=60.0, loss=1.0)
    future = planner.future_budget(ctx, 0.6)
    assert float(future[0]) == 0.6 and float(future[-1]) == 0.0 and future.numel() == 60


def test_the_probe_runs_only_where_graff_reads_it_and_eta_between_updates_is_the_decoders(make_planner):
    """The entropy is read at u and on weighted steps, not at u + 1 (m ≡ 1 and no encoder); between updates η is
    computed in plain numbers: it must equal the decoder's tensor formula lr_init·warmup·exp(clamp(W_0·r_t))."""
    planner, *_ = make_planner("graff", update_every=4, warmup_fraction=0.0)
    seen = {}                                                   # step -> whether its tokens came with the entropy
    weigh = planner.weigh_tokens

    def watch(tokens):
        seen[tokens.step] = tokens.entropy is not None
        return weigh(tokens)

    def check(p):
        if not p.is_update_step(max(seen)):                     # an ordinary step (or u + 1): η from numbers
            lo, hi = p.eta_bounds()
            r = readout(p.h_bar, float(p.last["budget_left"]))
            log_mult = float(log_lr_multiplier(r, p.net.W[0].detach(), p.cfg.state_bound))
            assert p.eta == pytest.approx(p.lr_init * math.exp(min(max(log_mult, lo), hi)), rel=1e-5)

    planner.weigh_tokens = watch
    run_steps(planner, 12, check=check)
    for step, probed in seen.items():
        assert probed == (planner.is_update_step(step) or not planner.is_measurement_step(step)), step
    assert not seen[2] and seen[1] and seen[3]                  # u = 1 probed, u + 1 = 2 not, step 3 weighted
