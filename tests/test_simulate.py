"""recon.simulate: lattice, potential, forward consistency, native layout and loading."""
from __future__ import annotations

import h5py
import numpy as np
import pytest

from recon.data import load_dataset
from recon.physics import sigma_rad_per_VA, wavelength_A
from recon.plan import DataSpec, PlanError, SimulationSpec
from recon.simulate import (atom_columns, atom_weight_VA2, projected_potential, simulate, unit_cell,
                            write_dataset)

SMALL = SimulationSpec(pattern_px=24, dk_invA=0.1, scan_shape=(4, 5), scan_step_A=0.6, slices=2,
                       slice_thickness_A=2.5, dose_e_per_A2=(1e4, 1e6), seed=7)


@pytest.fixture(scope="module")
def small():
    return simulate(SMALL)


def test_shapes_attrs_and_scan_margins(small):
    n, (sy, sx) = SMALL.pattern_px, SMALL.scan_shape
    assert small.dp.shape == (sy, sx, n, n) and small.dp.dtype == np.float32
    assert list(small.dp_noisy) == ["dose_1e+04", "dose_1e+06"]
    m = small.V_slices.shape[-1]
    assert small.V_slices.shape == (2, m, m) and m == small.attrs["gt_pixels"]
    assert small.dx_A == pytest.approx(1 / (n * SMALL.dk_invA))
    assert small.attrs["sigma_rad_per_VA"] == pytest.approx(float(sigma_rad_per_VA(SMALL.energy_eV)))
    assert small.attrs["wavelength_A"] == pytest.approx(float(wavelength_A(SMALL.energy_eV)))
    np.testing.assert_allclose(small.slice_z_limits_A, [[0, 2.5], [2.5, 5.0]])
    side, half = m * small.dx_A, n * small.dx_A / 2
    assert small.positions_yx_A.min() - half > 0 and small.positions_yx_A.max() + half < side
    np.testing.assert_allclose(np.diff(small.y_A), SMALL.scan_step_A)
    np.testing.assert_allclose(small.positions_yx_A[1] - small.positions_yx_A[0], [0, SMALL.scan_step_A])
    assert max(abs(small.attrs["strain_y"]), abs(small.attrs["strain_x"])) < 0.02
    sums = small.dp.sum(axis=(-2, -1))
    assert 0.9 < sums.min() and sums.max() <= 1.0 + 1e-5                 # fraction of the incident beam


def test_deterministic_for_a_seed(small):
    again = simulate(SMALL)
    np.testing.assert_array_equal(again.dp_noisy["dose_1e+04"], small.dp_noisy["dose_1e+04"])
    other = simulate(SMALL.model_copy(update={"seed": 8}))
    np.testing.assert_array_equal(other.dp, small.dp)
    assert not np.array_equal(other.dp_noisy["dose_1e+04"], small.dp_noisy["dose_1e+04"])


def test_poisson_counts_match_dose(small):
    counts = small.dp_noisy["dose_1e+06"]
    expected = small.dp * 1e6 * SMALL.scan_step_A ** 2
    assert np.all(counts == np.round(counts))
    assert counts.sum() == pytest.approx(expected.sum(), rel=2e-3)


def test_potential_integral_peaks_and_no_aliasing():
    dx, m = 0.3, 64
    cell, sites = unit_cell("square", 3.2, 2)
    side = m * dx
    columns = atom_columns(cell, sites, side, np.array([side / 2, side / 2]))
    V = projected_potential(columns, (38, 8), m, dx)
    assert len(columns[0]) == 36 and len(columns[1]) == 36                  # 6 × 6 cells of 3.2 Å
    total = V.sum() * dx * dx
    assert total == pytest.approx(36 * (atom_weight_VA2(38) + atom_weight_VA2(8)), rel=1e-9)
    assert np.unravel_index(V.argmax(), V.shape) == (m // 2, m // 2)        # site 0 (Z = 38) at the centre
    assert V[m // 2, m // 2] > 2 * V[m // 2 + 5, m // 2 + 5] > 0           # lighter column at (½, ½)
    fine = projected_potential(columns, (38, 8), 2 * m, dx / 2)             # same band, finer grid
    spectrum = np.fft.fft2(fine)
    keep = np.r_[0:m // 2, 3 * m // 2:2 * m]
    coarse = np.fft.ifft2(spectrum[np.ix_(keep, keep)]).real / 4
    np.testing.assert_allclose(np.delete(np.delete(V, m // 2, 0), m // 2, 1)[:8, :8],
                               np.delete(np.delete(coarse, m // 2, 0), m // 2, 1)[:8, :8], rtol=0, atol=5e-3 * V.max())


def test_hexagonal_honeycomb_distances():
    cell, sites = unit_cell("hexagonal", 3.16, 2)
    side = 4 * cell[0]                                  # 4 × a√3 ≈ 7 × a: 1 % strain
    cols = atom_columns(cell, sites, side, np.zeros(2))
    d = cols[1][:, None, :] - cols[0][None, :, :]
    d = np.linalg.norm((d + side / 2) % side - side / 2, axis=-1)
    assert d.min() == pytest.approx(3.16 / np.sqrt(3), rel=2e-2)             # A–B bond in projection


def _numpy_forward(V_slices, probe, pos_yx_A, dx, energy_eV, dz):
    """Independent multislice on the stored ground truth (the check the shared data passed)."""
    sigma, lam = float(sigma_rad_per_VA(energy_eV)), float(wavelength_A(energy_eV))
    n, m = probe.shape[-1], V_slices.shape[-1]
    f = np.fft.fftfreq(n)
    band = np.sqrt(f[:, None] ** 2 + f[None, :] ** 2) <= 0.5 * 2 / 3
    r = np.asarray(pos_yx_A) / dx - n / 2            # window top-left, probe centred at [n/2, n/2]
    top_left = np.floor(r).astype(int)
    frac = r - top_left
    psi = np.fft.ifft2(np.fft.fft2(probe) * np.exp(-2j * np.pi * (f[:, None] * frac[0] + f[None, :] * frac[1])))
    iy, ix = (np.arange(n) + top_left[0]) % m, (np.arange(n) + top_left[1]) % m
    k = np.fft.fftfreq(n, dx)
    prop = np.exp(-1j * np.pi * lam * dz * (k[:, None] ** 2 + k[None, :] ** 2)) * band
    for s, V in enumerate(V_slices):
        psi = psi * np.exp(1j * sigma * V.astype(np.float64))[np.ix_(iy, ix)]
        if s < len(V_slices) - 1:
            psi = np.fft.ifft2(prop * np.fft.fft2(psi))
    return np.fft.fftshift(np.abs(np.fft.fft2(psi, norm="ortho")) ** 2)


def test_patterns_match_independent_forward_model(small):
    for k in (0, 7, 19):
        iy, ix = divmod(k, SMALL.scan_shape[1])
        ref = _numpy_forward(small.V_slices, small.psi_ideal, small.positions_yx_A[k], small.dx_A,
                             SMALL.energy_eV, SMALL.slice_thickness_A)
        np.testing.assert_allclose(small.dp[iy, ix], ref, atol=2e-5 * ref.max())


def test_write_then_load_matches_in_memory(small, tmp_path):
    path = write_dataset(small, tmp_path / "sim.h5")
    with h5py.File(path, "r") as f:
        for key in ("dp", "dp_noisy/dose_1e+04", "dp_noisy/dose_1e+06", "scan/positions_yx_A", "scan/y_A",
                    "scan/x_A", "probe/psi_ideal", "ground_truth/V_slices", "ground_truth/V_sum",
                    "ground_truth/phase_sum", "ground_truth/slice_z_limits_A"):
            assert key in f, key
        for attr in ("energy_eV", "semiangle_mrad", "defocus_A", "dk_invA", "dx_A", "sigma_rad_per_VA",
                     "wavelength_A", "ground_truth_periodic"):
            assert attr in f.attrs, attr
        np.testing.assert_allclose(f["ground_truth/phase_sum"][()],
                                   f.attrs["sigma_rad_per_VA"] * f["ground_truth/V_sum"][()], rtol=1e-5)
        assert f["dp_noisy/dose_1e+04"].attrs["incident_e_per_pattern"] == pytest.approx(1e4 * 0.36)
    from_file = load_dataset(DataSpec(path=str(path), patterns="dp_noisy/dose_1e+04", bin=2))
    in_memory = load_dataset(DataSpec(simulate=SMALL, bin=2))                 # first dose
    np.testing.assert_array_equal(from_file.patterns, in_memory.patterns)
    np.testing.assert_array_equal(from_file.positions_yx_A, in_memory.positions_yx_A)
    for name in ("scan_step_A", "scan_shape", "energy_eV", "semiangle_mrad", "defocus_A", "dk_invA",
                 "total_thickness_A"):
        assert getattr(from_file, name) == pytest.approx(getattr(in_memory, name)), name
    assert in_memory.dk_invA == pytest.approx(0.2) and in_memory.total_thickness_A == pytest.approx(5.0)
    clean = load_dataset(DataSpec(simulate=SMALL.model_copy(update={"dose_e_per_A2": ()})))
    np.testing.assert_allclose(clean.patterns[:, 0, 0], small.dp[..., 12, 12].ravel())


def test_bad_specs():
    with pytest.raises(PlanError, match="simulate.atom_Z"):
        simulate(SMALL.model_copy(update={"atom_Z": (42, 16, 8)}))
    with pytest.raises(PlanError, match="simulate.dose_e_per_A2"):
        simulate(SMALL.model_copy(update={"dose_e_per_A2": (-1.0,)}))
    with pytest.raises(PlanError, match="repeated"):
        simulate(SMALL.model_copy(update={"dose_e_per_A2": (1.0e5, 1.2e5)}))


def test_default_spec_is_small_and_mos2_like():
    sim = simulate(SimulationSpec())
    assert sim.dp.shape == (16, 16, 48, 48)
    assert 0.5 < sim.phase_sum.max() < 1.5                                   # like monolayer MoS2 (0.97 rad)
