"""Per-variable optax optimisers whose learning rate, schedule and start are traced settings.

Each optimiser is an optax gradient transformation without its learning rate (scale_by_adam,
scale_by_rms, ...); the engine multiplies its updates by −lr(t), with lr(t) a traced schedule, so
changing a learning rate, a schedule or a start iteration never recompiles. Only the optimiser's
name is a compile-time choice.
"""
from __future__ import annotations

import jax.numpy as jnp
import optax

from .state import OptimizerSettings

SCHEDULES = ("constant", "cosine", "exponential", "warmup_cosine")


def direction(name: str, momentum) -> optax.GradientTransformation:
    """The optimiser `name` without its learning rate; `momentum` may be traced."""
    if name == "adam":
        return optax.scale_by_adam()
    if name == "sgd":
        return optax.identity()
    if name == "momentum":
        return optax.trace(decay=momentum)
    if name == "rmsprop":
        return optax.scale_by_rms(decay=momentum)
    if name == "adabelief":
        return optax.scale_by_belief()
    if name == "lamb":
        return optax.chain(optax.scale_by_adam(), optax.scale_by_trust_ratio())
    if name == "yogi":
        return optax.scale_by_yogi()
    raise ValueError(f"unknown optimiser {name!r}")


def schedule_factor(schedule_id, t, total, decay_rate, warmup, final_fraction):
    """Learning-rate multiplier at step t ≥ 0 of `total`; schedule_id indexes SCHEDULES."""
    t = jnp.asarray(t, jnp.float32)
    total = jnp.maximum(jnp.asarray(total, jnp.float32), 1.0)
    warmup = jnp.asarray(warmup, jnp.float32)

    def cosine(progress):
        progress = jnp.clip(progress, 0.0, 1.0)
        return final_fraction + (1.0 - final_fraction) * 0.5 * (1.0 + jnp.cos(jnp.pi * progress))

    warm = jnp.where(t < warmup, (t + 1.0) / jnp.maximum(warmup, 1.0),
                     cosine((t - warmup) / jnp.maximum(total - warmup, 1.0)))
    factors = jnp.stack([jnp.ones(()), cosine(t / total), decay_rate**t, warm])
    return factors[schedule_id]


def learning_rate(spec: OptimizerSettings, iteration, total_iterations):
    """lr at `iteration` for a traced optimiser spec; 0 before its start."""
    t = iteration - spec.start_iteration
    factor = schedule_factor(spec.schedule_id, jnp.maximum(t, 0), total_iterations - spec.start_iteration,
                             spec.decay_rate, spec.warmup_iterations, spec.final_fraction)
    return jnp.where(t >= 0, spec.learning_rate * factor, 0.0)
