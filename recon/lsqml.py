"""LSQML engine (Odstrčil et al. 2018, Opt. Express 26, 3108): least-squares maximum-likelihood steps.

Per mini-batch: the exit-wave update χ = ψ' − ψ from the modulus projection (the per-pixel
maximum-likelihood exit wave for amplitude and Poisson noise, `recon.epie.modulus_projection`), the
preconditioned directions

    ΔO = d_O / (Σ_b |P_b|² + δ max Σ_b |P_b|²),   ΔP = d_P / (Σ_b |O_b|² + δ max Σ_b |O_b|²)

(d the adjoint of the model applied to the residual, `recon.epie.adjoint_directions`), and the step
lengths (a_O, a_P) that minimise ‖χ + a_O J_O ΔO + a_P J_P ΔP‖² (a 2×2 least-squares problem; J_O ΔO
and J_P ΔP by jax.jvp through the multislice model). One pair of steps per mini-batch (the paper's
per-position object steps are averaged into it); `lsqml_step` scales both.
"""
from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp

from .epie import Directions


def preconditioned(d: Directions, delta):
    """(ΔO, ΔP): the directions divided by their δ-regularised illuminations."""
    d_obj = d.d_object / (d.illumination + delta * jnp.max(d.illumination) + 1e-30)
    d_probe = d.d_probe / (d.object_intensity + delta * jnp.max(d.object_intensity) + 1e-30)
    return d_obj, d_probe


def optimal_steps(residual, u, v):
    """(a_O, a_P) minimising ‖residual − a_O u − a_P v‖² (real steps; v = 0 gives a_P = 0)."""
    def inner(a, b):
        return jnp.vdot(a, b).real

    uu, vv, uv = inner(u, u), inner(v, v), inner(u, v)
    ridge = 1e-6 * (uu + vv) + 1e-30
    matrix = jnp.array([[uu + ridge, uv], [uv, vv + ridge]])
    return jnp.linalg.solve(matrix, jnp.array([inner(u, residual), inner(v, residual)]))


def lsqml_update(exit_fn: Callable, d: Directions, obj, probe, step, delta, probe_on, weights):
    """The LSQML update of (obj, probe) for one mini-batch's directions (`weights` (B,): 0 for padding)."""
    d_obj, d_probe = preconditioned(d, delta)
    d_probe = d_probe * jnp.where(probe_on, 1.0, 0.0)
    _, u = jax.jvp(exit_fn, (obj, probe), (d_obj, jnp.zeros_like(probe)))
    _, v = jax.jvp(exit_fn, (obj, probe), (jnp.zeros_like(obj), d_probe))
    w = weights[:, None, None, None]
    a = optimal_steps(d.residual, u * w, v * w)
    return obj - step * a[0] * d_obj, probe - step * a[1] * d_probe
