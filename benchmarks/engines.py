"""Every engine side by side: NRMSE against iteration and against seconds on the shared datasets.

Usage: python benchmarks/engines.py --mos2 MOS2.h5 [--sto STO.h5] [--iterations 100] [--sto-iterations 20]
         [--every 10] [--engines gradient,epie,rpie,lsqml,gauss_newton]

mos2_1l: dose 1e5 (`dp_noisy/dose_1e+05`), one slice, supersample 1; sto_10nm: clean `dp`, 13 slices
of 7.81 Å. Scoring as benchmarks/recon_groundtruth.py (metrics.Scorer on the data file's
ground_truth/phase_sum). Prints one JSON line per scored iteration (engine, dataset, iteration,
seconds of iterating so far, NRMSE) and a final summary table (markdown).
"""
from __future__ import annotations

import argparse
import json
import os
import sys

import numpy as np

import metrics
import recon
from recon.plan import apply_overrides, plan_from_dict

ENGINES = ("gradient", "epie", "rpie", "lsqml", "gauss_newton")
#: Each engine's settings in this benchmark (everything else is the plan default), picked from 20-iteration
#: trials on mos2_1l (NRMSE at 20: rpie α 0.1 / 0.5: 0.30 / 0.25; lsqml step 0.9, δ 0.1 / 0.5, 0.5: 0.34 /
#: 0.23; gauss_newton cg 4 / 2 / 1 at batch 32: 0.30 / 0.27 / 0.23, cg 2 at batch 96: 0.21).
ENGINE_SETTINGS = {
    "gradient": {"engine": {"name": "gradient"}},
    "epie": {"engine": {"name": "epie", "alpha": 1.0, "beta": 1.0}},
    "rpie": {"engine": {"name": "rpie", "alpha": 0.5, "beta": 0.5}},
    "lsqml": {"engine": {"name": "lsqml", "lsqml_step": 0.5, "lsqml_delta": 0.5}},
    "gauss_newton": {"engine": {"name": "gauss_newton", "cg_iterations": 2}, "batch_size": 96},
}


def base_plans(args) -> dict[str, dict]:
    """The two datasets' plans (without the engine)."""
    plans = {"mos2_1l": {"iterations": args.iterations, "batch_size": 32,
                         "data": {"path": os.path.abspath(args.mos2), "patterns": "dp_noisy/dose_1e+05"}}}
    if args.sto:
        plans["sto_10nm"] = {"iterations": args.sto_iterations, "batch_size": 32,
                             "data": {"path": os.path.abspath(args.sto), "patterns": "dp"},
                             "object": {"slices": 13, "slice_thickness_A": 7.81},
                             "optimizers": {"object": {"learning_rate": 0.02, "schedule": "constant"}}}
    return plans


def run(dataset_name: str, plan_dict: dict, engine: str, every: int, scorer) -> list[dict]:
    """One reconstruction: NRMSE every `every` iterations, with the iterating seconds so far
    (the engine's own per-iteration times, so compilation and scoring are not counted)."""
    plan = plan_from_dict(apply_overrides(plan_dict, ENGINE_SETTINGS[engine]))
    scored: dict[int, float] = {}

    def callback(progress):
        if progress.iteration % every == 0 or progress.iteration == 1:
            s = scorer.score_phase(np.angle(progress.object()).sum(0), progress.dx_A, progress.origin_yx_A)
            scored[progress.iteration] = float(s["nrmse"])

    result = recon.reconstruct(plan, callback=callback)
    if result.diverged and not scored:
        print(json.dumps({"dataset": dataset_name, "engine": engine, "stop_reason": result.stop_reason}), flush=True)
        return []
    seconds = np.cumsum(result.history["time_s"])
    rows = [{"dataset": dataset_name, "engine": engine, "iteration": it, "seconds": round(float(seconds[it - 1]), 2),
             "nrmse": round(nrmse, 4), "stop_reason": result.stop_reason} for it, nrmse in sorted(scored.items())]
    for row in rows:
        print(json.dumps(row), flush=True)
    return rows


def table(rows: list[dict]) -> str:
    """Markdown: per dataset and engine, NRMSE at a few iterations, the best, and seconds per iteration."""
    lines = ["| dataset | engine | NRMSE @10 | @20 | @50 | @100 | best (iteration) | s/iteration |",
             "|---|---|---|---|---|---|---|---|"]
    keys = sorted({(r["dataset"], r["engine"]) for r in rows}, key=lambda k: (k[0], ENGINES.index(k[1])))
    for dataset, engine in keys:
        mine = [r for r in rows if r["dataset"] == dataset and r["engine"] == engine]
        at = {r["iteration"]: r["nrmse"] for r in mine}
        best = min(mine, key=lambda r: r["nrmse"])
        per_it = mine[-1]["seconds"] / mine[-1]["iteration"]
        cells = [f"{at[i]:.3f}" if i in at else "–" for i in (10, 20, 50, 100)]
        lines.append(f"| {dataset} | {engine} | " + " | ".join(cells)
                     + f" | {best['nrmse']:.3f} ({best['iteration']}) | {per_it:.3f} |")
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mos2", required=True)
    parser.add_argument("--sto")
    parser.add_argument("--iterations", type=int, default=100)
    parser.add_argument("--sto-iterations", type=int, default=20)
    parser.add_argument("--every", type=int, default=10)
    parser.add_argument("--engines", default=",".join(ENGINES))
    parser.add_argument("--datasets", default="mos2_1l,sto_10nm", help="which of the two to run")
    args = parser.parse_args()
    paths = {"mos2_1l": args.mos2, "sto_10nm": args.sto}
    rows = []
    for dataset_name, plan_dict in base_plans(args).items():
        if dataset_name not in args.datasets.split(","):
            continue
        scorer = metrics.build_scorer(paths[dataset_name])
        for engine in args.engines.split(","):
            rows += run(dataset_name, plan_dict, engine, args.every, scorer)
    print(table(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
