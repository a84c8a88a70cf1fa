"""The analysis (issue 5): significance tests against hand computations, seed groups, and robustness."""
import json
import math
import sys
import types

import pytest

from src import evaluate as ev


def test_mcnemar_exact_matches_a_hand_computation():
    # 8 problems only the first run solves, 2 only the second: exact two-sided binomial test on 10 discordant
    # pairs, p = 2 · P(X ≤ 2 | n=10, ½) = 2 · (1 + 10 + 45) / 1024
    a = [1] * 8 + [0] * 2 + [1] * 30 + [0] * 60
    b = [0] * 8 + [1] * 2 + [1] * 30 + [0] * 60
    result = ev.mcnemar_test(a, b)
    assert (result["only_first"], result["only_second"], result["both_correct"], result["neither"]) == (8, 2, 30, 60)
    assert result["test"] == "exact binomial"
    assert result["p_value"] == pytest.approx(112 / 1024)


def test_mcnemar_chi_square_matches_a_hand_computation():
    # 30 vs 10 discordant: χ² = (|30 − 10| − 1)² / 40 = 9.025 with one degree of freedom, p = erfc(√(χ²/2))
    a = [1] * 30 + [0] * 10 + [1] * 5
    b = [0] * 30 + [1] * 10 + [1] * 5
    result = ev.mcnemar_test(a, b)
    assert result["test"] == "chi-square with continuity correction"
    assert result["statistic"] == pytest.approx(9.025)
    assert result["p_value"] == pytest.approx(math.erfc(math.sqrt(9.025 / 2)))


def test_bootstrap_interval_covers_the_estimate_and_shrinks_with_n():
    small = ev.bootstrap_ci([1, 0] * 50)
    large = ev.bootstrap_ci([1, 0] * 500)
    assert small[0] < 50 < small[1] and large[0] < 50 < large[1]
    assert large[1] - large[0] < small[1] - small[0]


def test_seed_stats_use_a_t_interval():
    stats = ev.seed_stats([10.0, 12.0, 14.0])
    assert stats["mean"] == 12.0 and stats["std"] == pytest.approx(2.0)
    half = 4.302652729911275 * 2.0 / math.sqrt(3)               # t_{0.975, 2}
    assert stats["ci95"] == pytest.approx([12.0 - half, 12.0 + half])
    assert ev.seed_stats([5.0])["ci95"] is None


def test_auc_over_budget_by_hand():
    # EM 0 at t=0, 50 at t=30, 50 held until B=60: area = 30·25 + 30·50 = 2250, / 60 = 37.5
    assert ev.auc_over_budget([(0.0, 0.0), (30.0, 50.0)], 60.0) == pytest.approx(37.5)
    assert ev.auc_over_budget([], 60.0) is None


def record(run_id, em, bits, finished=True, evals=True, budget=5.0, digest="d1", loss=None, extra=None):
    history = [{"_step": s, ev.LOSS: 1.0 / (s + 1), ev.LR: 1e-3 * (1 - s / 5), ev.ELAPSED: 10.0 * s,
                ev.BUDGET_LEFT: 1 - 10.0 * s / (60 * budget), ev.TOKENS_PER_S: 100.0} for s in range(5)]
    summary = {"budget/minutes": budget}
    if evals:
        history[0].update({ev.EM: 0.0, ev.EM_FLEX: 0.0, ev.EVAL_AT: 0.0})
        history[4].update({ev.EM: em, ev.EM_FLEX: em, ev.EVAL_AT: 40.0})
    if finished and evals:
        summary.update({ev.FINAL_EM: em, ev.FINAL_CORRECT: bits, ev.PROBLEM_DIGEST: digest, ev.AUC: em / 2})
        if loss is not None:
            summary[ev.FINAL_LOSS] = loss
    summary.update(extra or {})
    return ev.RunRecord(run_id, history, summary, {"run_id": run_id}, "test", finished)


@pytest.fixture
def fake_runs(monkeypatch, tmp_path):
    runs = {
        "proposed-iter1-x": record("proposed-iter1-x", 60.0, "1" * 6 + "0" * 4),
        "proposed-iter1-x-seed1": record("proposed-iter1-x-seed1", 50.0, "1" * 5 + "0" * 5),
        "comparative-5-iter1-x": record("comparative-5-iter1-x", 40.0, "1" * 4 + "0" * 6),
        "comparative-4-iter1-x": record("comparative-4-iter1-x", 30.0, "0" * 7 + "1" * 3, digest="other"),
        "comparative-6-iter1-x": record("comparative-6-iter1-x", 0.0, "", finished=False, evals=False),
        "comparative-7-iter1-x": record("comparative-7-iter1-x", 20.0, "", finished=False),
    }
    monkeypatch.setattr(ev, "load_run", lambda d, rid, e, p: runs.get(rid, f"{rid}: no such run"))
    monkeypatch.setattr(ev, "replicate_ids",
                        lambda d, rid, e=None, p=None: [rid] + [r for r in runs if r.startswith(rid + "-seed")])
    return tmp_path


def test_analysis_groups_seeds_and_survives_missing_and_partial_runs(fake_runs, capsys):
    ids = ["proposed-iter1-x", "comparative-5-iter1-x", "comparative-4-iter1-x", "comparative-6-iter1-x",
           "comparative-7-iter1-x", "comparative-9-missing"]
    agg = ev.analyse(fake_runs, ids)
    out = capsys.readouterr().out
    assert "comparative-9-missing" in out                                     # a missing run: one line
    group = agg["seed_groups"]["proposed-iter1-x"]
    assert group["seed_values"] == [60.0, 50.0] and group["ci_method"] == "t-interval across seeds"
    assert agg["best_proposed"] == {"run_id": "proposed-iter1-x", "value": 55.0}
    assert agg["best_baseline"] == {"run_id": "comparative-5-iter1-x", "value": 40.0}
    assert agg["gap"] == pytest.approx((55.0 - 40.0) / 40.0 * 100)
    assert "comparative-6-iter1-x" not in agg["metrics"]["dev_em_at_budget"]  # no evaluation: absent, not 0
    assert any("comparative-6-iter1-x: no evaluation" in n for n in agg["notes"])
    assert any("comparative-7-iter1-x: in_progress" in n for n in agg["notes"])
    tests = agg["significance"]["mcnemar_vs_best_proposed"]
    assert set(tests) == {"comparative-5-iter1-x"}                            # other digest: no paired test
    assert any("comparative-4-iter1-x: not evaluated on the same problems" in n for n in agg["notes"])
    assert agg["bootstrap_ci95"]["comparative-5-iter1-x"] is not None
    saved = json.loads((fake_runs / "comparison" / "aggregated_metrics.json").read_text())
    assert saved["gap"] == agg["gap"]
    table = (fake_runs / "comparison" / "metrics_table.csv").read_text().splitlines()
    assert table[0].startswith("run_id,dev_em_at_budget") and len(table) == 1 + 5          # every run found
    metrics = json.loads((fake_runs / "proposed-iter1-x" / "metrics.json").read_text())
    assert set(metrics["seeds"]) == {"proposed-iter1-x", "proposed-iter1-x-seed1"}


def test_a_zero_baseline_gives_a_null_gap_with_a_note(fake_runs):
    agg = ev.analyse(fake_runs, ["proposed-iter1-x", "comparative-6-iter1-x"])
    assert agg["best_baseline"] is None and agg["gap"] is None
    assert any("no baseline run" in n for n in agg["notes"])


@pytest.mark.parametrize("content", [b"", b":W", b":W&B\x00"])
def test_a_record_torn_before_its_header_reads_as_empty(tmp_path, content):
    # a process killed right after W&B created its file leaves an empty or partial header: nothing logged, no error
    path = tmp_path / "run-x.wandb"
    path.write_bytes(content)
    assert ev.read_wandb_file(path) == ([], {}, {}, False)


def test_a_file_that_is_not_a_record_is_refused(tmp_path):
    path = tmp_path / "run-x.wandb"
    path.write_bytes(b"PK\x03\x04 not a W&B record at all")
    with pytest.raises(ValueError, match="is not a W&B record"):
        ev.read_wandb_file(path)


# --- a local record with a gap (an online run killed before W&B wrote rows it had uploaded) ---------------------
def gap_segments(monkeypatch, tmp_path, folder_prefix, api):
    """Two segments of one run, steps 0-3 and 6-9: steps 4-5 never reached the disk.  `api` stands for the server."""
    folders = [tmp_path / f"{folder_prefix}run-20260101_00000{i}-r" for i in (0, 1)]
    first = ([{"_step": s, ev.LOSS: 1.0} for s in range(4)], {}, {"run_id": "r"}, False)
    second = ([{"_step": s, ev.LOSS: 0.5} for s in range(6, 10)], {"final": 1}, {"run_id": "r"}, True)
    monkeypatch.setattr(ev, "local_segments", lambda d, rid: [f / "run-r.wandb" for f in folders])
    monkeypatch.setattr(ev, "read_wandb_file", lambda path: first if path.parent == folders[0] else second)
    calls = []
    monkeypatch.setattr(ev, "load_from_api", lambda rid, e, p: calls.append(rid) or api)
    return calls


def test_a_gap_in_an_offline_record_is_named_and_the_server_is_not_asked(monkeypatch, tmp_path):
    calls = gap_segments(monkeypatch, tmp_path, "offline-", api="not to be called")
    rec = ev.load_run(tmp_path, "r", None, "p")
    assert calls == [] and [r["_step"] for r in rec.history] == [0, 1, 2, 3, 6, 7, 8, 9]
    assert rec.note == "r: the local record lacks steps 4-5 (written by a process killed before they reached disk)"


def test_a_gap_in_an_online_record_is_filled_from_the_server_when_its_copy_is_complete(monkeypatch, tmp_path):
    server = ev.RunRecord("r", [{"_step": s, ev.LOSS: 1.0} for s in range(10)], {"final": 1}, {}, "W&B API", True)
    gap_segments(monkeypatch, tmp_path, "", api=server)
    rec = ev.load_run(tmp_path, "r", None, "p")
    assert rec.source == "W&B API" and len(rec.history) == 10 and "read from the W&B server instead" in rec.note


def test_a_gap_in_an_online_record_stays_named_when_the_server_cannot_fill_it(monkeypatch, tmp_path):
    gap_segments(monkeypatch, tmp_path, "", api="connection refused")
    rec = ev.load_run(tmp_path, "r", None, "p")
    assert rec.source.startswith("local") and len(rec.history) == 8 and rec.finished
    assert rec.note.endswith("lacks steps 4-5 (written by a process killed before they reached disk); the W&B "
                             "server could not fill them (connection refused); metrics use the local record")


def test_step_spans():
    assert ev.step_spans([3, 4, 5, 9]) == "3-5, 9" and ev.step_spans([7]) == "7"
    assert ev.missing_steps([{"_step": 0}, {"_step": 3}]) == [1, 2] and ev.missing_steps([]) == []


# --- metric names, defined once here and imported by train.py -------------------------------------------------
def test_the_metric_names_section_holds_every_name_train_logs():
    names = {v for k, v in vars(ev).items() if k.isupper() and isinstance(v, str)}
    logged = ["train/loss", "train/lr", "train/grad_norm", "train/tokens_per_s", "train/step_time_s",
              "train/skipped_steps", "train/epoch", "train/planner_time_s", "train/planner_fraction",
              "time/elapsed_s", "time/budget_left", "eval/exact_match", "eval/exact_match_flexible",
              "eval/model_time_s", "eval/duration_s", "eval/problems", "contamination/exact_match",
              "contamination/exact_match_flexible", "energy/joules", "memory/peak_gib", "final/exact_match",
              "final/exact_match_flexible", "best/exact_match", "final/auc_em_over_b", "final/correct_strict",
              "final/problem_digest", "eval/loss", "final/loss", "eval/split", "machine/speed_probe_s",
              "train/mean_step_time_s", "train/steps", "budget/minutes", "budget/unit", "budget/steps"]
    assert [n for n in logged if n not in names] == []
    assert ev.em_at_mark(30) == "final/em_at_30min" and ev.em_at_mark(60.0) == "final/em_at_60min"
    assert ev.BUDGET_UNITS == ("minutes", "steps") and ev.EVAL_SPLITS == ("test", "validation")


# --- the primary metric: EM at the 30-minute mark ---------------------------------------------------------------
@pytest.mark.parametrize("summary, value, source", [
    ({"budget/minutes": 5.0, "final/exact_match": 41.0}, 41.0, "em_at_budget: budget 5 min < 30 min"),
    ({"budget/minutes": 30.0, "final/exact_match": 41.0, "final/em_at_30min": 41.0}, 41.0, "em_at_30min"),
    ({"budget/minutes": 30.0, "final/exact_match": 41.0}, 41.0, "em_at_budget: budget 30 min = the 30-min mark"),
    ({"budget/minutes": 60.0, "final/exact_match": 55.0, "final/em_at_30min": 40.0}, 40.0, "em_at_30min"),
    ({"budget/minutes": 60.0, "final/exact_match": 55.0}, None, "none: budget 60 min but no EM logged at the "
     "30-min mark (its final EM is at B, not at 30 min)"),
    ({"budget/minutes": 5.0}, None, "none: budget 5 min < 30 min and no final EM (no final evaluation yet)"),
    ({"final/exact_match": 41.0}, None, "none: the run's budget is unknown (no budget/minutes in its summary)"),
    ({"budget/unit": "steps", "budget/steps": 900, "final/exact_match": 41.0}, None,
     "none: step-matched control (budget 900 optimiser steps), no wall-clock mark; its EM at B is in "
     "dev_em_at_budget"),
])
def test_primary_value_is_em_at_30_min_and_says_where_it_comes_from(summary, value, source):
    assert ev.primary_em(summary) == (value, source)


def test_runs_of_60_minutes_are_compared_at_the_30_minute_mark(monkeypatch, tmp_path):
    long = {"budget": 60.0}
    runs = {
        # final EM (at 60 min) would rank the proposed run first; at 30 min the baseline is ahead
        "proposed-q": record("proposed-q", 70.0, "1" * 7 + "0" * 3, extra={"final/em_at_30min": 30.0}, **long),
        "comparative-1-q": record("comparative-1-q", 50.0, "1" * 5 + "0" * 5, extra={"final/em_at_30min": 45.0},
                                  **long),
        "comparative-2-q": record("comparative-2-q", 65.0, "1" * 6 + "0" * 4, **long),   # no EM at 30 min
    }
    monkeypatch.setattr(ev, "load_run", lambda d, rid, e, p: runs[rid])
    monkeypatch.setattr(ev, "replicate_ids", lambda d, rid, e=None, p=None: [rid])
    agg = ev.analyse(tmp_path, list(runs))
    assert agg["best_proposed"] == {"run_id": "proposed-q", "value": 30.0}
    assert agg["best_baseline"] == {"run_id": "comparative-1-q", "value": 45.0}
    assert agg["gap"] == pytest.approx((30.0 - 45.0) / 45.0 * 100)
    assert agg["primary_metric_source"]["proposed-q"] == "em_at_30min"
    assert agg["primary_metric_source"]["comparative-2-q"].startswith("none: budget 60 min")
    assert "comparative-2-q" not in agg["metrics"][ev.PRIMARY_KEY]                # null, never its final EM
    assert agg["metrics"]["dev_em_at_budget"]["comparative-2-q"] == 65.0
    assert any(n.startswith("comparative-2-q: no primary value") for n in agg["notes"])
    assert agg["seed_groups"]["proposed-q"]["ci95"] is None      # the bootstrap is of the 60-min evaluation


# --- a fresh machine: no results_dir, every run from the W&B API -----------------------------------------------
class StandInApi:
    """The part of wandb.Api the analysis uses, serving RunRecords."""
    runs_served: dict = {}
    asked: list = []
    default_entity = "default-entity"

    def __init__(self, *args, **kwargs):
        pass

    def run(self, path):
        StandInApi.asked.append(path)
        rec = self.runs_served.get(path.split("/")[-1])
        if rec is None:
            raise ValueError(f"Could not find run {path}")
        return types.SimpleNamespace(id=rec.run_id, state="finished" if rec.finished else "running",
                                     summary=types.SimpleNamespace(_json_dict=dict(rec.summary)),
                                     config=dict(rec.config), scan_history=lambda: iter(rec.history))

    def runs(self, path, filters=None):
        StandInApi.asked.append(path)
        return [types.SimpleNamespace(id=r) for r in self.runs_served
                if filters and ev.seed_of(r)[0] == filters.get("group")]


def test_a_fresh_machine_reads_the_runs_from_the_api_and_creates_results_dir(monkeypatch, tmp_path, capsys):
    import wandb
    served = {rid: record(rid, em, "1" * int(em / 10) + "0" * (10 - int(em / 10)), loss=1 - em / 100)
              for rid, em in (("proposed-f", 60.0), ("proposed-f-seed1", 50.0), ("comparative-1-f", 40.0),
                              ("comparative-1-f-seed1", 30.0))}
    monkeypatch.setattr(StandInApi, "runs_served", served)
    monkeypatch.setattr(StandInApi, "asked", [])
    monkeypatch.setattr(wandb, "Api", StandInApi)
    monkeypatch.setenv("WANDB_ENTITY", "team")
    monkeypatch.setenv("WANDB_PROJECT", "proj")
    results = tmp_path / "not" / "yet"
    monkeypatch.setattr(sys, "argv", ["evaluate", f"results_dir={results}",
                                      'run_ids=["proposed-f", "comparative-1-f", "comparative-9-f"]'])
    ev.main()                                                            # no SystemExit: exit code 0
    assert "comparative-9-f" in capsys.readouterr().out                 # the API could not give it: one line
    assert set(StandInApi.asked) >= {"team/proj/proposed-f", "team/proj/proposed-f-seed1", "team/proj"}
    assert all(p.startswith("team/proj") for p in StandInApi.asked)
    agg = json.loads((results / "comparison" / "aggregated_metrics.json").read_text())
    assert agg["best_proposed"] == {"run_id": "proposed-f", "value": 55.0}
    assert agg["seed_groups"]["comparative-1-f"]["seed_values"] == [40.0, 30.0]
    metrics = json.loads((results / "proposed-f" / "metrics.json").read_text())
    assert metrics["source"] == "W&B API (team/proj/proposed-f)" and metrics["status"] == "finished"


def test_entity_and_project_come_from_the_config_unless_the_environment_says(monkeypatch):
    import yaml
    cfg = yaml.safe_load((ev.REPO_ROOT / "config" / "config.yaml").read_text())["wandb"]
    monkeypatch.delenv("WANDB_ENTITY", raising=False)
    monkeypatch.delenv("WANDB_PROJECT", raising=False)
    assert ev.wandb_target() == (cfg.get("entity") or None, cfg.get("project") or None)
    monkeypatch.setenv("WANDB_ENTITY", "someone")
    monkeypatch.setenv("WANDB_PROJECT", "elsewhere")
    assert ev.wandb_target() == ("someone", "elsewhere")


def test_a_results_dir_that_is_a_file_is_refused_in_one_line(tmp_path):
    path = tmp_path / "file"
    path.write_text("x")
    with pytest.raises(ev.EvaluateError, match="is a file, not a folder"):
        ev.parse_args([f"results_dir={path}", 'run_ids=["a"]'])


# --- statistics across seeds, against hand computations and scipy ----------------------------------------------
def test_paired_difference_by_hand_and_scipy():
    from scipy import stats
    ref, other = {0: 60.0, 1: 50.0, 2: 52.0}, {0: 40.0, 1: 45.0, 2: 41.0, 3: 99.0}     # seed 3: not paired
    row = ev.paired_difference(ref, other)
    assert row["seeds"] == [0, 1, 2] and row["differences"] == [20.0, 5.0, 11.0]
    sd = math.sqrt((8 ** 2 + 7 ** 2 + 1 ** 2) / 2)                     # differences 20, 5, 11 around 12
    t = 12.0 / (sd / math.sqrt(3))
    assert row["mean_difference"] == 12.0 and row["std_difference"] == pytest.approx(sd)
    assert row["t_statistic"] == pytest.approx(t)
    assert row["t_p_value"] == pytest.approx(2 * stats.t.sf(t, 2))
    half = 4.302652729911275 * sd / math.sqrt(3)                       # t_{0.975, 2}
    assert row["ci95"] == pytest.approx([12.0 - half, 12.0 + half])
    # Wilcoxon, exact: all three differences positive, W- = 0; two-sided p = 2 · P(W- ≤ 0) = 2 / 2^3
    assert row["wilcoxon_statistic"] == 0.0 and row["wilcoxon_p_value"] == pytest.approx(0.25)


def test_paired_difference_names_what_cannot_be_tested():
    one = ev.paired_difference({0: 1.0, 1: 2.0}, {0: 0.5})
    assert one["n"] == 1 and one["t_p_value"] is None and "no paired test" in one["note"]
    same = ev.paired_difference({0: 3.0, 1: 4.0}, {0: 1.0, 1: 2.0})      # the difference is 2 on both seeds
    assert same["t_p_value"] is None and same["wilcoxon_p_value"] == pytest.approx(0.5)
    assert "paired t-test is undefined" in same["note"]
    zero = ev.paired_difference({0: 1.0, 1: 2.0}, {0: 1.0, 1: 2.0})
    assert zero["wilcoxon_p_value"] is None and "Wilcoxon test is undefined" in zero["note"]


def test_holm_by_hand():
    # sorted p 0.01, 0.03, 0.04: ×3 = 0.03, ×2 = 0.06, ×1 = 0.04 -> kept monotone: 0.06
    adjusted = ev.holm({"a": 0.01, "b": 0.04, "c": 0.03, "d": None})
    assert adjusted == {"a": pytest.approx(0.03), "b": pytest.approx(0.06), "c": pytest.approx(0.06), "d": None}


def test_the_detectable_difference_has_80_percent_power():
    from scipy import stats
    sd, n = 4.0, 5
    mde = ev.detectable_difference(sd, n)
    crit = stats.t.ppf(0.975, n - 1)                                   # power of the two-sided paired t-test
    nc = mde / sd * math.sqrt(n)
    assert stats.nct.sf(crit, n - 1, nc) + stats.nct.cdf(-crit, n - 1, nc) == pytest.approx(0.8, abs=1e-6)
    assert ev.detectable_difference(sd, 1) is None and ev.detectable_difference(None, 5) is None


def test_seed_of():
    assert ev.seed_of("proposed-iter1-x") == ("proposed-iter1-x", 0)
    assert ev.seed_of("proposed-iter1-x-seed12") == ("proposed-iter1-x", 12)


def three_seed_runs():
    ems = {"proposed-s": (60.0, 50.0, 52.0), "comparative-1-s": (40.0, 45.0, 41.0),
           "comparative-2-s": (30.0, 33.0, None)}
    runs = {}
    for arm, values in ems.items():
        for seed, em in enumerate(values):
            if em is None:
                continue
            rid = arm if seed == 0 else f"{arm}-seed{seed}"
            bits = "1" * int(em) + "0" * (100 - int(em))
            runs[rid] = record(rid, em, bits, loss=2.0 - em / 50, extra={ev.SPEED_PROBE: 1.0 + seed})
    return runs


def test_analysis_pairs_seeds_tests_per_seed_and_reports_the_detectable_difference(monkeypatch, tmp_path, capsys):
    from scipy import stats
    runs = three_seed_runs()
    monkeypatch.setattr(ev, "load_run", lambda d, rid, e, p: runs[rid])
    monkeypatch.setattr(ev, "replicate_ids",
                        lambda d, rid, e=None, p=None: [rid] + [r for r in runs if r.startswith(rid + "-seed")])
    agg = ev.analyse(tmp_path, ["proposed-s", "comparative-1-s", "comparative-2-s"])
    out = capsys.readouterr().out
    table = agg["per_seed"]["proposed-s"]
    assert [row["primary"] for row in table["seeds"].values()] == [60.0, 50.0, 52.0]
    assert table["primary"]["mean"] == pytest.approx(54.0) and table["loss"]["mean"] == pytest.approx(2 - 54 / 50)
    paired = agg["significance"]["paired_vs_best_proposed"]
    assert paired["reference"] == "proposed-s"
    one, two = paired["primary"]["comparative-1-s"], paired["primary"]["comparative-2-s"]
    assert one["seeds"] == [0, 1, 2] and two["seeds"] == [0, 1]
    raw = [stats.ttest_rel([60, 50, 52], [40, 45, 41]).pvalue, stats.ttest_rel([60, 50], [30, 33]).pvalue]
    assert [one["t_p_value"], two["t_p_value"]] == pytest.approx(raw)
    low, high = sorted(raw)                 # Holm over two: the smaller ×2, the larger kept at least as large
    holm = {low: min(1.0, 2 * low), high: min(1.0, max(2 * low, high))}
    assert [one["t_p_holm"], two["t_p_holm"]] == pytest.approx([holm[raw[0]], holm[raw[1]]])
    loss = paired["loss"]["comparative-1-s"]                              # lower is better: negative favours
    assert loss["mean_difference"] == pytest.approx(-(54.0 - 42.0) / 50)
    mc = agg["significance"]["mcnemar_per_seed"]
    assert set(mc["comparative-1-s"]["seeds"]) == {"0", "1", "2"} and mc["comparative-1-s"]["tested"] == 3
    assert mc["comparative-1-s"]["seeds"]["1"]["only_first"] == 5       # 50 vs 45 correct, nested
    power = agg["power"]["primary"]
    sds = [one["std_difference"], two["std_difference"]]
    pooled = math.sqrt((2 * sds[0] ** 2 + 1 * sds[1] ** 2) / 3)
    assert power["pooled_paired_difference_std"] == pytest.approx(pooled) and power["n_seeds"] == 3
    assert power["detectable_difference"] == pytest.approx(ev.detectable_difference(pooled, 3))
    assert power["arm_std"]["comparative-1-s"] == pytest.approx(stats.tstd([40, 45, 41]))
    assert "detects a true mean difference of" in out and "with 80% power" in out
    assert any("speed probe ranges" in n for n in agg["notes"])            # 1 s to 3 s: the machine drifted
    saved = json.loads((tmp_path / "comparison" / "aggregated_metrics.json").read_text())
    assert saved["power"] == agg["power"] and saved["per_seed"] == agg["per_seed"]


def test_eta_against_the_budget_left_is_drawn_per_run_and_overlaid(fake_runs):
    ev.analyse(fake_runs, ["proposed-iter1-x", "comparative-5-iter1-x"])
    assert (fake_runs / "proposed-iter1-x" / "proposed-iter1-x_eta_vs_budget.pdf").stat().st_size > 1000
    assert (fake_runs / "comparison" / "comparison_eta_vs_budget.pdf").stat().st_size > 1000


# --- compact records (bench/export_record.py) and the results table (bench/results_table.py) -------------------
def bench_module(name):
    import importlib.util
    spec = importlib.util.spec_from_file_location(f"bench_{name}", ev.REPO_ROOT / "bench" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def long_record(run_id, em, seed_cfg):
    """A run with 1,000 logged steps, 5 evaluations and the summary a finished run has."""
    rec = record(run_id, em, "1" * int(em) + "0" * (100 - int(em)), loss=2.0 - em / 50,
                 extra={ev.SPEED_PROBE: 1.5, ev.EVAL_SPLIT: "test", ev.STEPS: 1000, ev.PLANNER_FRACTION: 0.25,
                        ev.MEAN_STEP_TIME: 0.3, "budget/unit": "minutes", "model/parameters": 123})
    rec.history = [{"_step": s, ev.LOSS: 2.0 / s, ev.LR: 1e-3 * (1 - s / 1000), ev.ELAPSED: 0.3 * s,
                    ev.BUDGET_LEFT: 1 - s / 1000} for s in range(1, 1001)]
    for s in (0, 250, 500, 750, 1000):
        rec.history.append({"_step": s, ev.EM: em * s / 1000, ev.EVAL_AT: 0.3 * s, ev.EVAL_PROBLEMS: 100,
                            ev.EVAL_LOSS: 1.0})
    rec.config = {"run_id": run_id, "seed": seed_cfg, "method": "proposed", "model": {"name": "embedded"},
                  "training": {"scheduler": {"type": "graff", "outer_lr": 1e-3}, "budget_minutes": 5.0,
                               "optimizer": {"type": "adamw", "lr_init": 3e-3}}}
    return rec


def test_export_writes_a_small_complete_record_per_run_and_seed(monkeypatch, tmp_path, capsys):
    export = bench_module("export_record")
    runs = {"proposed-e": long_record("proposed-e", 60.0, 0),
            "proposed-e-seed1": long_record("proposed-e-seed1", 50.0, 1)}
    monkeypatch.setattr(ev, "load_run", lambda d, rid, e, p: runs.get(rid, f"{rid}: no such run"))
    monkeypatch.setattr(ev, "replicate_ids",
                        lambda d, rid, e=None, p=None: [rid] + [r for r in runs if r.startswith(rid + "-seed")])
    out = tmp_path / "records"
    assert export.main([str(tmp_path / "results"), str(out), "proposed-e", "comparative-9-e"]) == 0
    assert "comparative-9-e" in capsys.readouterr().out
    assert sorted(p.name for p in out.iterdir()) == ["proposed-e-seed1.json", "proposed-e.json"]
    path = out / "proposed-e-seed1.json"
    rec = json.loads(path.read_text())
    assert path.stat().st_size < 16_000
    assert (rec["run_id"], rec["arm"], rec["seed"]) == ("proposed-e-seed1", "proposed-e", 1)
    assert rec["config"]["scheduler"] == {"type": "graff", "outer_lr": 1e-3}
    assert rec["config"]["optimizer"]["lr_init"] == 3e-3 and rec["config"]["budget_minutes"] == 5.0
    summary = rec["summary"]
    assert summary[ev.FINAL_CORRECT] == "1" * 50 + "0" * 50 and summary[ev.FINAL_LOSS] == 1.0
    for key in (ev.SPEED_PROBE, ev.EVAL_SPLIT, ev.STEPS, ev.MEAN_STEP_TIME, "budget/unit", ev.BUDGET_MINUTES):
        assert key in summary, key
    assert "model/parameters" not in summary
    evals = rec["eval_history"]
    assert evals["columns"][:4] == ["_step", ev.EVAL_AT, ev.EM, ev.EVAL_PROBLEMS]
    assert [row[0] for row in evals["rows"]] == [0, 250, 500, 750, 1000] and evals["rows"][-1][2] == 50.0
    train = rec["train_history"]
    assert train["columns"] == ["_step", ev.ELAPSED, ev.BUDGET_LEFT, ev.LOSS, ev.LR] and train["of_rows"] == 1000
    steps = [row[0] for row in train["rows"]]
    assert len(steps) <= 200 and steps[0] == 1 and steps[-1] == 1000 and steps == sorted(set(steps))
    assert all(row[3] == pytest.approx(2.0 / row[0], rel=1e-6) for row in train["rows"])     # picked, not averaged


def test_export_takes_the_planner_share_as_the_runs_mean_not_its_last_step():
    """W&B's summary held the last step's share (a 10-step update: 11%) where the run's mean was under 1%."""
    export = bench_module("export_record")
    rec = long_record("proposed-e-seed1", 50.0, 1)
    for row in rec.history:
        if ev.LOSS in row:
            row.update({ev.STEP_TIME: 0.5, ev.PLANNER_TIME: 0.09 if row["_step"] % 10 == 0 else 0.001})
    rec.summary[ev.PLANNER_FRACTION] = 0.09 / 0.5                      # what the summary held: the last step's
    share = export.compact_record(rec)["summary"][ev.PLANNER_FRACTION]
    assert share == pytest.approx((100 * 0.09 + 900 * 0.001) / (1000 * 0.5))


def test_export_refuses_bad_arguments_in_one_line(tmp_path, capsys):
    export = bench_module("export_record")
    afile = tmp_path / "f"
    afile.write_text("x")
    assert export.main([str(afile), str(tmp_path / "out")]) == 2
    assert export.main([str(tmp_path)]) == 2
    assert export.main([str(tmp_path / "empty"), str(tmp_path / "out")]) == 2     # no run here and none named
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 3 and all(line.startswith("error: ") for line in err)
    assert not (tmp_path / "out").exists()


def three_seed_record_files(tmp_path, edit=None):
    """three_seed_runs() written to tmp_path as compact records (GRAFF for the proposed arm, cosine for the others),
    each run changed by `edit(run_id, record)` first; returns bench/results_table.py as a module."""
    export = bench_module("export_record")
    for rid, rec in three_seed_runs().items():
        if edit is not None:
            edit(rid, rec)
        rec.config = {"training": {"scheduler": {"type": "graff" if "proposed" in rid else "cosine"}}}
        (tmp_path / f"{rid}.json").write_text(export.dumps(export.compact_record(rec)))
    return bench_module("results_table")


def test_the_results_table_is_rebuilt_from_compact_records_alone(tmp_path, capsys):
    from scipy import stats
    from statsmodels.stats.multitest import multipletests
    table = three_seed_record_files(tmp_path)
    assert table.main([str(tmp_path)]) == 0
    lines = capsys.readouterr().out.splitlines()
    rows = {line.split(" | ")[0].strip("| "): line for line in lines if line.startswith("| ")}
    mean = ev.seed_stats([60.0, 50.0, 52.0])
    assert rows["proposed"].startswith(f"| proposed | graff | 60.0, 50.0, 52.0 | 54.0 [{mean['ci95'][0]:.1f}, "
                                       f"{mean['ci95'][1]:.1f}] |")
    raw = [stats.ttest_rel([60, 50, 52], [40, 45, 41]).pvalue, stats.ttest_rel([60, 50], [30, 33]).pvalue]
    holm = multipletests(raw, method="holm")[1]
    paired = [line for line in lines if line.startswith("| comparative-1 | 3 |")]
    assert len(paired) == 1 and f"| {holm[0]:.2g} |" in paired[0]
    # McNemar per seed, proposed vs comparative-1: 20, 5 and 11 discordant pairs, all one way: exact p = 2 / 2^d
    assert paired[0].endswith("| 2 of 3 |")
    assert [line for line in lines if line.startswith("| comparative-2 | 2 |")]
    assert any("with 3 seeds a paired t-test" in line and "80% power" in line for line in lines)
    assert any("em_at_budget: budget 5 min < 30 min" in line for line in lines)
    assert any(line.startswith("EM is strict ? EM at B = 5 min") for line in lines)


def test_the_results_table_compares_a_step_matched_control_on_its_em_at_b(tmp_path, capsys):
    """A step budget has no 30-min mark (no primary value), but the control is compared on its EM at B."""
    table = three_seed_record_files(tmp_path, lambda rid, rec: rec.summary.update(
        {"budget/unit": "steps", ev.BUDGET_STEPS: 600, ev.EVAL_SPLIT: "test", ev.EVAL_N_PROBLEMS: 100}))
    assert table.main([str(tmp_path)]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert any(line.startswith("| proposed | graff | 60.0, 50.0, 52.0 | 54.0 [") for line in lines)
    assert any(line.startswith("| comparative-1 | 3 | 12.0 [") for line in lines)
    assert any("strict test EM at B = 600 optimiser steps (100 problems, %)" in line for line in lines)
    assert any("none: step-matched control" in line for line in lines)


def test_the_results_table_compares_against_a_named_reference_arm(tmp_path, capsys):
    """--reference ARM: the paired table is ARM minus every other arm (an ablation against the baselines)."""
    table = three_seed_record_files(tmp_path)
    assert table.main(["--reference", "comparative-1", str(tmp_path)]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert any(line.startswith("| vs comparative-1 (Δ = comparative-1 − run") for line in lines)
    mean = ev.seed_stats([40.0 - 60.0, 45.0 - 50.0, 41.0 - 52.0])["mean"]      # comparative-1 − proposed
    assert [line for line in lines if line.startswith(f"| proposed | 3 | {mean:.1f} [")]
    assert table.main(["--reference", "comparative-9", str(tmp_path)]) == 2
    assert "no such arm" in capsys.readouterr().err


def test_the_results_table_reads_each_arms_eta_at_fractions_of_the_budget(tmp_path, capsys):
    """η where 10/50/85/99% of B are spent, interpolated in the budget left, the median over seeds (not the mean)."""
    def decaying_lr(rid, rec):
        scale = {"proposed-s": 1.0, "proposed-s-seed1": 2.0, "proposed-s-seed2": 10.0}.get(rid, 1.0)
        rec.history = [{"_step": s, ev.LOSS: 1.0 / (s + 1), ev.LR: scale * 1e-3 * (1 - s / 100), ev.ELAPSED: 3.0 * s,
                        ev.BUDGET_LEFT: 1 - s / 100} for s in range(0, 101, 3)]       # logged every 3rd step

    table = three_seed_record_files(tmp_path, decaying_lr)
    assert table.main([str(tmp_path)]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert any("| η (logged) at 10, 50, 85, 99% of B, median over seeds |" in line for line in lines)
    [proposed] = [line for line in lines if line.startswith("| proposed | graff |")]
    assert proposed.endswith("| 1.8e-03, 1.0e-03, 3.0e-04, 2.0e-05 |")      # 2e-3·b, the middle seed's
    [baseline] = [line for line in lines if line.startswith("| comparative-1 | cosine |")]
    assert baseline.endswith("| 9.0e-04, 5.0e-04, 1.5e-04, 1.0e-05 |")


def test_the_results_table_keeps_only_the_seeds_asked_for(tmp_path, capsys):
    """--seeds: the table of a protocol's seeds from a folder that holds more (later seeds added to it)."""
    table = three_seed_record_files(tmp_path)
    assert table.main(["--seeds", "1-2", str(tmp_path)]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert any(line.startswith("| proposed | graff | 50.0, 52.0 | 51.0 [") for line in lines)
    assert any(line.startswith("| comparative-1 | 2 |") for line in lines)
    assert any(line.startswith("| comparative-2 | 1 |") for line in lines)
    assert table.main(["--reference", "comparative-1", "--seeds", "0,2", str(tmp_path)]) == 0
    assert any(line.startswith("| proposed | 2 |") for line in capsys.readouterr().out.splitlines())
    assert table.main(["--seeds", "7-9", str(tmp_path)]) == 2
    assert table.main(["--seeds", "one", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert "no record of those seeds" in err[0] and "give the seeds as a range or a list" in err[1]


def test_the_results_table_refuses_what_is_not_a_record(tmp_path, capsys):
    table = bench_module("results_table")
    assert table.main([str(tmp_path)]) == 2                                 # empty folder
    (tmp_path / "x.json").write_text('{"run_id": "a"}')
    assert table.main([str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 2 and "no compact record" in err[0] and "is not a compact run record" in err[1]


def test_the_tuning_table_lists_every_trial_from_the_tune_phase_record(tmp_path, capsys):
    table = bench_module("results_table")
    record = {"comparative-6": {"study": "comparative-6-iter1-tiny-synthetic-seed100", "best_value": 20.0,
                                "trials": [{"number": 1, "value": 20.0, "params": {"adapter_lr_init": 0.002}},
                                           {"number": 0, "value": 5.5, "params": {"adapter_lr_init": 0.0071}}]},
              "proposed": {"study": "p", "best_value": 12.6,
                           "trials": [{"number": 0, "value": 12.6, "params": {"adapter_lr_init": 0.00101,
                                                                             "graff_outer_lr": 0.000175}}]}}
    (tmp_path / "tuning.json").write_text(json.dumps(record))
    assert table.main(["--tuning", str(tmp_path / "tuning.json")]) == 0
    rows = capsys.readouterr().out.strip().splitlines()[2:]
    assert rows[0].startswith("| proposed |") and "0: 12.6 (adapter_lr_init=0.00101, graff_outer_lr=0.000175)" in rows[0]
    assert rows[1].startswith("| comparative-6 |") and "0: 5.5 (adapter_lr_init=0.0071); 1: 20.0" in rows[1]
    assert table.main(["--tuning", str(tmp_path / "missing.json")]) == 2
