"""Forward model: probe windows on the object, multislice, far-field intensities.

Zero frequency is at index [0, 0] everywhere inside the engine. A probe window of N×N object
pixels has its top-left pixel at `floor(r)` with r = (position − origin)/dx − N/2; the sub-pixel
remainder shifts the probe by a Fourier phase ramp so positions stay continuous (and learnable).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from .physics import frequency_grid, wavelength_A

BAND_LIMIT_FRACTION = 2.0 / 3.0


def band_limit_mask(n_px: int, fraction=BAND_LIMIT_FRACTION):
    """1 for |k| ≤ fraction·k_max (k_max = Nyquist), else 0; (N, N) float32 (fraction may be traced)."""
    f = np.fft.fftfreq(n_px)
    k = np.sqrt(f[:, None] ** 2 + f[None, :] ** 2)
    return (k <= 0.5 * fraction).astype(jnp.float32)


def fresnel_propagator(n_px: int, dk_invA, wavelength, dz_A, tilt_mrad=(0.0, 0.0), band_limit=BAND_LIMIT_FRACTION):
    """Band-limited Fresnel propagator exp(−iπλΔz k² + 2πiΔz k·tanθ), (N, N) complex64.

    A beam tilt θ (y, x) in mrad shifts the wave laterally by Δz·tanθ per slice; frequencies
    beyond band_limit × Nyquist are removed (2/3 avoids aliasing in multislice).
    """
    ky, kx = frequency_grid(n_px, dk_invA)
    tilt = jnp.tan(jnp.asarray(tilt_mrad) * 1e-3)
    phase = -jnp.pi * wavelength * dz_A * (ky**2 + kx**2) + 2 * jnp.pi * dz_A * (ky * tilt[0] + kx * tilt[1])
    return (jnp.exp(1j * phase) * band_limit_mask(n_px, band_limit)).astype(jnp.complex64)


def window_offsets(positions_yx_A, origin_yx_A, dx_A, n_px: int):
    """Integer top-left object pixel (B, 2) and sub-pixel remainder (B, 2) of each probe window."""
    r = (positions_yx_A - origin_yx_A) / dx_A - n_px / 2
    top_left = jnp.floor(r)
    return top_left.astype(jnp.int32), r - top_left


def shift_ramps(frac_px, n_px: int):
    """Fourier phase ramps (B, N, N) that shift an image by +frac pixels (y, x)."""
    q = jnp.asarray(np.fft.fftfreq(n_px), dtype=jnp.float32)
    ry = jnp.exp(-2j * jnp.pi * frac_px[:, 0, None] * q)
    rx = jnp.exp(-2j * jnp.pi * frac_px[:, 1, None] * q)
    return (ry[:, :, None] * rx[:, None, :]).astype(jnp.complex64)


def shifted_probes(probe_modes, frac_px):
    """Probe modes (M, N, N) shifted by each sub-pixel remainder: (B, M, N, N)."""
    probe_k = jnp.fft.fft2(probe_modes)
    ramps = shift_ramps(frac_px, probe_modes.shape[-1])
    return jnp.fft.ifft2(probe_k[None] * ramps[:, None])


def extract_windows(image, top_left, n_px: int):
    """N×N windows of a (S, Y, X) array at integer top-left pixels (B, 2): (B, S, N, N).

    Windows that would leave the array are clamped to its edge (as lax.dynamic_slice does).
    """
    def one(tl):
        return jax.lax.dynamic_slice(image, (0, tl[0], tl[1]), (image.shape[0], n_px, n_px))

    return jax.vmap(one)(top_left)


def exit_waves(probes, transmission_windows, propagator):
    """Multislice: transmit at the entrance of each slice, then propagate to the next.

    probes (B, M, N, N), transmission_windows (B, S, N, N), propagator (N, N) → (B, M, N, N).
    """
    n_slices = transmission_windows.shape[1]
    psi = probes * transmission_windows[:, 0, None]
    for s in range(1, n_slices):
        psi = jnp.fft.ifft2(jnp.fft.fft2(psi) * propagator) * transmission_windows[:, s, None]
    return psi


def abs2(z):
    """|z|² without the square root of jnp.abs."""
    return jnp.real(z) ** 2 + jnp.imag(z) ** 2


def farfield_intensity(exit_wave):
    """Σ over modes of |FFT(exit wave)|² with norm="ortho": (B, M, N, N) → (B, N, N)."""
    return jnp.sum(abs2(jnp.fft.fft2(exit_wave, norm="ortho")), axis=1)


def crop_farfield(intensity, detector_px: int):
    """Keep the detector_px × detector_px lowest frequencies (zero frequency stays at [0, 0])."""
    w = intensity.shape[-1]
    if w == detector_px:
        return intensity
    idx = np.r_[0:(detector_px + 1) // 2, w - detector_px // 2:w]
    return intensity[..., idx, :][..., :, idx]


def predict_intensities(transmission, probe_modes, positions_yx_A, origin_yx_A, dx_A, propagator,
                        detector_px: int | None = None):
    """Far-field intensities (B, N, N) of probe modes at positions on a (S, Y, X) transmission.

    With an object grid finer than 1/(N dk) (supersampling), probe windows are larger than the
    detector and the far field is cropped to its central `detector_px` pixels.
    """
    n_px = probe_modes.shape[-1]
    top_left, frac = window_offsets(positions_yx_A, origin_yx_A, dx_A, n_px)
    windows = extract_windows(transmission, top_left, n_px)
    intensity = farfield_intensity(exit_waves(shifted_probes(probe_modes, frac), windows, propagator))
    return crop_farfield(intensity, detector_px or n_px)


def predict_patterns(transmission, probe_modes, positions_yx_A, origin_yx_A, dx_A, energy_eV,
                     slice_thickness_A, tilt_mrad=(0.0, 0.0), batch_size: int = 64):
    """Noise-free patterns (n, N, N), zero frequency at [0, 0], for simulation and checks.

    `transmission` is exp(iσV) per slice (S, Y, X); `probe_modes` (M, N, N) real-space probes
    whose total power sets the pattern scale; dx_A the object pixel (= 1/(N dk)).
    """
    transmission = jnp.asarray(transmission, jnp.complex64)
    probe_modes = jnp.asarray(probe_modes, jnp.complex64)
    n_px = probe_modes.shape[-1]
    dk = 1.0 / (n_px * dx_A)
    prop = fresnel_propagator(n_px, dk, wavelength_A(energy_eV), slice_thickness_A, tilt_mrad)
    run = jax.jit(predict_intensities)
    positions = np.asarray(positions_yx_A, dtype=np.float32)
    origin = jnp.asarray(origin_yx_A, jnp.float32)
    out = [np.asarray(run(transmission, probe_modes, positions[i:i + batch_size], origin, dx_A, prop))
           for i in range(0, len(positions), batch_size)]
    return np.concatenate(out, axis=0)
