"""Projection engines ePIE and rPIE on mini-batches, and what LSQML shares with them.

An exit-wave function `exit_fn(obj, probe) -> ψ (B, M, W, W)` (the engine's multislice model at the
batch's positions, holomorphic in the object (S, Y, X) and the probe modes (M, W, W)) is moved to its
target in the far field (`exit_wave_target`: the modulus projection, every mode scaled by
√(y / Σ_m I_m), for the amplitude noise model; for the Poisson model the likelihood-gradient step
Ψ (1 + ½ (y/I − 1)), as in LSQML's Poisson variant: the projection is the amplitude model's
least-squares update and biases the phase low at low counts). The update
directions conj(P)·(ψ − ψ') and conj(O)·(ψ − ψ') are the adjoint of the model applied to the
exit-wave residual (`adjoint_directions`, by jax.vjp); for one slice they are exactly ePIE's, for
several slices they back-propagate through the slices (the normalisations then use the probe's
illumination for every slice). All positions of a mini-batch update simultaneously:

    ePIE: O −= α d_O / max(Σ_b |P_b|²),                     P −= β d_P / max(Σ_b |O_b|²)
    rPIE: O −= d_O / ((1−α) Σ_b|P_b|² + α max Σ_b|P_b|²),
          P −= d_P / ((1−β) Σ_b|O_b|² + β max Σ_b|O_b|²)

With S slices each slice's object step is divided by S (the exit wave changes by the sum of the
slices' changes; full steps on 13 slices diverged at the first iteration on sto_10nm).

Σ_b |P_b|² is the batch's illumination scattered on the object grid and Σ_b |O_b|² the object's
intensity in each probe window (product over slices).
"""
from __future__ import annotations

from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from . import forward


class Directions(NamedTuple):
    """Update directions and their normalisations for one mini-batch.

    d_object (S, Y, X) c64; d_probe (M, W, W) c64; illumination (1, Y, X) f32 Σ_b Σ_m |P_b,m|² on the
    object grid; object_intensity (W, W) f32 Σ_b Π_s |O_b,s|²; residual (B, M, W, W) c64 ψ − ψ';
    intensity (B, W, W) f32 the modelled far-field intensity Σ_m |Ψ_m|² before the update.
    """

    d_object: jnp.ndarray
    d_probe: jnp.ndarray
    illumination: jnp.ndarray
    object_intensity: jnp.ndarray
    residual: jnp.ndarray
    intensity: jnp.ndarray


def exit_wave_target(noise_model: str, exit_k, measured, support, eps):
    """Far-field exit-wave targets Ψ' (B, M, W, W) on `support` (W, W) (elsewhere Ψ' = Ψ).

    amplitude: the modulus projection Ψ √(y / I); poisson: Ψ (1 + ½ (y / I − 1)), the step along the
    Poisson likelihood's gradient that equals the projection to first order but weights every pixel
    as the Poisson likelihood does (unbiased at low counts, where √y is not). I = Σ_m |Ψ_m|² + ε.
    """
    ratio = jnp.maximum(measured, 0.0) / (jnp.sum(forward.abs2(exit_k), axis=1) + eps)
    factor = 0.5 * (1.0 + ratio) if noise_model == "poisson" else jnp.sqrt(ratio)
    return exit_k * jnp.where(support > 0, factor, 1.0)[:, None]


def embed_patterns(patterns, window_px: int):
    """Detector patterns (B, N, N) placed at their frequencies on the W × W far-field grid (zeros beyond)."""
    n = patterns.shape[-1]
    if n == window_px:
        return patterns
    idx = np.r_[0:(n + 1) // 2, window_px - n // 2:window_px]  # as forward.crop_farfield
    return jnp.zeros(patterns.shape[:-2] + (window_px, window_px), patterns.dtype).at[
        ..., idx[:, None], idx[None, :]].set(patterns)


def adjoint(vjp: Callable, cotangent):
    """The adjoint J^H c of a holomorphic map whose transpose is `vjp` (JAX's vjp is J^T c)."""
    return jax.tree_util.tree_map(jnp.conj, vjp(jnp.conj(cotangent)))


def scattered_illumination(shifted_probes, top_left, object_shape: tuple[int, int]):
    """Σ_b Σ_m |P_b,m|² added into the object grid at each window (1, Y, X)."""
    n = shifted_probes.shape[-1]
    power = jnp.sum(forward.abs2(shifted_probes), axis=1)[:, None]
    _, vjp = jax.vjp(lambda o: forward.extract_windows(o, top_left, n), jnp.zeros((1, *object_shape), jnp.float32))
    return vjp(power)[0]


def adjoint_directions(noise_model: str, exit_fn: Callable, obj, probe, measured, support, eps, shifted_probes,
                       top_left, weights) -> Directions:
    """Directions of one mini-batch; `weights` (B,) are 0 for padding positions."""
    psi, vjp = jax.vjp(exit_fn, obj, probe)
    psi_k = jnp.fft.fft2(psi, norm="ortho")
    target = exit_wave_target(noise_model, psi_k, measured, support, eps)
    residual = jnp.fft.ifft2(psi_k - target, norm="ortho") * weights[:, None, None, None]
    d_object, d_probe = adjoint(vjp, residual)
    windows = forward.extract_windows(obj, top_left, probe.shape[-1])
    obj_power = jnp.sum(jnp.prod(forward.abs2(windows), axis=1) * weights[:, None, None], axis=0)
    return Directions(d_object, d_probe, scattered_illumination(shifted_probes * weights[:, None, None, None],
                                                                top_left, obj.shape[-2:]), obj_power, residual,
                      jnp.sum(forward.abs2(psi_k), axis=1))


def pie_update(d: Directions, obj, probe, alpha, beta, regularized: bool, probe_on):
    """ePIE (regularized=False: steps α, β) or rPIE (regularized=True: weights α, β) update of (obj, probe)."""
    def denominator(power, weight):
        peak = jnp.max(power)
        return ((1.0 - weight) * power + weight * peak) if regularized else peak / jnp.maximum(weight, 1e-30)

    slices = obj.shape[0]  # the exit wave changes by the sum of the slices' changes: share the step
    obj = obj - d.d_object / (slices * jnp.maximum(denominator(d.illumination, alpha), 1e-30))
    step_p = d.d_probe / jnp.maximum(denominator(d.object_intensity, beta), 1e-30)
    return obj, probe - jnp.where(probe_on, 1.0, 0.0) * step_p
