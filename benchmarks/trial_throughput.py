"""Trials per hour with K trials batched in one compiled program (study.trials_per_batch).

Usage: python benchmarks/trial_throughput.py [--ks 1,2,4,8,16,32,64] [--iterations 30]
                                             [--problems tune576,demo] [--peak-GBs BW]
Problems (simulated, no files needed): `tune576` = 576 positions (24 × 24) of 64² patterns, one
slice, one mode (the size users tune on); `demo` = the demo study's problem (16 × 16 of 48²).
For each K: seconds per iteration of the whole batch and per trial, trials per hour for a trial of
`--iterations` iterations (compile excluded, reported apart), device memory per trial (from the
shapes: recon.lower.trial_bytes), the ratio to K = 1 and, on a GPU, the fraction of the FFT
memory roofline (recon.lower.fft_bytes_per_iteration per trial × K / time / peak bandwidth).
K values past the device's memory stop the sweep. Prints one JSON line per (problem, K).
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time

import numpy as np

PROBLEMS = {
    "tune576": dict(pattern_px=64, scan_shape=(24, 24), scan_step_A=0.4, dk_invA=0.0667),
    "demo": dict(pattern_px=48, scan_shape=(16, 16), scan_step_A=0.5, dk_invA=0.0667),
}
#: Peak memory bandwidth (GB/s) of known accelerators, for the roofline fraction.
PEAK_GBS = {"H100": 3350.0, "H200": 4800.0, "A100": 2039.0, "L40": 864.0}


def peak_bandwidth(device_kind: str, override: float | None) -> float | None:
    if override:
        return override
    return next((bw for name, bw in PEAK_GBS.items() if name in device_kind), None)


def plans_for(recon, data_path: str, k: int, iterations: int) -> list:
    """K trial plans differing in every tuned float (defocus, learning rates, TV weight)."""
    rng = np.random.default_rng(0)
    return [recon.plan_from_dict({
        "iterations": iterations, "batch_size": 32, "seed": i,
        "data": {"path": data_path, "patterns": "dp_noisy/dose_1e+05"},
        "probe": {"defocus_A": float(rng.uniform(-150, -50))},
        "optimizers": {"object": {"learning_rate": float(10 ** rng.uniform(-2.5, -1))},
                       "probe": {"learning_rate": float(10 ** rng.uniform(-3.5, -2))}},
        "regularizers": {"object_tv": float(10 ** rng.uniform(-6, -2))}}) for i in range(k)]


def measure(recon, plans, dataset) -> dict:
    """Run the batch once; seconds per iteration after the first (median) and compile seconds."""
    t0 = time.perf_counter()
    results = recon.reconstruct_batch(plans, dataset=dataset) if len(plans) > 1 else [
        recon.reconstruct(plans[0], dataset=dataset)]
    wall = time.perf_counter() - t0
    times = np.asarray(results[0].history["time_s"][1:])
    return {"s_per_iteration": float(np.median(times)), "compile_s": results[0].compile_s, "wall_s": wall,
            "diverged": sum(r.diverged for r in results)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ks", default="1,2,4,8,16,32,64")
    parser.add_argument("--iterations", type=int, default=30)
    parser.add_argument("--problems", default="tune576,demo")
    parser.add_argument("--peak-GBs", type=float, default=None, help="device memory bandwidth for the roofline")
    args = parser.parse_args()
    import jax
    import recon
    from recon.lower import fft_bytes_per_iteration, lower, trial_bytes
    from recon.plan import SimulationSpec
    from recon.simulate import write_dataset

    device = jax.devices()[0]
    peak = peak_bandwidth(device.device_kind, args.peak_GBs) if device.platform == "gpu" else None
    tmp = tempfile.mkdtemp(prefix="ptytune-throughput-")
    for name in args.problems.split(","):
        path = str(write_dataset(SimulationSpec(**PROBLEMS[name], defocus_A=-100.0), f"{tmp}/{name}.h5"))
        base = None
        for k in (int(v) for v in args.ks.split(",")):
            plans = plans_for(recon, path, k, args.iterations)
            dataset = recon.load_dataset(plans[0].data)
            static = lower(plans[0], dataset).static
            try:
                m = measure(recon, plans, dataset)
            except Exception as err:  # noqa: BLE001 - out of device memory ends the sweep
                print(json.dumps({"problem": name, "K": k, "stopped": f"{type(err).__name__}: {str(err)[:200]}"}))
                break
            per_trial = m["s_per_iteration"] / k
            base = base or per_trial
            row = {"problem": name, "device": f"{device.platform}:{device.device_kind}", "K": k,
                   "positions": static.n_fit, "pattern_px": static.n_px,
                   "mb_per_trial": round(trial_bytes(static) / 2**20, 1),
                   "s_per_iteration_batch": round(m["s_per_iteration"], 5),
                   "s_per_iteration_per_trial": round(per_trial, 5),
                   "trials_per_hour": round(3600.0 / (per_trial * args.iterations), 1),
                   "speedup_vs_K1": round(base / per_trial, 2), "compile_s": round(m["compile_s"], 2),
                   "diverged": m["diverged"]}
            if peak:
                row["fft_roofline_fraction"] = round(fft_bytes_per_iteration(static) * k / m["s_per_iteration"]
                                                     / (peak * 1e9), 3)
            print(json.dumps(row), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
