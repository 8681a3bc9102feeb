"""Score a dataset's ground truth against distorted copies of itself (not a test: reads your data files).

    .venv/bin/python benchmarks/metrics_groundtruth.py DATA.h5 [DATA.h5 ...] [--out DIR]   # e.g. mos2_1l.h5

For each dataset: (1) the truth shifted on its periodic grid by a sub-pixel amount, scaled 0.9 and
given an offset and ramp, on the truth's own grid; (2) the same written as a 3-slice recon result
HDF5 on a 100×100 window with a non-integer origin, scored through the file and the CLI, per slice
too; (3) the truth band-limited-resampled onto a finer grid (0.8·dx); (4) a region across the edge
of the periodic cell, the truth rolled by whole pixels. Expect NRMSE < 0.01 and the applied shift
recovered within 0.02 px. Figures go to --out.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import sys
import tempfile
from pathlib import Path

import h5py
import numpy as np

from metrics import GroundTruth, Scorer
from metrics.cli import score_main
from metrics.figure import save_score_figure

SHIFT_PX = (0.37, -1.73)


def fourier_eval(image: np.ndarray, y_px: np.ndarray, x_px: np.ndarray) -> np.ndarray:
    """Band-limited (periodic) interpolation of ``image`` at rows y_px × columns x_px."""
    ny, nx = image.shape
    ky, kx = np.fft.fftfreq(ny) * ny, np.fft.fftfreq(nx) * nx
    ey = np.exp(2j * np.pi * np.outer(y_px, ky) / ny)
    ex = np.exp(2j * np.pi * np.outer(x_px, kx) / nx)
    return (ey @ np.fft.fft2(image) @ ex.T).real / (ny * nx)


def distort(phase: np.ndarray, y_A: np.ndarray, x_A: np.ndarray) -> np.ndarray:
    """0.9·phase + 0.2 rad + ramp (0.004, −0.003) rad/Å."""
    return 0.9 * phase + 0.2 + 0.004 * y_A[:, None] - 0.003 * x_A[None, :]


def check(name: str, scores: dict, expect_shift: tuple[float, float]) -> bool:
    ok = scores["nrmse"] < 0.01 and max(abs(scores["shift_y_px"] - expect_shift[0]), abs(scores["shift_x_px"] - expect_shift[1])) < 0.02
    keys = ("nrmse", "pearson_r", "ssim", "scale", "shift_y_px", "shift_x_px", "frc_resolution_half_bit_A", "frc_area")
    print(f"  {name:<34} " + "  ".join(f"{k}={scores[k]:.4g}" for k in keys if k in scores) + ("  OK" if ok else "  FAIL"))
    return ok


def run(path: Path, out_dir: Path) -> bool:
    gt = GroundTruth.from_h5(path)
    scorer = Scorer(gt)
    dx = gt.dx_A
    ny, nx = gt.phase_yx.shape
    print(f"{path.name}: truth {ny}×{nx} px at {dx:.4f} Å, region {scorer.region}")
    ok = True

    # (1) periodic sub-pixel shift on the truth's own grid: recon(y) = truth(y − shift)
    rows, cols = np.arange(ny) - SHIFT_PX[0], np.arange(nx) - SHIFT_PX[1]
    shifted = distort(fourier_eval(gt.phase_yx, rows, cols), np.arange(ny) * dx, np.arange(nx) * dx)
    report = scorer.report_phase(shifted, dx, (0.0, 0.0))
    ok &= check("shifted+scaled, truth grid", report.scores, SHIFT_PX)
    save_score_figure(out_dir / f"{path.stem}_shifted.png", report, title=f"{path.name}: truth shifted {SHIFT_PX} px, ×0.9, offset, ramp")

    # (2) a 3-slice result file on a 100×100 window with a non-integer origin
    y_A, x_A = scorer.region.coords_A(dx)
    origin = (y_A.mean() - 50 * dx + 0.123, x_A.mean() - 50 * dx - 0.271)
    wy, wx = origin[0] + np.arange(100) * dx, origin[1] + np.arange(100) * dx
    slices = np.stack([fourier_eval(s, wy / dx - SHIFT_PX[0], wx / dx - SHIFT_PX[1]) for s in gt.phase_slices])
    slices = slices * 0.9 + 0.05
    with tempfile.TemporaryDirectory() as tmp:
        result = Path(tmp) / "result.h5"
        with h5py.File(result, "w") as f:
            f["object"] = np.exp(1j * slices).astype(np.complex64)
            f.attrs.update(dx_A=dx, origin_yx_A=origin, heldout_loss=np.nan, final_data_loss=1.5)
        ok &= check(f"{len(slices)}-slice result file", scorer.score(result), SHIFT_PX)
        per_slice = scorer.score(result, per_slice=True)
        worst = max(v for k, v in per_slice.items() if k.endswith("_nrmse"))
        print(f"  per slice against sigma*V_slices: worst slice NRMSE {worst:.3g}")
        ok &= worst < 0.01
        buf = io.StringIO()
        with contextlib.redirect_stdout(buf):
            code = score_main([str(result), "--ground-truth", str(path), "--out", str(out_dir / f"{path.stem}_cli.png")])
        cli_scores = json.loads(buf.getvalue())
        print(f"  CLI exit {code}, nrmse {cli_scores['nrmse']:.4g}, final_data_loss {cli_scores['final_data_loss']}")
        ok &= code == 0

    # (3) finer reconstruction grid (0.8·dx), band-limited copy of the shifted truth
    fine_dx = 0.8 * dx
    fy, fx = np.arange(int(ny / 0.8)) * fine_dx, np.arange(int(nx / 0.8)) * fine_dx
    fine = distort(fourier_eval(gt.phase_yx, fy / dx - SHIFT_PX[0], fx / dx - SHIFT_PX[1]), fy, fx)
    ok &= check("finer grid 0.8·dx", scorer.score_phase(fine, fine_dx, (0.0, 0.0)), SHIFT_PX)

    # (4) a box across the periodic cell's edge; the result covers y, x in [-96, 96) px around 0
    box = (-3.0, -3.0, 5.0, 5.0)
    rolled = distort(np.roll(gt.phase_yx, (96 + 1, 96 - 2), axis=(0, 1)), np.arange(ny) * dx, np.arange(nx) * dx)
    wrapped = Scorer(gt, box_yx_A=box).score_phase(rolled, dx, (-96 * dx, -96 * dx))
    ok &= check("box across the periodic edge", wrapped, (1.0, -2.0))
    return bool(ok)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("data", nargs="+", type=Path, help="dataset files with a ground truth, e.g. mos2_1l.h5")
    p.add_argument("--out", type=Path, default=Path("out/metrics"))
    args = p.parse_args()
    results = [run(path, args.out) for path in args.data]
    print("all OK" if all(results) else "FAILED")
    return 0 if all(results) else 1


if __name__ == "__main__":
    sys.exit(main())
