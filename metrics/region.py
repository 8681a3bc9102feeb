"""Region of interest on the ground-truth grid, and weight maps."""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from .errors import ScoringError
from .io import GroundTruth

MIN_REGION_PX = 8


@dataclass(frozen=True)
class Region:
    """Ground-truth pixels y0 … y0+h−1 (rows) and x0 … x0+w−1 (columns); pixel [i, j] is at
    (i, j)·dx_A. A region may extend past the truth only when the truth is periodic."""

    y0: int
    x0: int
    h: int
    w: int

    @property
    def shape(self) -> tuple[int, int]:
        return self.h, self.w

    def coords_A(self, dx_A: float) -> tuple[np.ndarray, np.ndarray]:
        """(y, x) positions in Å of the region's rows and columns."""
        return (self.y0 + np.arange(self.h)) * dx_A, (self.x0 + np.arange(self.w)) * dx_A

    def crop(self, image: np.ndarray) -> np.ndarray:
        """The region cut from an image of the truth's shape (indices taken modulo its size)."""
        rows = (self.y0 + np.arange(self.h)) % image.shape[-2]
        cols = (self.x0 + np.arange(self.w)) % image.shape[-1]
        return image[..., rows[:, None], cols[None, :]]


def make_region(
    gt: GroundTruth,
    roi: str = "scan",
    margin_A: float = 0.0,
    box_yx_A: tuple[float, float, float, float] | None = None,
) -> Region:
    """The scanned field (bounding box of the scan positions), the full truth, or an explicit
    box (y_min, x_min, y_max, x_max) in Å (takes precedence over ``roi``), grown by ``margin_A``."""
    if box_yx_A is not None:
        y_min, x_min, y_max, x_max = (float(v) for v in box_yx_A)
    elif roi == "scan":
        if gt.positions_yx_A is None:
            raise ScoringError(f"roi='scan' needs scan positions in the ground truth ({gt.source})")
        (y_min, x_min), (y_max, x_max) = gt.positions_yx_A.min(0), gt.positions_yx_A.max(0)
    elif roi == "full":
        ny, nx = gt.phase_yx.shape
        y_min, x_min, y_max, x_max = 0.0, 0.0, (ny - 1) * gt.dx_A, (nx - 1) * gt.dx_A
        margin_A = 0.0
    else:
        raise ScoringError(f"unknown roi {roi!r}: use 'scan', 'full' or box_yx_A")
    eps = 1e-6
    i0 = math.ceil((y_min - margin_A) / gt.dx_A - eps)
    i1 = math.floor((y_max + margin_A) / gt.dx_A + eps)
    j0 = math.ceil((x_min - margin_A) / gt.dx_A - eps)
    j1 = math.floor((x_max + margin_A) / gt.dx_A + eps)
    if not gt.periodic:
        ny, nx = gt.phase_yx.shape
        i0, j0, i1, j1 = max(i0, 0), max(j0, 0), min(i1, ny - 1), min(j1, nx - 1)
    h, w = i1 - i0 + 1, j1 - j0 + 1
    if h < 1 or w < 1:
        raise ScoringError(
            f"empty region of interest: y {y_min - margin_A:.2f}..{y_max + margin_A:.2f} Å,"
            f" x {x_min - margin_A:.2f}..{x_max + margin_A:.2f} Å holds no ground-truth pixel"
        )
    if h < MIN_REGION_PX or w < MIN_REGION_PX:
        raise ScoringError(f"region of interest too small: {h}×{w} px (need at least {MIN_REGION_PX}×{MIN_REGION_PX})")
    return Region(i0, j0, h, w)


def region_weight(weight: np.ndarray | None, region: Region, truth_shape: tuple[int, int]) -> np.ndarray:
    """Non-negative weights on the region: a map of the region's shape, or of the truth's shape
    (cropped), or None (all ones)."""
    if weight is None:
        return np.ones(region.shape)
    w = np.asarray(weight, dtype=np.float64)
    if w.shape == tuple(truth_shape):
        w = region.crop(w)
    elif w.shape != region.shape:
        raise ScoringError(
            f"weight shape mismatch: {w.shape}, expected the region {region.shape} or the truth {tuple(truth_shape)}"
        )
    if not np.all(np.isfinite(w)) or np.any(w < 0):
        raise ScoringError("weight map must be finite and non-negative")
    if w.sum() <= 0:
        raise ScoringError("empty region: the weight map is zero everywhere in the region of interest")
    return w
