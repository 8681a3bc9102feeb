"""Detector round trip: the shared MoS2 patterns written as EMPAD and Merlin files (disk off centre, hot
pixels), read back through recon.detectors + recon.preprocess, reconstructed with the same plan as the
original HDF5 file, all three scored against the file's ground truth.

Usage: PYTHONPATH=. python benchmarks/detector_roundtrip.py DATA.h5 [--patterns dp_noisy/dose_1e+05] [--iterations 30]
         [--plan studies/mos2_1l_recon.yml] [--workdir DIR] [--runs original empad mib mib_dk_from_disk]
         [dotted.key=value ...]

What differs between the three runs is only the data section:
* original: the native file (zero frequency at the centre, no mask);
* EMPAD: 128×128 float32 frames, each 64×64 pattern placed with its zero frequency at (64+3, 64-2),
  5 hot pixels (2 in the bright field) at 1e5; energy, scan step and dk in the .xml; `crop_px: 64`;
* Merlin: 96×96 U16 frames, zero frequency at (48-2, 48+4), the same hot pixels at 30000, `crop_px: 64`;
  a .mib holds no calibration, so the plan gives dk (the original file's value): run `mib`;
  run `mib_dk_from_disk` takes dk from the fitted bright-field radius and the 21 mrad semi-angle instead
  (as `tune init` does without a dk), which measures that calibration path too.
The detector files carry no positions in the ground truth's frame, so all three runs take the original
positions (`data.positions`: a .npy written from /scan/positions_yx_A); optics (energy, semi-angle,
defocus) are set in the plan for all three to the file's values. Prints one JSON line per run and a summary.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import h5py
import numpy as np

import metrics
import recon
from recon.data import load_dataset
from recon.detectors import wavelength_A, write_empad, write_mib
from recon.plan import parse_overrides
from recon.preprocess import dk_from_disk

HOT_OFFSETS = [(2, -3), (-5, 6), (-20, 14), (17, -25), (25, 25)]   # from the zero frequency; first two in the BF


def place(patterns: np.ndarray, n_frame: int, shift: tuple[int, int], hot_value: float) -> np.ndarray:
    """(sy, sx, 64, 64) centred patterns into (sy, sx, n_frame, n_frame) frames, zero frequency at
    n_frame/2 + shift, plus hot pixels at HOT_OFFSETS from it."""
    sy, sx, n, _ = patterns.shape
    frames = np.zeros((sy, sx, n_frame, n_frame), np.float32)
    y0, x0 = n_frame // 2 + shift[0] - n // 2, n_frame // 2 + shift[1] - n // 2
    frames[:, :, y0:y0 + n, x0:x0 + n] = patterns
    cy, cx = n_frame // 2 + shift[0], n_frame // 2 + shift[1]
    for dy, dx in HOT_OFFSETS:
        frames[:, :, cy + dy, cx + dx] = hot_value
    return frames


def run(name: str, plan_path: str, overrides: dict, scorer) -> dict:
    plan = recon.load_plan(plan_path, overrides=overrides)
    t0 = time.perf_counter()
    dataset = load_dataset(plan.data)
    load_s = time.perf_counter() - t0
    result = recon.reconstruct(plan)
    scores = scorer.report(result).scores
    p = dataset.preprocessing
    out = {"run": name, "nrmse": round(float(scores["nrmse"]), 4), "scale": round(float(scores["scale"]), 4),
           "pearson_r": round(float(scores["pearson_r"]), 4), "iterations": result.iterations_done,
           "final_data_loss": round(result.final_data_loss, 5), "load_s": round(load_s, 2),
           "dk_invA": plan.detector.dk_invA or dataset.dk_invA}
    for key in ("center_yx_px", "shift_yx_px", "residual_yx_px", "bf_radius_px", "hot_pixel_count", "hot_pixels",
                "dead_pixel_count"):
        if key in p:
            out[key] = p[key]
    if dataset.detector_mask is not None:
        out["masked_pixels"] = int((dataset.detector_mask == 0).sum())
    print(json.dumps(out), flush=True)
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("data")
    parser.add_argument("--patterns", default="dp_noisy/dose_1e+05")
    parser.add_argument("--iterations", type=int, default=30)
    parser.add_argument("--plan", default=str(Path(__file__).resolve().parents[1] / "studies/mos2_1l_recon.yml"))
    parser.add_argument("--workdir")
    parser.add_argument("--runs", nargs="+", default=["original", "empad", "mib", "mib_dk_from_disk"],
                        choices=["original", "empad", "mib", "mib_dk_from_disk"])
    parser.add_argument("overrides", nargs="*", help="dotted.key=value for all three runs")
    args = parser.parse_intermixed_args()
    data = os.path.abspath(args.data)
    work = Path(args.workdir or tempfile.mkdtemp(prefix="detector-roundtrip-"))
    work.mkdir(parents=True, exist_ok=True)

    with h5py.File(data, "r") as f:
        patterns = f[args.patterns][()].astype(np.float32)
        positions = f["scan/positions_yx_A"][()]
        attrs = {k: float(f.attrs[k]) for k in ("energy_eV", "semiangle_mrad", "defocus_A", "dk_invA")}
        step = float(np.median(np.diff(f["scan/x_A"][()])))
    np.save(work / "positions.npy", positions)
    empad = write_empad(work / "mos2.xml", place(patterns, 128, (3, -2), 1e5), scan_step_A=step,
                        dk_invA=attrs["dk_invA"], energy_eV=attrs["energy_eV"])
    mib = write_mib(work / "mos2.mib", place(patterns, 96, (-2, 4), 30000).astype(np.uint16), "U16")
    print(json.dumps({"workdir": str(work), "empad_bytes": (work / "scan_x24_y24.raw").stat().st_size,
                      "mib_bytes": mib.stat().st_size}), flush=True)

    common = {**parse_overrides(args.overrides), "iterations": args.iterations,
              "probe.energy_eV": attrs["energy_eV"], "probe.semiangle_mrad": attrs["semiangle_mrad"],
              "probe.defocus_A": attrs["defocus_A"], "data.positions": str(work / "positions.npy")}
    scorer = metrics.build_scorer(data)
    detector = {**common, "data.crop_px": 64}
    plans = {"original": {**common, "data.path": data, "data.patterns": args.patterns},
             "empad": {**detector, "data.path": str(empad)},
             "mib": {**detector, "data.path": str(mib), "detector.dk_invA": attrs["dk_invA"]}}
    if "mib_dk_from_disk" in args.runs:
        mib_data = load_dataset(recon.load_plan(args.plan, overrides=plans["mib"]).data)
        radius = mib_data.preprocessing["bf_radius_px"]
        dk = dk_from_disk(radius, attrs["semiangle_mrad"], wavelength_A(attrs["energy_eV"]))
        print(json.dumps({"bf_radius_px": radius, "nominal_radius_px": round(attrs["semiangle_mrad"] * 1e-3 / (
            wavelength_A(attrs["energy_eV"]) * attrs["dk_invA"]), 3), "mib_dk_from_disk_invA": round(dk, 6),
            "true_dk_invA": attrs["dk_invA"], "relative_error": round(dk / attrs["dk_invA"] - 1, 4)}), flush=True)
        plans["mib_dk_from_disk"] = {**plans["mib"], "detector.dk_invA": dk}
    results = {name: run(name, args.plan, plans[name], scorer) for name in args.runs}
    if "original" in results:
        reference = results["original"]["nrmse"]
        summary = {name: {"nrmse": r["nrmse"], "vs_original": round(r["nrmse"] / reference - 1, 4)}
                   for name, r in results.items() if name != "original"}
        print(json.dumps({"original_nrmse": reference, **summary}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
