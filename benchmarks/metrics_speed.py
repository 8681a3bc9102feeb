"""Timing of scoring a 256×256 region (full score and the cheap intermediate score).

    .venv/bin/python benchmarks/metrics_speed.py [--repeat 10]

A synthetic 512×512 truth (periodic and non-periodic) and a 400×400 reconstruction with a
sub-pixel offset and noise; the region is an explicit 256×256 box.
"""

from __future__ import annotations

import argparse
import time

import numpy as np

from metrics import GroundTruth, Scorer

DX_A = 0.2


def synthetic_truth(n: int, seed: int = 0) -> np.ndarray:
    """Band-limited random 'atoms': smoothed sparse peaks (periodic)."""
    rng = np.random.default_rng(seed)
    peaks = (rng.random((n, n)) < 0.01) * rng.uniform(0.5, 1.0, (n, n))
    q2 = np.fft.fftfreq(n)[:, None] ** 2 + np.fft.fftfreq(n)[None, :] ** 2
    return np.fft.ifft2(np.fft.fft2(peaks) * np.exp(-q2 / (2 * 0.08**2))).real * 20


def best_of(fn, repeat: int) -> float:
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--repeat", type=int, default=10)
    args = p.parse_args()
    truth = synthetic_truth(512)
    rng = np.random.default_rng(1)
    origin = (60.3 * DX_A, 57.8 * DX_A)
    rows = np.arange(400) + origin[0] / DX_A
    cols = np.arange(400) + origin[1] / DX_A
    ry, rx = np.floor(rows).astype(int), np.floor(cols).astype(int)
    recon = 0.9 * truth[np.ix_(ry, rx)] + 0.05 * rng.standard_normal((400, 400))
    box = (120 * DX_A, 120 * DX_A, 375 * DX_A, 375 * DX_A)
    for periodic in (True, False):
        t0 = time.perf_counter()
        scorer = Scorer(GroundTruth(truth, DX_A, periodic=periodic), box_yx_A=box)
        setup = time.perf_counter() - t0
        full = best_of(lambda: scorer.score_phase(recon, DX_A, origin), args.repeat)
        quick = best_of(lambda: scorer.score_phase(recon, DX_A, origin, quick=True), args.repeat)
        s = scorer.score_phase(recon, DX_A, origin)
        print(
            f"periodic={periodic!s:<5} region {scorer.region.h}×{scorer.region.w}: Scorer() {setup * 1e3:.0f} ms,"
            f" full score {full * 1e3:.0f} ms, quick score {quick * 1e3:.0f} ms"
            f" (best of {args.repeat}; nrmse {s['nrmse']:.3f}, shift ({s['shift_y_px']:.2f}, {s['shift_x_px']:.2f}) px)"
        )
    idx = np.floor(origin[0] / DX_A + np.arange(480) * 0.75).astype(int) % 512
    fine_recon = truth[np.ix_(idx, idx)]
    fine = best_of(lambda: scorer.score_phase(fine_recon, DX_A * 0.75, (origin[0], origin[0])), max(1, args.repeat // 3))
    print(f"full score of a 480×480 reconstruction at 0.75·dx (Fourier-resampled first): {fine * 1e3:.0f} ms")


if __name__ == "__main__":
    main()
