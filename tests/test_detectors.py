"""recon.detectors / recon.preprocess / tune inspect+init: detector files made here, in each format's layout.

EMPAD (.xml + float32 128×130 raw frames) and Merlin (.mib with 384-byte headers + .hdr) files are
written by recon.detectors.write_empad / write_mib and read back through rsciio; Arina master files
(external links to data files) and EMD/py4DSTEM files are written with h5py. Nothing here can write a
Gatan DM3/DM4 file (rsciio only reads them), so the test writes a minimal DM4 file itself, tag by tag
in the layout rsciio's DigitalMicrographReader parses (checked against its source, not against a file
from Gatan's software); the metadata mapping is also tested on a dictionary shaped like rsciio's output.
"""
from __future__ import annotations

import struct
import subprocess
import sys
from pathlib import Path

import dask
import dask.array as da
import h5py
import numpy as np
import pytest

import recon
from test_data import one_line_error
from recon import detectors
from recon.data import load_dataset
from recon.detectors import write_empad, write_mib
from recon.plan import DataSpec, PlanError, SubsetSpec
from recon.preprocess import Steps, apply, bad_pixels, descan_plane, dk_from_disk, fit_disk, wrapped
from tune.inspect import format_inspection, inspect_data, starter_study
from tune.study import check_data, load_study

SY, SX = 5, 6
RADIUS = 9.0


def _disk_patterns(n_px: int, centre: tuple[float, float], counts: float = 40.0, seed: int = 0,
                   shape: tuple[int, int] = (SY, SX)) -> np.ndarray:
    """(sy, sx, n, n) Poisson patterns: a bright-field disk (pixel-integrated) on a weak dark field.

    Pattern k has a little extra intensity in its disk so that patterns differ."""
    rng = np.random.default_rng(seed)
    sub = 4
    iy, ix = (np.indices((n_px * sub, n_px * sub)) + 0.5) / sub - 0.5
    disk = (np.hypot(iy - centre[0], ix - centre[1]) < RADIUS).reshape(n_px, sub, n_px, sub).mean(axis=(1, 3))
    expected = counts * disk + 0.3
    scale = 1.0 + 0.1 * np.arange(shape[0] * shape[1]).reshape(shape)[..., None, None] / (shape[0] * shape[1])
    return rng.poisson(expected * scale).astype(np.float32)


# --------------------------------------------------------------------------- EMPAD
@pytest.fixture
def empad(tmp_path):
    dp = _disk_patterns(128, (61.0, 67.0))
    dp[:, :, 10, 20] = 5000.0        # a hot pixel
    dp[:, :, 63, 63] = 0.0           # a dead pixel inside the bright field
    xml = write_empad(tmp_path / "scan.xml", dp, scan_step_A=0.4, dk_invA=0.05, energy_eV=80e3)
    return xml, dp


def test_empad_layout_and_metadata(empad):
    xml, dp = empad
    raw = xml.parent / f"scan_x{SX}_y{SY}.raw"
    assert raw.stat().st_size == SY * SX * 130 * 128 * 4
    det = detectors.open_detector(xml, DataSpec(path=str(xml)), detectors.detect_format(xml))
    assert isinstance(det.patterns, da.Array) and det.patterns.shape == (SY, SX, 128, 128)
    np.testing.assert_array_equal(np.asarray(det.patterns), dp)
    m = det.meta
    assert (m.energy_eV, m.scan_step_A, m.dk_invA) == (80e3, pytest.approx(0.4), pytest.approx(0.05))


def test_empad_loads_centred_and_masked(empad):
    xml, dp = empad
    d = load_dataset(DataSpec(path=str(xml), crop_px=64))
    p = d.preprocessing
    assert p["format"] == "empad" and p["center_mode"] == "auto"
    assert p["center_yx_px"] == [pytest.approx(61.0, abs=0.1), pytest.approx(67.0, abs=0.1)]
    assert p["shift_yx_px"] == [3, -3] and p["bf_radius_px"] == pytest.approx(RADIUS, abs=0.2)
    assert p["hot_pixels"] == [[10, 20]] and p["dead_pixels"] == [[63, 63]]
    assert d.patterns.shape == (SY * SX, 64, 64)
    assert (d.energy_eV, d.scan_step_A, d.dk_invA) == (80e3, pytest.approx(0.4), pytest.approx(0.05))
    np.testing.assert_allclose(d.positions_yx_A[SX], [0.4, 0.0])
    # the disk now sits on the zero frequency ([0, 0] after preparation) and the dead pixel is masked
    centred = np.fft.fftshift(d.patterns.mean(axis=0))
    fit = fit_disk(centred, np.ones_like(centred, bool))
    assert fit.center_yx_px == (pytest.approx(32.0, abs=0.15), pytest.approx(32.0, abs=0.15))
    mask = np.fft.fftshift(d.detector_mask)
    assert mask[63 + 3 - 32, 63 - 3 - 32] == 0 and mask.sum() == 64 * 64 - 1
    # the same counts, moved by whole pixels
    np.testing.assert_array_equal(np.fft.fftshift(d.patterns[0])[5, 5], dp[0, 0, 5 + 32 - 3, 5 + 32 + 3])


def test_empad_plan_overrides_metadata_and_given_centre(empad):
    xml, dp = empad
    d = load_dataset(DataSpec(path=str(xml), center=(60.0, 68.0), hot_pixels="none", scan_shape=(SX, SY)))
    assert d.preprocessing["shift_yx_px"] == [4, -4] and "hot_pixels" not in d.preprocessing
    assert d.scan_shape == (SX, SY)
    d = load_dataset(DataSpec(path=str(xml), center="none", hot_pixels="none"))
    np.testing.assert_array_equal(d.patterns, np.fft.ifftshift(dp.reshape(-1, 128, 128), axes=(-2, -1)))


def test_empad_errors_name_the_file(empad, tmp_path):
    xml, dp = empad
    raw = xml.parent / f"scan_x{SX}_y{SY}.raw"
    assert "data.scan_shape" in one_line_error(DataSpec(path=str(xml), scan_shape=(4, 4)))
    data = raw.read_bytes()
    raw.write_bytes(data[:-1000])                                      # cut inside the last frame
    msg = one_line_error(DataSpec(path=str(xml)))
    assert "truncated" in msg and str(raw) in msg
    raw.write_bytes(data[:-130 * 128 * 4])                             # a whole frame missing
    msg = one_line_error(DataSpec(path=str(xml)))
    assert "truncated" in msg and "29 frames" in msg
    raw.write_bytes(data + data[:130 * 128 * 4])                       # one frame too many
    assert "data.scan_shape" in one_line_error(DataSpec(path=str(xml)))
    raw.unlink()
    assert "missing" in one_line_error(DataSpec(path=str(xml)))
    (tmp_path / "other.xml").write_text("<settings><a>1</a></settings>")
    assert "EMPAD" in one_line_error(DataSpec(path=str(tmp_path / "other.xml")))
    (tmp_path / "x.raw").write_bytes(b"\x00" * 16)
    assert "EMPAD .xml" in one_line_error(DataSpec(path=str(tmp_path / "x.raw")))


# --------------------------------------------------------------------------- Merlin MIB
@pytest.fixture
def mib(tmp_path):
    dp = _disk_patterns(32, (14.0, 18.0)).astype(np.uint16)
    return write_mib(tmp_path / "scan.mib", dp, exposure_ns=500_000), dp


def test_mib_layout_and_header(mib):
    path, dp = mib
    head = path.read_bytes()[:384].decode()
    assert head.startswith("MQ1,000001,00384,01,0032,0032,U16,") and len(head) == 384
    assert path.stat().st_size == SY * SX * (384 + 32 * 32 * 2)
    det = detectors.open_detector(path, DataSpec(path=str(path)), "mib")
    assert det.scan_shape_from == ".hdr" and det.meta.exposure_s == pytest.approx(5e-4)
    np.testing.assert_array_equal(np.asarray(det.patterns), dp)       # rsciio's vertical flip undone by the writer


def test_mib_loads_centred(mib):
    path, dp = mib
    d = load_dataset(DataSpec(path=str(path)))
    assert d.preprocessing["shift_yx_px"] == [2, -2]
    assert d.scan_shape == (SY, SX) and d.scan_step_A == 1.0 and d.energy_eV is None and d.dk_invA is None
    np.testing.assert_array_equal(np.fft.fftshift(d.patterns[7])[16, 16], dp.reshape(-1, 32, 32)[7, 14, 18])
    # the rows and columns that wrapped around the detector edge are masked
    mask = np.fft.fftshift(d.detector_mask)
    assert mask[:2].sum() == 0 and mask[:, -2:].sum() == 0 and mask[2:, :-2].all()


def test_detector_positions_from_the_plan(mib, tmp_path):
    path, dp = mib
    positions = np.random.default_rng(3).uniform(10, 20, (SY * SX, 2))
    np.save(tmp_path / "pos.npy", positions)
    d = load_dataset(DataSpec(path=str(path), positions=str(tmp_path / "pos.npy")))
    np.testing.assert_array_equal(d.positions_yx_A, positions)


def test_mib_scan_shape_sources(mib, tmp_path):
    path, dp = mib
    path.with_suffix(".hdr").unlink()
    msg = one_line_error(DataSpec(path=str(path)))                    # 30 frames, not square, no .hdr
    assert str(path) in msg and "data.scan_shape" in msg
    d = load_dataset(DataSpec(path=str(path), scan_shape=(SY, SX), center="none", hot_pixels="none"))
    np.testing.assert_array_equal(np.fft.fftshift(d.patterns, axes=(-2, -1)), dp.reshape(-1, 32, 32))
    square = write_mib(tmp_path / "sq.mib", _disk_patterns(32, (16, 16), shape=(4, 4)).astype(np.uint8), "U08",
                       hdr=False)
    assert load_dataset(DataSpec(path=str(square))).scan_shape == (4, 4)


def test_mib_errors_name_the_file(mib, tmp_path):
    path, dp = mib
    frame = 384 + 32 * 32 * 2
    data = path.read_bytes()
    assert "data.scan_shape" in one_line_error(DataSpec(path=str(path), scan_shape=(7, 4)))
    path.write_bytes(data[:-100])
    msg = one_line_error(DataSpec(path=str(path)))
    assert "truncated" in msg and str(path) in msg
    path.write_bytes(data[:-frame])
    msg = one_line_error(DataSpec(path=str(path)))
    assert "truncated" in msg and "29 frames" in msg
    path.write_bytes(data.replace(b",U16,", b",U12,"))
    msg = one_line_error(DataSpec(path=str(path)))
    assert "unknown Merlin dtype 'U12'" in msg and str(path) in msg
    (tmp_path / "junk.mib").write_bytes(b"\x00" * 2000)
    assert "MQ1" in one_line_error(DataSpec(path=str(tmp_path / "junk.mib")))


def test_mib_subset_reads_only_its_chunks(tmp_path, monkeypatch):
    """Whole-frame chunks over blocks of positions: a centre block computes only the chunks it touches."""
    dp = _disk_patterns(32, (16.0, 16.0), shape=(8, 8)).astype(np.uint16)
    path = write_mib(tmp_path / "big.mib", dp)
    computed = []
    real = detectors.mib_reader

    def counting_reader(*args, **kwargs):
        out = real(*args, **kwargs)
        out[0]["data"] = out[0]["data"].map_blocks(lambda block: computed.append(block.shape) or block)
        return out

    monkeypatch.setattr(detectors, "mib_reader", counting_reader)
    with dask.config.set({"array.chunk-size": "8KiB"}):
        det = detectors.open_detector(path, DataSpec(path=str(path)), "mib")
        assert det.patterns.chunks[2:] == ((32,), (32,)) and det.patterns.npartitions >= 8
        d = load_dataset(DataSpec(path=str(path), subset=SubsetSpec(mode="center", shape=(2, 2))))
    assert d.patterns.shape == (4, 32, 32)
    chunks_read = [s for s in computed if s[-2:] == (32, 32)]            # (dask also calls it on tiny meta arrays)
    assert len(chunks_read) == 4 and det.patterns.npartitions == 16      # rows 3-4, cols 3-4: 2 × 2 of 4 × 4 chunks
    np.testing.assert_array_equal(np.fft.fftshift(d.patterns, axes=(-2, -1)).reshape(2, 2, 32, 32), dp[3:5, 3:5])


# --------------------------------------------------------------------------- Arina and EMD/py4DSTEM (HDF5)
def test_arina_master_with_linked_data_files(tmp_path):
    dp = _disk_patterns(32, (15.0, 17.0), shape=(4, 4)).astype(np.uint16)
    frames = dp.reshape(-1, 32, 32)
    for i, part in enumerate((frames[:10], frames[10:]), start=1):
        with h5py.File(tmp_path / f"run_data_{i:06d}.h5", "w") as f:
            f["entry/data/data"] = part
    wavelength = detectors.wavelength_A(200e3)
    with h5py.File(tmp_path / "run_master.h5", "w") as f:
        for i in (1, 2):
            f[f"entry/data/data_{i:06d}"] = h5py.ExternalLink(f"run_data_{i:06d}.h5", "entry/data/data")
        f["entry/instrument/beam/incident_wavelength"] = wavelength
        f["entry/instrument/detector/x_pixel_size"] = 100e-6
        f["entry/instrument/detector/detector_distance"] = 0.1
        f["entry/instrument/detector/count_time"] = 1e-3
    path = tmp_path / "run_master.h5"
    assert detectors.detect_format(path) == "arina"
    d = load_dataset(DataSpec(path=str(path)))
    assert d.scan_shape == (4, 4) and d.preprocessing["shift_yx_px"] == [1, -1]
    assert d.energy_eV == pytest.approx(200e3, rel=1e-9)
    assert d.dk_invA == pytest.approx(1e-3 / wavelength)                  # 100 µm / 0.1 m = 1 mrad per pixel
    (tmp_path / "run_data_000002.h5").unlink()
    assert "missing linked data file" in one_line_error(DataSpec(path=str(path)))


def test_emd_py4dstem_by_key_and_auto(tmp_path):
    dp = _disk_patterns(32, (16.0, 16.0))
    path = tmp_path / "cube.emd"
    with h5py.File(path, "w") as f:
        f.attrs.update(emd_group_type="file", version_major=1, version_minor=0)
        g = f.create_group("experiment/datacube")
        g.attrs["emd_group_type"] = "array"
        g["data"] = dp
        for i, (step, units) in enumerate(((0.3, "A"), (0.3, "A"), (0.04, "A^-1"), (0.04, "A^-1"))):
            g[f"dim{i}"] = np.array([0.0, step])
            g[f"dim{i}"].attrs["units"] = units
        f["experiment/other"] = np.zeros((3, 3))
    assert detectors.detect_format(path) == "emd"
    d = load_dataset(DataSpec(path=str(path)))
    assert d.source.endswith("experiment/datacube/data") and d.scan_shape == (SY, SX)
    assert d.scan_step_A == pytest.approx(0.3) and d.dk_invA == pytest.approx(0.04)
    assert load_dataset(DataSpec(path=str(path), patterns="experiment/datacube/data")).scan_shape == (SY, SX)
    assert "4D datasets in the file: experiment/datacube/data" in one_line_error(
        DataSpec(path=str(path), patterns="nope"))


# --------------------------------------------------------------------------- Gatan DM3/DM4
def _dm_tag(name: str, payload: bytes) -> bytes:
    """A DM4 data tag: id 21, name, size, '%%%%', then the info array and the value (rsciio's parser)."""
    raw = name.encode()
    return struct.pack(">BH", 21, len(raw)) + raw + struct.pack(">Q", len(payload) + 4) + b"%%%%" + payload


def _dm_group(name: str, tags: list[bytes]) -> bytes:
    """A DM4 tag group: id 20, name, sorted, open, size, number of tags, the tags."""
    raw, body = name.encode(), b"".join(tags)
    return struct.pack(">BH", 20, len(raw)) + raw + struct.pack(">BBQQ", 0, 1, len(body), len(tags)) + body


def _dm_number(value: float, etype: int) -> bytes:
    return struct.pack(">QQ", 1, etype) + struct.pack({3: "<i", 5: "<I", 6: "<f", 7: "<d"}[etype], value)


def _dm_array(raw: bytes, eltype: int, length: int) -> bytes:
    return struct.pack(">QQQQ", 3, 20, eltype, length) + raw


def _dm_string(text: str) -> bytes:
    return _dm_array(np.array([ord(c) for c in text], "<u2").tobytes(), 4, len(text))


def write_dm4(path: Path, data: np.ndarray, scales: list[tuple[float, str]], tags: list[bytes]) -> Path:
    """A minimal DM4 file: one (sy, sx, ky, kx) uint16 image, calibrations in DM order (x first)."""
    dims = data.shape[::-1]
    calib = [_dm_group("", [_dm_tag("Origin", _dm_number(0.0, 6)), _dm_tag("Scale", _dm_number(scale, 6)),
                            _dm_tag("Units", _dm_string(units))]) for scale, units in scales[::-1]]
    image_data = _dm_group("ImageData", [
        _dm_group("Calibrations", [_dm_group("Brightness", [_dm_tag("Origin", _dm_number(0.0, 6)),
                                                           _dm_tag("Scale", _dm_number(1.0, 6)),
                                                           _dm_tag("Units", _dm_string(""))]),
                                   _dm_group("Dimension", calib)]),
        _dm_tag("Data", _dm_array(np.ascontiguousarray(data, "<u2").tobytes(), 4, data.size)),
        _dm_tag("DataType", _dm_number(10, 3)),
        _dm_group("Dimensions", [_dm_tag("", _dm_number(n, 5)) for n in dims]),
        _dm_tag("PixelDepth", _dm_number(2, 3))])
    image = _dm_group("", [image_data, _dm_group("ImageTags", tags), _dm_tag("Name", _dm_string("scan"))])
    body = struct.pack(">BBQ", 0, 1, 1) + _dm_group("ImageList", [image]) + b"\x00" * 8
    path.write_bytes(struct.pack(">IQI", 4, len(body), 1) + body)
    return path


def test_dm4_file_written_in_the_tag_layout_rsciio_parses(tmp_path):
    dp = _disk_patterns(32, (17.0, 15.0)).astype(np.uint16)
    tags = [_dm_group("Microscope Info", [_dm_tag("Voltage", _dm_number(300e3, 7)),
                                          _dm_tag("Illumination Mode", _dm_string("STEM")),
                                          _dm_tag("STEM Camera Length", _dm_number(100.0, 6))])]
    path = write_dm4(tmp_path / "scan.dm4", dp, [(0.025, "nm"), (0.025, "nm"), (0.4, "1/nm"), (0.4, "1/nm")], tags)
    assert detectors.detect_format(path) == "dm"
    det = detectors.open_detector(path, DataSpec(path=str(path)), "dm")
    assert isinstance(det.patterns, da.Array)
    np.testing.assert_array_equal(np.asarray(det.patterns), dp)
    assert det.meta.camera_length_m == pytest.approx(0.1)
    d = load_dataset(DataSpec(path=str(path)))
    assert (d.energy_eV, d.scan_step_A, d.dk_invA) == (300e3, pytest.approx(0.25), pytest.approx(0.04))
    assert d.scan_shape == (SY, SX) and d.preprocessing["shift_yx_px"] == [-1, 1]
    data = path.read_bytes()
    path.write_bytes(data[:-5000])                                     # cut (DM files hold tags after the image)
    msg = one_line_error(DataSpec(path=str(path)))
    assert str(path) in msg and "truncated" in msg
    path.write_bytes(b"\x00\x00\x00\x07" + data[4:])                    # DM version 7
    assert "cannot read as dm" in one_line_error(DataSpec(path=str(path)))


def test_dm_metadata_mapping(monkeypatch, tmp_path):
    """What recon.detectors makes of rsciio's DM reader output (a dictionary as rsciio returns it)."""
    dp = da.from_array(_disk_patterns(32, (16.0, 16.0)))
    out = {"data": dp, "axes": [
        {"size": SY, "scale": 0.025, "units": "nm", "navigate": True},
        {"size": SX, "scale": 0.025, "units": "nm", "navigate": True},
        {"size": 32, "scale": 1.5, "units": "mrad", "navigate": False},
        {"size": 32, "scale": 1.5, "units": "mrad", "navigate": False}],
        "metadata": {"Acquisition_instrument": {"TEM": {"beam_energy": 300.0, "convergence_angle": 20.0,
                                                        "camera_length": 100.0}}},
        "original_metadata": {}}
    monkeypatch.setattr(detectors, "dm_reader", lambda path, lazy: [{"data": np.zeros((4, 4))}, out])
    path = tmp_path / "scan.dm4"
    path.write_bytes(b"\x00")
    d = load_dataset(DataSpec(path=str(path)))
    assert (d.energy_eV, d.semiangle_mrad, d.scan_step_A) == (300e3, 20.0, pytest.approx(0.25))
    assert d.dk_invA == pytest.approx(1.5e-3 / detectors.wavelength_A(300e3))


# --------------------------------------------------------------------------- preprocessing pieces
def test_bad_pixels_spare_the_disk_edge():
    dp = _disk_patterns(64, (30.3, 33.6), counts=200.0, shape=(4, 4)).sum(axis=(0, 1)).astype(np.float64)
    hot, dead = bad_pixels(dp)
    assert not hot.any() and not dead.any()
    dp[5, 6] = dp[5, 7] = 50.0 * dp.max()          # a pair of hot pixels
    dp[31, 32] = 0.0                               # a dead one in the bright field
    hot, dead = bad_pixels(dp)
    assert sorted(map(tuple, np.argwhere(hot))) == [(5, 6), (5, 7)] and list(map(tuple, np.argwhere(dead))) == [(31, 32)]


@pytest.mark.parametrize("centre", [(30.0, 33.0), (28.4, 35.7), (32.5, 31.5)])
def test_disk_fit_is_sub_pixel(centre):
    mean = _disk_patterns(64, centre, counts=500.0, shape=(2, 2)).mean(axis=(0, 1))
    fit = fit_disk(mean, np.ones(mean.shape, bool))
    assert fit.center_yx_px == (pytest.approx(centre[0], abs=0.05), pytest.approx(centre[1], abs=0.05))
    assert fit.radius_px == pytest.approx(RADIUS, abs=0.1)


def test_descan_rolls_each_pattern():
    grid = (4, 5)
    stack = np.stack([_disk_patterns(48, (24.0 + 0.8 * iy, 24.0 - 0.6 * ix), counts=300.0, shape=(1, 1), seed=iy * 9 + ix)[0, 0]
                      for iy in range(grid[0]) for ix in range(grid[1])])
    steps = Steps(detector=True, hot_pixels=False, center="auto", descan=True, normalize="none")
    out, mask, record = apply(stack, None, steps, grid, None, "test")
    assert record["descan_range_px"] == [pytest.approx(2.4, abs=0.3), pytest.approx(2.4, abs=0.3)]
    for k in (0, 7, 19):
        fit = fit_disk(out[k], mask != 0)
        assert fit.center_yx_px == (pytest.approx(24.0, abs=0.55), pytest.approx(24.0, abs=0.55))
    plane = descan_plane(np.array([[iy, 2.0 * ix] for iy in range(3) for ix in range(2)], float), (3, 2))
    np.testing.assert_allclose(plane, [[iy, 2.0 * ix] for iy in range(3) for ix in range(2)], atol=1e-12)


def test_normalise_and_wrapped_and_calibration():
    stack = _disk_patterns(32, (16.0, 16.0), shape=(1, 6)).reshape(6, 32, 32)
    steps = Steps(detector=False, hot_pixels=False, center="none", descan=False, normalize="mean")
    out, mask, record = apply(stack, None, steps, None, None, "test")
    assert out.sum(axis=(1, 2)).mean() == pytest.approx(1.0, rel=1e-5) and mask is None
    vacuum = np.full((32, 32), 2.0)
    out, _, record = apply(stack, None, Steps(False, False, "none", False, "vacuum"), None, vacuum, "test")
    assert record["normalized_by"] == pytest.approx(2.0 * 32 * 32)
    w = wrapped(6, (2, -1))
    assert w[:2].all() and w[:, -1].all() and w.sum() == 2 * 6 + 6 - 2
    assert dk_from_disk(10.08, 21.0, detectors.wavelength_A(80e3)) == pytest.approx(0.049898, rel=2e-3)  # mos2_1l


def test_vacuum_pattern_centres_and_normalises(mib, tmp_path):
    path, dp = mib
    vacuum = _disk_patterns(32, (14.0, 18.0), counts=1000.0, shape=(1, 1))[0, 0]
    np.save(tmp_path / "vacuum.npy", vacuum)
    d = load_dataset(DataSpec(path=str(path), vacuum="vacuum.npy", normalize="vacuum"))
    assert d.preprocessing["center_from"] == "vacuum pattern" and d.preprocessing["shift_yx_px"] == [2, -2]
    assert d.preprocessing["normalized_by"] == pytest.approx(vacuum.sum())
    mask = d.detector_mask
    np.testing.assert_allclose((d.patterns * mask).sum(axis=(1, 2)),
                               (np.fft.ifftshift(np.roll(dp.reshape(-1, 32, 32), (2, -2), (1, 2)), axes=(1, 2)) * mask
                                ).sum(axis=(1, 2)) / vacuum.sum(), rtol=1e-5)


def test_native_files_are_untouched_unless_asked(tmp_path):
    dp = _disk_patterns(32, (16.0, 17.0))
    np.save(tmp_path / "dp.npy", dp)
    d = load_dataset(DataSpec(path=str(tmp_path / "dp.npy")))
    np.testing.assert_array_equal(d.patterns, np.fft.ifftshift(dp.reshape(-1, 32, 32), axes=(-2, -1)))
    assert d.detector_mask is None and d.preprocessing == {"format": "npy"}
    d = load_dataset(DataSpec(path=str(tmp_path / "dp.npy"), center="auto"))
    assert d.preprocessing["shift_yx_px"] == [0, -1]


# --------------------------------------------------------------------------- tune inspect / init
def test_inspect_reports_and_init_writes_a_loadable_study(empad, tmp_path):
    xml, dp = empad
    ins = inspect_data(xml, {"probe.semiangle_mrad": 21.0})
    text = format_inspection(ins)
    for expected in ("format        empad", "[5, 6, 128, 128], dtype float32", "(from .xml)", "80000   (file)",
                     "centre        [61.0", "centre spread", "1 hot [[10, 20]]", "plan must set probe.defocus_A"):
        assert expected in text, expected
    assert ins.values["detector.dk_invA"] == pytest.approx(0.05)      # the file's value beats the disk
    study = tmp_path / "sub" / "study.yml"
    study.parent.mkdir()
    study.write_text(starter_study(ins, study))
    config = load_study(study)
    assert config.spec.objective.metrics == ("heldout_loss",) and config.spec.data.ground_truth is None
    assert config.base_plan.data.heldout_fraction == 0.1 and config.base_plan.data.format == "empad"
    assert config.data_path == xml.resolve()
    assert set(config.spec.search) >= {"recon.probe.defocus_A", "recon.scan.rotation_deg",
                                       "recon.optimizers.object.learning_rate", "recon.regularizers.object_tv"}
    assert config.base_plan.detector.dk_invA == pytest.approx(0.05) and config.base_plan.scan.step_A == pytest.approx(0.4)
    check_data(config)  # what tune start and every worker check first: a detector file is not read as HDF5


def test_init_calibrates_from_the_disk_and_names_missing_keys(mib, tmp_path):
    path, dp = mib
    with pytest.raises(PlanError, match=r"probe.energy_eV: not in the file; pass --set probe.energy_eV="):
        starter_study(inspect_data(path), tmp_path / "s.yml")
    ins = inspect_data(path, {"probe.energy_eV": 200e3, "probe.semiangle_mrad": 20.0, "scan.step_A": 0.5})
    assert ins.origin["detector.dk_invA"].startswith("bright-field disk radius")
    assert ins.values["detector.dk_invA"] == pytest.approx(20e-3 / (detectors.wavelength_A(200e3) * RADIUS), rel=0.02)


def _tune(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "tune", *args], capture_output=True, text=True,
                          cwd=Path(__file__).resolve().parents[1])


@pytest.mark.slow  # subprocess CLI runs / a fit of 60 iterations
def test_cli_inspect_init_and_bad_input(mib, tmp_path):
    path, dp = mib
    r = _tune("inspect", str(path))
    assert r.returncode == 0 and "format        mib" in r.stdout and "plan must set" in r.stdout
    out = tmp_path / "study.yml"
    r = _tune("init", str(path), "-o", str(out), "--set", "probe.energy_eV=80000", "--set", "probe.semiangle_mrad=21",
              "--set", "scan.step_A=0.5")
    assert r.returncode == 0 and out.is_file(), r.stderr
    path.write_bytes(path.read_bytes()[:-10])
    for args in (("inspect", str(path)), ("init", str(path), "-o", str(tmp_path / "x.yml")),
                 ("inspect", str(path), "--set", "data.scan_shape=[4,4]")):
        r = _tune(*args)
        assert r.returncode == 2 and r.stderr.count("\n") == 1 and str(path) in r.stderr, r.stderr


def test_the_result_file_records_the_preprocessing(mib, tmp_path):
    path, dp = mib
    plan = recon.plan_from_dict({
        "data": {"path": str(path)}, "iterations": 1, "batch_size": 8,
        "probe": {"energy_eV": 200e3, "semiangle_mrad": 20.0, "defocus_A": 0.0},
        "detector": {"dk_invA": 0.05}, "scan": {"step_A": 0.5}})
    saved = recon.reconstruct(plan).save(tmp_path / "r.h5")
    record = recon.load_result(saved).preprocessing
    assert record["format"] == "mib" and record["shift_yx_px"] == [2, -2]
    without_step = recon.plan_from_dict({**plan.model_dump(mode="json"), "scan": {"step_A": None}})
    with pytest.raises(PlanError, match="scan.step_A"):  # a MIB file has no scan step: grid indices are not Å
        recon.reconstruct(without_step)
