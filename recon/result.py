"""Reconstruction results: in memory, and as HDF5 files that can be scored and resumed."""
from __future__ import annotations

import errno
import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import h5py
import numpy as np
import yaml

from .plan import Plan, PlanError, plan_from_dict


@dataclass(frozen=True)
class Result:
    """A finished (or stopped) reconstruction.

    object: complex64 (slices, y, x) transmission; probe: complex64 (modes, N, N), centred at
    [N/2, N/2]; positions_yx_A: (n, 2) fitted positions after correction (held-out positions are
    at their nominal place); object pixel [i, j] sits at origin_yx_A + (i, j)·dx_A.
    """

    object: np.ndarray
    probe: np.ndarray
    positions_yx_A: np.ndarray
    dx_A: float
    origin_yx_A: tuple[float, float]
    plan: Plan
    history: dict[str, np.ndarray]
    slice_thickness_A: float
    energy_eV: float
    sigma_rad_per_VA: float
    iterations_done: int
    diverged: bool
    converged: bool
    stop_reason: str
    heldout_indices: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))
    heldout_loss: float = float("nan")
    final_data_loss: float = float("nan")
    compile_s: float = 0.0
    run_s: float = 0.0
    preprocessing: dict = field(default_factory=dict)  # what recon.preprocess did to the patterns (Dataset)
    fitted: dict[str, float] = field(default_factory=dict)         # plan key path → fitted value (plan units)
    fitted_stderr: dict[str, float] = field(default_factory=dict)  # plan key path → standard error (Fisher)

    @property
    def phase(self) -> np.ndarray:
        """Phase of the object summed over slices (y, x) in radians."""
        return np.angle(self.object).sum(axis=0)

    def save(self, path: str | Path) -> Path:
        """Write the documented HDF5 layout (README, "Result file").

        Atomic: the file is written under a temporary name in the same folder and renamed, so
        `path` is either the complete result or absent. A folder that cannot be written (read-only,
        full) raises `ResultWriteError` (an OSError) naming the file and the reason, and leaves
        nothing behind."""
        path = Path(path)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.part")
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            with h5py.File(tmp, "w") as f:
                self._write(f)
            os.replace(tmp, path)
        except OSError as err:
            _discard(tmp)
            raise ResultWriteError(f"cannot write result file {path}: {_os_reason(err)}") from None
        except BaseException:
            _discard(tmp)
            raise
        return path

    def _write(self, f: h5py.File) -> None:
        f["object"] = self.object.astype(np.complex64)
        f["probe"] = self.probe.astype(np.complex64)
        f["positions_yx_A"] = np.asarray(self.positions_yx_A, np.float64)
        f["heldout_indices"] = np.asarray(self.heldout_indices, np.int64)
        for name, values in self.history.items():
            f[f"history/{name}"] = np.asarray(values)
        for group in ("fitted", "fitted_stderr"):
            for name, value in getattr(self, group).items():
                f[f"{group}/{name}"] = float(value)
        f.attrs["dx_A"] = float(self.dx_A)
        f.attrs["origin_yx_A"] = np.asarray(self.origin_yx_A, np.float64)
        f.attrs["plan"] = self.plan.to_yaml()
        for key in ("slice_thickness_A", "energy_eV", "sigma_rad_per_VA", "heldout_loss", "final_data_loss",
                    "compile_s", "run_s"):
            f.attrs[key] = float(getattr(self, key))
        f.attrs["iterations_done"] = int(self.iterations_done)
        f.attrs["diverged"] = bool(self.diverged)
        f.attrs["converged"] = bool(self.converged)
        f.attrs["stop_reason"] = self.stop_reason
        f.attrs["preprocessing"] = json.dumps(self.preprocessing, default=float)


class ResultWriteError(OSError):
    """A result file could not be written (read-only or full folder, ...); one line for the user."""


def _discard(path: Path) -> None:
    try:
        path.unlink(missing_ok=True)
    except OSError:  # a read-only file system: nothing was written there either
        pass


def _os_reason(err: OSError) -> str:
    """Why a write failed, in one line: the errno's text when there is one (h5py puts it in its message)."""
    if err.errno is not None:
        return os.strerror(err.errno)
    text = str(err)
    for code, name in ((errno.ENOSPC, "errno = 28"), (errno.EACCES, "errno = 13"), (errno.EROFS, "errno = 30")):
        if name in text:
            return os.strerror(code)
    return text.splitlines()[0] if text else type(err).__name__


def load_result(path: str | Path) -> Result:
    """Read a result file written by Result.save; a wrong file is a PlanError naming it."""
    path = Path(path)
    try:
        with h5py.File(path, "r") as f:
            a = dict(f.attrs)
            plan = plan_from_dict(yaml.safe_load(a["plan"]), f"{path}:plan")
            return Result(
                object=f["object"][()], probe=f["probe"][()], positions_yx_A=f["positions_yx_A"][()],
                dx_A=float(a["dx_A"]), origin_yx_A=tuple(float(v) for v in a["origin_yx_A"]), plan=plan,
                history={k: f["history"][k][()] for k in f["history"]},
                slice_thickness_A=float(a["slice_thickness_A"]), energy_eV=float(a["energy_eV"]),
                sigma_rad_per_VA=float(a["sigma_rad_per_VA"]), iterations_done=int(a["iterations_done"]),
                diverged=bool(a["diverged"]), converged=bool(a["converged"]), stop_reason=str(a["stop_reason"]),
                heldout_indices=f["heldout_indices"][()], heldout_loss=float(a["heldout_loss"]),
                final_data_loss=float(a["final_data_loss"]), compile_s=float(a["compile_s"]), run_s=float(a["run_s"]),
                preprocessing=json.loads(a.get("preprocessing", "{}")),
                fitted=_scalars(f, "fitted"), fitted_stderr=_scalars(f, "fitted_stderr"),
            )
    except OSError as err:
        raise PlanError(f"{path}: cannot read result file ({err})") from None
    except KeyError as err:
        raise PlanError(f"{path}: not a ptytune result file (missing {err.args[0]})") from None


def _scalars(f: h5py.File, group: str) -> dict[str, float]:
    """{name: float} of a group of scalar datasets (empty when the file has none)."""
    return {k: float(v[()]) for k, v in f[group].items()} if group in f else {}
