"""Reconstruct a plan and score it against the data file's ground truth, printing NRMSE milestones.

Usage: python benchmarks/recon_groundtruth.py PLAN.yml --data DATA.h5 [--patterns dp] [--iterations 100]
         [--every 10] [--out result.h5] [--figure fig.png] [dotted.key=value ...]
Prints one JSON line per scored iteration and a final line with all scores (metrics.Scorer) and timing.
"""
from __future__ import annotations

import argparse
import json
import os
import sys

import numpy as np


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("plan")
    parser.add_argument("--data", required=True)
    parser.add_argument("--patterns")
    parser.add_argument("--iterations", type=int)
    parser.add_argument("--every", type=int, default=10)
    parser.add_argument("--out")
    parser.add_argument("--figure")
    parser.add_argument("overrides", nargs="*", help="dotted.key=value (value parsed as YAML)")
    args = parser.parse_intermixed_args()
    import metrics
    import recon
    from metrics.figure import save_score_figure
    from recon.plan import parse_overrides

    overrides = {**parse_overrides(args.overrides), "data.path": os.path.abspath(args.data)}
    if args.patterns:
        overrides["data.patterns"] = args.patterns
    if args.iterations:
        overrides["iterations"] = args.iterations
    plan = recon.load_plan(args.plan, overrides=overrides)
    scorer = metrics.build_scorer(args.data)

    def report(progress):
        if progress.iteration % args.every == 0:
            s = scorer.score_phase(np.angle(progress.object()).sum(0), progress.dx_A, progress.origin_yx_A)
            print(json.dumps({"iteration": progress.iteration, "nrmse": round(s["nrmse"], 4),
                              "scale": round(s["scale"], 4)}), flush=True)

    result = recon.reconstruct(plan, callback=report)
    if args.out:
        result.save(args.out)
    final = scorer.report(result)
    if args.figure:
        save_score_figure(args.figure, final)
    keys = ("nrmse", "scale", "pearson_r", "ssim", "frc_resolution_half_bit_A", "frc_area")
    print(json.dumps({"plan": args.plan, "patterns": plan.data.patterns, "iterations": result.iterations_done,
                      **{k: round(float(final.scores[k]), 4) for k in keys},
                      "final_data_loss": round(result.final_data_loss, 5), "compile_s": round(result.compile_s, 2),
                      "median_s_per_iteration": round(float(np.median(result.history["time_s"][1:])), 4),
                      "stop_reason": result.stop_reason}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
