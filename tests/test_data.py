"""recon.data: loading the native layout, generic HDF5/.npy stacks, preparation and user errors."""
from __future__ import annotations

import h5py
import numpy as np
import pytest

from recon.data import bin_frequencies, crop_frequencies, heldout_indices, load_dataset
from recon.plan import DataSpec, PlanError, SubsetSpec

SY, SX, N = 5, 6, 12
STEP_A = 0.4


def _patterns(seed: int = 0) -> np.ndarray:
    """DC-centred (SY, SX, N, N) patterns; pattern k has value 1000 + k at the DC pixel [N/2, N/2]."""
    rng = np.random.default_rng(seed)
    dp = rng.uniform(0.0, 1.0, (SY, SX, N, N)).astype(np.float32)
    dp[:, :, N // 2, N // 2] = 1000.0 + np.arange(SY * SX).reshape(SY, SX)
    return dp


def _positions() -> np.ndarray:
    y = 10.0 + STEP_A * np.arange(SY)
    x = 20.0 + STEP_A * np.arange(SX)
    return np.stack(np.meshgrid(y, x, indexing="ij"), axis=-1).reshape(-1, 2)


@pytest.fixture
def native(tmp_path):
    path = tmp_path / "native.h5"
    with h5py.File(path, "w") as f:
        f.attrs.update(energy_eV=80e3, semiangle_mrad=21.0, C10_A=100.0, dx_A=0.25, description="x")
        f["dp"] = _patterns()
        f["dp_noisy/dose_1e+05"] = np.round(_patterns() * 10)
        f["scan/positions_yx_A"] = _positions()
        f["scan/y_A"] = 10.0 + STEP_A * np.arange(SY)
        f["scan/x_A"] = 20.0 + STEP_A * np.arange(SX)
        f["ground_truth/slice_z_limits_A"] = np.array([[0.0, 2.0], [2.0, 4.0], [4.0, 6.5]])
        mask = np.ones((N, N), np.float32)
        mask[0, :] = 0
        f["mask"] = mask
    return path


def test_native_layout(native):
    d = load_dataset(DataSpec(path=str(native)))
    assert d.patterns.shape == (SY * SX, N, N) and d.patterns.dtype == np.float32
    np.testing.assert_array_equal(d.patterns[:, 0, 0], 1000.0 + np.arange(SY * SX))  # DC moved to [0, 0]
    np.testing.assert_array_equal(d.patterns, np.fft.ifftshift(_patterns().reshape(-1, N, N), axes=(-2, -1)))
    np.testing.assert_array_equal(d.positions_yx_A, _positions())
    assert d.positions_yx_A.dtype == np.float64 and d.indices.dtype == np.int64
    assert d.scan_shape == (SY, SX) and d.scan_step_A == pytest.approx(STEP_A)
    assert (d.energy_eV, d.semiangle_mrad, d.defocus_A) == (80e3, 21.0, -100.0)   # defocus = -C10
    assert d.dk_invA == pytest.approx(1 / (N * 0.25))                               # from dx_A
    assert d.total_thickness_A == pytest.approx(6.5)
    assert d.detector_mask is None and d.source.endswith("native.h5::dp")


def test_noisy_key_and_not_centred(native):
    d = load_dataset(DataSpec(path=str(native), patterns="dp_noisy/dose_1e+05", dc_centered=False))
    np.testing.assert_array_equal(d.patterns, np.round(_patterns() * 10).reshape(-1, N, N))


def test_crop_and_bin_keep_zero_frequency(native):
    d = load_dataset(DataSpec(path=str(native), crop_px=9, bin=3))
    assert d.patterns.shape == (SY * SX, 3, 3)
    assert d.dk_invA == pytest.approx(3 / (N * 0.25))
    centred = _patterns().reshape(-1, N, N)
    c = N // 2
    expected_dc = centred[:, c - 1:c + 2, c - 1:c + 2].sum(axis=(-2, -1))   # 3×3 block centred on DC
    np.testing.assert_allclose(d.patterns[:, 0, 0], expected_dc, rtol=1e-6)
    np.testing.assert_allclose(d.patterns.sum(axis=(-2, -1)),
                               centred[:, c - 4:c + 5, c - 4:c + 5].sum(axis=(-2, -1)), rtol=1e-5)


@pytest.mark.parametrize("n, n_out", [(12, 8), (12, 7), (11, 6), (11, 11)])
def test_crop_matches_centred_crop(n, n_out):
    a = np.random.default_rng(1).normal(size=(2, n, n))
    centred = np.fft.fftshift(a, axes=(-2, -1))
    lo = n // 2 - n_out // 2
    expected = np.fft.ifftshift(centred[:, lo:lo + n_out, lo:lo + n_out], axes=(-2, -1))
    np.testing.assert_array_equal(crop_frequencies(a, n_out), expected)


def test_bin_conserves_intensity_and_symmetry():
    n, b = 12, 3
    k = np.fft.fftfreq(n) * n
    a = np.exp(-(k[:, None] ** 2 + k[None, :] ** 2) / 8.0)       # centrosymmetric about zero frequency
    binned = bin_frequencies(a, b)
    assert binned.sum() == pytest.approx(a.sum())
    assert binned.argmax() == 0
    inner = np.fft.fftshift(binned)[1:, 1:]                           # drop the Nyquist row and column
    np.testing.assert_allclose(inner, inner[::-1, ::-1], atol=1e-12)


def test_subsets_read_only_kept_positions(native):
    full = load_dataset(DataSpec(path=str(native)))
    sub = load_dataset(DataSpec(path=str(native), subset=SubsetSpec(mode="sub", step=2)))
    # the central position (SY//2, SX//2) = (2, 3) is kept: rows 0, 2, 4 and columns 1, 3, 5
    assert sub.scan_shape == (3, 3)
    np.testing.assert_array_equal(sub.indices, [r * SX + c for r in (0, 2, 4) for c in (1, 3, 5)])
    np.testing.assert_array_equal(sub.patterns, full.patterns[sub.indices])
    np.testing.assert_array_equal(sub.positions_yx_A, full.positions_yx_A[sub.indices])
    cen = load_dataset(DataSpec(path=str(native), subset=SubsetSpec(mode="center", shape=(3, 4))))
    assert cen.scan_shape == (3, 4)
    np.testing.assert_array_equal(cen.indices, [r * SX + c for r in (1, 2, 3) for c in (1, 2, 3, 4)])
    np.testing.assert_array_equal(cen.patterns, full.patterns[cen.indices])


def test_detector_mask_follows_patterns(native):
    d = load_dataset(DataSpec(path=str(native), detector_mask="mask", bin=2))
    assert d.detector_mask.shape == (N // 2, N // 2) and d.detector_mask.dtype == np.float32
    # row 0 on disk is the most negative frequency row: after binning it is the Nyquist row
    expected = np.ones((N // 2, N // 2), np.float32)
    expected[N // 4, :] = 0
    np.testing.assert_array_equal(d.detector_mask, expected)


def test_npy_stack_with_and_without_positions(tmp_path):
    stack = _patterns().reshape(-1, N, N)
    np.save(tmp_path / "stack.npy", stack)
    d = load_dataset(DataSpec(path=str(tmp_path / "stack.npy"), scan_shape=(SY, SX),
                              subset=SubsetSpec(mode="center", shape=(1, 2))))
    # no positions: grid indices × 1 Å and scan_step_A = 1 (the engine rescales by plan.scan.step_A)
    assert d.scan_step_A == 1.0 and d.scan_shape == (1, 2)
    np.testing.assert_array_equal(d.positions_yx_A, [[2.0, 2.0], [2.0, 3.0]])
    assert d.energy_eV is None and d.dk_invA is None and d.total_thickness_A is None
    np.save(tmp_path / "pos.npy", _positions())
    d = load_dataset(DataSpec(path=str(tmp_path / "stack.npy"), positions=str(tmp_path / "pos.npy")))
    assert d.scan_shape is None and d.scan_step_A is None
    np.testing.assert_array_equal(d.positions_yx_A, _positions())
    d = load_dataset(DataSpec(path=str(tmp_path / "stack.npy"), positions=str(tmp_path / "pos.npy"),
                              scan_shape=(SY, SX)))
    assert d.scan_step_A == pytest.approx(STEP_A)


def test_generic_hdf5_dataset_path(tmp_path):
    path = tmp_path / "generic.h5"
    with h5py.File(path, "w") as f:
        f["entry/data"] = _patterns().reshape(-1, N, N)
        f["entry/pos"] = _positions()
    d = load_dataset(DataSpec(path=str(path), patterns="entry/data", positions="entry/pos", scan_shape=(SY, SX),
                              subset=SubsetSpec(mode="sub", step=3)))
    np.testing.assert_array_equal(d.indices, [r * SX + c for r in (2,) for c in (0, 3)])
    np.testing.assert_array_equal(d.positions_yx_A, _positions()[d.indices])
    assert d.patterns[:, 0, 0].tolist() == [1000.0 + i for i in d.indices]


def one_line_error(spec: DataSpec) -> str:
    """The message of the PlanError that loading `spec` raises, checked to be one line."""
    with pytest.raises(PlanError) as err:
        load_dataset(spec)
    msg = str(err.value)
    assert "\n" not in msg
    return msg


def test_user_errors_are_one_line(native, tmp_path):
    p = str(native)
    assert "file not found" in one_line_error(DataSpec(path=str(tmp_path / "nope.h5")))
    msg = one_line_error(DataSpec(path=p, patterns="dp_noisy/dose_1e+07"))
    assert "data.patterns" in msg and "dose_1e+05" in msg
    msg = one_line_error(DataSpec(path=p, patterns="nothing"))
    assert "dp" in msg and "scan/" in msg and "ground_truth/" in msg
    assert "data.crop_px" in one_line_error(DataSpec(path=p, crop_px=16))
    assert "divisors of 12" in one_line_error(DataSpec(path=p, bin=5))
    assert "data.subset.shape" in one_line_error(DataSpec(path=p, subset=SubsetSpec(mode="center", shape=(6, 2))))
    assert "data.subset.shape" in one_line_error(DataSpec(path=p, subset=SubsetSpec(mode="center")))
    assert "data.detector_mask" in one_line_error(DataSpec(path=p, detector_mask="dp"))
    np.save(tmp_path / "pos.npy", np.zeros((7, 2)))
    assert "(30, 2)" in one_line_error(DataSpec(path=p, positions=str(tmp_path / "pos.npy")))
    assert "data.scan_shape" in one_line_error(DataSpec(path=p, scan_shape=(6, 5)))


def test_bad_values_and_shapes(tmp_path):
    bad = _patterns()
    bad[0, 0, 0, :3] = np.nan
    bad[1, 1, 1, :2] = -1.0
    np.save(tmp_path / "nan.npy", bad)
    assert "3 NaN/inf" in one_line_error(DataSpec(path=str(tmp_path / "nan.npy")))
    np.save(tmp_path / "neg.npy", np.nan_to_num(bad))
    assert "2 negative" in one_line_error(DataSpec(path=str(tmp_path / "neg.npy")))
    np.save(tmp_path / "2d.npy", np.zeros((N, N)))
    assert "4D" in one_line_error(DataSpec(path=str(tmp_path / "2d.npy")))
    np.save(tmp_path / "stack.npy", np.zeros((30, N, N)))
    assert "data.scan_shape" in one_line_error(DataSpec(path=str(tmp_path / "stack.npy")))
    assert "data.scan_shape" in one_line_error(DataSpec(path=str(tmp_path / "stack.npy"), scan_shape=(4, 4)))
    np.save(tmp_path / "pos.npy", np.zeros((30, 2)))
    assert "'full'" in one_line_error(DataSpec(path=str(tmp_path / "stack.npy"), positions=str(tmp_path / "pos.npy"),
                                       subset=SubsetSpec(mode="sub")))
    for name in ("text.txt", "fake.h5"):
        (tmp_path / name).write_text("hello")
        assert "not an HDF5 file" in one_line_error(DataSpec(path=str(tmp_path / name)))
    (tmp_path / "fake.npy").write_text("hello")
    assert "cannot read as .npy" in one_line_error(DataSpec(path=str(tmp_path / "fake.npy")))


def test_heldout_indices():
    a = heldout_indices(100, 0.1, seed=3)
    assert a.dtype == np.int64 and len(a) == 10 and np.all(np.diff(a) > 0) and a.max() < 100
    np.testing.assert_array_equal(a, heldout_indices(100, 0.1, seed=3))
    assert not np.array_equal(a, heldout_indices(100, 0.1, seed=4))
    assert len(heldout_indices(20, 0.001, seed=0)) == 1
    assert len(heldout_indices(20, 0.0, seed=0)) == 0
    assert len(heldout_indices(2, 0.9, seed=0)) == 1
