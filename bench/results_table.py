"""Print the README's results table (Markdown) from what `src.evaluate` wrote into a results folder.

    uv run python bench/results_table.py results/embedded

Nothing is computed here that evaluate did not write: per-seed EM and steps come from each run's
`metrics.json`, the intervals and McNemar p-values from `comparison/aggregated_metrics.json`.
"""
import json
import sys
from pathlib import Path


def fmt(value, spec="{:.1f}"):
    return "–" if value is None else spec.format(value)


def main(results: Path) -> None:
    agg = json.loads((results / "comparison" / "aggregated_metrics.json").read_text())
    mcnemar = agg.get("significance", {}).get("mcnemar_vs_best_proposed", {})
    print("| run (`<token>-iter1-tiny-synthetic`) | planner | dev EM strict at B, per seed (%) | mean [95% CI] "
          "| seed 0: bootstrap 95% CI | optimiser steps, per seed | planner time share | McNemar p vs best proposed |")
    print("|---|---|---|---|---|---|---|---|")
    for run_id, entry in agg["seed_groups"].items():
        run = json.loads((results / run_id / "metrics.json").read_text())
        seeds = run["seeds"] or {run_id: run["metrics"]}
        em = ", ".join(fmt(m.get("dev_em_at_budget")) for m in seeds.values())
        steps = ", ".join(fmt(m.get("train_steps"), "{:.0f}") for m in seeds.values())
        ci = entry.get("ci95")
        mean = sum(entry["seed_values"]) / len(entry["seed_values"]) if entry["seed_values"] else None
        interval = f"{fmt(mean)} [{fmt(ci[0])}, {fmt(ci[1])}]" if ci else fmt(mean)
        boot = agg.get("bootstrap_ci95", {}).get(run_id)
        boot = f"[{fmt(boot[0])}, {fmt(boot[1])}]" if boot else "–"
        share = run["metrics"].get("planner_time_fraction")
        p = mcnemar.get(run_id, {}).get("p_value")
        token = run_id.removesuffix("-iter1-tiny-synthetic")
        kind = run["config"]["training"]["scheduler"]["type"]
        print(f"| {token} | {kind} | {em} | {interval} | {boot} | {steps} | {fmt(share and 100 * share, '{:.0f}%')} "
              f"| {fmt(p, '{:.2g}')} |")


if __name__ == "__main__":
    main(Path(sys.argv[1] if len(sys.argv) > 1 else "results/embedded"))
