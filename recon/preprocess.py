"""Preprocessing of experimental patterns, before the zero frequency is moved to [0, 0].

Steps, in this order, each optional and recorded in `Dataset.preprocessing`:

1. detector formats only: non-finite pixels are zeroed and masked, negative values clipped to 0;
2. `hot_pixels: auto`: hot and dead pixels of the summed pattern are masked (fed to the detector
   mask, which weights the data term) and zeroed. A pixel is hot when its sum exceeds 4 × the second
   largest of its 8 neighbours plus a floor (4 × the median pixel sum, at least 1e-3 of the largest),
   dead when it is below 1/4 of the second smallest neighbour while all its neighbours are bright
   (≥ 4 × the median pixel sum: dead pixels matter, and can be told from noise, in bright regions). The second neighbour makes pairs of bad pixels count as well, and a pixel
   on the bright-field edge always has a bright neighbour on both sides of the test, so edges are never hit;
3. `center`: `auto` takes the mean pattern (or the vacuum pattern when given), its centre of mass,
   then refines it by a least-squares fit of a soft-edged disk (centre, radius, edge width, levels);
   `[cy, cx]` is taken as given; the patterns are then **rolled by whole pixels** so that the centre
   lands on [N/2, N/2]. Integer rolls keep every count where it was measured (Poisson statistics, the
   hot-pixel mask and the total intensity are exact), with no ringing or negative values as a sub-pixel
   Fourier shift would give on sharp disk edges and noisy counts; the residual (≤ 0.5 px) is recorded.
   Pixels that wrapped around the detector edge are masked. `descan: true` also fits the per-position
   disk centre as a plane over the scan grid and rolls each pattern by its own whole-pixel shift;
4. `normalize`: divide by the mean total intensity of a pattern, or by the vacuum pattern's total
   (fractions of the incident beam). The engine's Poisson and amplitude losses are scale-invariant;
   `anscombe` assumes counts, so keep `none` with it.

The fitted bright-field radius gives the angular calibration when the file has none:
dk = α / (λ · r_px) (`dk_from_disk`).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np
from scipy import optimize

from .plan import DataSpec, PlanError

HOT_RATIO = 4.0


@dataclass(frozen=True)
class Steps:
    """The resolved preprocessing choices for one source."""

    detector: bool                                   # a detector format (clip negatives, mask NaN)
    hot_pixels: bool
    center: str | tuple[float, float]                # "auto", "none" or (cy, cx) in on-disk pixels
    descan: bool
    normalize: str                                   # "none", "mean", "vacuum"

    @property
    def any(self) -> bool:
        return self.detector or self.hot_pixels or self.center != "none" or self.descan or self.normalize != "none"


@dataclass(frozen=True)
class DiskFit:
    """The bright-field disk of a pattern, in on-disk pixels (y, x)."""

    center_yx_px: tuple[float, float]
    radius_px: float
    edge_px: float
    com_yx_px: tuple[float, float]


def resolve_steps(spec: DataSpec, detector: bool) -> Steps:
    """Plan keys → steps; null means auto for detector formats and none for hdf5/npy/simulated data."""
    default = "auto" if detector else "none"
    center = spec.center if spec.center is not None else default
    if isinstance(center, (tuple, list)):
        center = (float(center[0]), float(center[1]))
    hot = (spec.hot_pixels if spec.hot_pixels is not None else default) == "auto"
    return Steps(detector, hot, center, spec.descan, spec.normalize)


# --------------------------------------------------------------------------- the pipeline
def apply(patterns: np.ndarray, mask: np.ndarray | None, steps: Steps, grid: tuple[int, int] | None,
          vacuum: np.ndarray | None, source: str) -> tuple[np.ndarray, np.ndarray | None, dict[str, Any]]:
    """Run the steps on float32 (n, N, N) on-disk patterns; returns patterns, mask (N, N) or None, record."""
    record: dict[str, Any] = {}
    if not steps.any:
        return patterns, mask, record
    n_px = patterns.shape[-1]
    good = np.ones((n_px, n_px), bool) if mask is None else mask != 0
    if steps.detector:
        bad = ~np.isfinite(patterns)
        nonfinite_px = bad.any(axis=0)
        patterns = np.where(bad, 0.0, patterns).astype(np.float32)
        negative = int(np.count_nonzero(patterns < 0))
        patterns = np.maximum(patterns, 0.0)
        good &= ~nonfinite_px
        record.update(nonfinite_pixels=int(nonfinite_px.sum()), negative_values_clipped=negative)
    if steps.hot_pixels:
        hot, dead = bad_pixels(patterns.sum(axis=0, dtype=np.float64) * good)
        good &= ~(hot | dead)
        record.update(hot_pixel_count=int(hot.sum()), dead_pixel_count=int(dead.sum()),
                      hot_pixels=_coords(hot), dead_pixels=_coords(dead))
    patterns = patterns * good.astype(np.float32)
    if vacuum is not None:
        vacuum = _check_vacuum(vacuum, n_px, source) * good
    if steps.center != "none":
        patterns, good, centring = centre_patterns(patterns, good, steps, grid, vacuum, source)
        record.update(centring)
    if steps.normalize != "none":
        if steps.normalize == "vacuum" and vacuum is None:
            raise PlanError(f"{source}: data.normalize: 'vacuum' needs data.vacuum (a vacuum pattern)")
        if steps.normalize == "vacuum":
            scale = float(vacuum.sum())
        else:
            scale = float((patterns * good).sum(axis=(-2, -1)).mean())
        if not scale > 0:
            raise PlanError(f"{source}: data.normalize: the {steps.normalize} intensity is {scale:g}; cannot normalise")
        patterns = patterns / np.float32(scale)
        record["normalized_by"] = scale
    use_mask = mask is not None or not good.all()
    return patterns.astype(np.float32), good.astype(np.float32) if use_mask else None, record


def centre_patterns(patterns: np.ndarray, good: np.ndarray, steps: Steps, grid: tuple[int, int] | None,
                    vacuum: np.ndarray | None, source: str) -> tuple[np.ndarray, np.ndarray, dict[str, Any]]:
    """Roll the patterns so that the zero frequency sits on [N/2, N/2] (see the module docstring)."""
    n_px = patterns.shape[-1]
    reference = vacuum if vacuum is not None else patterns.mean(axis=0) * good
    fit = fit_disk(reference, good, source)
    record: dict[str, Any] = {"center_from": "vacuum pattern" if vacuum is not None else "mean pattern",
                              "bf_radius_px": round(fit.radius_px, 3), "bf_edge_px": round(fit.edge_px, 3),
                              "com_yx_px": [round(v, 3) for v in fit.com_yx_px]}
    centre = np.array(fit.center_yx_px if steps.center == "auto" else steps.center, dtype=np.float64)
    record["center_yx_px"] = [round(float(v), 3) for v in centre]
    record["center_mode"] = "auto" if steps.center == "auto" else "given"
    per_position = position_centres(patterns, good, fit)
    record["center_spread_px"] = [round(float(v), 3) for v in per_position.std(axis=0)]
    targets = np.broadcast_to(centre, per_position.shape).copy()
    if steps.descan:
        if grid is None:
            raise PlanError(f"{source}: data.descan: needs a scan grid (4D patterns or data.scan_shape)")
        plane = descan_plane(per_position, grid)
        targets = centre + plane - plane.mean(axis=0)
        record["descan_range_px"] = [round(float(v), 3) for v in np.ptp(plane, axis=0)]
    shifts = np.rint(n_px // 2 - targets).astype(np.int64)
    record["shift_yx_px"] = [int(v) for v in np.median(shifts, axis=0)]
    record["residual_yx_px"] = [round(float(v), 3) for v in (centre + np.median(shifts, axis=0) - n_px // 2)]
    out = np.empty_like(patterns)
    new_good = np.ones_like(good)
    for shift in {tuple(s) for s in shifts}:
        rows = np.all(shifts == shift, axis=1)
        out[rows] = np.roll(patterns[rows], shift, axis=(-2, -1))
        new_good &= np.roll(good, shift, axis=(0, 1)) & ~wrapped(n_px, shift)
    return out * new_good.astype(np.float32), new_good, record


# --------------------------------------------------------------------------- pieces
def bad_pixels(total: np.ndarray, ratio: float = HOT_RATIO) -> tuple[np.ndarray, np.ndarray]:
    """Hot and dead pixels (bool (N, N) each) of a summed pattern (see the module docstring)."""
    neighbours = _neighbours(total)
    second_high, second_low = neighbours[-2], neighbours[1]
    positive = total[total > 0]
    median = float(np.median(positive)) if positive.size else 0.0
    floor = max(ratio * median, 1e-3 * float(total.max()))
    hot = total > ratio * second_high + floor
    dead = (total < second_low / ratio) & (neighbours[0] >= ratio * median) & (median > 0)
    return hot, dead


def _neighbours(a: np.ndarray) -> np.ndarray:
    """The 8 neighbours of every pixel, sorted: (8, N, N); edges padded by reflection."""
    padded = np.pad(a, 1, mode="reflect")
    n0, n1 = a.shape
    stack = [padded[1 + dy:1 + dy + n0, 1 + dx:1 + dx + n1]
             for dy in (-1, 0, 1) for dx in (-1, 0, 1) if (dy, dx) != (0, 0)]
    return np.sort(np.stack(stack), axis=0)


def centre_of_mass(image: np.ndarray) -> tuple[float, float]:
    """(cy, cx) of a non-negative image in pixels."""
    total = float(image.sum())
    if not total > 0:
        raise ValueError("empty image")
    iy, ix = np.indices(image.shape)
    return float((iy * image).sum() / total), float((ix * image).sum() / total)


def fit_disk(image: np.ndarray, good: np.ndarray, source: str = "") -> DiskFit:
    """Bright-field disk of `image` (N, N): centre of mass, then a soft-edged disk fitted by least squares.

    Model: b + a · logistic((r − |k − c|) / w). Only `good` pixels within 2 starting radii are fitted.
    """
    img = np.where(good, image, 0.0).astype(np.float64)
    bright = img > 0.5 * _plateau(img)
    if bright.sum() < 4:
        raise PlanError(f"{source}: data.center: no bright-field disk in the mean pattern; set data.center "
                        f"[cy, cx] or none")
    com = centre_of_mass(np.where(bright, img, 0.0))
    r0 = math.sqrt(bright.sum() / math.pi)
    iy, ix = np.indices(img.shape)
    use = good & (np.hypot(iy - com[0], ix - com[1]) < 2.0 * r0 + 2)
    y, x, v = iy[use], ix[use], img[use]
    level = float(np.median(img[bright]))

    def residual(p):
        cy, cx, r, w, a, b = p
        z = np.clip((r - np.hypot(y - cy, x - cx)) / max(abs(w), 0.05), -50, 50)
        return (b + a / (1.0 + np.exp(-z)) - v) / level

    start = [com[0], com[1], r0, 0.5, level, 0.0]
    sol = optimize.least_squares(residual, start, x_scale=[1, 1, 1, 0.2, level, level], max_nfev=200)
    cy, cx, r, w = (float(v) for v in sol.x[:4])
    if not (sol.success and abs(cy - com[0]) < r0 and abs(cx - com[1]) < r0 and 0.3 * r0 < r < 2 * r0):
        cy, cx, r, w = com[0], com[1], r0, float("nan")  # a poor fit: keep the centre of mass
    return DiskFit((cy, cx), r, abs(w), com)


def _plateau(img: np.ndarray) -> float:
    """Typical bright-field level: the median of the brightest pixels (robust to a few hot ones)."""
    flat = np.sort(img.ravel())
    top = flat[-max(4, flat.size // 100):]
    return float(np.median(top))


def position_centres(patterns: np.ndarray, good: np.ndarray, fit: DiskFit) -> np.ndarray:
    """(n, 2) centre of each pattern's bright-field disk: centroid of its pixels above half the disk level,
    within 1.5 radii of the mean pattern's disk."""
    iy, ix = np.indices(patterns.shape[-2:])
    window = good & (np.hypot(iy - fit.center_yx_px[0], ix - fit.center_yx_px[1]) < 1.5 * fit.radius_px + 1)
    inside = np.hypot(iy - fit.center_yx_px[0], ix - fit.center_yx_px[1]) < 0.7 * fit.radius_px
    level = np.median(patterns[:, inside & good], axis=1) if (inside & good).any() else patterns.max(axis=(1, 2))
    bright = (patterns > 0.5 * level[:, None, None]) & window
    count = np.maximum(bright.sum(axis=(1, 2)), 1)
    return np.stack([(bright * iy).sum(axis=(1, 2)) / count, (bright * ix).sum(axis=(1, 2)) / count], axis=1)


def descan_plane(centres: np.ndarray, grid: tuple[int, int]) -> np.ndarray:
    """(n, 2) least-squares plane a + b·iy + c·ix through the per-position centres (raster order)."""
    iy, ix = np.indices(grid)
    design = np.stack([np.ones(iy.size), iy.ravel(), ix.ravel()], axis=1).astype(np.float64)
    coef, *_ = np.linalg.lstsq(design, centres, rcond=None)
    return design @ coef


def wrapped(n_px: int, shift: tuple[int, int]) -> np.ndarray:
    """Bool (N, N): pixels that `np.roll(·, shift)` brought around from the opposite edge."""
    out = np.zeros((n_px, n_px), bool)
    sy, sx = int(shift[0]), int(shift[1])
    if sy > 0:
        out[:sy] = True
    elif sy < 0:
        out[sy:] = True
    if sx > 0:
        out[:, :sx] = True
    elif sx < 0:
        out[:, sx:] = True
    return out


def dk_from_disk(radius_px: float, semiangle_mrad: float, wavelength_A: float) -> float:
    """Detector pixel in 1/Å from the bright-field disk radius and the known semi-angle: α / (λ r)."""
    return semiangle_mrad * 1e-3 / (wavelength_A * radius_px)


def _check_vacuum(vacuum: np.ndarray, n_px: int, source: str) -> np.ndarray:
    v = np.asarray(vacuum, dtype=np.float64)
    if v.shape != (n_px, n_px) or not np.all(np.isfinite(v)):
        raise PlanError(f"{source}: data.vacuum: expected a finite ({n_px}, {n_px}) pattern like the data, "
                        f"got shape {v.shape}")
    return np.maximum(v, 0.0)


def _coords(flags: np.ndarray, limit: int = 50) -> list[list[int]]:
    return [[int(y), int(x)] for y, x in np.argwhere(flags)[:limit]]
