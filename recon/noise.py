"""Noise models: the data term comparing modelled and measured intensities.

Each returns the loss of every pattern, normalised by the mean total intensity of a measured
pattern so that regulariser weights mean the same at any dose or intensity unit. `eps` is relative
to the mean pixel intensity and guards sqrt and log, so a zero intensity never gives a NaN or
infinite gradient.
"""
from __future__ import annotations

import jax.numpy as jnp

NOISE_MODELS = ("amplitude", "anscombe", "poisson", "intensity")


def amplitude(model, measured, eps):
    """Gaussian noise on amplitudes: (√(I+ε) − √y)²."""
    return (jnp.sqrt(model + eps) - jnp.sqrt(jnp.maximum(measured, 0.0))) ** 2


def anscombe(model, measured, eps):
    """Anscombe variance-stabilised counts: (√(I+3/8) − √(y+3/8))² (data in electron counts)."""
    return (jnp.sqrt(jnp.maximum(model, 0.0) + 0.375 + eps) - jnp.sqrt(jnp.maximum(measured, 0.0) + 0.375)) ** 2


def poisson(model, measured, eps):
    """Poisson negative log-likelihood minus its value at I = y (so a perfect fit scores 0)."""
    y = jnp.maximum(measured, 0.0)
    return model - y + y * (jnp.log(y + eps) - jnp.log(model + eps))


def intensity(model, measured, eps):
    """Gaussian noise on intensities: (I − y)², scaled by 1/(mean pixel intensity)."""
    del eps
    return (model - measured) ** 2


_MODELS = {"amplitude": amplitude, "anscombe": anscombe, "poisson": poisson, "intensity": intensity}


def pattern_losses(name: str, model, measured, mask, eps_rel, mean_total, mean_pixel):
    """Loss per pattern (B,) for modelled and measured intensities (B, N, N) and a (N, N) mask."""
    per_pixel = _MODELS[name](model, measured, eps_rel * mean_pixel)
    if name == "intensity":
        per_pixel = per_pixel / mean_pixel
    return jnp.sum(per_pixel * mask, axis=(-2, -1)) / mean_total
