"""Ground truth and reconstruction results: HDF5 readers and duck-typed adapters.

Layouts: the dataset HDF5 of ``shared/data/README.md`` (``/ground_truth/...``, ``/scan/...``) and the
recon result HDF5 (``/object``, root attributes ``dx_A``, ``origin_yx_A``, ``heldout_loss``, ...).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import h5py
import numpy as np

from .errors import ScoringError

PathLike = str | Path
#: Where the dataset files keep the true phase summed over slices.
GROUND_TRUTH_KEY = "ground_truth/phase_sum"


@dataclass(frozen=True)
class GroundTruth:
    """Ground-truth phase on its own grid: pixel [i, j] sits at (y, x) = (i, j) · dx_A.

    ``periodic``: index the truth modulo its shape (a periodic simulation cell).
    ``positions_yx_A``: scan positions (n, 2), used for the default region of interest.
    ``phase_slices``: σ·V per slice (slices, y, x) in rad, for per-slice scores.
    """

    phase_yx: np.ndarray
    dx_A: float
    periodic: bool = True
    positions_yx_A: np.ndarray | None = None
    phase_slices: np.ndarray | None = None
    source: str = "<array>"

    def __post_init__(self) -> None:
        phase = np.asarray(self.phase_yx, dtype=np.float64)
        if phase.ndim != 2:
            raise ScoringError(f"ground truth must be 2-D (y, x), got shape {phase.shape} ({self.source})")
        if not np.all(np.isfinite(phase)):
            raise ScoringError(f"NaN or inf in ground truth ({self.source})")
        if not (math.isfinite(self.dx_A) and self.dx_A > 0):
            raise ScoringError(f"ground-truth dx_A must be positive, got {self.dx_A} ({self.source})")
        object.__setattr__(self, "phase_yx", phase)
        if self.positions_yx_A is not None:
            pos = np.asarray(self.positions_yx_A, dtype=np.float64)
            if pos.ndim != 2 or pos.shape[1] != 2 or len(pos) == 0:
                raise ScoringError(f"scan positions must have shape (n, 2), got {pos.shape} ({self.source})")
            object.__setattr__(self, "positions_yx_A", pos)
        if self.phase_slices is not None:
            slices = np.asarray(self.phase_slices, dtype=np.float64)
            if slices.ndim != 3 or slices.shape[1:] != phase.shape:
                raise ScoringError(
                    f"ground-truth slices shape {slices.shape} does not match phase {phase.shape} ({self.source})"
                )
            object.__setattr__(self, "phase_slices", slices)

    @classmethod
    def from_h5(
        cls,
        path: PathLike,
        key: str = GROUND_TRUTH_KEY,
        *,
        slices_key: str | None = "ground_truth/V_slices",
        periodic: bool | None = None,
    ) -> GroundTruth:
        """Read a dataset file. A key whose name starts with ``V`` (a potential in V·Å) is
        multiplied by the root attribute ``sigma_rad_per_VA``. ``periodic`` defaults to the root
        attribute ``ground_truth_periodic`` (or ``periodic``), else True (the shared datasets)."""
        with _open(path) as f:
            phase = _dataset(f, path, key)
            if _is_potential(key):
                phase = _sigma(f, path) * phase
            slices = None
            if slices_key is not None and slices_key in f:
                slices = _sigma(f, path) * _dataset(f, path, slices_key)
            positions = _dataset(f, path, "scan/positions_yx_A") if "scan/positions_yx_A" in f else None
            if periodic is None:
                periodic = bool(f.attrs.get("ground_truth_periodic", f.attrs.get("periodic", True)))
            return cls(
                phase_yx=phase,
                dx_A=float(_attr(f, path, "dx_A")),
                periodic=periodic,
                positions_yx_A=positions,
                phase_slices=slices,
                source=f"{path}:{key}",
            )


@dataclass(frozen=True)
class Reconstruction:
    """A reconstructed object: pixel [i, j] sits at (y, x) = origin_yx_A + (i, j) · dx_A."""

    object: np.ndarray
    dx_A: float
    origin_yx_A: tuple[float, float]
    heldout_loss: float = math.nan
    final_data_loss: float = math.nan
    source: str = "<object>"

    def __post_init__(self) -> None:
        obj = np.asarray(self.object)
        if obj.ndim == 2:
            obj = obj[None]
        if obj.ndim != 3 or not np.iscomplexobj(obj):
            raise ScoringError(
                f"object must be complex transmission (slices, y, x), got {obj.dtype} {obj.shape} ({self.source});"
                " use score_phase for a phase array"
            )
        object.__setattr__(self, "object", obj)
        object.__setattr__(self, "dx_A", float(self.dx_A))
        object.__setattr__(self, "origin_yx_A", _pair(self.origin_yx_A, "origin_yx_A", self.source))

    @property
    def phase_yx(self) -> np.ndarray:
        """Phase summed over slices, rad (per-slice phases are small; no unwrapping)."""
        return np.angle(self.object).sum(axis=0)

    @property
    def slice_phases(self) -> np.ndarray:
        """Phase of each slice (slices, y, x), rad."""
        return np.angle(self.object)


def load_reconstruction(path: PathLike) -> Reconstruction:
    """Read a recon result HDF5 (``/object``, attributes ``dx_A``, ``origin_yx_A``, losses)."""
    with _open(path) as f:
        return Reconstruction(
            object=_dataset(f, path, "object", dtype=None),
            dx_A=float(_attr(f, path, "dx_A")),
            origin_yx_A=tuple(_attr(f, path, "origin_yx_A")),
            heldout_loss=float(f.attrs.get("heldout_loss", math.nan)),
            final_data_loss=_final_data_loss_h5(f),
            source=str(path),
        )


def as_reconstruction(result: Any) -> Reconstruction:
    """A path to a result HDF5, a Reconstruction, or any object with ``object``, ``dx_A`` and
    ``origin_yx_A`` attributes (optionally ``heldout_loss``, ``final_data_loss``)."""
    if isinstance(result, Reconstruction):
        return result
    if isinstance(result, (str, Path)):
        return load_reconstruction(result)
    missing = [name for name in ("object", "dx_A", "origin_yx_A") if not hasattr(result, name)]
    if missing:
        raise ScoringError(f"result of type {type(result).__name__} lacks attribute(s) {', '.join(missing)}")
    return Reconstruction(
        object=np.asarray(result.object),
        dx_A=result.dx_A,
        origin_yx_A=tuple(np.asarray(result.origin_yx_A, dtype=np.float64)),
        heldout_loss=float(getattr(result, "heldout_loss", math.nan)),
        final_data_loss=float(getattr(result, "final_data_loss", math.nan)),
        source=type(result).__name__,
    )


def heldout_loss(result: Any) -> float:
    """Noise-model loss on the held-out scan positions after reconstruction (lower is better;
    NaN when nothing was held out). Reads the root attribute ``heldout_loss`` of a result file."""
    if isinstance(result, (str, Path)):
        with _open(result) as f:
            return float(_attr(f, result, "heldout_loss"))
    if not hasattr(result, "heldout_loss"):
        raise ScoringError(f"result of type {type(result).__name__} has no heldout_loss")
    return float(result.heldout_loss)


def final_data_loss(result: Any) -> float:
    """Data loss at the end of the reconstruction (lower is better): the root attribute
    ``final_data_loss``, else the last entry of ``/history/data_loss``."""
    if isinstance(result, (str, Path)):
        with _open(result) as f:
            value = _final_data_loss_h5(f)
        if math.isnan(value):
            raise ScoringError(f"{result}: no attribute 'final_data_loss' and no dataset 'history/data_loss'")
        return value
    if not hasattr(result, "final_data_loss"):
        raise ScoringError(f"result of type {type(result).__name__} has no final_data_loss")
    return float(result.final_data_loss)


def _final_data_loss_h5(f: h5py.File) -> float:
    if "final_data_loss" in f.attrs:
        return float(f.attrs["final_data_loss"])
    if "history/data_loss" in f and f["history/data_loss"].size:
        return float(f["history/data_loss"][-1])
    return math.nan


def _sigma(f: h5py.File, path: PathLike) -> float:
    return float(_attr(f, path, "sigma_rad_per_VA"))


def _is_potential(key: str) -> bool:
    return key.rstrip("/").rsplit("/", 1)[-1].startswith("V")


def _open(path: PathLike) -> h5py.File:
    try:
        return h5py.File(path, "r")
    except (OSError, ValueError) as exc:
        raise ScoringError(f"cannot open {path} as HDF5: {exc}") from None


def _dataset(f: h5py.File, path: PathLike, key: str, dtype: Any = np.float64) -> np.ndarray:
    if key not in f or not isinstance(f[key], h5py.Dataset):
        raise ScoringError(f"{path}: missing dataset '{key}'")
    data = f[key][()]
    return data if dtype is None else np.asarray(data, dtype=dtype)


def _attr(f: h5py.File, path: PathLike, name: str) -> Any:
    if name not in f.attrs:
        raise ScoringError(f"{path}: missing root attribute '{name}'")
    return f.attrs[name]


def _pair(value: Any, name: str, source: str) -> tuple[float, float]:
    arr = np.asarray(value, dtype=np.float64).ravel()
    if arr.shape != (2,) or not np.all(np.isfinite(arr)):
        raise ScoringError(f"{name} must be two finite numbers (y, x), got {value!r} ({source})")
    return float(arr[0]), float(arr[1])
