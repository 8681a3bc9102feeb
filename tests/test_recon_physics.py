"""Physics and forward model against the project's conventions (units, signs, FFT and geometry)."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from recon import forward, physics


def test_wavelength_and_sigma_match_conventions():
    assert float(physics.wavelength_A(80e3)) == pytest.approx(0.041757, rel=1e-4)
    assert float(physics.wavelength_A(300e3)) == pytest.approx(0.019687, rel=1e-4)
    assert float(physics.sigma_rad_per_VA(80e3)) == pytest.approx(1.00871e-3, rel=1e-4)
    assert float(physics.sigma_rad_per_VA(300e3)) == pytest.approx(6.5262e-4, rel=1e-4)


def test_defocus_is_minus_c10():
    ky, kx = physics.frequency_grid(16, 0.05)
    lam = physics.wavelength_A(80e3)
    chi = physics.aberration_phase(ky, kx, lam, {"C10": 100.0}, {})
    np.testing.assert_allclose(chi, np.pi * lam * 100.0 * (ky**2 + kx**2), rtol=1e-5)
    probe = physics.probe_from_aberrations(64, 0.05, 80e3, 21.0, -100.0, aperture_edge_px=0.0, supersample=1)
    ky, kx = physics.frequency_grid(64, 0.05)
    expected_k = (np.hypot(ky, kx) <= 21e-3 / lam) * np.exp(-1j * np.pi * lam * 100.0 * (ky**2 + kx**2))
    expected = np.fft.fftshift(np.fft.ifft2(expected_k))
    overlap = abs(np.vdot(expected, np.asarray(probe))) / np.linalg.norm(expected)
    assert overlap == pytest.approx(1.0, abs=1e-5)


def test_probe_is_centred_and_normalised():
    psi = np.asarray(physics.probe_from_aberrations(64, 0.05, 80e3, 21.0, 0.0, aperture_edge_px=0.0, supersample=1))
    assert np.sum(np.abs(psi) ** 2) == pytest.approx(1.0, rel=1e-5)
    assert np.unravel_index(np.argmax(np.abs(psi)), psi.shape) == (32, 32)
    spectrum = np.abs(np.fft.fft2(np.fft.ifftshift(psi))) ** 2
    k = np.hypot(*np.meshgrid(np.fft.fftfreq(64) * 64 * 0.05, np.fft.fftfreq(64) * 64 * 0.05, indexing="ij"))
    cutoff = 21e-3 / float(physics.wavelength_A(80e3))
    assert spectrum[k > cutoff].sum() < 1e-6 * spectrum.sum()


def test_pixel_integrated_aperture_is_the_area_fraction():
    dk, cutoff = 1.0, 10.3
    amp = np.asarray(physics.pixel_integrated_aperture(64, dk, cutoff, 0.0, 9))
    # total intensity ≈ the disc area in pixels; inner pixels full, far pixels empty
    assert np.sum(amp**2) == pytest.approx(np.pi * cutoff**2, rel=0.01)
    assert amp[0, 0] == 1.0 and amp[0, 12] == 0.0 and 0.0 < amp[0, 10] < 1.0


def test_astigmatism_angle_rotates_probe():
    a = physics.probe_from_aberrations(64, 0.05, 80e3, 21.0, 0.0, {"C12": 50.0, "phi12": 0.0})
    b = physics.probe_from_aberrations(64, 0.05, 80e3, 21.0, 0.0, {"C12": 50.0, "phi12": 90.0})
    # C12 at 90° is C12 at 0° with the opposite sign: |ψ| transposed
    np.testing.assert_allclose(np.abs(a)[1:, 1:], np.abs(b)[1:, 1:].T, atol=1e-5)


def test_mixed_state_modes_are_orthogonal_with_power_split():
    psi = physics.probe_from_aberrations(32, 0.1, 80e3, 21.0, -50.0)
    modes = np.asarray(physics.mixed_state_probe(psi, 3, 0.7)).reshape(3, -1)
    gram = modes.conj() @ modes.T
    np.testing.assert_allclose(np.diag(gram).real, [0.7, 0.15, 0.15], atol=1e-5)
    assert np.max(np.abs(gram - np.diag(np.diag(gram)))) < 1e-5


def test_farfield_conserves_intensity_in_vacuum():
    psi = physics.probe_from_aberrations(32, 0.1, 80e3, 21.0, -50.0)[None]
    obj = jnp.ones((1, 64, 64), jnp.complex64)
    prop = forward.fresnel_propagator(32, 0.1, physics.wavelength_A(80e3), 2.0)
    intensity = forward.predict_intensities(obj, psi, jnp.array([[10.0, 10.0]]), jnp.zeros(2), 0.3125, prop)
    assert float(intensity.sum()) == pytest.approx(1.0, rel=1e-5)


def test_subpixel_shift_moves_probe():
    psi = physics.probe_from_aberrations(32, 0.1, 80e3, 21.0, 0.0)[None]
    shifted = forward.shifted_probes(psi, jnp.array([[1.0, 0.0]]))[0, 0]
    np.testing.assert_allclose(np.abs(shifted), np.abs(np.roll(np.asarray(psi[0]), 1, axis=0)), atol=1e-5)


def test_propagator_band_limit_and_unit_modulus():
    prop = np.asarray(forward.fresnel_propagator(32, 0.1, 0.04, 5.0))
    inside = forward.band_limit_mask(32) > 0
    np.testing.assert_allclose(np.abs(prop[np.asarray(inside)]), 1.0, rtol=1e-6)
    assert np.all(prop[~np.asarray(inside)] == 0)


def test_noise_models_have_finite_gradients_at_zero_intensity():
    from recon import noise

    model = jnp.zeros((2, 8, 8))
    measured = jnp.zeros((2, 8, 8)).at[0, 0, 0].set(3.0)
    for name in noise.NOISE_MODELS:
        def loss(m, name=name):
            return jnp.sum(noise.pattern_losses(name, m, measured, jnp.ones((8, 8)), 1e-6, 3.0, 3.0 / 64))
        grad = jax.grad(loss)(model)
        assert np.all(np.isfinite(np.asarray(grad))), name
        assert np.isfinite(float(loss(model))), name
