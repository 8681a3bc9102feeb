"""recon.simulate, the hard cases: aberrations with angles, scan rotation, partial spatial coherence, dose."""
from __future__ import annotations

import h5py
import numpy as np
import pytest
from pydantic import ValidationError
from scipy import ndimage

import recon
from recon.data import load_dataset
from recon.physics import wavelength_A
from recon.plan import Aberrations, DataSpec, SimulationSpec
from recon.simulate import simulate, source_offsets, write_dataset

BASE = dict(pattern_px=24, dk_invA=0.1, scan_shape=(6, 6), scan_step_A=0.6, dose_e_per_A2=(1e3,), seed=3)
ABERRATED = SimulationSpec(**BASE, aberrations=Aberrations(C12_A=40.0, phi12_deg=30.0, C21_A=400.0, phi21_deg=60.0,
                                                           C23_A=300.0, phi23_deg=-20.0, C30_A=2.0e4))


def _krivanek_chi(n_px, dk_invA, energy_eV, defocus_A, ab):
    """χ(k) from the conventions, written out term by term (independent of recon.physics)."""
    lam = float(wavelength_A(energy_eV))
    f = np.fft.fftfreq(n_px) * n_px * dk_invA
    ky, kx = np.meshgrid(f, f, indexing="ij")
    k, phi = np.hypot(ky, kx), np.arctan2(ky, kx)
    terms = [(-defocus_A, 1, 0, 0.0), (ab.C12_A, 1, 2, ab.phi12_deg), (ab.C21_A, 2, 1, ab.phi21_deg),
             (ab.C23_A, 2, 3, ab.phi23_deg), (ab.C30_A, 3, 0, 0.0)]
    chi = sum(c * (lam * k) ** (n + 1) / (n + 1) * np.cos(m * (phi - np.deg2rad(a))) for c, n, m, a in terms)
    return 2 * np.pi / lam * chi, k * lam * 1e3


def _unit_phasor_spread(psi_k, chi, inside):
    """Largest deviation of ψ(k)·exp(iχ) from its mean unit phasor: 0 when ψ = A exp(−iχ + const)."""
    rel = psi_k[inside] * np.exp(1j * chi[inside])
    rel = rel / np.abs(rel)
    return float(np.abs(rel - rel.mean() / abs(rel.mean())).max())


def test_aberrated_probe_follows_the_krivanek_convention(tmp_path):
    sim = simulate(ABERRATED)
    psi_k = np.fft.fft2(np.fft.ifftshift(sim.psi_ideal))
    ab = ABERRATED.aberrations
    chi, k_mrad = _krivanek_chi(24, 0.1, ABERRATED.energy_eV, ABERRATED.defocus_A, ab)
    inside = k_mrad < 0.8 * ABERRATED.semiangle_mrad
    assert _unit_phasor_spread(psi_k, chi, inside) < 1e-3
    mirrored = ab.model_copy(update={"phi12_deg": -30.0, "phi21_deg": -60.0, "phi23_deg": 20.0})
    chi_mirrored, _ = _krivanek_chi(24, 0.1, ABERRATED.energy_eV, ABERRATED.defocus_A, mirrored)
    assert _unit_phasor_spread(psi_k, chi_mirrored, inside) > 0.5      # the angles matter, with their sign
    with h5py.File(write_dataset(sim, tmp_path / "aberrated.h5"), "r") as f:
        assert (f.attrs["C12_A"], f.attrs["phi12_deg"], f.attrs["phi21_deg"], f.attrs["C30_A"]) == (40, 30, 60, 2e4)


def test_scan_rotation_moves_the_probe_but_not_the_stored_grid(tmp_path):
    plain = simulate(SimulationSpec(**BASE))
    rotated = simulate(SimulationSpec(**BASE, scan_rotation_deg=15.0))
    np.testing.assert_array_equal(plain.true_positions_yx_A, plain.positions_yx_A)
    np.testing.assert_allclose(rotated.positions_yx_A - rotated.positions_yx_A.mean(0),
                               plain.positions_yx_A - plain.positions_yx_A.mean(0))
    d = rotated.positions_yx_A - rotated.positions_yx_A.mean(0)
    t = np.deg2rad(15.0)
    expected = np.stack([d[:, 0] * np.cos(t) - d[:, 1] * np.sin(t), d[:, 0] * np.sin(t) + d[:, 1] * np.cos(t)], 1)
    np.testing.assert_allclose(rotated.true_positions_yx_A - rotated.positions_yx_A.mean(0), expected, atol=1e-12)
    path = write_dataset(rotated, tmp_path / "rotated.h5")
    with h5py.File(path, "r") as f:
        assert f.attrs["scan_rotation_deg"] == 15.0
        np.testing.assert_array_equal(f["scan/true_positions_yx_A"][()], rotated.true_positions_yx_A)
    loaded = load_dataset(DataSpec(path=str(path), patterns="dp"))
    np.testing.assert_array_equal(loaded.positions_yx_A, rotated.positions_yx_A)   # the nominal grid


def test_the_engine_fits_a_rotated_scan_best_at_the_true_rotation(tmp_path):
    """End to end: the engine's scan.rotation_deg and the simulator's scan_rotation_deg agree in sign."""
    spec = SimulationSpec(**{**BASE, "scan_shape": (8, 8), "dose_e_per_A2": ()}, scan_rotation_deg=20.0)
    path = write_dataset(spec, tmp_path / "rotated.h5")
    dataset = load_dataset(DataSpec(path=str(path), patterns="dp"))

    def final_loss(rotation_deg):
        plan = recon.plan_from_dict({"iterations": 15, "batch_size": 16, "data": {"path": str(path), "patterns": "dp"},
                                     "scan": {"rotation_deg": rotation_deg},
                                     "optimizers": {"object": {"learning_rate": 0.1, "schedule": "constant"}}})
        return recon.reconstruct(plan, dataset=dataset).final_data_loss

    losses = {r: final_loss(r) for r in (-20.0, 0.0, 20.0)}
    assert losses[20.0] < 0.5 * min(losses[0.0], losses[-20.0]), losses


def test_source_size_is_a_convolution_of_the_4d_data_over_scan_position():
    """Partial spatial coherence = the coherent 4D data blurred over the scan by the source (fine scan)."""
    fine = dict(BASE, scan_shape=(25, 25), scan_step_A=0.05, dose_e_per_A2=())
    coherent = simulate(SimulationSpec(**fine)).dp.astype(np.float64)
    partial = simulate(SimulationSpec(**fine, source_fwhm_A=0.4)).dp.astype(np.float64)
    sigma_steps = 0.4 / (2 * np.sqrt(2 * np.log(2))) / 0.05
    blurred = ndimage.gaussian_filter(coherent, sigma=(sigma_steps, sigma_steps, 0, 0), mode="nearest", truncate=4)
    inner = (slice(11, 14), slice(11, 14))                      # the centre, beyond 3σ of the scan edge
    blur = np.abs(partial[inner] - coherent[inner]).max()
    assert blur > 0.02 * coherent.max()                         # the source does blur the data
    assert np.abs(partial[inner] - blurred[inner]).max() < 0.1 * blur
    np.testing.assert_allclose(partial.sum(axis=(-2, -1)), coherent.sum(axis=(-2, -1)), rtol=1e-3)


def test_source_quadrature_weights_and_width():
    offsets, weights = source_offsets(0.8)
    assert weights.sum() == pytest.approx(1.0) and len(weights) == len(offsets)
    sigma = 0.8 / (2 * np.sqrt(2 * np.log(2)))
    np.testing.assert_allclose(weights @ offsets, 0.0, atol=1e-12)
    np.testing.assert_allclose(weights @ offsets**2, sigma**2, rtol=1e-12)
    np.testing.assert_array_equal(source_offsets(0.0)[0], np.zeros((1, 2)))


def test_low_dose_counts_and_bad_values():
    spec = SimulationSpec(**BASE, source_fwhm_A=0.5, scan_rotation_deg=-7.0)
    sim = simulate(spec)
    counts = sim.dp_noisy["dose_1e+03"]
    assert np.all(counts == np.round(counts)) and counts.min() >= 0
    assert counts.sum() == pytest.approx(sim.dp.sum() * 1e3 * 0.36, rel=0.02)       # 360 e per pattern
    with pytest.raises(ValidationError, match="source_fwhm_A"):
        SimulationSpec(source_fwhm_A=-0.1)
