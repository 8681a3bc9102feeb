"""Detector files: format detection, lazy readers and the metadata found in them.

Formats (`DataSpec.format`, `auto` decides from the extension and, for HDF5, the content):

| format | files | reader |
|---|---|---|
| `empad` | `.xml` + the `.raw` it names (float32 frames 128×130, 2 trailing metadata rows) | `rsciio.empad`, lazy (dask) |
| `mib` | Quantum Detectors Merlin `.mib` (+ `.hdr` beside it when present) | `rsciio.quantumdetector`, lazy (dask) |
| `dm` | Gatan `.dm3` / `.dm4` | `rsciio.digitalmicrograph`, lazy (dask) |
| `arina` | Dectris Arina `*_master.h5` (`/entry/data/data_*`, (n, ky, kx) each) | h5py + dask (rsciio's arina reader is not lazy) |
| `emd` | EMD 1.0 / py4DSTEM HDF5 (a 4D dataset by key; auto: the only 4D one) | h5py + dask |

Every reader returns the patterns as a lazy `(scan_y, scan_x, ky, kx)` dask array, so a position
subset reads only its frames. Orientation: as rsciio returns it (rsciio flips Merlin frames
vertically, `np.flip(frame, -2)`, on read; writing a file that reads back as array `a` therefore
stores `np.flip(a, -2)`).

Metadata found in the file (energy, scan shape and step, angular pixel size or camera length,
exposure) fills `DetectorMeta`; plan values override it (the engine takes plan values first), and
`DetectorMeta.notes` says where each value came from. Unit heuristics for free-text metadata
(EMPAD/DM tags): an energy below 1000 is in kV, else in V; a camera length below 10 is in m, else mm.
Camera length → angular pixel = detector pixel pitch / camera length (pitches: EMPAD 150 µm,
Merlin 55 µm, Arina 100 µm, or the file's own).

Every problem (unknown format, wrong scan shape, truncated file, unknown dtype) is a one-line
`PlanError` naming the file and the plan key to change.
"""
from __future__ import annotations

import logging
import math
import re
import struct
import xml.etree.ElementTree as ET
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import dask.array as da
import h5py
import numpy as np
from rsciio.digitalmicrograph import file_reader as dm_reader
from rsciio.empad import file_reader as empad_reader
from rsciio.exceptions import (ByteOrderError, DM3DataTypeError, DM3FileVersionError, DM3TagError, DM3TagIDError,
                               DM3TagTypeError)
from rsciio.quantumdetector import file_reader as mib_reader
from rsciio.utils.file import memmap_distributed

from .plan import DataSpec, PlanError

try:  # registers the HDF5 filters (bitshuffle, LZ4) of compressed Arina data; pip install -e '.[arina]'
    import hdf5plugin  # noqa: F401
except ImportError:  # uncompressed Arina/EMD files read without it
    hdf5plugin = None

DETECTOR_FORMATS = ("empad", "mib", "dm", "arina", "emd")
#: dask chunks: whole frames, blocks of scan positions of dask's default chunk size (~128 MiB)
FRAME_CHUNKS = ("auto", "auto", -1, -1)
#: Detector pixel pitch in metres, for a camera-length calibration.
PIXEL_PITCH_M = {"empad": 150e-6, "mib": 55e-6, "arina": 100e-6}
_EXTENSIONS = {".npy": "npy", ".xml": "empad", ".mib": "mib", ".dm3": "dm", ".dm4": "dm"}
_HDF5_EXTENSIONS = (".h5", ".hdf5", ".hdf", ".emd", ".nxs")
_MIB_DTYPES = {"U01": ">u1", "U08": ">u1", "U16": ">u2", "U32": ">u4"}
_LENGTH_A = {"m": 1e10, "cm": 1e8, "mm": 1e7, "µm": 1e4, "μm": 1e4, "um": 1e4, "nm": 10.0, "Å": 1.0, "A": 1.0,
             "angstrom": 1.0, "pm": 1e-2}
_INV_LENGTH_INVA = {"1/nm": 0.1, "nm^-1": 0.1, "1 / nm": 0.1, "1/Å": 1.0, "1/A": 1.0, "A^-1": 1.0, "Å^-1": 1.0,
                    "1/m": 1e-10, "1/pm": 100.0}
_HC_EV_A, _M0C2_EV = 12398.4198, 510998.95

logging.getLogger("rsciio").setLevel(logging.ERROR)  # rsciio warns about every optional file it misses


@dataclass(frozen=True)
class DetectorMeta:
    """Acquisition values found in a detector file (None: not there). Units in the names."""

    energy_eV: float | None = None
    semiangle_mrad: float | None = None
    defocus_A: float | None = None
    scan_step_A: float | None = None
    dk_invA: float | None = None
    angle_px_mrad: float | None = None      # angular size of one detector pixel
    camera_length_m: float | None = None
    exposure_s: float | None = None
    notes: tuple[str, ...] = ()             # "energy_eV 80000 from <tag>", ...

    def resolved_dk_invA(self) -> float | None:
        """dk from the file: directly, or from the angular pixel size and the energy."""
        if self.dk_invA is not None:
            return self.dk_invA
        if self.angle_px_mrad is not None and self.energy_eV is not None:
            return self.angle_px_mrad * 1e-3 / wavelength_A(self.energy_eV)
        return None


@dataclass(frozen=True, eq=False)
class DetectorData:
    """An opened detector file: lazy patterns and what the file says about them."""

    patterns: Any                 # dask array (scan_y, scan_x, ky, kx), on-disk values and dtype
    fmt: str
    meta: DetectorMeta
    source: str                   # for messages
    scan_shape_from: str          # where the scan shape came from
    extra: dict[str, Any] = field(default_factory=dict)


def wavelength_A(energy_eV: float) -> float:
    """Relativistic electron wavelength in Å (numpy; see conventions)."""
    return _HC_EV_A / math.sqrt(energy_eV * (2.0 * _M0C2_EV + energy_eV))


# --------------------------------------------------------------------------- format detection
def detect_format(path: Path, requested: str = "auto") -> str:
    """`requested` unless auto; else from the extension, and for HDF5 files from their content."""
    if requested != "auto":
        return requested
    suffix = path.suffix.lower()
    if suffix == ".raw":
        raise PlanError(f"{path}: data.path: give the EMPAD .xml file beside this .raw (it holds the scan shape)")
    if suffix in _EXTENSIONS:
        return _EXTENSIONS[suffix]
    if not h5py.is_hdf5(path):
        allowed = "HDF5 or .npy; detectors: EMPAD .xml, Merlin .mib, Gatan .dm3/.dm4, Arina/EMD .h5"
        raise PlanError(f"{path}: data.path: not an HDF5 file (allowed: {allowed}; or set data.format)")
    try:
        with h5py.File(path, "r") as f:
            return hdf5_kind(f)
    except OSError as err:  # a truncated or damaged file
        raise PlanError(f"{path}: data.path: cannot read as HDF5 ({err})") from None


def hdf5_kind(f: h5py.File) -> str:
    """'arina' (NeXus /entry/data/data_*), 'emd' (EMD 1.0 / py4DSTEM attributes), else 'hdf5'."""
    data = f.get("entry/data")
    if isinstance(data, h5py.Group) and any(k.startswith("data_") for k in data.keys()):
        return "arina"
    if "emd_group_type" in f.attrs or "version_major" in f.attrs:
        return "emd"
    return "hdf5"


# --------------------------------------------------------------------------- reading
def open_detector(path: Path, spec: DataSpec, fmt: str) -> DetectorData:
    """Open `path` lazily as `fmt`; the scan shape is `spec.scan_shape` if given, else the file's."""
    readers = {"empad": _open_empad, "mib": _open_mib, "dm": _open_dm, "arina": _open_arina, "emd": _open_emd}
    try:
        det = readers[fmt](path, spec)
    except PlanError:
        raise
    except (OSError, ValueError, KeyError, IndexError, TypeError, RuntimeError, UnicodeDecodeError, EOFError,
            NotImplementedError, struct.error, ByteOrderError, DM3DataTypeError, DM3FileVersionError, DM3TagError,
            DM3TagIDError, DM3TagTypeError) as err:
        if isinstance(err, (struct.error, EOFError)):
            raise PlanError(f"{path}: data.path: the {fmt} file ends early (truncated?): {_one_line(err)}") from None
        raise PlanError(f"{path}: data.path: cannot read as {fmt} ({_one_line(err)}); "
                        f"check the file or set data.format") from None
    _check_dtype(det.patterns.dtype, det.source)
    return det


# ----- EMPAD
_EMPAD_FRAME = (130, 128)  # rows (128 + 2 metadata rows) × columns, float32


def _open_empad(path: Path, spec: DataSpec) -> DetectorData:
    root = _xml_root(path)
    raw_el = root.find("raw_file")
    raw_name = raw_el.get("filename") if raw_el is not None else None
    if not raw_name:
        raise PlanError(f"{path}: data.path: not an EMPAD .xml (no <raw_file filename=...>); set data.format")
    raw = path.parent / raw_name
    if not raw.is_file():
        raise PlanError(f"{path}: data.path: the raw file it names is missing: {raw}")
    frame_bytes = _EMPAD_FRAME[0] * _EMPAD_FRAME[1] * 4
    n_file, rest = divmod(raw.stat().st_size, frame_bytes)
    if rest:
        raise PlanError(f"{raw}: data.path: truncated EMPAD raw file: {n_file} whole frames of 128×130 float32 "
                        f"and {rest} bytes of a partial one")
    xml_shape = _empad_xml_shape(root, raw_name)
    if xml_shape is None:
        raise PlanError(f"{path}: data.scan_shape: the .xml gives no scan shape; set data.scan_shape [ny, nx]")
    n_xml = xml_shape[0] * xml_shape[1]
    if n_file < n_xml:
        raise PlanError(f"{raw}: data.path: truncated: {n_file} frames, the .xml scan {list(xml_shape)} needs {n_xml}")
    if n_file > n_xml:
        raise PlanError(f"{raw}: data.scan_shape: the .xml scan {list(xml_shape)} ({n_xml} frames) does not match "
                        f"the {n_file} frames in the raw file; set data.scan_shape")
    shape, shape_from = _scan_shape(spec, n_file, xml_shape, "the .xml", str(path))
    d = empad_reader(str(path), lazy=True)[0]  # metadata and axes; frames re-mapped below in whole-frame chunks
    frame = np.dtype([("data", "<f4", (128, 128)), ("footer", "<f4", (2, 128))])  # as rsciio.empad reads it
    data = memmap_distributed(str(raw), dtype=frame, shape=shape, key="data", chunks=FRAME_CHUNKS)
    meta = _rsciio_meta(d, "empad")
    return DetectorData(data, "empad", meta, str(path), shape_from)


def _xml_root(path: Path) -> ET.Element:
    try:
        return ET.parse(path).getroot()
    except ET.ParseError as err:
        raise PlanError(f"{path}: data.path: not a readable EMPAD .xml ({_one_line(err)})") from None


def _empad_xml_shape(root: ET.Element, raw_name: str) -> tuple[int, int] | None:
    """Scan shape as rsciio reads it: <pix_y>/<pix_x>, a series count, or the raw name scan_x<nx>_y<ny>.raw."""
    series = root.find("scan_parameters/series_count")
    if series is not None and (series.text or "").strip():
        return 1, int(series.text)
    px, py = root.find("pix_x"), root.find("pix_y")
    if px is not None and py is not None:
        return int(py.text), int(px.text)
    m = re.match(r"scan_x(\d+)_y(\d+)", raw_name)
    return (int(m.group(2)), int(m.group(1))) if m else None


# ----- Merlin MIB
def _open_mib(path: Path, spec: DataSpec) -> DetectorData:
    with open(path, "rb") as fh:
        head = fh.read(768)
    text = head.decode("ascii", errors="replace")
    if not text.startswith("MQ1,"):
        raise PlanError(f"{path}: data.path: not a Merlin .mib (the header does not start with MQ1); set data.format")
    fields = text.split(",")
    try:
        head_size, width, height = int(fields[2]), int(fields[4]), int(fields[5])
    except (IndexError, ValueError):
        raise PlanError(f"{path}: data.path: unreadable Merlin header ({text[:40]!r}…)") from None
    code = fields[6].strip()
    if code == "R64":
        raise PlanError(f"{path}: data.path: raw (R64) Merlin frames are not supported; save them as U08/U16/U32")
    if code not in _MIB_DTYPES or head_size not in (384, 768):
        raise PlanError(f"{path}: data.path: unknown Merlin dtype {code!r} / header size {head_size} "
                        f"(allowed: {', '.join(_MIB_DTYPES)}; 384 or 768)")
    frame_bytes = head_size + width * height * np.dtype(_MIB_DTYPES[code]).itemsize
    n_file, rest = divmod(path.stat().st_size, frame_bytes)
    if rest:
        raise PlanError(f"{path}: data.path: truncated: {n_file} whole {height}×{width} {code} frames and "
                        f"{rest} bytes of a partial one")
    hdr_path = path.with_suffix(".hdr")
    hdr = mib_hdr(hdr_path) if hdr_path.is_file() else {}
    file_shape = None
    if hdr:
        n_acq, per_line = int(hdr.get("Frames in Acquisition (Number)", 0)), int(hdr.get("Frames per Trigger (Number)", 0))
        if n_acq and n_file < n_acq:
            raise PlanError(f"{path}: data.path: truncated: {n_file} frames, the .hdr acquisition has {n_acq}")
        if n_acq and per_line > 1 and n_acq % per_line == 0:
            file_shape = (n_acq // per_line, per_line)
    shape, shape_from = _scan_shape(spec, n_file, file_shape, "the .hdr", str(path))
    d = mib_reader(str(path), lazy=True, navigation_shape=(shape[1], shape[0]), chunks=FRAME_CHUNKS)[0]
    data = d["data"].reshape(shape + (height, width))
    exposure = _mib_exposure_s(fields)
    notes = (f"exposure_s {exposure:g} from the frame header",) if exposure is not None else ()
    meta = DetectorMeta(exposure_s=exposure, notes=notes)
    return DetectorData(data, "mib", meta, str(path), shape_from)


def mib_hdr(path: Path) -> dict[str, str]:
    """The Merlin acquisition header (.hdr): 'key:<TAB>value' lines between 'HDR' and 'End'."""
    out = {}
    for line in path.read_text(errors="replace").splitlines():
        key, sep, value = line.partition("\t")
        if sep and not line.startswith(("HDR", "End")):
            out[key.rstrip(":").strip()] = value.strip()
    return out


def _mib_exposure_s(fields: list[str]) -> float | None:
    for value in reversed(fields):
        if value.strip().endswith("ns"):
            try:
                return float(value.strip()[:-2]) * 1e-9
            except ValueError:
                return None
    return None


# ----- Gatan DM3/DM4
def _open_dm(path: Path, spec: DataSpec) -> DetectorData:
    dicts = [d for d in dm_reader(str(path), lazy=True) if d["data"].ndim in (3, 4)]
    if not dicts:
        raise PlanError(f"{path}: data.path: no 3D or 4D image in this DM file")
    d = max(dicts, key=lambda d: d["data"].size)
    data = d["data"]
    stored = d.get("original_metadata", {}).get("ImageList", {}).get("TagGroup0", {}).get("ImageData", {}).get("Data")
    if isinstance(stored, dict) and stored.get("offset", 0) + stored.get("size_bytes", 0) > path.stat().st_size:
        raise PlanError(f"{path}: data.path: truncated: the image data needs {stored['size_bytes']} bytes from "
                        f"offset {stored['offset']}, the file has {path.stat().st_size}")
    n = int(np.prod(data.shape[:-2]))
    file_shape = tuple(int(s) for s in data.shape[:2]) if data.ndim == 4 else None
    shape, shape_from = _scan_shape(spec, n, file_shape, "the DM file", str(path))
    return DetectorData(data.reshape(shape + tuple(data.shape[-2:])), "dm", _rsciio_meta(d, "dm"), str(path), shape_from)


# ----- Dectris Arina
def _open_arina(path: Path, spec: DataSpec) -> DetectorData:
    f = h5py.File(path, "r")
    group = f.get("entry/data")
    if not isinstance(group, h5py.Group):
        raise PlanError(f"{path}: data.path: not an Arina master file (no /entry/data group); set data.format")
    chunks = []
    for key in sorted(k for k in group.keys() if k.startswith("data_")):
        dset = group.get(key)
        if not isinstance(dset, h5py.Dataset):
            raise PlanError(f"{path}: data.path: /entry/data/{key} cannot be opened (missing linked data file?)")
        if dset.ndim != 3:
            raise PlanError(f"{path}: data.patterns: /entry/data/{key} has shape {dset.shape}, expected (n, ky, kx)")
        if dset.compression is None and hdf5plugin is None and dset.id.get_create_plist().get_nfilters():
            raise PlanError(f"{path}: data.path: /entry/data/{key} is compressed with an HDF5 filter plugin; "
                            f"install hdf5plugin (pip install -e '.[arina]')")
        chunks.append(da.from_array(dset, chunks=(min(64, dset.shape[0]),) + dset.shape[1:]))
    if not chunks:
        raise PlanError(f"{path}: data.path: no /entry/data/data_* datasets")
    frames = da.concatenate(chunks, axis=0)
    shape, shape_from = _scan_shape(spec, frames.shape[0], None, "", str(path))
    meta = _arina_meta(f, path)
    return DetectorData(frames.reshape(shape + frames.shape[1:]), "arina", meta, str(path), shape_from, {"file": f})


def _arina_meta(f: h5py.File, path: Path) -> DetectorMeta:
    values, notes = {}, []
    wavelength = _h5_number(f, "entry/instrument/beam/incident_wavelength")
    if wavelength:
        values["energy_eV"] = energy_from_wavelength_eV(wavelength)
        notes.append(f"energy_eV {values['energy_eV']:.6g} from /entry/instrument/beam/incident_wavelength")
    pitch = _h5_number(f, "entry/instrument/detector/x_pixel_size") or PIXEL_PITCH_M["arina"]
    distance = _h5_number(f, "entry/instrument/detector/detector_distance")
    if distance:
        values["camera_length_m"] = distance
        values["angle_px_mrad"] = pitch / distance * 1e3
        notes.append(f"angle_px_mrad {values['angle_px_mrad']:.4g} from detector_distance and x_pixel_size")
    exposure = _h5_number(f, "entry/instrument/detector/count_time")
    if exposure:
        values["exposure_s"] = exposure
    side = Path(str(path).replace("_master.h5", ".h5"))
    if side != path and side.is_file():
        with h5py.File(side, "r") as g:
            stem = g.get("STEM Metadata")
            size = stem.attrs.get("Pixel Size") if stem is not None else None
            if size is not None:
                values["scan_step_A"] = float(np.ravel(size)[0]) * 10.0  # nm → Å, as rsciio reads it
                notes.append(f"scan_step_A {values['scan_step_A']:g} from {side.name} 'STEM Metadata' Pixel Size")
    return DetectorMeta(**values, notes=tuple(notes))


def _h5_number(f: h5py.File, key: str) -> float | None:
    obj = f.get(key)
    if not isinstance(obj, h5py.Dataset) or obj.size != 1 or not np.issubdtype(obj.dtype, np.number):
        return None
    value = float(np.ravel(obj[()])[0])
    return value if math.isfinite(value) and value > 0 else None


def energy_from_wavelength_eV(wavelength_A: float) -> float:
    """Inverse of `wavelength_A`."""
    return math.sqrt(_M0C2_EV ** 2 + (_HC_EV_A / wavelength_A) ** 2) - _M0C2_EV


# ----- EMD 1.0 / py4DSTEM
def _open_emd(path: Path, spec: DataSpec) -> DetectorData:
    f = h5py.File(path, "r")
    key = _emd_key(f, path, spec.patterns)
    dset = f[key]
    data = da.from_array(dset, chunks=FRAME_CHUNKS[-dset.ndim:])
    n = int(np.prod(dset.shape[:-2]))
    file_shape = tuple(int(s) for s in dset.shape[:2]) if dset.ndim == 4 else None
    shape, shape_from = _scan_shape(spec, n, file_shape, "the dataset", f"{path}::{key}")
    meta = _emd_meta(f, key)
    return DetectorData(data.reshape(shape + dset.shape[-2:]), "emd", meta, f"{path}::{key}", shape_from,
                        {"file": f, "key": key})


def _emd_key(f: h5py.File, path: Path, key: str) -> str:
    """`key` when it is a 3D/4D dataset; with the default key 'dp' absent, the file's only 4D dataset."""
    obj = f.get(key)
    if isinstance(obj, h5py.Dataset) and obj.ndim in (3, 4):
        return obj.name.lstrip("/")
    if obj is not None:
        raise PlanError(f"{path}: data.patterns: {key!r} is not a 3D or 4D dataset")
    found: list[str] = []
    f.visititems(lambda name, o: found.append(name) if isinstance(o, h5py.Dataset) and o.ndim == 4 else None)
    if key == "dp" and len(found) == 1:
        return found[0]
    listed = ", ".join(found) or "none"
    raise PlanError(f"{path}: data.patterns: no dataset {key!r}; 4D datasets in the file: {listed}")


def _emd_meta(f: h5py.File, key: str) -> DetectorMeta:
    """Scan step and dk from the dimension vectors beside the data (EMD 1.0 dim1..4, emdfile dim0..3)."""
    group = f[key].parent
    ndim = f[key].ndim
    dims = [group.get(f"dim{i}") for i in range(1, ndim + 1)]
    if not all(isinstance(d, h5py.Dataset) for d in dims):
        dims = [group.get(f"dim{i}") for i in range(ndim)]
    values, notes = {}, []
    if all(isinstance(d, h5py.Dataset) for d in dims):
        scan, sig = dims[ndim - 3], dims[-1]
        step = _dim_step(scan, _LENGTH_A)
        if step and ndim == 4:
            values["scan_step_A"] = step
            notes.append(f"scan_step_A {step:g} from {scan.name}")
        dk = _dim_step(sig, _INV_LENGTH_INVA)
        if dk:
            values["dk_invA"] = dk
            notes.append(f"dk_invA {dk:g} from {sig.name}")
        elif _attr_text(sig, "units") == "mrad" and _dim_step(sig, {"mrad": 1.0}):
            values["angle_px_mrad"] = _dim_step(sig, {"mrad": 1.0})
            notes.append(f"angle_px_mrad from {sig.name}")
    return DetectorMeta(**values, notes=tuple(notes))


def _dim_step(dim: h5py.Dataset, units: dict[str, float]) -> float | None:
    factor = units.get(_attr_text(dim, "units"))
    if factor is None or dim.size < 2:
        return None
    v = np.ravel(dim[()]).astype(float)
    step = abs(v[1] - v[0]) * factor
    return step if step > 0 else None


def _attr_text(obj: Any, key: str) -> str:
    value = obj.attrs.get(key)
    if isinstance(value, bytes):
        value = value.decode(errors="replace")
    return str(value).strip() if value is not None else ""


# ----- shared
def _scan_shape(spec: DataSpec, n: int, file_shape: tuple[int, int] | None, where: str,
                source: str) -> tuple[tuple[int, int], str]:
    """(ny, nx) holding the n frames: data.scan_shape, else the file's, else square."""
    if spec.scan_shape is not None:
        ny, nx = (int(v) for v in spec.scan_shape)
        if ny < 1 or nx < 1 or ny * nx != n:
            raise PlanError(f"{source}: data.scan_shape: {[ny, nx]} does not hold the {n} frames in the file "
                            f"(ny × nx must equal {n})")
        return (ny, nx), "plan (data.scan_shape)"
    if file_shape is not None:
        if file_shape[0] * file_shape[1] != n:
            raise PlanError(f"{source}: data.scan_shape: {where} says {list(file_shape)} but the file holds {n} "
                            f"frames; set data.scan_shape")
        return file_shape, where.removeprefix("the ")
    side = int(round(math.sqrt(n)))
    if side * side == n:
        return (side, side), "square (assumed: the file does not say)"
    raise PlanError(f"{source}: data.scan_shape: the file does not give the scan shape of its {n} frames; "
                    f"set data.scan_shape [ny, nx]")


def _rsciio_meta(d: dict, fmt: str) -> DetectorMeta:
    """Calibration from rsciio's axes and metadata, plus energy/camera length/exposure tags."""
    values: dict[str, float] = {}
    notes: list[str] = []
    axes = sorted(d.get("axes", []), key=lambda a: a.get("index_in_array", 0))
    n_nav = max(0, len(axes) - 2)                 # (…, ky, kx): the last two axes are the detector's
    nav, sig = axes[:n_nav], axes[n_nav:]
    if nav:
        factor = _LENGTH_A.get(str(nav[-1].get("units") or ""))
        if factor:
            values["scan_step_A"] = abs(float(nav[-1]["scale"])) * factor
            notes.append(f"scan_step_A {values['scan_step_A']:.4g} from the scan axis ({nav[-1]['units']})")
    if sig:
        units, scale = str(sig[-1].get("units") or ""), abs(float(sig[-1].get("scale", 1.0)))
        if units in _INV_LENGTH_INVA:
            values["dk_invA"] = scale * _INV_LENGTH_INVA[units]
            notes.append(f"dk_invA {values['dk_invA']:.4g} from the detector axis ({units})")
        elif units in ("mrad", "rad"):
            values["angle_px_mrad"] = scale * (1e3 if units == "rad" else 1.0)
            notes.append(f"angle_px_mrad {values['angle_px_mrad']:.4g} from the detector axis ({units})")
    flat = dict(_flatten(d.get("original_metadata", {})))
    tem = {**d.get("metadata", {}).get("Acquisition_instrument", {}).get("TEM", {}),
           **_mapped(d.get("mapping") or {}, flat, "Acquisition_instrument.TEM.")}
    for key, name, factor in (("beam_energy", "energy_eV", 1e3), ("convergence_angle", "semiangle_mrad", 1.0),
                              ("camera_length", "camera_length_m", 1e-3)):
        if isinstance(tem.get(key), (int, float)) and tem[key] > 0:
            values[name] = float(tem[key]) * factor
            notes.append(f"{name} {values[name]:.6g} from metadata TEM.{key}")
    for name, pattern, convert in (("energy_eV", r"high_?voltage|accelerating_?voltage|beam_?energy", _volts),
                                   ("semiangle_mrad", r"convergence_?(semi_?)?angle", float),
                                   ("camera_length_m", r"camera_?length", _metres),
                                   ("exposure_s", r"exposure|dwell_?time|frame_?time", _seconds)):
        if name in values:
            continue
        for key, raw in flat.items():
            if re.search(pattern, key, re.IGNORECASE):
                value = _number(raw)
                if value is not None and value > 0:
                    values[name] = convert(value)
                    notes.append(f"{name} {values[name]:.6g} from tag {key}")
                    break
    if "angle_px_mrad" not in values and "dk_invA" not in values and values.get("camera_length_m") \
            and fmt in PIXEL_PITCH_M:
        values["angle_px_mrad"] = PIXEL_PITCH_M[fmt] / values["camera_length_m"] * 1e3
        notes.append(f"angle_px_mrad {values['angle_px_mrad']:.4g} from the camera length and a "
                     f"{PIXEL_PITCH_M[fmt] * 1e6:g} µm pixel")
    return DetectorMeta(**values, notes=tuple(notes))


def _mapped(mapping: dict, flat: dict[str, Any], prefix: str) -> dict[str, Any]:
    """Apply rsciio's metadata mapping ({original key: (metadata key, function)}) for keys under `prefix`."""
    by_key = {k.replace(" ", "_"): v for k, v in flat.items()}
    out = {}
    for source, (target, convert) in mapping.items():
        value = by_key.get(source.replace(" ", "_"))
        if value is None or not target.startswith(prefix):
            continue
        try:
            out[target[len(prefix):]] = convert(value) if convert else value
        except (TypeError, ValueError):
            continue
    return out


def _flatten(tree: Any, prefix: str = ""):
    if isinstance(tree, dict):
        for k, v in tree.items():
            yield from _flatten(v, f"{prefix}.{k}" if prefix else str(k))
    else:
        yield prefix, tree


def _number(raw: Any) -> float | None:
    if isinstance(raw, (int, float)) and not isinstance(raw, bool):
        return float(raw)
    m = re.search(r"[-+]?\d*\.?\d+(?:[eE][-+]?\d+)?", str(raw))
    return float(m.group()) if m else None


def _volts(v: float) -> float:
    return v * 1e3 if v < 1000 else v


def _metres(v: float) -> float:
    return v if v < 10 else v * 1e-3


def _seconds(v: float) -> float:
    return v if v < 10 else v * 1e-3

def _one_line(err: BaseException) -> str:
    text = " ".join(str(err).split()) or type(err).__name__
    return text[:200]


def _check_dtype(dtype: Any, source: str) -> None:
    kind = np.dtype(dtype)
    if not (np.issubdtype(kind, np.integer) or np.issubdtype(kind, np.floating)):
        raise PlanError(f"{source}: data.patterns: unsupported dtype {kind} (allowed: integer or float intensities)")


# --------------------------------------------------------------------------- writers (tests, benchmarks, examples)
def write_empad(xml_path: Path, patterns: np.ndarray, scan_step_A: float | None = None,
                dk_invA: float | None = None, energy_eV: float | None = None) -> Path:
    """Write (sy, sx, 128, 128) patterns as an EMPAD .xml + .raw pair in the layout rsciio reads.

    Raw frames: float32 128 × 130 (2 trailing metadata rows, zero here), named scan_x<nx>_y<ny>.raw.
    Step → <iom_measurements><optics><get_full_scan_field_of_view> (m), dk → <calibrated_pixelsize>
    (rsciio reads value × 1e9 as 1/nm), energy → <iom_measurements><high_voltage> (V).
    """
    xml_path = Path(xml_path)
    sy, sx, h, w = patterns.shape
    if (h, w) != (128, 128):
        raise ValueError(f"EMPAD frames are 128 × 128, got {(h, w)}")
    frames = np.zeros((sy, sx, 130, 128), "<f4")
    frames[:, :, :128] = patterns
    raw_name = f"scan_x{sx}_y{sy}.raw"
    frames.tofile(xml_path.parent / raw_name)
    iom = ""
    if scan_step_A is not None:
        iom += (f"<optics><get_full_scan_field_of_view>[{sy * scan_step_A * 1e-10!r}, {sx * scan_step_A * 1e-10!r}]"
                f"</get_full_scan_field_of_view></optics>")
    if dk_invA is not None:
        iom += f"<calibrated_pixelsize>{dk_invA * 10 / 1e9!r}</calibrated_pixelsize>"
    if energy_eV is not None:
        iom += f"<high_voltage>{energy_eV!r}</high_voltage>"
    xml_path.write_text(f'<?xml version="1.0"?>\n<root><pix_x>{sx}</pix_x><pix_y>{sy}</pix_y>'
                        f'<raw_file filename="{raw_name}"/><iom_measurements>{iom}</iom_measurements></root>\n')
    return xml_path


def write_mib(path: Path, patterns: np.ndarray, code: str = "U16", exposure_ns: int = 1_000_000,
              hdr: bool = True) -> Path:
    """Write (sy, sx, h, w) counts as a Merlin .mib (384-byte headers, big-endian frames) + .hdr.

    Frames are stored flipped vertically, so that rsciio (which flips on read) returns `patterns`.
    The .hdr gives Frames in Acquisition = sy·sx and Frames per Trigger = sx (one trigger per line).
    """
    path = Path(path)
    sy, sx, h, w = patterns.shape
    dtype = np.dtype(_MIB_DTYPES[code])
    with open(path, "wb") as fh:
        for i, frame in enumerate(patterns.reshape(-1, h, w)):
            head = (f"MQ1,{i + 1:06d},00384,01,{w:04d},{h:04d},{code},   1x1,01,2026-12-04 12:00:00.000000,"
                    f"{exposure_ns * 1e-9:.6f},0,0,0,1.200000E+2,5.110000E+2,0.000000E+0,0.000000E+0,0.000000E+0,"
                    f"0.000000E+0,0.000000E+0,0.000000E+0,3RX,175,511,000,000,000,000,000,000,125,255,125,125,"
                    f"100,100,082,100,087,030,128,004,255,129,128,176,168,511,511,MQ1A,"
                    f"2026-12-04T12:00:00.000000000Z,{exposure_ns}ns,12,")
            fh.write(head.ljust(384).encode("ascii"))
            fh.write(np.flip(np.asarray(frame), 0).astype(dtype).tobytes())
    if hdr:
        path.with_suffix(".hdr").write_text(
            "HDR,\t\nTime and Date Stamp (day, mnth, yr, hr, min, s):\t04/12/2026 12:00:00\n"
            f"Chip ID:\tW529_F5,-,-,-\nAssembly Size (NX1, 2X2):\t   1x1\n"
            f"Frames in Acquisition (Number):\t{sy * sx}\nFrames per Trigger (Number):\t{sx}\nEnd\t\n")
    return path
