"""Compile seconds and seconds per iteration of a reconstruction plan.

Usage: python benchmarks/recon_speed.py PLAN.yml [--data PATH] [--iterations N] [key=value ...]
Prints one JSON line: compile_s (this process; 0 when the persistent cache already had the
program, so a fresh cache dir is used unless --keep-cache), median and mean s/iteration after the
first iteration, and the device.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile

import numpy as np


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("plan")
    parser.add_argument("--data", help="override data.path")
    parser.add_argument("--iterations", type=int, default=30)
    parser.add_argument("--keep-cache", action="store_true", help="use the persistent compilation cache")
    parser.add_argument("overrides", nargs="*", help="dotted.key=value (value parsed as YAML)")
    args = parser.parse_intermixed_args()
    if not args.keep_cache:
        os.environ["PTYTUNE_JAX_CACHE"] = tempfile.mkdtemp(prefix="ptytune-bench-cache-")
    import jax
    import recon

    from recon.plan import parse_overrides

    overrides = {"iterations": args.iterations, **parse_overrides(args.overrides)}
    if args.data:
        overrides["data.path"] = os.path.abspath(args.data)
    plan = recon.load_plan(args.plan, overrides=overrides)
    dataset = recon.load_dataset(plan.data)
    result = recon.reconstruct(plan, dataset=dataset)
    times = np.asarray(result.history["time_s"][1:])
    print(json.dumps({
        "plan": args.plan, "device": str(jax.devices()[0]), "patterns": list(dataset.patterns.shape),
        "batch_size": plan.batch_size, "modes": plan.probe.modes, "slices": plan.object.slices,
        "compile_s": round(result.compile_s, 3), "median_s_per_iteration": round(float(np.median(times)), 4),
        "mean_s_per_iteration": round(float(times.mean()), 4), "iterations": result.iterations_done,
    }))
    return 0


if __name__ == "__main__":
    sys.exit(main())
