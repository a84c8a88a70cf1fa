"""The budget object at its boundaries (src/train.py, section 1): the stopping rule, b_t, the horizon, the marks,
periodic evaluations and a resume.  The clock is set by hand (`last`), so the boundaries are exact."""
import pytest

from src.train import EVAL_MARGIN, Budget


def seconds_budget(limit=100.0, problems=100, marks=(), rate=0.05, step=5.0, last=0.0):
    b = Budget(limit, "seconds", None, problems, marks)
    b.eval_rate, b.step_estimate, b.last, b.steps_done = rate, step, last, 1
    return b


def test_a_step_budget_allows_exactly_its_steps_and_the_first_always():
    b = Budget(3, "steps")
    assert b.can_step() and b.fraction_left() == 1.0 and b.steps_left() == 3
    taken = 0
    while b.can_step():
        b.end_step(b.last)
        taken += 1
    assert taken == 3 and b.fraction_left() == 0.0 and b.progress() == 1.0 and b.reserve == 0.0
    assert Budget(1e-9, "seconds").can_step()                 # the first step always may, whatever B


def test_a_step_may_start_only_while_it_and_the_final_evaluation_fit():
    b = seconds_budget()
    assert b.reserve == pytest.approx(EVAL_MARGIN * 0.05 * 100)
    b.last = b.limit - b.step_estimate - b.reserve             # exactly at the boundary: allowed
    assert b.can_step()
    b.last += 1e-6
    assert not b.can_step()


def test_the_horizon_is_b_less_the_reserve_and_b_t_is_clipped_to_the_unit_interval():
    b = seconds_budget(last=50.0)
    assert b.horizon == pytest.approx(100.0 - b.reserve)
    assert b.fraction_left() == pytest.approx(0.5) and b.progress() == pytest.approx(50.0 / b.horizon)
    assert b.fraction_left(150.0) == 0.0 and b.progress(150.0) == 1.0 and b.steps_left(150.0) == 0.0
    assert b.steps_left() == pytest.approx((b.horizon - 50.0) / 5.0)


def test_the_final_evaluation_reserve_follows_the_worst_rate_so_far():
    b = seconds_budget(rate=0.0)
    b.record_evaluation(2.0, 100)
    b.record_evaluation(1.0, 100)                             # a faster one does not lower it
    assert b.eval_rate == pytest.approx(0.02)
    steps = Budget(10, "steps", None, 100)
    steps.record_evaluation(2.0, 100)                          # a step budget: evaluations are free
    assert steps.eval_rate == 0.0 and steps.reserve == 0.0


def test_a_mark_is_due_when_its_evaluation_must_start_and_only_once():
    b = seconds_budget(limit=180.0, marks=(1, 5), last=0.0)   # 5 min is beyond B: never due
    b.last = 60.0 - b.step_estimate - b.reserve - 1e-6
    assert b.mark_due() is None
    b.last += 2e-6
    assert b.mark_due() == 1
    b.marks_done[1] = 42.0
    b.last = 179.0
    assert b.mark_due() is None
    assert Budget(3, "steps", None, 10, (1,)).mark_due() is None   # marks are wall-clock


def test_a_periodic_evaluation_runs_only_if_a_step_and_the_final_one_still_fit_after_it():
    b = seconds_budget(last=0.0)
    cost = b.eval_rate * 20
    b.last = b.limit - cost - b.step_estimate - b.reserve
    assert b.periodic_fits(20)
    b.last += 1e-6
    assert not b.periodic_fits(20)


def test_a_resumed_budget_continues_from_the_time_already_spent():
    b = seconds_budget(last=42.0)
    b.marks_done[1] = 12.5
    again = Budget(100.0, "seconds", None, 100, (1,), b.state_dict())
    assert again.now() >= 42.0 and again.eval_rate == b.eval_rate and again.marks_done == {1: 12.5}
