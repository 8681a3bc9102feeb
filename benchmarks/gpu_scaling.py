"""Seconds per iteration of one reconstruction at large shapes, with the FFT-roofline fraction.

Usage: python benchmarks/gpu_scaling.py [--shapes phaser,tune576] [--iterations 6] [--ks 1,16]
                                        [--peak-GBs BW]
Shapes: `phaser` = phaser's published benchmark (6,400 positions of 128², 20 slices, 4 probe
modes); `tune576` = 576 positions of 64², one slice, one mode. Patterns are synthetic (a bright
field disc with Poisson noise: timing does not depend on content), so nothing is simulated or
read. For each shape and K (trials batched in one program): median seconds per iteration after
the first, per trial, and on a GPU the fraction of the FFT memory roofline
(recon.lower.fft_bytes_per_iteration × K / time / peak bandwidth). The single-trial anchor
(K = 1) stands next to the batched one. Prints one JSON line per (shape, K).
"""
from __future__ import annotations

import argparse
import json
import sys

import numpy as np

SHAPES = {
    "phaser": dict(scan=(80, 80), n_px=128, slices=20, modes=4, batch_size=64),
    "tune576": dict(scan=(24, 24), n_px=64, slices=1, modes=1, batch_size=32),
}
PEAK_GBS = {"H100": 3350.0, "H200": 4800.0, "A100": 2039.0, "L40": 864.0}


def synthetic_dataset(recon, scan: tuple[int, int], n_px: int, step_A: float = 0.4, dk_invA: float = 0.05):
    """A Dataset of Poisson-noisy bright-field discs on a raster scan (zero frequency at [0, 0])."""
    rng = np.random.default_rng(0)
    k = np.fft.fftfreq(n_px) * n_px
    disc = (np.hypot(*np.meshgrid(k, k, indexing="ij")) < n_px / 6).astype(np.float32) * 100.0
    n = scan[0] * scan[1]
    patterns = rng.poisson(np.broadcast_to(disc, (n, n_px, n_px))).astype(np.float32)
    iy, ix = np.meshgrid(np.arange(scan[0]), np.arange(scan[1]), indexing="ij")
    positions = np.stack([iy.ravel(), ix.ravel()], axis=1) * step_A
    return recon.Dataset(patterns=patterns, positions_yx_A=positions.astype(np.float64), scan_step_A=step_A,
                         detector_mask=None, indices=np.arange(n), scan_shape=scan, energy_eV=300e3,
                         semiangle_mrad=21.0, defocus_A=100.0, dk_invA=dk_invA, total_thickness_A=None,
                         source="<synthetic>")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shapes", default="phaser,tune576")
    parser.add_argument("--iterations", type=int, default=6)
    parser.add_argument("--ks", default="1,16")
    parser.add_argument("--peak-GBs", type=float, default=None)
    args = parser.parse_args()
    import jax
    import recon
    from recon.lower import fft_bytes_per_iteration, lower

    device = jax.devices()[0]
    peak = args.peak_GBs or next((bw for n, bw in PEAK_GBS.items() if n in device.device_kind), None)
    for name in args.shapes.split(","):
        shape = SHAPES[name]
        dataset = synthetic_dataset(recon, shape["scan"], shape["n_px"])
        for k in (int(v) for v in args.ks.split(",")):
            plans = [recon.plan_from_dict({
                "iterations": args.iterations, "batch_size": shape["batch_size"], "seed": i,
                "data": {"path": "<synthetic>"}, "probe": {"modes": shape["modes"], "defocus_A": 100.0 + i},
                "object": {"slices": shape["slices"], "slice_thickness_A": 2.0}}) for i in range(k)]
            static = lower(plans[0], dataset).static
            try:
                results = (recon.reconstruct_batch(plans, dataset=dataset) if k > 1
                           else [recon.reconstruct(plans[0], dataset=dataset)])
            except Exception as err:  # noqa: BLE001 - out of memory ends this shape
                print(json.dumps({"shape": name, "K": k, "stopped": f"{type(err).__name__}: {str(err)[:200]}"}))
                break
            s_it = float(np.median(results[0].history["time_s"][1:]))
            row = {"shape": name, "device": f"{device.platform}:{device.device_kind}", "K": k,
                   "positions": static.n_fit, "pattern_px": static.n_px, "slices": static.slices,
                   "modes": static.modes, "s_per_iteration": round(s_it, 4),
                   "s_per_iteration_per_trial": round(s_it / k, 4), "compile_s": round(results[0].compile_s, 2),
                   "fft_GB_per_iteration": round(fft_bytes_per_iteration(static) * k / 1e9, 3)}
            if peak and device.platform == "gpu":
                row["fft_roofline_fraction"] = round(fft_bytes_per_iteration(static) * k / s_it / (peak * 1e9), 3)
            print(json.dumps(row), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
