"""Calibration of the fitted optics' standard errors on simulated data with known optics.

Usage: python benchmarks/fisher_calibration.py [--realisations 20] [--first-seed 0] [--iterations 60]
         [--engine gauss_newton] [--dose 1e4] [--out DIR]

One noise-free dataset is made with an aberrated probe (defocus, C12, φ12), tapered at its window's
edge as the fitted probe is, and a rotated scan (recon.physics.probe_from_aberrations + taper_probe +
recon.forward.predict_patterns on recon.simulate's MoS2-like potential); each realisation draws Poisson
counts from it (numpy default_rng(seed), seeds first-seed, first-seed + 1, ...) and fits defocus_A,
C12_A, phi12_deg and rotation_deg from perturbed starting values.
Prints, per parameter, the mean error, the scatter of the fitted values, the mean reported σ, and the
coverage: the fraction of fits whose true value lies within 2σ (the target is ≥ 90 %).
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import numpy as np

import recon
from recon import forward, physics
from recon.plan import SimulationSpec, plan_from_dict
from recon.simulate import simulate

#: The true optics of the simulated data and where each fit starts.
TRUTH = {"probe.defocus_A": -100.0, "probe.aberrations.C12_A": 20.0, "probe.aberrations.phi12_deg": 30.0,
         "scan.rotation_deg": 3.0}
START = {"probe.defocus_A": -95.0, "probe.aberrations.C12_A": 16.0, "probe.aberrations.phi12_deg": 25.0,
         "scan.rotation_deg": 2.0}
SPEC = SimulationSpec(pattern_px=32, scan_shape=(10, 10), dk_invA=0.1, scan_step_A=0.6, dose_e_per_A2=())
APERTURE_EDGE_PX = 0.33  # the plan default, so that the model is exact
TAPER_PX = 4.0  # probe.fit_taper_px: the fitted probe's edge taper, also applied to the simulated probe


def rotate(positions_yx_A: np.ndarray, angle_deg: float) -> np.ndarray:
    """Positions rotated about their centroid as the engine does (recon.engine.scan_positions)."""
    c = positions_yx_A.mean(axis=0)
    t = np.deg2rad(angle_deg)
    rot = np.array([[np.cos(t), -np.sin(t)], [np.sin(t), np.cos(t)]])
    return c + (positions_yx_A - c) @ rot.T


def clean_patterns(spec: SimulationSpec = SPEC, truth: dict = TRUTH) -> tuple[np.ndarray, np.ndarray]:
    """Noise-free patterns (n, N, N) (fraction of the beam, zero frequency at [0, 0]) and nominal positions."""
    sim = simulate(spec)
    sigma = physics.sigma_rad_per_VA(spec.energy_eV)
    transmission = np.exp(1j * float(sigma) * sim.V_slices).astype(np.complex64)
    aberrations = {"C12": truth["probe.aberrations.C12_A"], "phi12": truth["probe.aberrations.phi12_deg"]}
    probe = physics.probe_from_aberrations(spec.pattern_px, spec.dk_invA, spec.energy_eV, spec.semiangle_mrad,
                                           truth["probe.defocus_A"], aberrations, APERTURE_EDGE_PX)
    probe = physics.taper_probe(probe, TAPER_PX)  # the fitted probe's model, so that it stays exact
    actual = rotate(sim.positions_yx_A, truth["scan.rotation_deg"])
    patterns = forward.predict_patterns(transmission, np.asarray(probe)[None], actual, np.zeros(2), sim.dx_A,
                                        spec.energy_eV, spec.slice_thickness_A)
    return patterns.astype(np.float64), sim.positions_yx_A


def write_realisation(directory: Path, clean: np.ndarray, positions: np.ndarray, counts_per_pattern: float,
                      seed: int) -> dict:
    """Poisson counts of one realisation as .npy files; the plan's data section for them."""
    counts = np.random.default_rng(seed).poisson(clean * counts_per_pattern).astype(np.float32)
    patterns_path, positions_path = directory / f"patterns_{seed}.npy", directory / "positions.npy"
    np.save(patterns_path, counts)
    np.save(positions_path, positions)
    return {"path": str(patterns_path), "positions": str(positions_path), "dc_centered": False}


def fit_plan(data: dict, engine: str, iterations: int, spec: SimulationSpec = SPEC) -> dict:
    """A plan that fits the four optics from START (every other optic exact); one batch of all positions
    (the Gauss-Newton engine then takes one Levenberg-Marquardt step on all data per iteration)."""
    n = spec.scan_shape[0] * spec.scan_shape[1]
    return {"iterations": iterations, "batch_size": n, "data": data,
            "engine": {"name": engine, "cg_iterations": 20} if engine == "gauss_newton" else {"name": engine},
            "probe": {"energy_eV": spec.energy_eV, "semiangle_mrad": spec.semiangle_mrad,
                      "defocus_A": START["probe.defocus_A"],
                      "aberrations": {"C12_A": START["probe.aberrations.C12_A"],
                                      "phi12_deg": START["probe.aberrations.phi12_deg"]},
                      "aperture_edge_px": APERTURE_EDGE_PX, "fit": ["defocus_A", "C12_A", "phi12_deg"],
                      "fit_taper_px": TAPER_PX},
            "detector": {"dk_invA": spec.dk_invA},
            "scan": {"step_A": spec.scan_step_A, "rotation_deg": START["scan.rotation_deg"], "fit": ["rotation_deg"]},
            "object": {"slice_thickness_A": spec.slice_thickness_A},
            # the errors are those of an unconstrained maximum-likelihood fit: no amplitude clipping
            "constraints": {"object_amplitude": {"enabled": False}}}


def coverage(fits: list[dict], truth: dict = TRUTH) -> dict:
    """Per parameter: mean error, scatter, mean σ, and the fraction with |value − truth| ≤ 2σ."""
    out = {}
    for key, true in truth.items():
        values = np.array([f["fitted"][key] for f in fits])
        sigmas = np.array([f["fitted_stderr"][key] for f in fits])
        out[key] = {"mean_error": float(np.mean(values - true)), "scatter": float(np.std(values, ddof=1)),
                    "mean_sigma": float(np.mean(sigmas)),
                    "coverage_2sigma": float(np.mean(np.abs(values - true) <= 2 * sigmas))}
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--realisations", type=int, default=20)
    parser.add_argument("--first-seed", type=int, default=0, help="seed of the first realisation")
    parser.add_argument("--iterations", type=int, default=60)
    parser.add_argument("--engine", default="gauss_newton")
    parser.add_argument("--dose", type=float, default=1e4, help="electrons per Å² (× step² per pattern)")
    parser.add_argument("--out", help="directory for the realisations (default: a temporary one)")
    args = parser.parse_args()
    directory = Path(args.out or tempfile.mkdtemp(prefix="fisher-"))
    directory.mkdir(parents=True, exist_ok=True)
    clean, positions = clean_patterns()
    fits = []
    for seed in range(args.first_seed, args.first_seed + args.realisations):
        data = write_realisation(directory, clean, positions, args.dose * SPEC.scan_step_A**2, seed)
        result = recon.reconstruct(plan_from_dict(fit_plan(data, args.engine, args.iterations)))
        fits.append({"seed": seed, "fitted": result.fitted, "fitted_stderr": result.fitted_stderr,
                     "run_s": round(result.run_s, 2)})
        print(json.dumps(fits[-1]), flush=True)
    print(json.dumps({"engine": args.engine, "iterations": args.iterations, "dose_e_per_A2": args.dose,
                      "realisations": args.realisations, "coverage": coverage(fits)}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
