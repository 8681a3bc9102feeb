"""Resolution without ground truth: Fourier ring correlation between two half-set reconstructions.

Two reconstructions of one plan from interleaved halves of the scan positions (``recon.halfset``)
are compared over the scanned field: the phase summed over slices of half B is put on half A's
pixels (their origins' difference, refined by sub-pixel registration: upsampled cross-correlation
at 1/10 px, then 1/100 px, moving B each round with ``TruthShifter``'s periodic-plus-smooth Fourier
shift, so A is never interpolated), a constant and a linear phase ramp are removed from both, and
the FRC of the two (``metrics.frc``, Hann window) gives the resolution where it first falls below
the ½-bit threshold (van Heel & Schatz 2005, the threshold meant for half-data sets) and the mean
FRC over the rings (the area, a smoother objective).

Each half holds half the dose, so this resolution is the half-data one (pessimistic for the full
data); it measures reproducibility, so errors both halves share (the same wrong probe or optics
reconstructed the same way) are not seen.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np

from .align import PlaneFit, TruthShifter, registration_step
from .errors import ScoringError
from .frc import FRCCurve, frc, window_2d
from .io import as_reconstruction

REGISTER_UPSAMPLE = (10, 100)
MIN_FIELD_PX = 8


@dataclass(frozen=True)
class HalfsetComparison:
    """The two half-set phases (y, x) over the field, registered and detrended, and their FRC.
    ``shift_yx_px``: displacement of half B relative to half A, in object pixels."""

    phase_a: np.ndarray
    phase_b: np.ndarray
    curve: FRCCurve
    shift_yx_px: tuple[float, float]

    def scores(self) -> dict[str, float]:
        """``halfset_frc_resolution_A`` (½-bit, Å, lower is better), ``halfset_frc_area`` (higher
        is better), the 0.143-threshold resolution and the registration shift."""
        return {
            "halfset_frc_resolution_A": self.curve.resolution_A("half_bit"),
            "halfset_frc_area": self.curve.area(),
            "halfset_frc_resolution_0143_A": self.curve.resolution_A("0.143"),
            "halfset_shift_y_px": self.shift_yx_px[0],
            "halfset_shift_x_px": self.shift_yx_px[1],
        }


def field_pixels(positions_yx_A: np.ndarray, origin_yx_A: tuple[float, float], dx_A: float,
                 shape: tuple[int, int], margin_A: float = 0.0) -> tuple[np.ndarray, np.ndarray]:
    """Rows and columns of the object pixels inside the bounding box of the positions (n, 2) Å,
    grown by ``margin_A`` and clipped to the object ``shape``."""
    lo = (positions_yx_A.min(axis=0) - margin_A - np.asarray(origin_yx_A)) / dx_A
    hi = (positions_yx_A.max(axis=0) + margin_A - np.asarray(origin_yx_A)) / dx_A
    start = np.maximum(np.ceil(lo - 1e-6).astype(int), 0)
    stop = np.minimum(np.floor(hi + 1e-6).astype(int) + 1, shape)
    if np.any(stop - start < MIN_FIELD_PX):
        raise ScoringError(f"halfset: the scanned field covers {tuple(int(v) for v in stop - start)} object pixels; "
                           f"need at least {MIN_FIELD_PX} × {MIN_FIELD_PX}")
    return np.arange(start[0], stop[0]), np.arange(start[1], stop[1])


def compare_halves(half_a: Any, half_b: Any, *, margin_A: float = 0.0, window: str = "hann",
                   min_ring_px: int = 16) -> HalfsetComparison:
    """FRC of two half-set results over their scanned field (see the module docstring).

    Each result is a result file path or an object with ``object`` (slices, y, x), ``dx_A``,
    ``origin_yx_A``; the field is the bounding box of their ``positions_yx_A`` (n, 2) when both
    carry them, else the whole object. Both must have the same ``dx_A`` and object shape.
    """
    ra, rb = as_reconstruction(half_a), as_reconstruction(half_b)
    shape = ra.phase_yx.shape
    if rb.phase_yx.shape != shape or not math.isclose(ra.dx_A, rb.dx_A, rel_tol=1e-6):
        raise ScoringError(f"halfset: the halves differ in grid: {shape} at {ra.dx_A} Å and "
                           f"{rb.phase_yx.shape} at {rb.dx_A} Å")
    rows, cols = _field(half_a, half_b, ra.origin_yx_A, ra.dx_A, shape, margin_A)
    plane = PlaneFit.make(rows * ra.dx_A, cols * ra.dx_A, np.ones((rows.size, cols.size)))
    win = window_2d((rows.size, cols.size), window)
    phase_a = plane.detrend(ra.phase_yx[rows[:, None], cols[None, :]])
    shifter = TruthShifter.make(rb.phase_yx, periodic=False)
    delta = (np.asarray(rb.origin_yx_A) - np.asarray(ra.origin_yx_A)) / ra.dx_A
    reference = np.fft.fft2(phase_a * win)
    for upsample in REGISTER_UPSAMPLE:
        moved = plane.detrend(shifter.region(rows, cols, delta))
        delta = delta - registration_step(reference, moved * win, upsample)
    phase_b = plane.detrend(shifter.region(rows, cols, delta))
    curve = frc(phase_a, phase_b, ra.dx_A, window=window, min_ring_px=min_ring_px)
    return HalfsetComparison(phase_a, phase_b, curve, (float(-delta[0]), float(-delta[1])))


def _field(half_a: Any, half_b: Any, origin_yx_A: tuple[float, float], dx_A: float, shape: tuple[int, int],
           margin_A: float) -> tuple[np.ndarray, np.ndarray]:
    positions = [getattr(h, "positions_yx_A", None) for h in (half_a, half_b)]
    if any(p is None for p in positions):
        return np.arange(shape[0]), np.arange(shape[1])
    return field_pixels(np.concatenate([np.asarray(p, dtype=np.float64) for p in positions]), origin_yx_A, dx_A,
                        shape, margin_A)
