"""Electron optics: wavelength, interaction constant, aberration phase and probes.

Every function is written with `jax.numpy` on values that may be traced, so probes built from
tunable optics (defocus, aberrations, semi-angle, calibration) live inside compiled programs.
Conventions: the project's conventions.md (lengths in Å, angles in mrad or degrees).
"""
from __future__ import annotations

from typing import Mapping

import jax.numpy as jnp
import numpy as np

HC_EV_A = 12398.4198
M0C2_EV = 510998.95

# (order n, multiplicity m) of each Krivanek coefficient C_nm.
ABERRATION_ORDERS: dict[str, tuple[int, int]] = {
    "C10": (1, 0), "C12": (1, 2), "C21": (2, 1), "C23": (2, 3), "C30": (3, 0), "C32": (3, 2),
    "C34": (3, 4), "C41": (4, 1), "C43": (4, 3), "C45": (4, 5), "C50": (5, 0), "C52": (5, 2),
    "C54": (5, 4), "C56": (5, 6),
}


def wavelength_A(energy_eV):
    """Relativistic electron wavelength in Å."""
    return HC_EV_A / jnp.sqrt(energy_eV * (2.0 * M0C2_EV + energy_eV))


def sigma_rad_per_VA(energy_eV):
    """Interaction parameter σ = 2π m e λ / h² (relativistic mass) in rad/(V·Å)."""
    lam = wavelength_A(energy_eV)
    return 2.0 * jnp.pi / (lam * energy_eV) * (M0C2_EV + energy_eV) / (2.0 * M0C2_EV + energy_eV)


def frequency_grid(n_px: int, dk_invA):
    """Spatial frequencies (ky, kx) in 1/Å on an n×n grid, zero frequency at [0, 0]."""
    f = np.fft.fftfreq(n_px) * n_px
    return jnp.meshgrid(f * dk_invA, f * dk_invA, indexing="ij")


def aberration_phase(ky, kx, wavelength, coefficients_A: Mapping, angles_deg: Mapping):
    """χ(k) = (2π/λ) Σ C_nm (λk)^(n+1)/(n+1) cos(m(φ − φ_nm)) in radians.

    `coefficients_A` maps names like "C10" to Å; `angles_deg` maps the same names to degrees
    (missing angles are 0).
    """
    k = jnp.sqrt(ky**2 + kx**2)
    phi = jnp.arctan2(ky, kx)
    lam_k = wavelength * k
    chi = jnp.zeros_like(k)
    for name, c in coefficients_A.items():
        n, m = ABERRATION_ORDERS[name]
        angle = jnp.deg2rad(angles_deg.get(name, 0.0))
        chi = chi + c * lam_k ** (n + 1) / (n + 1) * jnp.cos(m * (phi - angle))
    return 2.0 * jnp.pi / wavelength * chi


def aperture(k_invA, cutoff_invA, edge_invA):
    """Objective aperture: 1 inside, 0 outside, a linear taper `edge_invA` wide (0 = hard)."""
    hard = (k_invA <= cutoff_invA).astype(k_invA.dtype)
    soft = jnp.clip((cutoff_invA - k_invA) / jnp.maximum(edge_invA, 1e-12) + 0.5, 0.0, 1.0)
    return jnp.where(edge_invA > 0, soft, hard)


def pixel_integrated_aperture(n_px: int, dk_invA, cutoff_invA, edge_invA, supersample: int):
    """Aperture amplitude √(mean |A|² over each detector pixel), sampled on supersample² points.

    A detector pixel integrates the intensity over its area, so pixels on the aperture edge see a
    partial disc; this amplitude reproduces that intensity exactly (supersample = 1: point samples).
    """
    ky, kx = frequency_grid(n_px, dk_invA)
    offsets = (np.arange(supersample) - (supersample - 1) / 2) / supersample
    sub_ky = ky[..., None, None] + dk_invA * offsets[:, None]
    sub_kx = kx[..., None, None] + dk_invA * offsets[None, :]
    a = aperture(jnp.sqrt(sub_ky**2 + sub_kx**2), cutoff_invA, edge_invA)
    return jnp.sqrt(jnp.mean(a**2, axis=(-2, -1)))


def probe_from_aberrations(n_px: int, dk_invA, energy_eV, semiangle_mrad, defocus_A,
                           aberrations: Mapping | None = None, aperture_edge_px=0.33, supersample: int = 3):
    """Real-space probe (N, N) complex64, centred at [N/2, N/2], Σ|ψ|² = 1.

    ψ(k) = A(k) exp(−iχ(k)) with C10 = −defocus_A; `aberrations` maps "C12", "phi12", ... to
    Å / degrees (keys without a leading "C" are angles "phiNM"). A is the pixel-integrated
    aperture (`pixel_integrated_aperture`) with an edge taper `aperture_edge_px` wide.
    """
    lam = wavelength_A(energy_eV)
    ky, kx = frequency_grid(n_px, dk_invA)
    coeffs, angles = split_aberrations(aberrations or {})
    coeffs = {**coeffs, "C10": -jnp.asarray(defocus_A)}
    chi = aberration_phase(ky, kx, lam, coeffs, angles)
    amp = pixel_integrated_aperture(n_px, dk_invA, semiangle_mrad * 1e-3 / lam, aperture_edge_px * dk_invA,
                                    supersample)
    psi_k = amp * jnp.exp(-1j * chi)
    psi = jnp.fft.fftshift(jnp.fft.ifft2(psi_k, norm="ortho"))
    return (psi / jnp.sqrt(jnp.sum(jnp.abs(psi) ** 2))).astype(jnp.complex64)


def split_aberrations(values: Mapping) -> tuple[dict, dict]:
    """Split {"C12": c, "phi12": a, ...} into coefficient and angle maps keyed by "C12"."""
    coeffs = {k: v for k, v in values.items() if k.startswith("C")}
    angles = {"C" + k[3:]: v for k, v in values.items() if k.startswith("phi")}
    return coeffs, angles


def edge_taper(n_px: int, width_px: float):
    """(N, N) f32 window: 0 on the outermost ring of pixels, rising as sin² over `width_px` pixels to 1."""
    centre = np.arange(n_px) + 0.5
    ramp = np.sin(0.5 * np.pi * np.clip((np.minimum(centre, n_px - centre) - 1.0) / width_px, 0.0, 1.0)) ** 2
    return jnp.asarray(ramp[:, None] * ramp[None, :], jnp.float32)


def taper_probe(psi, width_px: float):
    """A probe (..., N, N) brought to zero at its window's edge (`edge_taper`), at its total power.

    A probe that reaches the edge of its window makes the forward model jump where a scan position's
    window steps by a pixel (the sub-pixel shift wraps the edge column around: recon.forward); tapered,
    the predicted patterns are continuous in the positions and the scan rotation.
    """
    tapered = psi * edge_taper(psi.shape[-1], width_px)
    scale = jnp.sqrt(jnp.sum(jnp.abs(psi) ** 2) / jnp.sum(jnp.abs(tapered) ** 2))
    return (tapered * scale).astype(jnp.complex64)


def mixed_state_probe(psi0, n_modes: int, main_mode_fraction):
    """(M, N, N) orthogonal modes: ψ0 times low-order polynomials, powers (f, (1−f)/(M−1), ...).

    The total power equals that of ψ0; a single mode returns ψ0[None].
    """
    if n_modes == 1:
        return psi0[None]
    n = psi0.shape[-1]
    c = (np.arange(n) - n / 2) / (n / 4)
    y, x = np.meshgrid(c, c, indexing="ij")
    orders = [(0, 1), (1, 0), (1, 1), (0, 2), (2, 0), (2, 1), (1, 2), (0, 3), (3, 0), (2, 2),
              (3, 1), (1, 3), (0, 4), (4, 0), (3, 2)]
    modes = [psi0] + [psi0 * (y**py * x**px) for py, px in orders[: n_modes - 1]]
    ortho = gram_schmidt(jnp.stack(modes))
    power0 = jnp.sum(jnp.abs(psi0) ** 2)
    fractions = jnp.concatenate([jnp.asarray([main_mode_fraction]),
                                 jnp.full((n_modes - 1,), (1.0 - main_mode_fraction) / (n_modes - 1))])
    return (ortho * jnp.sqrt(fractions * power0)[:, None, None]).astype(jnp.complex64)


def gram_schmidt(modes):
    """Orthonormalise (M, N, N) modes in order."""
    out = []
    for v in modes:
        for u in out:
            v = v - jnp.vdot(u, v) * u
        out.append(v / jnp.sqrt(jnp.sum(jnp.abs(v) ** 2)))
    return jnp.stack(out)
