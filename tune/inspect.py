"""`tune inspect DATA` and `tune init DATA -o study.yml`: what a data file holds, and a starter study.

`inspect_data` reads the file the way a reconstruction would (format detection, metadata,
preprocessing; at most a central block of 32 × 32 positions, so that large scans stay quick) and
returns an `Inspection`; `format_inspection` prints it; `starter_study` turns it into a study file
with the nominal optics, a search over defocus, scan rotation, learning rates and regularisation,
and the truth-free objective `heldout_loss`. Values the file lacks come from `--set key=value`
(plan keys such as probe.semiangle_mrad=21); anything still missing is one `PlanError` line naming
the key.
"""
from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import h5py
import numpy as np
import yaml

from recon.data import Dataset, load_dataset
from recon.detectors import DETECTOR_FORMATS, detect_format, open_detector, wavelength_A
from recon.plan import DataSpec, PlanError
from recon.preprocess import dk_from_disk, fit_disk
from tune.study import load_study

MAX_POSITIONS = 1024
#: Plan keys a reconstruction needs, with the Dataset attribute that can supply each.
REQUIRED = {"probe.energy_eV": "energy_eV", "probe.semiangle_mrad": "semiangle_mrad",
            "probe.defocus_A": "defocus_A", "detector.dk_invA": "dk_invA", "scan.step_A": "scan_step_A"}


@dataclass(frozen=True)
class Inspection:
    """What was read from a data file and what follows from it."""

    path: Path
    kind: str
    shape: tuple[int, ...]            # on disk, (sy, sx, ky, kx) or (n, ky, kx)
    dtype: str
    scan_shape: tuple[int, int] | None
    scan_shape_from: str
    data: dict[str, Any]              # the data keys used (format, patterns, ...) for the study
    values: dict[str, float | None]   # plan key -> value (file, --set or derived)
    origin: dict[str, str]            # plan key -> where the value came from
    notes: tuple[str, ...]
    preprocessing: dict[str, Any]
    n_read: int
    counts_mean: float
    counts_min: float
    counts_max: float
    bf_radius_px: float | None        # in prepared (cropped/binned) pixels
    bf_center_after_yx_px: tuple[float, float] | None
    masked_pixels: int
    missing: tuple[str, ...] = field(default=())


def split_settings(settings: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """`--set` items → (data keys without the 'data.' prefix, plan keys such as probe.energy_eV)."""
    data = {k.removeprefix("data."): v for k, v in settings.items() if k.startswith("data.")}
    plan = {k: v for k, v in settings.items() if not k.startswith("data.")}
    unknown = sorted(set(plan) - set(REQUIRED))
    if unknown:
        raise PlanError(f"--set {unknown[0]}: allowed keys: data.<key>, {', '.join(REQUIRED)}")
    return data, plan


def inspect_data(path: str | Path, settings: dict[str, Any] | None = None) -> Inspection:
    """Read `path` like a reconstruction would (see the module docstring)."""
    data_keys, plan_values = split_settings(settings or {})
    path = Path(path).expanduser().resolve()
    try:
        spec = DataSpec(path=str(path), **data_keys)
    except ValueError as err:
        raise PlanError(f"{path}: --set data.*: {' '.join(str(err).split())[:200]}") from None
    if not path.is_file():
        raise PlanError(f"{path}: data.path: file not found")
    kind = detect_format(path, spec.format)
    shape, dtype, grid, grid_from, meta = _describe(path, spec, kind)
    n = int(np.prod(shape[:-2]))
    side = int(math.sqrt(MAX_POSITIONS))
    big = grid is not None and n > MAX_POSITIONS   # a central block: reads only the chunks (scan rows) it needs
    subset = {"mode": "center", "shape": [min(side, grid[0]), min(side, grid[1])]} if big else {"mode": "full"}
    ds = load_dataset(spec.model_copy(update={"subset": spec.subset.model_validate(subset)}))
    values, origin = _values(ds, plan_values, spec)
    notes = meta.notes if meta is not None else ()
    mask = ds.detector_mask if ds.detector_mask is not None else np.ones(ds.patterns.shape[-2:], np.float32)
    totals = (ds.patterns * mask).sum(axis=(-2, -1))
    radius, centre = _bf_disk(ds, mask)
    missing = tuple(k for k, v in values.items() if v is None)
    data_out = {"format": kind} if kind in DETECTOR_FORMATS else {}
    if kind in ("hdf5", "emd") and "dp" not in ds.source.split("::")[-1:]:
        data_out["patterns"] = ds.source.split("::")[-1]
    if kind == "arina":
        data_out["patterns"] = "entry/data"   # not read (the reader takes every data_* under it); names the group
    data_out.update(data_keys)
    return Inspection(path, kind, tuple(int(s) for s in shape), str(dtype), grid, grid_from, data_out, values,
                      origin, tuple(notes), dict(ds.preprocessing), len(ds.patterns), float(totals.mean()),
                      float(totals.min()), float(totals.max()), radius, centre, int((mask == 0).sum()), missing)


def _describe(path: Path, spec: DataSpec, kind: str):
    """On-disk shape, dtype, scan grid and where it came from, and detector metadata (None for hdf5/npy)."""
    if kind in DETECTOR_FORMATS:
        det = open_detector(path, spec, kind)
        return det.patterns.shape, det.patterns.dtype, tuple(det.patterns.shape[:2]), det.scan_shape_from, det.meta
    if kind == "npy":
        try:
            arr = np.load(path, mmap_mode="r", allow_pickle=False)
        except (ValueError, OSError) as err:
            raise PlanError(f"{path}: data.path: cannot read as .npy ({err})") from None
        shape, dtype = arr.shape, arr.dtype
    else:
        with h5py.File(path, "r") as f:
            obj = f.get(spec.patterns)
            if not isinstance(obj, h5py.Dataset):
                raise PlanError(f"{path}: data.patterns: no dataset {spec.patterns!r}; set data.patterns")
            shape, dtype = obj.shape, obj.dtype
    grid = tuple(shape[:2]) if len(shape) == 4 else (tuple(spec.scan_shape) if spec.scan_shape else None)
    return shape, dtype, grid, "the array shape" if len(shape) == 4 else "data.scan_shape", None


def _values(ds: Dataset, plan_values: dict[str, Any], spec: DataSpec) -> tuple[dict, dict]:
    """Plan key -> value and origin: --set beats the file; dk can come from the bright-field disk."""
    values: dict[str, float | None] = {}
    origin: dict[str, str] = {}
    for key, attr in REQUIRED.items():
        if plan_values.get(key) is not None:
            values[key], origin[key] = float(plan_values[key]), "--set"
        elif getattr(ds, attr) is not None and not (attr == "scan_step_A" and _grid_fallback(ds)):
            values[key], origin[key] = float(getattr(ds, attr)), "file"
            if key == "detector.dk_invA" and "dk_invA_from_disk" in ds.preprocessing:
                origin[key] = "bright-field disk radius"
        else:
            values[key] = None
    radius = ds.preprocessing.get("bf_radius_px")
    if values["detector.dk_invA"] is None and radius and values["probe.energy_eV"] and values["probe.semiangle_mrad"]:
        values["detector.dk_invA"] = dk_from_disk(radius, values["probe.semiangle_mrad"],
                                                  wavelength_A(values["probe.energy_eV"])) * spec.bin
        origin["detector.dk_invA"] = f"bright-field disk radius {radius:.2f} px and the semi-angle"
    return values, origin


def _grid_fallback(ds: Dataset) -> bool:
    """True when the positions are recon.data's stand-in (grid indices × 1 Å): the file has no step."""
    p = ds.positions_yx_A
    return ds.scan_step_A == 1.0 and p.min() == 0 and bool(np.all(p == np.round(p)))


def _bf_disk(ds: Dataset, mask: np.ndarray) -> tuple[float | None, tuple[float, float] | None]:
    """Bright-field disk of the prepared mean pattern (zero frequency shifted back to the centre)."""
    mean = np.fft.fftshift(ds.patterns.mean(axis=0))
    try:
        disk = fit_disk(mean, np.fft.fftshift(mask) != 0, ds.source)
    except PlanError:
        return None, None
    return disk.radius_px, disk.center_yx_px


# --------------------------------------------------------------------------- printing
def format_inspection(ins: Inspection) -> str:
    """Human-readable report of an Inspection (a few lines)."""
    p = ins.preprocessing
    lines = [f"file          {ins.path}", f"format        {ins.kind}",
             f"patterns      shape {list(ins.shape)}, dtype {ins.dtype}",
             f"scan          {list(ins.scan_shape) if ins.scan_shape else 'no grid'} (from {ins.scan_shape_from})"]
    for key, value in ins.values.items():
        shown = f"{value:.6g}" if value is not None else "MISSING"
        lines.append(f"{key:<22}{shown}" + (f"   ({ins.origin[key]})" if key in ins.origin else ""))
    lines += [f"  {note}" for note in ins.notes]
    if "center_yx_px" in p:
        lines.append(f"centre        {p['center_yx_px']} px on disk ({p.get('center_mode')}, from the "
                     f"{p.get('center_from')}; centre of mass {p.get('com_yx_px')}), rolled by {p.get('shift_yx_px')} px, "
                     f"residual {p.get('residual_yx_px')} px")
        lines.append(f"centre spread {p.get('center_spread_px')} px (std over positions, y x)"
                     + (f", descan range {p['descan_range_px']} px" if "descan_range_px" in p else ""))
    if ins.bf_radius_px is not None:
        lines.append(f"bright field  radius {ins.bf_radius_px:.2f} px, centre after preparation "
                     f"({ins.bf_center_after_yx_px[0]:.2f}, {ins.bf_center_after_yx_px[1]:.2f})")
    if "hot_pixel_count" in p:
        lines.append(f"bad pixels    {p['hot_pixel_count']} hot {p['hot_pixels'][:5]}, {p['dead_pixel_count']} dead "
                     f"{p['dead_pixels'][:5]}; masked in total: {ins.masked_pixels}")
    if p.get("nonfinite_pixels") or p.get("negative_values_clipped"):
        lines.append(f"cleaned       {p.get('nonfinite_pixels', 0)} non-finite pixels masked, "
                     f"{p.get('negative_values_clipped', 0)} negative values clipped to 0")
    lines.append(f"counts        per pattern mean {ins.counts_mean:.6g}, min {ins.counts_min:.6g}, "
                 f"max {ins.counts_max:.6g} (over {ins.n_read} patterns read)")
    if ins.missing:
        lines.append("plan must set " + ", ".join(ins.missing)
                     + ("  (with probe.semiangle_mrad and probe.energy_eV, detector.dk_invA comes from the "
                        "bright-field disk)" if "detector.dk_invA" in ins.missing else ""))
    else:
        lines.append("plan must set nothing more (every optical value is known)")
    return "\n".join(lines)


# --------------------------------------------------------------------------- tune init
def starter_study(ins: Inspection, study_path: Path, name: str | None = None, n_trials: int = 40,
                  iterations: int = 30) -> str:
    """YAML text of a starter study for the inspected data (nominal optics, truth-free objective)."""
    need = [k for k in ("probe.energy_eV", "probe.semiangle_mrad", "detector.dk_invA", "scan.step_A")
            if ins.values[k] is None]
    if need:
        raise PlanError(f"{ins.path}: {need[0]}: not in the file; pass --set {need[0]}=VALUE "
                        f"(still missing: {', '.join(need)})")
    defocus = ins.values["probe.defocus_A"]
    nominal = defocus if defocus is not None else 0.0
    rel = os.path.relpath(ins.path, study_path.resolve().parent)
    data = {"path": rel, **ins.data, "center": ins.data.get("center", "auto" if ins.kind in DETECTOR_FORMATS else "none"),
            "hot_pixels": ins.data.get("hot_pixels", "auto" if ins.kind in DETECTOR_FORMATS else "none"),
            "heldout_fraction": 0.1, "ground_truth": None}
    study = {
        "study": {"name": name or _study_name(ins.path), "sampler": {"name": "tpe", "seed": 0},
                  "pruner": {"name": "median", "options": {"n_startup_trials": 8, "n_warmup_steps": 6}},
                  "n_trials": n_trials},
        "data": data,
        "recon": {"iterations": iterations, "batch_size": 32,
                  "probe": {"energy_eV": ins.values["probe.energy_eV"],
                            "semiangle_mrad": ins.values["probe.semiangle_mrad"], "defocus_A": nominal},
                  "detector": {"dk_invA": _round(ins.values["detector.dk_invA"])},
                  "scan": {"step_A": _round(ins.values["scan.step_A"]), "rotation_deg": 0.0}},
        "search": {
            "recon.probe.defocus_A": {"low": nominal - 300.0, "high": nominal + 300.0},
            "recon.scan.rotation_deg": {"low": -180.0, "high": 180.0},
            "recon.optimizers.object.learning_rate": {"low": 1.0e-3, "high": 0.5, "log": True},
            "recon.optimizers.probe.learning_rate": {"low": 1.0e-4, "high": 0.1, "log": True},
            "recon.regularizers.object_tv": {"low": 1.0e-6, "high": 1.0e-1, "log": True},
        },
        "objective": {"metrics": ["heldout_loss"], "report_every": 2},
        "output": {"artifacts": ["phase_png"], "keep": "best"},
    }
    origin = "; ".join(f"{k} from {v}" for k, v in ins.origin.items())
    header = (f"# Starter study written by `tune init` for {ins.path.name} ({ins.kind}, {list(ins.shape)}).\n"
              f"# Nominal optics: {origin or 'none from the file'}.\n"
              + ("# probe.defocus_A is not in the file: the search is centred on 0 Å; narrow it if you know it.\n"
                 if defocus is None else "")
              + (f"# Patterns are {ins.shape[-1]} px wide (bright-field radius {ins.bf_radius_px:.1f} px): "
                 f"data.crop_px / data.bin make trials cheaper, at the cost of the outer angles.\n"
                 if ins.shape[-1] > 96 and ins.bf_radius_px else "")
              + "# No ground truth: trials are scored by the held-out data loss (10 % of positions).\n"
                "#   tune start THIS.yml  →  tune best THIS.yml -o best.yml  →  tune recon best.yml\n")
    return header + yaml.safe_dump(study, sort_keys=False)


def write_starter_study(ins: Inspection, out: Path, **kwargs: Any) -> str:
    """Write the starter study to `out`, check it with `load_study`, and return a one-line summary."""
    out.write_text(starter_study(ins, out, **kwargs))
    config = load_study(out)
    return (f"wrote {out}: study {config.name}, {len(config.params)} searched settings, "
            f"objective {', '.join(config.spec.objective.metrics)}")


def _study_name(path: Path) -> str:
    stem = "".join(c if c.isalnum() or c in "-_." else "-" for c in path.stem).strip("-_.") or "data"
    return f"{stem}-tune"[:100]


def _round(value: float | None) -> float | None:
    return None if value is None else float(f"{value:.6g}")
