"""Checks of the values of loaded diffraction data, one line per problem (`PlanError`).

`recon.data.load_dataset` calls `check_patterns` on every pattern stack it prepares, so a corrupt
dataset fails with a message naming the file, the dataset and what is wrong, before any
reconstruction starts (and, through `tune start`'s checks, before any trial is created).
"""
from __future__ import annotations

import numpy as np

from .plan import PlanError


def check_patterns(patterns: np.ndarray, source: str) -> None:
    """Patterns `(n, N, N)` must exist (n ≥ 1), be finite and be intensities ≥ 0.

    `source` is "file::dataset" (how `recon.data` names a pattern source)."""
    if patterns.ndim < 3 or patterns.shape[0] == 0 or patterns.size == 0:
        raise PlanError(f"{source}: data.patterns: empty scan (shape {tuple(patterns.shape)}); "
                        "expected at least one diffraction pattern")
    bad = int(np.count_nonzero(~np.isfinite(patterns)))
    if bad:
        raise PlanError(f"{source}: data.patterns: {bad} NaN/inf values; patterns must be finite")
    negative = int(np.count_nonzero(patterns < 0))
    if negative:
        raise PlanError(f"{source}: data.patterns: {negative} negative values (min {patterns.min():.3g}); "
                        f"patterns must be intensities ≥ 0")
