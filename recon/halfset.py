"""Half-set reconstructions: one plan run on two interleaved halves of the scan positions.

The two objects are what `metrics.halfset` compares by Fourier ring correlation, the standard
resolution estimate without ground truth. Split: a checkerboard on the scan grid, position
(iy, ix) goes to half (iy + ix) mod 2, over the largest even × even block of the grid (an odd last
row or column is left out of both halves). Each half then covers the whole field, its nearest
neighbours √2 steps apart, and both halves have the same centroid and the same extent about it.
The engine places the object grid at centroid − shape/2 · dx and rotates the scan about the
centroid, so both halves are reconstructed on the same object grid (half B is given half A's
object shape explicitly): their objects differ only by the data of each half and by the
reconstruction's own ambiguities (a sub-pixel shift, a phase offset and ramp).

Each half is the trial's plan on half the positions, with nothing held out (data.heldout_fraction
0); it sees half the dose per area and, with the same batch size, half the updates per iteration.
"""
from __future__ import annotations

from dataclasses import replace

import numpy as np

from .data import Dataset, load_dataset
from .plan import Plan, PlanError
from .result import Result
from .run import reconstruct


def checkerboard_halves(scan_shape: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
    """Raster indices (k,) of the two interleaved halves of a (ny, nx) grid, each sorted.

    Only the even × even block [0, 2⌊ny/2⌋) × [0, 2⌊nx/2⌋) is used, so the halves are equal in
    size, centroid and extent.
    """
    ny, nx = scan_shape
    if ny < 2 or nx < 2:
        raise PlanError(f"halfset: needs a scan grid of at least 2 × 2 positions, got {ny} × {nx}")
    iy, ix = np.meshgrid(np.arange(ny - ny % 2), np.arange(nx - nx % 2), indexing="ij")
    raster = (iy * nx + ix).ravel()
    parity = ((iy + ix) % 2).ravel()
    return raster[parity == 0].astype(np.int64), raster[parity == 1].astype(np.int64)


def half_dataset(dataset: Dataset, indices: np.ndarray) -> Dataset:
    """The dataset restricted to `indices` (k,) of its patterns; no longer a grid."""
    return replace(dataset, patterns=dataset.patterns[indices], positions_yx_A=dataset.positions_yx_A[indices],
                   indices=dataset.indices[indices], scan_shape=None)


def half_plan(plan: Plan, object_size_px: tuple[int, int] | None = None) -> Plan:
    """The plan for one half: nothing held out, optionally a fixed object size (y, x) in pixels."""
    data = plan.data.model_copy(update={"heldout_fraction": 0.0})
    obj = plan.object.model_copy(update={"size_px": object_size_px}) if object_size_px else plan.object
    return plan.model_copy(update={"data": data, "object": obj})


def reconstruct_halves(plan: Plan, dataset: Dataset | None = None) -> tuple[Result, Result]:
    """Reconstruct `plan` on the two checkerboard halves of its scan grid: (half A, half B).

    Both results share dx_A, object shape and origin_yx_A (see the module docstring).
    """
    dataset = dataset if dataset is not None else load_dataset(plan.data)
    if dataset.scan_shape is None:
        raise PlanError(f"{dataset.source}: halfset: needs positions on a scan grid (4D patterns or data.scan_shape)")
    first, second = (half_dataset(dataset, i) for i in checkerboard_halves(dataset.scan_shape))
    result_a = reconstruct(half_plan(plan), dataset=first)
    result_b = reconstruct(half_plan(plan, tuple(result_a.object.shape[-2:])), dataset=second)
    return result_a, result_b
