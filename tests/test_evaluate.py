"""The analysis (issue 5): significance tests against hand computations, seed groups, and robustness."""
import json
import math

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


def record(run_id, em, bits, finished=True, evals=True, budget=5.0, digest="d1"):
    history = [{"_step": s, ev.LOSS: 1.0 / (s + 1), ev.LR: 1e-3, ev.ELAPSED: 10.0 * s, ev.TOKENS_PER_S: 100.0}
               for s in range(5)]
    summary = {"budget/minutes": budget}
    if evals:
        history[0].update({ev.EM: 0.0, ev.EM_FLEX: 0.0, ev.EVAL_AT: 0.0})
        history[4].update({ev.EM: em, ev.EM_FLEX: em, ev.EVAL_AT: 40.0})
    if finished and evals:
        summary.update({ev.FINAL_EM: em, ev.FINAL_CORRECT: bits, ev.PROBLEM_DIGEST: digest, ev.AUC: em / 2})
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
