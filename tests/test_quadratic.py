"""GRAFF's objectives on the noisy-quadratic testbed (bench/quadratic_planners.py), where the best schedule for a
budget is known: the terminal objective must end below the greedy one in every setting and near linear decay.

The peaks are linear decay's tuned peaks recorded in bench/results/quadratic_planners.txt (the bench tunes them on
a grid; the test does not repeat the tuning).  The bench's two seeds, 600 steps: about 10 s per setting (the noise
is seeded, so the outcome is deterministic)."""
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "bench"))
from quadratic_planners import SETTINGS, Quadratic  # noqa: E402

PEAKS = {(1.5, 1e-2): 3.12e-2, (1.5, 1e-3): 1.56e-2, (1.0, 1e-2): 1.56e-2, (2.0, 1e-2): 3.94e-2}
GRAFF = dict(warmup_fraction=0.02, outer_lr=0.02, token_sequences=0, stability_guard=1.9)


@pytest.mark.integration
@pytest.mark.parametrize("p, noise", SETTINGS)
def test_the_terminal_objective_ends_below_the_greedy_one_and_near_linear_decay(p, noise):
    problems = [Quadratic(p, noise, seed=s, steps=600) for s in (0, 1)]
    peak = PEAKS[(p, noise)]

    def mean(kind, **knobs):
        return sum(q.run(kind, peak, **knobs) for q in problems) / len(problems)
    linear = mean("linear", warmup_fraction=0.02)
    greedy = mean("graff", objective="greedy", **GRAFF)
    terminal = mean("graff", objective="terminal", **GRAFF)
    assert terminal < greedy, (terminal / linear, greedy / linear)
    assert terminal < 2.0 * linear, terminal / linear      # measured 1.2-1.9x over two seeds (the bench's record)


@pytest.mark.integration
@pytest.mark.parametrize("p, noise", [(1.5, 1e-2), (1.0, 1e-2)])
def test_pre_trained_through_whole_budgets_the_planner_starts_the_next_ones_sensibly(p, noise):
    """The warm start (bench/quadratic_episodes.py): one planner through several budgets.  With the whole episode
    as the forecast's span, every warm episode ends within 1.3x tuned linear decay (measured 1.05-1.19x); with only
    the remaining budget, what the end of one episode taught W set the next one's start unchecked (up to 3.1x)."""
    q = Quadratic(p, noise, seed=0, steps=600)
    peak = PEAKS[(p, noise)]
    linear = q.run("linear", peak, warmup_fraction=0.05)
    planner, x = q.planner("graff", peak, warmup_fraction=0.05, outer_lr=0.02, token_sequences=0, stability_guard=1.9)
    ratios = []
    for episode in range(4):
        if episode:
            planner.start_episode()
        ratios.append(q.episode(planner, x)[0] / linear)
    assert max(ratios[1:]) < 1.3, ratios
