"""Loading and preparing diffraction data for the engine.

Sources (`DataSpec`):
* the native HDF5 layout (the one recon.simulate writes) (`/dp` or `/dp_noisy/dose_…`, `/scan/positions_yx_A`,
  root attributes `energy_eV`, `semiangle_mrad`, `defocus_A`, `dk_invA`, ...);
* any other HDF5 dataset path or a `.npy` file, 4D `(sy, sx, ky, kx)` or 3D `(n, ky, kx)`;
* `simulate:` a synthetic dataset from `recon.simulate` (its first noisy dose, or the clean
  patterns when `dose_e_per_A2` is empty), prepared exactly like a file.

Preparation, in this order: position subset (`sub`: every k-th row and column, `center`: an
(ny, nx) block; both keep the central position (ny//2, nx//2) of the grid; read with h5py slicing,
so only the kept patterns are loaded), zero frequency moved to [0, 0] (`dc_centered: true` means it is at [N/2, N/2] on
disk), crop to `crop_px` around the zero frequency, `bin × bin` summing. Binning works on the
periodic frequency axis so that every block is centred on the zero frequency (exactly for odd
`bin`, half an original pixel low for even `bin`); the binned Nyquist row and column therefore
gather the outermost detector pixels of both edges, which keeps the total intensity.

Detector files (EMPAD .xml, Merlin .mib, Gatan .dm3/.dm4, Dectris Arina, EMD/py4DSTEM; `data.format`)
are opened lazily by `recon.detectors` and go through `recon.preprocess` (hot pixels, centring,
normalisation; on by default for them, off for hdf5/.npy) right after the subset is read.

Positions: from `data.positions` (HDF5 path in the same file, or .npy), else the native
`/scan/positions_yx_A`, else grid indices (iy, ix) × 1 Å with `scan_step_A = 1.0`: the engine
always rescales nominal positions by `plan.scan.step_A / dataset.scan_step_A`, so a plan gives
the true step. Values the file does not hold are None; the engine takes them from the plan.
Every user mistake raises `PlanError` with one line naming the file, the key and what is allowed.
"""
from __future__ import annotations

from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import h5py
import numpy as np

from . import preprocess
from .detectors import DETECTOR_FORMATS, detect_format, open_detector, wavelength_A
from .plan import DataSpec, PlanError, SubsetSpec
from .validate import check_patterns

@dataclass(frozen=True, eq=False)
class Dataset:
    """Prepared diffraction data: what the engine fits."""

    patterns: np.ndarray              # float32 (n, N, N), zero frequency at [0, 0]
    positions_yx_A: np.ndarray        # float64 (n, 2) nominal probe centres (y, x) in Å
    scan_step_A: float | None         # grid spacing of positions_yx_A, None if unknown
    detector_mask: np.ndarray | None  # float32 (N, N), 1 = use, 0 = ignore; zero frequency at [0, 0]
    indices: np.ndarray               # int64 (n,) raster index of each kept pattern in the file
    scan_shape: tuple[int, int] | None  # (ny, nx) of the kept subset when it is a grid
    energy_eV: float | None
    semiangle_mrad: float | None
    defocus_A: float | None
    dk_invA: float | None             # after binning (dk × bin)
    total_thickness_A: float | None
    source: str                       # "path::dataset" for messages
    positions_in_steps: bool = False  # positions are scan-grid indices (no positions in the file): scan.step_A needed
    preprocessing: dict = field(default_factory=dict)  # what recon.preprocess did (format, centre, masks, ...)

    @property
    def n_px(self) -> int:
        return int(self.patterns.shape[-1])


@dataclass(frozen=True, eq=False)
class _Source:
    """An opened pattern source before preparation (patterns still on disk or in memory)."""

    patterns: Any                       # h5py.Dataset or ndarray, 3D or 4D, on-disk layout
    grid: tuple[int, int] | None        # scan grid (ny, nx) when the patterns form one
    positions_yx_A: np.ndarray | None   # (n, 2) for all patterns in raster order
    scan_step_A: float | None
    detector_mask: np.ndarray | None    # (N, N) on-disk layout, 1/0
    meta: dict[str, float | None]       # energy_eV, semiangle_mrad, defocus_A, dk_invA, total_thickness_A
    source: str
    positions_in_steps: bool = False    # positions are grid indices, scan_step_A = 1 step
    kind: str = "hdf5"                  # format: hdf5, npy, simulate or one of DETECTOR_FORMATS
    vacuum: np.ndarray | None = None    # (N, N) on-disk layout, for centring / normalisation

    @property
    def n_patterns(self) -> int:
        shape = self.patterns.shape
        return int(shape[0] * shape[1]) if len(shape) == 4 else int(shape[0])


# --------------------------------------------------------------------------- public API
def load_dataset(spec: DataSpec) -> Dataset:
    """Load and prepare the patterns described by `spec` (see the module docstring)."""
    if spec.simulate is not None:
        from .simulate import simulate

        sim = simulate(spec.simulate)
        name, patterns = sim.default_patterns()
        src = _Source(patterns, sim.dp.shape[:2], sim.positions_yx_A, sim.spec.scan_step_A, None,
                      sim.metadata(), f"<simulated>::{name}")
        return _prepare(src, spec.model_copy(update={"dc_centered": True}))
    path = _existing_file(spec.path)
    kind = detect_format(path, spec.format)
    if kind == "npy":
        return _prepare(_open_npy(path, spec), spec)
    if kind in DETECTOR_FORMATS:
        return _prepare(_open_detector(path, spec, kind), spec)
    if not h5py.is_hdf5(path):
        raise PlanError(f"{path}: data.path: not an HDF5 file (allowed: HDF5 or .npy)")
    with h5py.File(path, "r") as f:
        return _prepare(_open_hdf5(f, path, spec), spec)


def heldout_indices(n: int, fraction: float, seed: int) -> np.ndarray:
    """Sorted int64 indices of round(fraction·n) positions (at least 1 if fraction > 0).

    Reproducible: numpy default_rng(seed). At least one position is always kept for fitting.
    """
    if fraction <= 0:
        return np.zeros(0, dtype=np.int64)
    if n < 2:
        raise PlanError(f"data.heldout_fraction: needs at least 2 positions, the data has {n}")
    k = min(max(1, int(round(fraction * n))), n - 1)
    rng = np.random.default_rng(seed)
    return np.sort(rng.choice(n, size=k, replace=False)).astype(np.int64)


# --------------------------------------------------------------------------- opening sources
def _existing_file(path_str: str | None) -> Path:
    path = Path(str(path_str)).expanduser()
    if not path.is_file():
        raise PlanError(f"{path}: data.path: file not found")
    return path


def _open_npy(path: Path, spec: DataSpec) -> _Source:
    patterns = _npy(path, "data.path")
    positions = _aux_array(spec.positions, "data.positions", None, path)
    mask = _aux_array(spec.detector_mask, "data.detector_mask", None, path)
    src = _make_source(patterns, positions, None, mask, {}, str(path), spec)
    return _with(src, "npy", _aux_array(_beside(path, spec.vacuum), "data.vacuum", None, path))


def _open_detector(path: Path, spec: DataSpec, kind: str) -> _Source:
    """A detector file (recon.detectors): lazy (sy, sx, ky, kx) patterns and the file's metadata."""
    det = open_detector(path, spec, kind)
    m = det.meta
    positions = _aux_array(spec.positions, "data.positions", None, path)
    if positions is None and m.scan_step_A is not None:
        iy, ix = np.meshgrid(np.arange(det.patterns.shape[0]), np.arange(det.patterns.shape[1]), indexing="ij")
        positions = np.stack([iy.ravel(), ix.ravel()], axis=1) * m.scan_step_A
    mask = _aux_array(spec.detector_mask, "data.detector_mask", None, path)
    meta = {"energy_eV": m.energy_eV, "semiangle_mrad": m.semiangle_mrad, "defocus_A": m.defocus_A,
            "dk_invA": m.resolved_dk_invA(), "total_thickness_A": None}
    step = m.scan_step_A if spec.positions is None else None
    src = _make_source(det.patterns, positions, step, mask, meta, det.source, spec)
    return _with(src, kind, _aux_array(_beside(path, spec.vacuum), "data.vacuum", None, path))


def _beside(path: Path, value: str | None) -> str | None:
    """A relative .npy path (data.vacuum) is relative to the data file's folder."""
    if value and value.endswith(".npy") and not Path(value).expanduser().is_absolute():
        return str(path.parent / value)
    return value


def _with(src: _Source, kind: str, vacuum: np.ndarray | None) -> _Source:
    return replace(src, kind=kind, vacuum=vacuum)


def _open_hdf5(f: h5py.File, path: Path, spec: DataSpec) -> _Source:
    patterns = _hdf5_dataset(f, path, spec.patterns, "data.patterns")
    positions = _aux_array(spec.positions, "data.positions", f, path)
    step = None
    if positions is None and isinstance(f.get("scan/positions_yx_A"), h5py.Dataset):
        positions = f["scan/positions_yx_A"][()]
        step = _step_from_axes(f) or _attr_float(f.attrs, "scan_step_A")
    mask = _aux_array(spec.detector_mask, "data.detector_mask", f, path)
    src = _make_source(patterns, positions, step, mask, _hdf5_metadata(f, patterns.shape[-1]),
                       f"{path}::{spec.patterns}", spec)
    return _with(src, "hdf5", _aux_array(_beside(path, spec.vacuum), "data.vacuum", f, path))


def _aux_array(value: str | None, key: str, f: h5py.File | None, path: Path) -> np.ndarray | None:
    """Positions or mask: a .npy file, or a dataset in the same HDF5 file `f`."""
    if value is None:
        return None
    if value.endswith(".npy"):
        aux = Path(value).expanduser()
        if not aux.is_file():
            raise PlanError(f"{aux}: {key}: file not found")
        return np.asarray(_npy(aux, key))
    if f is None:
        raise PlanError(f"{path}: {key}: with .npy patterns give a .npy file, got {value!r}")
    return _hdf5_dataset(f, path, value, key)[()]


def _npy(path: Path, key: str) -> np.ndarray:
    try:
        return np.load(path, mmap_mode="r", allow_pickle=False)
    except (ValueError, OSError) as err:
        raise PlanError(f"{path}: {key}: cannot read as .npy ({err})") from None


def _hdf5_dataset(f: h5py.File, path: Path, key: str, name: str) -> h5py.Dataset:
    """The dataset `key`, or a PlanError that lists what the nearest existing group holds."""
    obj = f.get(key)
    if isinstance(obj, h5py.Dataset):
        return obj
    if isinstance(obj, h5py.Group):
        raise PlanError(f"{path}: {name}: {key!r} is a group, not a dataset; it holds: {_members(obj)}")
    parent = key.strip("/").rsplit("/", 1)[0] if "/" in key.strip("/") else ""
    group = f.get(parent) if parent else f
    where = f"under {parent!r}" if isinstance(group, h5py.Group) and parent else "at the top level"
    group = group if isinstance(group, h5py.Group) else f
    raise PlanError(f"{path}: {name}: no dataset {key!r}; available {where}: {_members(group)}")


def _members(group: h5py.Group) -> str:
    names = [k + ("/" if isinstance(group.get(k), h5py.Group) else "") for k in group.keys()]
    return ", ".join(names) or "(nothing)"


def _attr_float(attrs: Any, key: str) -> float | None:
    value = attrs.get(key)
    if value is None:
        return None
    arr = np.asarray(value)
    if arr.size != 1 or not np.issubdtype(arr.dtype, np.number):
        return None
    out = float(arr.reshape(()))
    return out if np.isfinite(out) else None


def _hdf5_metadata(f: h5py.File, n_px_on_disk: int) -> dict[str, float | None]:
    """Acquisition values from root attributes (None where absent)."""
    a = f.attrs
    defocus = _attr_float(a, "defocus_A")
    if defocus is None and _attr_float(a, "C10_A") is not None:
        defocus = -_attr_float(a, "C10_A")
    dk = _attr_float(a, "dk_invA")
    if dk is None and _attr_float(a, "dx_A"):
        dk = 1.0 / (n_px_on_disk * _attr_float(a, "dx_A"))
    return {
        "energy_eV": _attr_float(a, "energy_eV"),
        "semiangle_mrad": _attr_float(a, "semiangle_mrad"),
        "defocus_A": defocus,
        "dk_invA": dk,
        "total_thickness_A": _thickness(f),
    }


def _thickness(f: h5py.File) -> float | None:
    limits = f.get("ground_truth/slice_z_limits_A")
    if isinstance(limits, h5py.Dataset) and limits.ndim == 2 and limits.shape[1] == 2 and limits.shape[0]:
        z = limits[()]
        return float(z[:, 1].max() - z[:, 0].min())
    return _attr_float(f.attrs, "total_thickness_A")


def _step_from_axes(f: h5py.File) -> float | None:
    """Grid step from /scan/y_A (or x_A) spacing."""
    for key in ("scan/y_A", "scan/x_A"):
        axis = f.get(key)
        if isinstance(axis, h5py.Dataset) and axis.ndim == 1 and axis.shape[0] > 1:
            return float(np.median(np.abs(np.diff(axis[()]))))
    return None


# --------------------------------------------------------------------------- checks and geometry
def _make_source(patterns, positions, step, mask, meta, source: str, spec: DataSpec) -> _Source:
    """Check shapes and fix the scan grid and positions of an opened source."""
    if patterns.ndim not in (3, 4):
        raise PlanError(f"{source}: data.patterns: expected 4D (scan_y, scan_x, ky, kx) or 3D (n, ky, kx), "
                        f"got shape {tuple(patterns.shape)}")
    if patterns.shape[-1] != patterns.shape[-2]:
        raise PlanError(f"{source}: data.patterns: patterns must be square, got {tuple(patterns.shape[-2:])}")
    kind = np.dtype(patterns.dtype)
    if not (np.issubdtype(kind, np.integer) or np.issubdtype(kind, np.floating)):
        raise PlanError(f"{source}: data.patterns: expected real intensities (integer or float), got {kind}")
    grid = _grid(patterns.shape, spec.scan_shape, source)
    n = int(np.prod(patterns.shape[:-2]))
    if positions is not None:
        positions = np.asarray(positions, dtype=np.float64)
        if positions.shape != (n, 2):
            raise PlanError(f"{source}: data.positions: expected shape ({n}, 2) (one (y, x) per pattern), "
                            f"got {positions.shape}")
        if not np.all(np.isfinite(positions)):
            raise PlanError(f"{source}: data.positions: {int((~np.isfinite(positions)).sum())} NaN/inf values")
        if step is None and grid is not None:
            step = _step_from_positions(positions, grid)
    elif grid is None:
        raise PlanError(f"{source}: data.scan_shape: a 3D pattern stack without positions needs "
                        f"data.scan_shape [ny, nx] or data.positions")
    else:
        iy, ix = np.meshgrid(np.arange(grid[0]), np.arange(grid[1]), indexing="ij")
        positions = np.stack([iy.ravel(), ix.ravel()], axis=1).astype(np.float64)
        return _Source(patterns, grid, positions, 1.0, _checked_mask(mask, patterns, source), meta, source,
                       positions_in_steps=True)
    return _Source(patterns, grid, positions, step, _checked_mask(mask, patterns, source), meta, source)


def _checked_mask(mask, patterns, source: str) -> np.ndarray | None:
    """The detector mask as 1/0 float32 in the on-disk layout, checked against the pattern shape."""
    if mask is None:
        return None
    mask = np.asarray(mask)
    if mask.shape != tuple(patterns.shape[-2:]):
        raise PlanError(f"{source}: data.detector_mask: expected shape {tuple(patterns.shape[-2:])} "
                        f"like the patterns, got {mask.shape}")
    return (mask != 0).astype(np.float32)


def _grid(shape: tuple[int, ...], scan_shape: tuple[int, int] | None, source: str) -> tuple[int, int] | None:
    if len(shape) == 4:
        if scan_shape is not None and tuple(scan_shape) != tuple(shape[:2]):
            raise PlanError(f"{source}: data.scan_shape: {list(scan_shape)} does not match the 4D patterns' "
                            f"scan axes {list(shape[:2])} (leave it null)")
        return int(shape[0]), int(shape[1])
    if scan_shape is None:
        return None
    if scan_shape[0] * scan_shape[1] != shape[0] or min(scan_shape) < 1:
        raise PlanError(f"{source}: data.scan_shape: {list(scan_shape)} does not hold the {shape[0]} patterns "
                        f"(ny × nx must equal n)")
    return int(scan_shape[0]), int(scan_shape[1])


def _step_from_positions(positions: np.ndarray, grid: tuple[int, int]) -> float | None:
    """Median distance between neighbours along the fast (or else slow) grid axis."""
    p = positions.reshape(grid[0], grid[1], 2)
    if grid[1] > 1:
        d = np.linalg.norm(np.diff(p, axis=1), axis=-1)
    elif grid[0] > 1:
        d = np.linalg.norm(np.diff(p, axis=0), axis=-1)
    else:
        return None
    return float(np.median(d))


def subset_selection(subset: SubsetSpec, grid: tuple[int, int] | None,
                     source: str) -> tuple[slice | None, slice | None, tuple[int, int] | None]:
    """Slices (y, x) of the scan grid kept by `subset`, and the kept grid shape.

    Both 'sub' and 'center' keep the central position (ny//2, nx//2) and stay centred on it.
    'full' without a grid returns (None, None, None): every pattern is kept.
    """
    if subset.mode == "full":
        if grid is None:
            return None, None, None
        return slice(0, grid[0]), slice(0, grid[1]), grid
    if grid is None:
        raise PlanError(f"{source}: data.subset.mode: {subset.mode!r} needs a scan grid "
                        f"(4D patterns or data.scan_shape); allowed without one: 'full'")
    if subset.mode == "sub":
        ys, xs = (slice((g // 2) % subset.step, g, subset.step) for g in grid)
    else:
        if subset.shape is None:
            raise PlanError(f"{source}: data.subset.shape: mode 'center' needs shape [ny, nx]")
        ny, nx = subset.shape
        if not (1 <= ny <= grid[0] and 1 <= nx <= grid[1]):
            raise PlanError(f"{source}: data.subset.shape: {[ny, nx]} must lie within the scan {list(grid)} "
                            f"(each entry 1 … scan size)")
        y0, x0 = grid[0] // 2 - ny // 2, grid[1] // 2 - nx // 2
        ys, xs = slice(y0, y0 + ny), slice(x0, x0 + nx)
    shape = (len(range(*ys.indices(grid[0]))), len(range(*xs.indices(grid[1]))))
    return ys, xs, shape


# --------------------------------------------------------------------------- preparation
def _prepare(src: _Source, spec: DataSpec) -> Dataset:
    ys, xs, kept_shape = subset_selection(spec.subset, src.grid, src.source)
    if ys is None:
        indices = np.arange(src.n_patterns, dtype=np.int64)
        raw = src.patterns[()] if isinstance(src.patterns, h5py.Dataset) else np.asarray(src.patterns)
    else:
        iy = np.arange(src.grid[0])[ys]
        ix = np.arange(src.grid[1])[xs]
        indices = (iy[:, None] * src.grid[1] + ix[None, :]).ravel().astype(np.int64)
        raw = _read_patterns(src, ys, xs, indices)
    n_disk = raw.shape[-1]
    patterns = np.asarray(raw, dtype=np.float32).reshape(-1, n_disk, n_disk)
    steps = preprocess.resolve_steps(spec, src.kind in DETECTOR_FORMATS)
    patterns, mask, record = preprocess.apply(patterns, src.detector_mask, steps, kept_shape, src.vacuum, src.source)
    check_patterns(patterns, src.source)
    if spec.dc_centered:
        patterns = np.fft.ifftshift(patterns, axes=(-2, -1))
        mask = None if mask is None else np.fft.ifftshift(mask)
    crop = spec.crop_px if spec.crop_px is not None else n_disk
    if crop > n_disk:
        raise PlanError(f"{src.source}: data.crop_px: {crop} is larger than the patterns ({n_disk} px); "
                        f"allowed: 4 … {n_disk} or null")
    if crop % spec.bin:
        raise PlanError(f"{src.source}: data.bin: {spec.bin} does not divide the pattern size {crop} px "
                        f"(after crop); allowed: divisors of {crop}")
    patterns = bin_frequencies(crop_frequencies(patterns, crop), spec.bin, np.sum)
    if mask is not None:
        mask = bin_frequencies(crop_frequencies(mask, crop), spec.bin, np.min).astype(np.float32)
    dk = src.meta.get("dk_invA")
    if dk is None and "bf_radius_px" in record and src.meta.get("energy_eV") and src.meta.get("semiangle_mrad"):
        dk = preprocess.dk_from_disk(record["bf_radius_px"], src.meta["semiangle_mrad"],
                                     wavelength_A(src.meta["energy_eV"]))
        record["dk_invA_from_disk"] = dk
    return Dataset(
        patterns=np.ascontiguousarray(patterns, dtype=np.float32),
        positions_yx_A=np.ascontiguousarray(src.positions_yx_A[indices], dtype=np.float64),
        scan_step_A=src.scan_step_A,
        detector_mask=mask,
        indices=indices,
        scan_shape=kept_shape,
        energy_eV=src.meta.get("energy_eV"),
        semiangle_mrad=src.meta.get("semiangle_mrad"),
        defocus_A=src.meta.get("defocus_A"),
        dk_invA=None if dk is None else dk * spec.bin,
        total_thickness_A=src.meta.get("total_thickness_A"),
        source=src.source,
        positions_in_steps=src.positions_in_steps,
        preprocessing={"format": src.kind, **record} if steps.any or src.kind != "hdf5" else {},
    )


def _read_patterns(src: _Source, ys: slice, xs: slice, indices: np.ndarray) -> np.ndarray:
    """Only the kept patterns: grid slicing for 4D, an increasing index list for 3D."""
    if src.patterns.ndim == 4:
        return src.patterns[ys, xs]
    return src.patterns[indices] if isinstance(src.patterns, h5py.Dataset) else np.asarray(src.patterns)[indices]


def crop_frequencies(a: np.ndarray, n_out: int) -> np.ndarray:
    """Keep the n_out × n_out frequencies around zero of (..., N, N) arrays with zero at [0, 0]."""
    n = a.shape[-1]
    if n_out == n:
        return a
    idx = (np.fft.fftfreq(n_out) * n_out).astype(np.int64) % n
    return a[..., idx[:, None], idx[None, :]]


def bin_frequencies(a: np.ndarray, b: int, reduce=np.sum) -> np.ndarray:
    """Combine b × b pixels of (..., N, N) arrays with zero frequency at [0, 0] (b divides N).

    Blocks are centred on the zero frequency (exactly for odd b): the axis is rolled by b//2
    before the reshape, so the result again has zero frequency at [0, 0].
    """
    if b == 1:
        return a
    n = a.shape[-1]
    rolled = np.roll(a, (b // 2, b // 2), axis=(-2, -1))
    blocks = rolled.reshape(*a.shape[:-2], n // b, b, n // b, b)
    return reduce(blocks, axis=(-3, -1))
