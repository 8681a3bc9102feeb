"""Fitted optics: aberrations and scan rotation as variables of the reconstruction, with errors.

`probe.fit` / `scan.fit` name plan values (defocus_A, C12_A, phi12_deg, ..., rotation_deg) that
become variables θ (P,) in plan units, carried in `EngineState.fitted`. The probe is then the
aberration-parameterised one (`physics.probe_from_aberrations` of θ; its free pixels are not
updated) and the positions are rotated by the fitted angle. There is no free-pixel probe stage:
the parameterised probe is used from the first iteration (free pixels would absorb the aberrations
the fit is meant to measure).

After each iteration's object pass, θ takes one Gauss-Newton (Levenberg-Marquardt) step on all
fitted positions with the object held fixed: (A + λ diag A) δ = −g with A = JᵀJ and g = Jᵀr,
J = ∂r/∂θ of the noise model's whitened residuals (`gauss_newton.residuals`; P forward-mode passes,
`jax.linearize`), kept only if Σ r² decreases.

Standard errors: the Fisher information at the solution restricted to θ (the object held fixed,
not its Schur complement), F = JᵀJ / s², with s² the whitened residual's variance
(`gauss_newton.RESIDUAL_VARIANCE`: Poisson 1, so F = Σ (∂μ/∂θ)²/μ; amplitude and Anscombe ¼;
intensity estimated as Σ r² / (n − P)); σ_i = √((F⁻¹)_ii).
"""
from __future__ import annotations

from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp

from .gauss_newton import RESIDUAL_VARIANCE
from .state import Settings


class NormalEquations(NamedTuple):
    """A = JᵀJ (P, P), g = Jᵀr (P,), rss = Σ r² (), n = residuals counted () (positions × N², mask ignored)."""

    A: jnp.ndarray
    g: jnp.ndarray
    rss: jnp.ndarray
    n: jnp.ndarray


def fits_probe(keys: tuple[str, ...]) -> bool:
    """True when any fitted value is a probe optic (the probe is then parameterised)."""
    return any(k.startswith("probe.") for k in keys)


def _aberration_field(key: str) -> str:
    """probe.aberrations.C12_A -> C12; probe.aberrations.phi12_deg -> phi12."""
    return key.rsplit(".", 1)[1].removesuffix("_A").removesuffix("_deg")


def initial_values(settings: Settings, keys: tuple[str, ...]):
    """θ (P,) f32: the settings' values of the fitted keys."""
    def one(key):
        if key == "probe.defocus_A":
            return settings.defocus_A
        if key == "scan.rotation_deg":
            return settings.rotation_deg
        return getattr(settings.aberrations, _aberration_field(key))

    return jnp.stack([jnp.asarray(one(k), jnp.float32) for k in keys]) if keys else jnp.zeros((0,), jnp.float32)


def with_fitted(settings: Settings, keys: tuple[str, ...], values) -> Settings:
    """The settings with each fitted key replaced by its value in θ (P,)."""
    if not keys:
        return settings
    ab = settings.aberrations._replace(**{_aberration_field(k): values[i] for i, k in enumerate(keys)
                                          if k.startswith("probe.aberrations.")})
    top = {k.split(".")[1]: values[i] for i, k in enumerate(keys) if k in ("probe.defocus_A", "scan.rotation_deg")}
    return settings._replace(aberrations=ab, **top)


def normal_equations(residual_fn: Callable, theta, batches, weights) -> NormalEquations:
    """Accumulate JᵀJ, Jᵀr and Σr² over mini-batches (n_batches, B) of positions with weights (0 = padding).

    residual_fn(theta, idx (B,)) -> whitened residuals (B, N, N); J by P forward-mode passes.
    """
    p = theta.shape[0]
    basis = jnp.eye(p, dtype=theta.dtype)

    def one(acc, batch):
        idx, w = batch
        r, jvp = jax.linearize(lambda t: residual_fn(t, idx), theta)
        scale = jnp.sqrt(w)[:, None, None]
        r = r * scale
        jac = jax.vmap(jvp)(basis) * scale  # (P, B, N, N)
        flat = jac.reshape(p, -1)
        return NormalEquations(acc.A + flat @ flat.T, acc.g + flat @ r.ravel(), acc.rss + jnp.sum(r**2),
                               acc.n + jnp.sum(w) * r.shape[-1] * r.shape[-2]), None

    zero = NormalEquations(jnp.zeros((p, p)), jnp.zeros((p,)), jnp.zeros(()), jnp.zeros(()))
    acc, _ = jax.lax.scan(one, zero, (batches, weights))
    return acc


def total_rss(residual_fn: Callable, theta, batches, weights):
    """Σ r² over the mini-batches at θ (one forward pass over the data)."""
    def one(acc, batch):
        idx, w = batch
        return acc + jnp.sum(residual_fn(theta, idx) ** 2 * w[:, None, None]), None

    return jax.lax.scan(one, jnp.zeros(()), (batches, weights))[0]


def lm_update(ne: NormalEquations, theta, damping):
    """θ + δ with (A + λ diag A) δ = −g (a tiny ridge keeps a parameter without signal in place)."""
    diag = jnp.diag(ne.A)
    matrix = ne.A + jnp.diag(damping * diag + 1e-12 * (jnp.max(diag) + 1e-30))
    return theta - jnp.linalg.solve(matrix, ne.g)


def residual_variance(noise_model: str, ne: NormalEquations):
    """s² of the whitened residuals: fixed by the noise model, or estimated (intensity)."""
    fixed = RESIDUAL_VARIANCE[noise_model]
    if fixed is not None:
        return jnp.asarray(fixed, jnp.float32)
    return ne.rss / jnp.maximum(ne.n - ne.A.shape[0], 1.0)


def standard_errors(noise_model: str, ne: NormalEquations):
    """σ (P,): √ diag of the inverse Fisher information F = JᵀJ / s² (restricted to θ)."""
    fisher = ne.A / residual_variance(noise_model, ne)
    return jnp.sqrt(jnp.diag(jnp.linalg.inv(fisher)))
