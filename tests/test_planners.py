"""Behaviour of every LR planner: GRAFF (issue 3), the baselines (issue 4) and their shared estimators."""
import math

import pytest
import torch

from src.model import (StepContext, TokenBatch, UpdateCurvature, answer_positions, cosine_multiplier, linear_multiplier,
                       token_multipliers, wsd_multiplier)
from src.train import Budget, optimiser_step
from tests.helpers import random_batch

CPU = torch.device("cpu")


def no_autocast():
    return torch.autocast(device_type="cpu", enabled=False)


def run_steps(planner, optimizer, lm, params, n, seed=0, clip=1.0, start=0, budget_s=100.0, check=None):
    """Drive the planner through n optimiser steps of the real step function; returns the step results."""
    budget = Budget(budget_s, "seconds", CPU)
    results = []
    for t in range(start, start + n):
        ctx = StepContext(step=t, elapsed=budget.now(), budget_left=budget.fraction_left(budget.now()),
                          progress=budget.progress(budget.now()), steps_left=budget.steps_left())
        results.append(optimiser_step(planner, [random_batch(seed=seed + t)], CPU, no_autocast, clip, ctx))
        if check is not None:
            check(planner)
    return results


def context(elapsed, budget, horizon, step=0, loss=math.nan):
    """A StepContext as the loop makes it for a wall-clock budget `budget` with `horizon` for training."""
    return StepContext(step=step, elapsed=elapsed, budget_left=min(max((budget - elapsed) / budget, 0), 1),
                       progress=min(max(elapsed / horizon, 0), 1), steps_left=max(horizon - elapsed, 0), loss=loss)


# --- time-based schedules: boundary points ----------------------------------------------------------------------
def test_cosine_boundaries():
    assert cosine_multiplier(0.0, 0.1, 0.0) == 0.0                      # start of warmup
    assert cosine_multiplier(0.1, 0.1, 0.0) == pytest.approx(1.0)       # end of warmup
    assert cosine_multiplier(0.55, 0.1, 0.0) == pytest.approx(0.5)      # half-way through the decay
    assert cosine_multiplier(1.0, 0.1, 0.2) == pytest.approx(0.2)       # end of the budget: min ratio


def test_linear_decay_boundaries():
    assert linear_multiplier(0.0, 0.0) == 1.0
    assert linear_multiplier(0.05, 0.1) == pytest.approx(0.5)
    assert linear_multiplier(0.1, 0.1) == pytest.approx(1.0)
    assert linear_multiplier(1.0, 0.1) == pytest.approx(0.0)


def test_wsd_boundaries():
    assert wsd_multiplier(0.0, 0.1, 0.2, 0.0) == 0.0
    assert wsd_multiplier(0.1, 0.1, 0.2, 0.0) == pytest.approx(1.0)     # end of warmup
    assert wsd_multiplier(0.5, 0.1, 0.2, 0.0) == 1.0                    # stable
    assert wsd_multiplier(0.8, 0.1, 0.2, 0.0) == pytest.approx(1.0)     # start of decay
    assert wsd_multiplier(0.9, 0.1, 0.2, 0.0) == pytest.approx(0.5)
    assert wsd_multiplier(1.0, 0.1, 0.2, 0.1) == pytest.approx(0.1)     # end of budget


@pytest.mark.parametrize("kind", ["cosine", "linear", "wsd"])
def test_time_schedules_follow_the_clock_and_stay_positive(make_planner, kind):
    planner, *_ = make_planner(kind, warmup_fraction=0.1)
    etas = [planner.plan(context(elapsed=t, budget=100, horizon=90)) for t in (0, 9, 50, 90, 120)]
    assert etas[1] == pytest.approx(1e-2)                               # peak at the end of warmup (9 s of 90 s)
    assert all(e > 0 and math.isfinite(e) for e in etas)
    assert etas[3] <= etas[2] <= etas[1]                                # decays over the horizon
    assert etas[4] == etas[3]                                           # held after the horizon


# --- the shared curvature estimator -----------------------------------------------------------------------------
@pytest.mark.parametrize("clip", [1.0, 0.1])
def test_update_curvature_recovers_a_quadratic_and_its_blocks(clip):
    # L(θ) = ½ Σ λ_b θ_b² with two blocks of curvature 3 and 50; plain gradient steps (no preconditioner: v = u).
    # With clip < 1 the gradient is clipped in .grad between before_step and the step, as the loop does: the step is
    # the clipped one, the secant's g_t the raw one, and the curvature must come out the same.
    theta = [torch.nn.Parameter(torch.tensor([1.0, -2.0])), torch.nn.Parameter(torch.tensor([0.5]))]
    lam = [3.0, 50.0]
    curv = UpdateCurvature(theta, torch.tensor([0, 1]), 2, ema=0.0)
    eta = 0.01
    for step in range(3):
        for p, l in zip(theta, lam):
            p.grad = l * p.detach().clone()
        curv.observe()
        curv.before_step()
        with torch.no_grad():
            for p in theta:
                p.grad *= clip                        # clipping, in place
                p -= eta * p.grad
        curv.after_step(eta, grad_scale=clip)
    assert curv.lam_blocks.tolist() == pytest.approx(lam, rel=1e-4)
    # the total is the Rayleigh quotient of H along the update: (Σ λ³θ²)/(Σ λ²θ²), dominated by the sharp block
    assert 3.0 < curv.lam < 50.0 and curv.lam_max == pytest.approx(curv.lam)
    assert curv.hypergradient < 0                               # a larger step would have lowered the loss more


def test_the_optimiser_step_clips_the_gradient_it_steps_with(make_planner):
    """training.clip_grad_norm is applied: after the step the gradient in .grad (the one AdamW stepped with) has
    norm clip, and the logged norm is the one before clipping."""
    planner, *_ = make_planner("constant")
    seen = []
    planner.after_step = lambda ctx: seen.append((float(torch.nn.utils.get_total_norm(
        [p.grad for p in planner.params if p.grad is not None])), ctx.grad_scale))
    result = run_steps(planner, None, None, None, 1, clip=1e-3)[0]
    norm_after, scale = seen[0]
    assert result.grad_norm > 1e-2 and scale < 0.1
    assert norm_after == pytest.approx(1e-3, rel=1e-3)


def _noisy_adamw(steps, ema, seed=0, d=2000, h=2.0, sigma=1.0, eta=1e-2, etas=None):
    """AdamW on L(θ) = ½ h‖θ‖² with gradient noise σ: the preconditioned sharpness is h·mean(1/(√v̂ + ε)), known
    at every step from the optimiser's state.  Yields (step, estimator, the true sharpness, the pair (a, b, den))."""
    torch.manual_seed(seed)
    theta = [torch.nn.Parameter(3 * torch.ones(d))]
    opt = torch.optim.AdamW(theta, lr=eta, betas=(0.9, 0.95), weight_decay=0.0)
    curv = UpdateCurvature(theta, torch.tensor([0]), 1, ema=ema)
    for step in range(steps):
        theta[0].grad = h * theta[0].detach() + sigma * torch.randn(d)
        observed = curv.observe()
        curv.before_step(opt)
        opt.param_groups[0]["lr"] = lr = eta if etas is None else etas[step]      # `etas`: η per step
        opt.step()
        curv.after_step(lr, 1.0)
        st = opt.state[theta[0]]
        vhat = st["exp_avg_sq"] / (1 - 0.95 ** float(st["step"]))
        yield step, curv, float((h / (vhat.sqrt() + 1e-8)).mean()), (curv.pair if observed else None)


def test_the_curvature_estimate_tracks_a_known_sharpness_late_in_training_where_the_old_one_died():
    """Late in a noisy AdamW run the first-order progress ⟨g_t, v_t⟩ the old quotient divided by turns ≤ 0 and stays
    there; the new denominator is a squared length in AdamW's metric, so the estimate keeps tracking the truth."""
    old_num = old_den = 0.0
    new, truth, old_dead = [], [], []
    for step, curv, true, pair in _noisy_adamw(1500, ema=0.98):
        if pair is not None:
            a, b, _ = pair
            old_num, old_den = 0.98 * old_num + 0.02 * (a - b) / 1e-2, 0.98 * old_den + 0.02 * a
        if step >= 800:                                         # the loss is at its noise floor: late training
            new.append(curv.lam_max)
            truth.append(true)
            old_dead.append(old_den <= 0)
    assert sum(new) / len(new) == pytest.approx(sum(truth) / len(truth), rel=0.15)
    assert sum(abs(n / t - 1) > 0.5 for n, t in zip(new, truth)) < 0.2 * len(new)
    assert sum(old_dead) > 0.8 * len(old_dead)


def test_update_curvature_is_unbiased_under_gradient_noise():
    """L(θ) = ½‖θ‖² (H = I) with noisy gradients g = θ + ξ under AdamW.  The secant numerator a_t − b_t must match,
    on average, the same quantity computed from the exact gradients; the naive one (dotting g_t with the update it
    produced) carries an extra +⟨ξ_t, (1−β1)Pξ_t⟩ and overstates the curvature (see UpdateCurvature)."""
    torch.manual_seed(0)
    eta = 1e-2
    excess = {}
    for name, use_optimizer in (("fixed", True), ("naive", False)):
        theta = [torch.nn.Parameter(torch.ones(4000))]
        opt = torch.optim.AdamW(theta, lr=eta, betas=(0.9, 0.95), weight_decay=0.0)
        curv = UpdateCurvature(theta, torch.tensor([0]), 1, ema=0.0)
        gaps, scale, prev = [], [], None
        for step in range(300):
            theta[0].grad = theta[0].detach() + torch.randn(4000)          # ∇L + ξ_t
            if prev is not None and curv.observe():
                v, before = prev
                exact = float(before @ v - theta[0].detach() @ v)          # ⟨∇L(θ_t) − ∇L(θ_{t+1}), v_t⟩
                a, b, _ = curv.pair
                gaps.append((a - b) - exact)
                scale.append(abs(exact))
            curv.before_step(opt if use_optimizer else None)
            before = theta[0].detach().clone()
            opt.step()
            curv.after_step(eta, 1.0)
            prev = (curv.v.clone(), before) if curv.v is not None else None
        excess[name] = sum(gaps[20:]) / sum(scale[20:])                  # average excess, relative to the signal
    assert abs(excess["fixed"]) < 0.15
    assert excess["naive"] > 1.0


def test_a_pair_taken_at_a_tiny_step_does_not_set_the_curvature_estimate():
    """Each pair weighs in by its step length η·den: a pair at a tiny η (a warmup's first steps) is almost only
    mini-batch noise, which the old ratio EMA[num/η] / EMA[den] multiplied by 1/η.  Here AdamW on L = ½·h‖θ‖² with
    gradient noise (_noisy_adamw): three steps at η = 1e-6 (one pair: the first has no momentum yet), then
    steps at η = 1e-2."""
    etas = [1e-6] * 3 + [1e-2] * 10
    old_num = old_den = 0.0
    for step, curv, truth, pair in _noisy_adamw(len(etas), ema=0.9, d=4000, etas=etas):
        if pair is not None:                                        # the pair (step − 1, step), at η of step − 1
            a, b, den = pair
            old_num, old_den = 0.9 * old_num + 0.1 * (a - b) / etas[step - 1], 0.9 * old_den + 0.1 * den
    assert curv.lam_max == pytest.approx(truth, rel=0.3)            # the steps that moved θ decide
    assert abs(old_num / old_den - truth) > 3 * truth               # the old ratio: still the tiny pair's noise


# --- SALeLR -----------------------------------------------------------------------------------------------------
def test_salelr_lowers_eta_when_sharpness_rises(make_planner):
    planner, *_ = make_planner("salelr", curvature_ema=0.0)
    ctx = context(elapsed=0, budget=100, horizon=100)
    etas = []
    for lam in [10.0, 10.0, 10.0, 40.0, 160.0]:
        planner.curv.observe = lambda: True                     # feed the estimate directly
        planner.curv.num_ema, planner.curv.den_ema = lam, 1.0
        etas.append(planner.plan(ctx))
    assert etas[0] == etas[2] == pytest.approx(1e-2)
    assert etas[4] < etas[3] < etas[2]


def test_salelr_trains_with_real_curvature(make_planner):
    planner, optimizer, lm, params = make_planner("salelr")
    results = run_steps(planner, optimizer, lm, params, 5)
    assert all(r.ok for r in results) and planner.curv.den_ema != 0.0 and math.isfinite(planner.curv.lam)


# --- BATS -------------------------------------------------------------------------------------------------------
def _token_batch(targets, losses):
    batch = random_batch(n=1, length=len(targets) + 1)
    return TokenBatch(batch, torch.tensor(targets), torch.tensor(losses), torch.linspace(0, 1, len(targets)), None, 0)


def test_bats_gives_harder_tokens_more_weight_and_weights_average_to_one(make_planner):
    planner, *_ = make_planner("bats", difficulty_ema=0.0, difficulty_power=1.0)
    assert planner.weigh_tokens(_token_batch([5, 6, 7], [1.0, 4.0, 2.0])) is None   # nothing measured yet
    planner.after_step(None)                                    # difficulty measured after the backward pass
    w = planner.weigh_tokens(_token_batch([5, 6, 7, 9], [0.0, 0.0, 0.0, 0.0]))
    assert w.mean().item() == pytest.approx(1.0, abs=1e-6)
    assert w[1] > w[2] > w[0]                                   # token 6 was hardest, 5 easiest
    assert w[3] == pytest.approx(w[:3].mean().item(), rel=0.5)  # unseen token: about the mean difficulty


# --- REACTOR ----------------------------------------------------------------------------------------------------
def test_reactor_policy_moves_toward_actions_with_positive_advantage(make_planner):
    planner, *_ = make_planner("reactor", controller_lr=1e-2, entropy_bonus=0.0)
    state = torch.zeros(planner.N_STATE)
    state[0] = 1.0
    planner.reinforce(state, 0.0, reward=0.0)                  # sets the baseline to 0
    before = float(planner.policy(state))
    info = planner.reinforce(state, action=0.5, reward=1.0)    # positive advantage for a = 0.5 > μ
    assert info["advantage"] > 0
    assert float(planner.policy(state)) > before
    before = float(planner.policy(state))
    planner.baseline = 10.0
    info = planner.reinforce(state, action=0.5, reward=0.0)    # negative advantage: move away from a
    assert info["advantage"] < 0 and float(planner.policy(state)) < before


def test_reactor_baseline_tracks_the_reward_ema(make_planner):
    planner, *_ = make_planner("reactor", baseline_decay=0.9)
    state = torch.zeros(planner.N_STATE)
    expected = None
    for r in [1.0, 2.0, 0.5, 3.0]:
        planner.reinforce(state, 0.0, r)
        expected = r if expected is None else 0.9 * expected + 0.1 * r
        assert planner.baseline == pytest.approx(expected)


def test_reactor_entropy_bonus_raises_entropy_when_rewards_are_flat(make_planner):
    planner, *_ = make_planner("reactor", controller_lr=1e-2, entropy_bonus=0.1)
    state = torch.zeros(planner.N_STATE)
    std0 = float(planner.log_std.exp())
    for _ in range(20):
        planner.reinforce(state, 0.0, reward=1.0)             # flat rewards: zero advantage
    assert float(planner.log_std.exp()) > std0


def test_reactor_runs_in_the_loop_and_logs_its_internals(make_planner):
    planner, optimizer, lm, params = make_planner("reactor")
    run_steps(planner, optimizer, lm, params, 4)
    log = planner.log()
    for key in ("multiplier", "policy_mean", "policy_std", "reward", "advantage", "baseline", "entropy"):
        assert key in log and math.isfinite(log[key])


# --- Schedule-Free ----------------------------------------------------------------------------------------------
def test_schedulefree_switches_modes_around_evaluation(make_planner):
    from src.train import evaluation_mode, generate_and_score
    planner, optimizer, lm, params = make_planner("schedulefree")
    run_steps(planner, optimizer, lm, params, 2)
    assert optimizer.param_groups[0]["train_mode"]
    model = lm.core
    seen = []

    class FakeTokenizer:
        eos_token_id = pad_token_id = 0

        def batch_decode(self, ids, skip_special_tokens=True):
            return ["#### 1"] * len(ids)

    def fake_generate(**kw):
        seen.append(optimizer.param_groups[0]["train_mode"])
        return kw["input_ids"]

    model.generate = fake_generate
    from src.preprocess import Problem
    problems = [Problem(0, "q", "#### 1", "1")]
    batch = ([0], torch.ones(1, 3, dtype=torch.long), torch.ones(1, 3, dtype=torch.long))
    with evaluation_mode(model, planner):
        strict, _ = generate_and_score(model, FakeTokenizer(), [batch], problems, 4, no_autocast)
    assert seen == [False]                                      # eval mode (averaged weights) while generating
    assert optimizer.param_groups[0]["train_mode"]              # back to train mode afterwards
    assert strict == [True]


@pytest.mark.parametrize("kind", ["graff", "reactor", "salelr", "bats", "constant", "cosine", "linear", "wsd",
                                  "schedulefree"])
def test_every_planner_gives_a_finite_positive_lr_over_steps(make_planner, kind):
    planner, optimizer, lm, params = make_planner(kind)
    results = run_steps(planner, optimizer, lm, params, 4)
    assert all(r.ok and math.isfinite(r.eta) and r.eta > 0 for r in results)


def test_every_planner_has_a_typed_config_and_reads_every_knob_of_it():
    import inspect
    import re
    from src.main import SCHEDULERS, knobs_of      # main validates run files without importing torch
    from src.model import PLANNERS
    assert set(PLANNERS) == set(SCHEDULERS)
    read_by_the_entry_point = {"pretrain_overrides"}    # GRAFF's pre-training is composed by src/main.py
    for kind, cls in PLANNERS.items():
        source = "".join(inspect.getsource(c) for c in cls.__mro__ if c.__module__ == "src.model")
        for knob in knobs_of(kind):
            assert knob in read_by_the_entry_point or re.search(rf"\b(cfg|c)\.{knob}\b", source), (kind, knob)


def test_answer_positions_run_from_zero_to_one_per_answer():
    batch = random_batch(n=2, length=9)
    pos = answer_positions(batch.answer_mask)
    assert pos.min() == 0.0 and pos.max() == 1.0 and len(pos) == batch.n_answer_tokens
