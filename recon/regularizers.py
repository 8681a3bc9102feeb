"""Regularisers: cost terms on the object and probe, each multiplied by a tunable weight.

The object enters as its transmission O = a·exp(iφ) per slice (S, Y, X). Terms are means over
pixels so weights do not depend on the object size.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from .state import RegularizerWeights

REGULARIZERS = ("object_l1", "object_l2", "object_tikhonov", "object_tv", "phase_l1",
                "layer_tikhonov", "layer_tv", "probe_l2")


def _lateral_gradients(obj):
    return obj[:, 1:, :-1] - obj[:, :-1, :-1], obj[:, :-1, 1:] - obj[:, :-1, :-1]


def object_l1(obj, phase):
    """Mean |O − 1|: sparsity of the deviation from vacuum."""
    return jnp.mean(jnp.abs(obj - 1.0))


def object_l2(obj, phase):
    """Mean |O − 1|²."""
    return jnp.mean(jnp.abs(obj - 1.0) ** 2)


def object_tikhonov(obj, phase):
    """Mean squared lateral gradient |∇O|² (smoothness)."""
    gy, gx = _lateral_gradients(obj)
    return jnp.mean(jnp.abs(gy) ** 2 + jnp.abs(gx) ** 2)


def object_tv(obj, phase, tv_eps):
    """Isotropic total variation mean √(|∂yO|² + |∂xO|² + ε)."""
    gy, gx = _lateral_gradients(obj)
    return jnp.mean(jnp.sqrt(jnp.abs(gy) ** 2 + jnp.abs(gx) ** 2 + tv_eps))


def phase_l1(obj, phase):
    """Mean |φ|: sparsity of the phase."""
    return jnp.mean(jnp.abs(phase))


def layer_tikhonov(obj, phase):
    """Mean |O_{s+1} − O_s|² between neighbouring slices (0 for one slice)."""
    if obj.shape[0] < 2:
        return jnp.zeros((), jnp.float32)
    return jnp.mean(jnp.abs(obj[1:] - obj[:-1]) ** 2)


def layer_tv(obj, phase, tv_eps):
    """Mean √(|O_{s+1} − O_s|² + ε) between neighbouring slices (0 for one slice)."""
    if obj.shape[0] < 2:
        return jnp.zeros((), jnp.float32)
    return jnp.mean(jnp.sqrt(jnp.abs(obj[1:] - obj[:-1]) ** 2 + tv_eps))


def probe_l2(probe_modes):
    """Mean |P|² of the (normalised) probe modes."""
    return jnp.mean(jnp.real(probe_modes) ** 2 + jnp.imag(probe_modes) ** 2)


def _terms(obj, phase, probe_modes, tv_eps) -> dict:
    """Each regulariser as a thunk, so it is only evaluated when needed."""
    return {
        "object_l1": lambda: object_l1(obj, phase),
        "object_l2": lambda: object_l2(obj, phase),
        "object_tikhonov": lambda: object_tikhonov(obj, phase),
        "object_tv": lambda: object_tv(obj, phase, tv_eps),
        "phase_l1": lambda: phase_l1(obj, phase),
        "layer_tikhonov": lambda: layer_tikhonov(obj, phase),
        "layer_tv": lambda: layer_tv(obj, phase, tv_eps),
        "probe_l2": lambda: probe_l2(probe_modes),
    }


def regularizer_values(obj, phase, probe_modes, tv_eps) -> dict:
    """Every regulariser's unweighted value."""
    return {name: term() for name, term in _terms(obj, phase, probe_modes, tv_eps).items()}


def weighted_sum(values: dict, weights: RegularizerWeights):
    """Σ weight × value over the regularisers."""
    return sum(getattr(weights, name) * values[name] for name in REGULARIZERS)


def any_on(weights: RegularizerWeights):
    """True when some regulariser has a non-zero weight (elementwise over a leading trial axis)."""
    return sum(getattr(weights, name) for name in REGULARIZERS) > 0


def penalty(obj, phase, probe_modes, weights: RegularizerWeights, gate=None):
    """Σ weight × regulariser; skipped at run time (without recompiling) while every weight is 0.

    `gate` (batched trials): any trial of the batch has a regulariser on; not batched itself, so the
    terms are skipped for the whole batch instead of vmap computing them for every trial.
    """
    return jax.lax.cond(any_on(weights) if gate is None else gate, lambda: weighted_sum(regularizer_values(obj, phase, probe_modes, weights.tv_eps),
                                                     weights), lambda: jnp.zeros((), jnp.float32))
