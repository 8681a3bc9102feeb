"""Constraints applied after each iteration, each on a start/step/end schedule (as in PtyRAD).

Every constraint is compiled into the iteration and switched by traced values (enabled, start,
step, end and its strengths), so turning one on or changing it never recompiles. Object arrays are
amplitude and phase (S, Y, X); the probe is (M, N, N) in real space.
"""
from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from .physics import aperture, frequency_grid, wavelength_A
from .state import ConstraintSettings, Params, ScheduleSettings

CONSTRAINTS = ("fix_probe_intensity", "orthogonalize_probe", "object_amplitude", "phase_positivity",
               "lateral_lowpass", "z_blur", "kz_filter", "phase_ramp_removal", "probe_fourier_mask",
               "position_recentering")


def is_active(sched: ScheduleSettings, iteration):
    """True when the schedule (enabled, start, step, end) covers `iteration`."""
    since = iteration - sched.start
    return ((sched.enabled > 0) & (since >= 0) & (since % jnp.maximum(sched.step, 1) == 0)
            & (iteration < sched.end))


def fix_probe_intensity(probe, target_power):
    """Scale all modes together so Σ|P|² = target_power."""
    return probe * jnp.sqrt(target_power / jnp.sum(jnp.abs(probe) ** 2))


def orthogonalize_probe(probe):
    """Orthogonal modes sorted by power (SVD of the (M, N²) mode matrix)."""
    m = probe.shape[0]
    if m == 1:
        return probe
    u, s, vh = jnp.linalg.svd(probe.reshape(m, -1), full_matrices=False)
    return (s[:, None] * vh).reshape(probe.shape).astype(probe.dtype)


def object_amplitude(amp, low, high):
    """Clip the transmission amplitude to [low, high]."""
    return jnp.clip(amp, low, high)


def phase_positivity(phase, relax):
    """Remove a fraction `relax` of any negative phase."""
    return phase - relax * jnp.minimum(phase, 0.0)


def lateral_lowpass(image, sigma_px):
    """Gaussian blur of each slice with standard deviation sigma_px (via FFT)."""
    qy = np.fft.fftfreq(image.shape[-2])[:, None]
    qx = np.fft.fftfreq(image.shape[-1])[None, :]
    kernel = jnp.exp(-2.0 * jnp.pi**2 * sigma_px**2 * (qy**2 + qx**2))
    return jnp.real(jnp.fft.ifft2(jnp.fft.fft2(image) * kernel)).astype(image.dtype)


def z_blur(image, sigma_slices):
    """Gaussian blur along the slice axis (normalised weights, edges renormalised)."""
    s = image.shape[0]
    if s == 1:
        return image
    d = np.arange(s)[:, None] - np.arange(s)[None, :]
    w = jnp.exp(-0.5 * d**2 / jnp.maximum(sigma_slices, 1e-6) ** 2)
    w = w / jnp.sum(w, axis=1, keepdims=True)
    return jnp.einsum("st,tyx->syx", w, image)


def kz_filter(phase, dx_A, dz_A, beta, strength):
    """Missing-wedge filter W = 1 − (2/π)·arctan(β²·kz²/kr²) on the 3D phase, blended by strength."""
    s, ny, nx = phase.shape
    if s == 1:
        return phase
    kz = jnp.asarray(np.fft.fftfreq(s))[:, None, None] / dz_A
    ky = jnp.asarray(np.fft.fftfreq(ny))[None, :, None] / dx_A
    kx = jnp.asarray(np.fft.fftfreq(nx))[None, None, :] / dx_A
    kr2 = ky**2 + kx**2
    w = 1.0 - 2.0 / jnp.pi * jnp.arctan(beta**2 * kz**2 / jnp.maximum(kr2, 1e-12))
    w = jnp.where((kz == 0), 1.0, w)
    filtered = jnp.real(jnp.fft.ifftn(jnp.fft.fftn(phase) * w)).astype(phase.dtype)
    return (1.0 - strength) * phase + strength * filtered


def phase_ramp_removal(phase):
    """Subtract the least-squares linear ramp (not the mean) of each slice's phase."""
    _, ny, nx = phase.shape
    y, x = np.meshgrid(np.arange(ny) - (ny - 1) / 2, np.arange(nx) - (nx - 1) / 2, indexing="ij")
    design = np.stack([y.ravel(), x.ravel()], axis=1)
    pinv = jnp.asarray(np.linalg.pinv(design), jnp.float32)
    coef = jnp.einsum("kp,sp->sk", pinv, phase.reshape(phase.shape[0], -1))
    ramp = coef[:, 0, None, None] * y + coef[:, 1, None, None] * x
    return phase - ramp.astype(phase.dtype)


def probe_fourier_mask(probe, dk_invA, energy_eV, semiangle_mrad, radius_factor, edge_px):
    """Zero the probe's spectrum outside radius_factor × the aperture radius."""
    n = probe.shape[-1]
    ky, kx = frequency_grid(n, dk_invA)
    cutoff = radius_factor * semiangle_mrad * 1e-3 / wavelength_A(energy_eV)
    mask = aperture(jnp.sqrt(ky**2 + kx**2), cutoff, edge_px * dk_invA)
    spectrum = jnp.fft.fft2(jnp.fft.ifftshift(probe, axes=(-2, -1)))
    return jnp.fft.fftshift(jnp.fft.ifft2(spectrum * mask), axes=(-2, -1)).astype(probe.dtype)


def position_recentering(offsets):
    """Remove the mean position correction (a global shift is an ambiguity, not information)."""
    return offsets - jnp.mean(offsets, axis=0, keepdims=True)


def _gated(active, fn, value, gate=None):
    """fn(value) where `active`, else value. With a `gate` (batched trials: true when any trial of the
    batch is active; not batched itself) the branch runs once for the batch and each trial keeps its
    own value where it is inactive, instead of vmap computing both branches for every trial."""
    if gate is None:
        return jax.lax.cond(active, fn, lambda v: v, value)
    return jax.lax.cond(gate, lambda v: jax.tree_util.tree_map(lambda a, b: jnp.where(active, a, b), fn(v), v),
                        lambda v: v, value)


def batch_gates(cons: ConstraintSettings, iteration, active):
    """(n_constraints,) bool: the constraint is active for some running trial of a batch.

    `cons` leaves and `iteration` carry the trial axis (K,); `active` (K,) marks running trials.
    """
    return jnp.stack([jnp.any(is_active(getattr(cons, name), iteration) & active) for name in CONSTRAINTS])


class Context(NamedTuple):
    """Traced values the constraints need (each () f32): probe_power Σ|P|² target in probe units,
    dx_A object pixel, dz_A slice thickness, dk_invA detector pixel, energy_eV, semiangle_mrad,
    aperture_edge_px."""

    probe_power: Any
    dx_A: Any
    dz_A: Any
    dk_invA: Any
    energy_eV: Any
    semiangle_mrad: Any
    aperture_edge_px: Any


def apply_constraints(params: Params, cons: ConstraintSettings, iteration, ctx: Context, gates=None) -> Params:
    """Apply every constraint whose schedule is active at `iteration`.

    `params` holds amplitude (object_a) and phase (object_b) whatever the plan's parameterization.
    `gates`: see `batch_gates` (None for a single trial).
    """
    act = {name: is_active(getattr(cons, name), iteration) for name in CONSTRAINTS}
    gate = {name: None if gates is None else gates[i] for i, name in enumerate(CONSTRAINTS)}

    def _when(name, fn, value):
        return _gated(act[name], fn, value, gate[name])

    probe = _when("probe_fourier_mask", lambda v: probe_fourier_mask(
        v, ctx.dk_invA, ctx.energy_eV, ctx.semiangle_mrad, cons.fourier_mask_radius_factor, ctx.aperture_edge_px),
        params.probe)
    probe = _when("orthogonalize_probe", orthogonalize_probe, probe)
    probe = _when("fix_probe_intensity", lambda v: fix_probe_intensity(v, ctx.probe_power), probe)
    amp = _when("object_amplitude", lambda v: object_amplitude(v, cons.amplitude_min, cons.amplitude_max),
                params.object_a)
    phase = _when("phase_positivity", lambda v: phase_positivity(v, cons.positivity_relax), params.object_b)
    sigma = cons.lowpass_sigma_px
    amp, phase = _when("lateral_lowpass", lambda ap: (
        1.0 + lateral_lowpass(ap[0] - 1.0, sigma), lateral_lowpass(ap[1], sigma)), (amp, phase))
    zs = cons.z_blur_sigma_slices
    amp, phase = _when("z_blur", lambda ap: (z_blur(ap[0], zs), z_blur(ap[1], zs)), (amp, phase))
    phase = _when("kz_filter", lambda v: kz_filter(v, ctx.dx_A, ctx.dz_A, cons.kz_beta, cons.kz_strength), phase)
    phase = _when("phase_ramp_removal", phase_ramp_removal, phase)
    offsets = _when("position_recentering", position_recentering, params.offsets_A)
    return Params(object_a=amp, object_b=phase, probe=probe, offsets_A=offsets)
