"""The compiled reconstruction engine: its programs and their compilation cache.

The programs `init`, `iteration`, `heldout` and `outputs` are pure functions of
(`Settings`, `EngineData`[, `EngineState`]) (see `recon.state`); `recon.lower` makes those inputs
from a plan. Each program is compiled once per `StaticConfig` with jax.jit's ahead-of-time API and
reused for every plan that shares it. One call of `iteration` runs every mini-batch of one pass
over the data (lax.scan, reshuffled each pass) and then the constraints, with no host
synchronisation inside. `batched(...)` gives the same programs over a leading trial axis
(jax.vmap): K trials that share a StaticConfig run as one program over one copy of the data.
"""
from __future__ import annotations

import os
import threading
import time
from pathlib import Path
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from . import constraints as cons_mod
from . import epie, fit, forward, lsqml, noise, optim, physics, regularizers
from . import gauss_newton as gn
from .lower import OPTIMIZED, StaticConfig, grid_origin_A, pixel_size_A
from .state import EngineData, EngineState, Groups, Params, Settings, Stats

_PERSISTENT_CACHE_LOCK = threading.Lock()


def enable_persistent_cache(path: str | os.PathLike | None = None) -> None:
    """Turn on JAX's persistent compilation cache (default ~/.cache/ptytune/jax or $PTYTUNE_JAX_CACHE).

    A second process with the same shapes then loads the compiled program instead of compiling.
    An application that configured its own cache directory keeps it.
    """
    with _PERSISTENT_CACHE_LOCK:
        if jax.config.jax_compilation_cache_dir:
            return
        cache = Path(path or os.environ.get("PTYTUNE_JAX_CACHE", Path.home() / ".cache" / "ptytune" / "jax"))
        cache.mkdir(parents=True, exist_ok=True)
        jax.config.update("jax_compilation_cache_dir", str(cache))
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
        jax.config.update("jax_persistent_cache_min_entry_size_bytes", -1)


# --------------------------------------------------------------------------- derived quantities


class Derived(NamedTuple):
    """Quantities computed from the traced settings once per program call.

    dx_A: () f32; origin_yx_A: (2,) f32; propagator: (W, W) c64 Fresnel kernel of one slice;
    positions_A: (n_fit, 2) and heldout_positions_A: (n_heldout, 2) f32 after step, affine and
    rotation; probe_unit: () f32 √(mean pixel intensity); probe_power: () f32 Σ|P|² target in probe units.
    """

    dx_A: Any
    origin_yx_A: Any
    propagator: Any
    positions_A: Any
    heldout_positions_A: Any
    probe_unit: Any
    probe_power: Any


def scan_positions(positions_A, settings: Settings, data: EngineData):
    """Positions after scan step, affine and rotation about the scan centroid (n, 2) Å.

    Rotation is counter-clockwise as displayed with y pointing down.
    """
    c = data.centroid_A
    d = (positions_A - c) * (settings.scan_step_A / data.nominal_step_A)
    d = d @ settings.affine.reshape(2, 2).T
    t = jnp.deg2rad(settings.rotation_deg)
    rot = jnp.array([[jnp.cos(t), -jnp.sin(t)], [jnp.sin(t), jnp.cos(t)]])
    return c + d @ rot.T


def probe_unit(data: EngineData):
    """Probe parameters are stored in units of √(mean pixel intensity)."""
    return jnp.sqrt(data.mean_pixel)


def derive(settings: Settings, data: EngineData, static: StaticConfig) -> Derived:
    n = static.window_px
    dx = pixel_size_A(settings.dk_invA, n)
    lam = physics.wavelength_A(settings.energy_eV)
    return Derived(
        dx_A=dx,
        origin_yx_A=grid_origin_A(data.centroid_A, dx, static.object_shape),
        propagator=forward.fresnel_propagator(n, settings.dk_invA, lam, settings.slice_thickness_A,
                                              settings.tilt_mrad, settings.band_limit),
        positions_A=scan_positions(data.positions_A, settings, data),
        heldout_positions_A=scan_positions(data.heldout_positions_A, settings, data),
        probe_unit=probe_unit(data),
        probe_power=jnp.asarray(float(static.n_px**2), jnp.float32),
    )


# --------------------------------------------------------------------------- parameters


def complex_object(params: Params, static: StaticConfig):
    """The complex transmission (S, Y, X) held by the optimised object parameters."""
    if static.parameterization == "amp_phase":
        return params.object_a * jnp.exp(1j * params.object_b)
    return params.object_a + 1j * params.object_b


def object_params(obj, static: StaticConfig) -> tuple[Any, Any]:
    """(object_a, object_b) of a complex transmission (the inverse of complex_object)."""
    if static.parameterization == "amp_phase":
        return jnp.abs(obj), jnp.angle(obj)
    return jnp.real(obj), jnp.imag(obj)


def transmission(params: Params, static: StaticConfig):
    """Complex transmission (S, Y, X) and its phase from the optimised object parameters."""
    obj = complex_object(params, static)
    return obj, params.object_b if static.parameterization == "amp_phase" else jnp.angle(obj)


def _to_amp_phase(params: Params, static: StaticConfig) -> Params:
    if static.parameterization == "amp_phase":
        return params
    obj = complex_object(params, static)
    return params._replace(object_a=jnp.abs(obj), object_b=jnp.angle(obj))


def _from_amp_phase(params: Params, static: StaticConfig) -> Params:
    if static.parameterization == "amp_phase":
        return params
    a, b = object_params(params.object_a * jnp.exp(1j * params.object_b), static)
    return params._replace(object_a=a, object_b=b)


#: Which Params fields each optimiser updates.
GROUP_FIELDS = Groups(object=("object_a", "object_b"), probe=("probe",), positions=("offsets_A",))


def _subset(params: Params, fields: tuple[str, ...]) -> dict:
    return {k: getattr(params, k) for k in fields}


def _direction(static: StaticConfig, settings: Settings, group: str):
    name = static.optimizers[OPTIMIZED.index(group)]
    return optim.direction(name, getattr(settings.optimizers, group).momentum)


# --------------------------------------------------------------------------- programs


def make_init(static: StaticConfig) -> Callable[[Settings, EngineData], EngineState]:
    """init(settings, data) -> state: object, probe from the optics, zero position offsets."""
    def init(settings: Settings, data: EngineData) -> EngineState:
        shape = (static.slices, *static.object_shape)
        probe = optics_probe(settings, static)
        params = _from_amp_phase(Params(object_a=jnp.full(shape, settings.init_amplitude, jnp.float32),
                                        object_b=jnp.full(shape, settings.init_phase_rad, jnp.float32),
                                        probe=probe, offsets_A=jnp.zeros((static.n_fit, 2), jnp.float32)), static)
        opt = Groups(*(_direction(static, settings, g).init(_subset(params, fields))
                       for g, fields in zip(OPTIMIZED, GROUP_FIELDS)))
        return EngineState(params=params, opt=opt, iteration=jnp.zeros((), jnp.int32),
                           key=jax.random.PRNGKey(settings.seed), fitted=fit.initial_values(settings, static.fit),
                           damping=settings.engine.damping, fit_damping=settings.engine.fit_damping)

    return init


def optics_probe(settings: Settings, static: StaticConfig):
    """The probe modes (M, W, W) in probe units built from the settings' optics (aberrations, modes);
    tapered to zero at the window's edge when probe optics are fitted with probe.fit_taper_px > 0
    (`physics.taper_probe`, README "Fitted optics")."""
    psi0 = physics.probe_from_aberrations(
        static.window_px, settings.dk_invA, settings.energy_eV, settings.semiangle_mrad, settings.defocus_A,
        settings.aberrations._asdict(), settings.aperture_edge_px, static.aperture_supersample)
    if static.fit_taper_px > 0:
        psi0 = physics.taper_probe(psi0, static.fit_taper_px)
    return physics.mixed_state_probe(psi0, static.modes, settings.main_mode_fraction) * static.n_px


def _model_intensities(params: Params, static: StaticConfig, drv: Derived, positions):
    obj, _ = transmission(params, static)
    return forward.predict_intensities(obj, params.probe * drv.probe_unit, positions, drv.origin_yx_A, drv.dx_A,
                                       drv.propagator, static.n_px)


class Gates(NamedTuple):
    """Batched trials: which optional steps some running trial of the batch needs this iteration
    (not batched themselves, so a step no trial needs is skipped for the whole batch).

    constraints: (n_constraints,) bool in `recon.constraints.CONSTRAINTS` order; regularizers: () bool.
    """

    constraints: Any
    regularizers: Any


def batch_gates(state: EngineState, settings: Settings, active) -> Gates:
    """The gates of a batch from its stacked state and settings and the running trials `active` (K,)."""
    return Gates(constraints=cons_mod.batch_gates(settings.constraints, state.iteration, active),
                 regularizers=jnp.any(regularizers.any_on(settings.regularizers) & active))


def _loss(params: Params, static: StaticConfig, settings: Settings, data: EngineData, drv: Derived, idx, weights,
          gates: Gates | None = None):
    positions = drv.positions_A[idx] + params.offsets_A[idx]
    model = _model_intensities(params, static, drv, positions)
    per_pattern = noise.pattern_losses(static.noise_model, model, data.patterns[idx], data.mask,
                                       settings.noise_eps, data.mean_total, data.mean_pixel)
    data_term = jnp.sum(per_pattern * weights) / jnp.sum(weights)
    obj, phase = transmission(params, static)
    penalty = regularizers.penalty(obj, phase, params.probe / static.n_px, settings.regularizers,
                                   None if gates is None else gates.regularizers)
    return data_term + penalty, data_term


def _batches(key, static: StaticConfig):
    """Shuffled position indices (n_batches, B) and weights (0 for padding)."""
    total = static.n_batches * static.batch_size
    perm = jax.random.permutation(key, static.n_fit)
    padded = jnp.concatenate([perm, perm[: total - static.n_fit]]) if total > static.n_fit else perm
    weights = (jnp.arange(total) < static.n_fit).astype(jnp.float32)
    return padded.reshape(static.n_batches, static.batch_size), weights.reshape(static.n_batches, static.batch_size)


def _constraint_context(settings: Settings, drv: Derived) -> cons_mod.Context:
    return cons_mod.Context(probe_power=drv.probe_power, dx_A=drv.dx_A, dz_A=settings.slice_thickness_A,
                            dk_invA=settings.dk_invA, energy_eV=settings.energy_eV,
                            semiangle_mrad=settings.semiangle_mrad, aperture_edge_px=settings.aperture_edge_px)


def _gradient_pass(static: StaticConfig, state: EngineState, settings: Settings, data: EngineData, drv: Derived,
                   idx, w, gates: Gates | None = None):
    """One pass of optax steps over the mini-batches: (params, opt, damping, fitted, data terms (n_batches,))."""
    it = state.iteration
    rates = Groups(*(optim.learning_rate(spec, it, settings.iterations) for spec in settings.optimizers))
    if fit.fits_probe(static.fit):  # the probe follows the fitted optics, not its pixels
        rates = rates._replace(probe=jnp.zeros_like(rates.probe))

    def step(carry, batch):
        params, opt = carry
        (_, data_term), grads = jax.value_and_grad(_loss, has_aux=True)(
            params, static, settings, data, drv, batch[0], batch[1], gates)
        grads = jax.tree_util.tree_map(lambda g: jnp.conj(g) if jnp.iscomplexobj(g) else g, grads)  # Wirtinger
        new_params, new_opt = params, []
        for g, fields, opt_g, spec, rate in zip(OPTIMIZED, GROUP_FIELDS, opt, settings.optimizers, rates):
            current = _subset(params, fields)
            updates, state_g = _direction(static, settings, g).update(_subset(grads, fields), opt_g, current)
            on = it >= spec.start_iteration
            new_opt.append(jax.tree_util.tree_map(lambda a, b, on=on: jnp.where(on, a, b), state_g, opt_g))
            new_params = new_params._replace(**{k: current[k] - rate * updates[k].astype(current[k].dtype)
                                                for k in fields})
        return (new_params, Groups(*new_opt)), data_term

    (params, opt), data_terms = jax.lax.scan(step, (state.params, state.opt), (idx, w))
    return params, opt, state.damping, state.fitted, data_terms


def _probe_on(static: StaticConfig, state: EngineState, settings: Settings):
    """Non-gradient engines update the probe pixels from optimizers.probe.start_iteration, unless fitted."""
    return (state.iteration >= settings.optimizers.probe.start_iteration) & (not fit.fits_probe(static.fit))


def _batch_exit_fn(static: StaticConfig, drv: Derived, positions):
    """exit_fn(obj (S, Y, X), probe (M, W, W) counts^½) -> exit waves (B, M, W, W) at the positions (B, 2),
    with the windows' top-left pixels (B, 2) and sub-pixel remainders (B, 2)."""
    top_left, frac = forward.window_offsets(positions, drv.origin_yx_A, drv.dx_A, static.window_px)

    def exit_fn(obj, probe):
        windows = forward.extract_windows(obj, top_left, static.window_px)
        return forward.exit_waves(forward.shifted_probes(probe, frac), windows, drv.propagator)

    return exit_fn, top_left, frac


def _weighted_data_term(static: StaticConfig, settings: Settings, data: EngineData, model, idx, weights):
    per_pattern = noise.pattern_losses(static.noise_model, model, data.patterns[idx], data.mask,
                                       settings.noise_eps, data.mean_total, data.mean_pixel)
    return jnp.sum(per_pattern * weights) / jnp.sum(weights)


def _set_object(params: Params, old_obj, new_obj, static: StaticConfig) -> Params:
    """Params holding `new_obj`; amp_phase phases move by the phase change (never wrapped to ±π)."""
    if static.parameterization == "amp_phase":
        return params._replace(object_a=jnp.abs(new_obj),
                               object_b=params.object_b + jnp.angle(new_obj * jnp.conj(old_obj)))
    a, b = object_params(new_obj, static)
    return params._replace(object_a=a, object_b=b)


def _projection_pass(static: StaticConfig, state: EngineState, settings: Settings, data: EngineData, drv: Derived,
                     idx, w, gates: Gates | None = None):
    """ePIE, rPIE or LSQML over the mini-batches (see recon.epie, recon.lsqml)."""
    e = settings.engine
    probe_on = _probe_on(static, state, settings)
    support = epie.embed_patterns(data.mask[None], static.window_px)[0]
    eps = settings.noise_eps * data.mean_pixel
    offsets = state.params.offsets_A

    def step(carry, batch):
        obj, probe = carry
        b_idx, b_w = batch
        exit_fn, top_left, frac = _batch_exit_fn(static, drv, drv.positions_A[b_idx] + offsets[b_idx])
        measured = epie.embed_patterns(data.patterns[b_idx], static.window_px)
        d = epie.adjoint_directions(static.noise_model, exit_fn, obj, probe, measured, support, eps,
                                    forward.shifted_probes(probe, frac), top_left, b_w)
        data_term = _weighted_data_term(static, settings, data, forward.crop_farfield(d.intensity, static.n_px),
                                        b_idx, b_w)
        if static.engine == "lsqml":
            obj, probe = lsqml.lsqml_update(exit_fn, d, obj, probe, e.lsqml_step, e.lsqml_delta, probe_on, b_w)
        else:
            obj, probe = epie.pie_update(d, obj, probe, e.alpha, e.beta, static.engine == "rpie", probe_on)
        return (obj, probe), data_term

    obj0 = complex_object(state.params, static)
    (obj, probe), data_terms = jax.lax.scan(step, (obj0, state.params.probe * drv.probe_unit), (idx, w))
    params = _set_object(state.params, obj0, obj, static)._replace(probe=(probe / drv.probe_unit).astype(jnp.complex64))
    return params, state.opt, state.damping, state.fitted, data_terms


def _gauss_newton_pass(static: StaticConfig, state: EngineState, settings: Settings, data: EngineData, drv: Derived,
                       idx, w, gates: Gates | None = None):
    """One Levenberg-Marquardt step per mini-batch on the object and the probe (see recon.gauss_newton)."""
    on = jnp.where(_probe_on(static, state, settings), 1.0, 0.0)
    probe0 = state.params.probe

    def unpack(params: Params, x: dict) -> Params:
        probe = x["probe_re"] + 1j * x["probe_im"]
        return params._replace(object_a=x["object_a"], object_b=x["object_b"],
                               probe=(probe0 + on * (probe - probe0)).astype(jnp.complex64))

    def step(carry, batch):
        params, damping = carry
        b_idx, b_w = batch
        positions = drv.positions_A[b_idx] + params.offsets_A[b_idx]
        scale = jnp.sqrt(b_w)[:, None, None]

        def model(x):
            return _model_intensities(unpack(params, x), static, drv, positions)

        def residual_fn(x):
            return _residuals(static, settings, data, model(x), b_idx) * scale

        def change_fn(new, old):
            return jnp.sum(_loss_change(static, settings, data, model(new), model(old), b_idx) * b_w)

        data_term = _weighted_data_term(static, settings, data, _model_intensities(params, static, drv, positions),
                                        b_idx, b_w)
        x = {"object_a": params.object_a, "object_b": params.object_b,
             "probe_re": jnp.real(params.probe), "probe_im": jnp.imag(params.probe)}
        x, damping = gn.lm_step(residual_fn, change_fn, x, damping, settings.engine.cg_iterations)
        return (unpack(params, x), damping), data_term

    (params, damping), data_terms = jax.lax.scan(step, (state.params, state.damping), (idx, w))
    return params, state.opt, damping, state.fitted, data_terms


#: Each engine's pass over the mini-batches: (static, state, settings, data, drv, idx, w) ->
#: (params, opt, damping, fitted, data terms (n_batches,)).
_PASSES = {"gradient": _gradient_pass, "epie": _projection_pass, "rpie": _projection_pass,
           "lsqml": _projection_pass, "gauss_newton": _gauss_newton_pass}


def _ordered_batches(static: StaticConfig):
    """All fitted positions in order as (n_batches, B) indices and weights (0 for padding)."""
    total = static.n_batches * static.batch_size
    order = jnp.arange(total) % static.n_fit
    weights = (jnp.arange(total) < static.n_fit).astype(jnp.float32)
    return order.reshape(static.n_batches, static.batch_size), weights.reshape(static.n_batches, static.batch_size)


def _residuals(static: StaticConfig, settings: Settings, data: EngineData, model, idx):
    return gn.residuals(static.noise_model, model, data.patterns[idx], data.mask, settings.noise_eps, data.mean_pixel)


def _loss_change(static: StaticConfig, settings: Settings, data: EngineData, new, old, idx):
    """Per pattern (B,): the change of the data term that decides whether a Gauss-Newton step is kept.
    With fitted optics and Poisson noise, that of the floored likelihood (`gn.floored_poisson_change`): the
    frozen-weight change accepted steps that raised the negative log-likelihood."""
    if static.fit and static.noise_model == "poisson":
        return gn.floored_poisson_change(new, old, data.patterns[idx], data.mask, data.mean_pixel)
    return gn.loss_change(static.noise_model, new, old, data.patterns[idx], data.mask, settings.noise_eps,
                          data.mean_pixel)


def _joint_model_fn(static: StaticConfig, params: Params, settings: Settings, data: EngineData):
    """model(x, θ, idx) -> intensities (B, N, N) of the nuisance variables x (`_nuisance`) and the optics θ."""
    def model(x, theta, idx):
        probe = x["probe_re"] + 1j * x["probe_im"] if "probe_re" in x else params.probe
        p = params._replace(object_a=x["object_a"], object_b=x["object_b"], probe=probe.astype(jnp.complex64))
        s = fit.with_fitted(settings, static.fit, theta)
        drv = derive(s, data, static)
        p = p._replace(probe=optics_probe(s, static)) if fit.fits_probe(static.fit) else p
        return _model_intensities(p, static, drv, drv.positions_A[idx] + p.offsets_A[idx])

    return model


def _joint_residual_fn(static: StaticConfig, params: Params, settings: Settings, data: EngineData):
    """r(x, θ, idx) -> whitened residuals (B, N, N) of the nuisance variables x and the optics θ."""
    model = _joint_model_fn(static, params, settings, data)
    return lambda x, theta, idx: _residuals(static, settings, data, model(x, theta, idx), idx)


def _fit_residual_fn(static: StaticConfig, params: Params, settings: Settings, data: EngineData):
    """r(θ, idx) -> whitened residuals (B, N, N) with the object held fixed and the optics from θ."""
    joint = _joint_residual_fn(static, params, settings, data)
    x = _nuisance(params, static)
    return lambda theta, idx: joint(x, theta, idx)


def _fit_step(static: StaticConfig, params: Params, settings: Settings, data: EngineData, theta, damping, iteration):
    """(params, θ, λ) after one joint Gauss-Newton step on the fitted optics and the object over all fitted
    positions (see recon.fit); kept only if the data term decreases and the iteration has reached
    engine.fit_start.
    λ is divided by 3 after a kept step and multiplied by 10 after a rejected one."""
    idx, w = _ordered_batches(static)
    ne = fit.normal_equations(_fit_residual_fn(static, params, settings, data), theta, idx, w)
    joint = _joint_residual_fn(static, params, settings, data)
    x = _nuisance(params, static)
    reduced = fit.reduce_system(joint, x, theta, ne, idx, w, settings.engine.fit_cg_iterations, fit.STEP_RIDGE,
                                damping)
    new_theta, new_x = fit.joint_step(reduced, theta, x, damping)
    model = _joint_model_fn(static, params, settings, data)
    better = fit.total_change(lambda i: _loss_change(static, settings, data, model(new_x, new_theta, i),
                                                     model(x, theta, i), i), idx, w) < 0
    started = iteration >= settings.engine.fit_start
    keep = better & started
    theta = jnp.where(keep, new_theta, theta)
    x = jax.tree_util.tree_map(lambda a, b: jnp.where(keep, a, b), new_x, x)
    damping = jnp.where(started, jnp.clip(jnp.where(better, damping / 3.0, damping * 10.0), *gn.DAMPING_RANGE),
                        damping)
    probe = x["probe_re"] + 1j * x["probe_im"] if "probe_re" in x else params.probe
    return params._replace(object_a=x["object_a"], object_b=x["object_b"], probe=probe.astype(jnp.complex64)), \
        theta, damping


def make_iteration(static: StaticConfig) -> Callable[[EngineState, Settings, EngineData], tuple[EngineState, Stats]]:
    """iteration(state, settings, data[, gates]) -> (state, stats): one pass over all mini-batches.

    The pass is the plan's engine (`_PASSES`); constraints, fitted optics and statistics are shared.
    `gates` (batched trials): see `Gates`.
    """
    engine_pass = _PASSES[static.engine]

    def iteration(state: EngineState, settings: Settings, data: EngineData,
                  gates: Gates | None = None) -> tuple[EngineState, Stats]:
        settings = fit.with_fitted(settings, static.fit, state.fitted)
        drv = derive(settings, data, static)
        key, sub = jax.random.split(state.key)
        it = state.iteration
        idx, w = _batches(sub, static)
        params, opt, damping, fitted, data_terms = engine_pass(static, state, settings, data, drv, idx, w, gates)
        params = _from_amp_phase(cons_mod.apply_constraints(
            _to_amp_phase(params, static), settings.constraints, it, _constraint_context(settings, drv),
            None if gates is None else gates.constraints), static)
        fit_damping = state.fit_damping
        if static.fit:
            params, fitted, fit_damping = _fit_step(static, params, settings, data, fitted, state.fit_damping, it)
            if fit.fits_probe(static.fit):
                params = params._replace(probe=optics_probe(fit.with_fitted(settings, static.fit, fitted), static))
        obj, phase = transmission(params, static)
        regs = regularizers.regularizer_values(obj, phase, params.probe / static.n_px, settings.regularizers.tv_eps)
        data_loss = jnp.mean(data_terms)
        stats = Stats(loss=data_loss + regularizers.weighted_sum(regs, settings.regularizers),
                      data_loss=data_loss, regularizers=regs)
        return EngineState(params=params, opt=opt, iteration=it + 1, key=key, fitted=fitted, damping=damping,
                           fit_damping=fit_damping), stats

    return iteration


class Fitted(NamedTuple):
    """Fitted optics at the solution: values (P,) in plan units, standard errors (P,) from the Schur
    complement with the object (and free probe pixels), and those of θ alone (P,) for comparison."""

    values: Any
    stderr: Any
    stderr_restricted: Any


def _nuisance(params: Params, static: StaticConfig) -> dict:
    """The variables correlated with the fitted optics: the object, and the probe pixels unless fitted."""
    x = {"object_a": params.object_a, "object_b": params.object_b}
    if not fit.fits_probe(static.fit):
        x.update(probe_re=jnp.real(params.probe), probe_im=jnp.imag(params.probe))
    return x


def make_fisher(static: StaticConfig) -> Callable[[EngineState, Settings, EngineData], Fitted]:
    """fisher(state, settings, data) -> Fitted: errors from the Fisher information (see recon.fit)."""
    def fisher(state: EngineState, settings: Settings, data: EngineData) -> Fitted:
        idx, w = _ordered_batches(static)
        ne = fit.normal_equations(_fit_residual_fn(static, state.params, settings, data), state.fitted, idx, w)
        schur = fit.reduce_system(_joint_residual_fn(static, state.params, settings, data),
                                  _nuisance(state.params, static), state.fitted, ne, idx, w).schur
        return Fitted(values=state.fitted, stderr=fit.standard_errors(static.noise_model, ne, schur),
                      stderr_restricted=fit.standard_errors(static.noise_model, ne))

    return fisher


def make_heldout(static: StaticConfig) -> Callable[[EngineState, Settings, EngineData], Any]:
    """heldout(state, settings, data) -> mean noise-model loss on the held-out positions."""
    def heldout(state: EngineState, settings: Settings, data: EngineData):
        settings = fit.with_fitted(settings, static.fit, state.fitted)
        drv = derive(settings, data, static)
        model = _model_intensities(state.params, static, drv, drv.heldout_positions_A)
        losses = noise.pattern_losses(static.noise_model, model, data.heldout_patterns, data.mask,
                                      settings.noise_eps, data.mean_total, data.mean_pixel)
        return jnp.mean(losses)

    return heldout


class Outputs(NamedTuple):
    """What a result keeps: object (S, Y, X) c64, probe (M, W, W) c64 in counts^½, fitted positions
    (n_fit, 2) and held-out positions (n_heldout, 2) in Å, dx_A () and origin_yx_A (2,)."""

    object: Any
    probe: Any
    positions_yx_A: Any
    heldout_positions_yx_A: Any
    dx_A: Any
    origin_yx_A: Any


def make_outputs(static: StaticConfig) -> Callable[[EngineState, Settings, EngineData], Outputs]:
    """outputs(state, settings, data) -> Outputs."""
    def outputs(state: EngineState, settings: Settings, data: EngineData) -> Outputs:
        settings = fit.with_fitted(settings, static.fit, state.fitted)
        drv = derive(settings, data, static)
        obj, _ = transmission(state.params, static)
        return Outputs(object=obj.astype(jnp.complex64),
                       probe=(state.params.probe * drv.probe_unit).astype(jnp.complex64),
                       positions_yx_A=drv.positions_A + state.params.offsets_A,
                       heldout_positions_yx_A=drv.heldout_positions_A, dx_A=drv.dx_A, origin_yx_A=drv.origin_yx_A)

    return outputs


# --------------------------------------------------------------------------- batched programs


def keep_where(active, new, old):
    """Per trial: the new pytree's value where `active` (K,) is true, else the old one's."""
    active = jnp.asarray(active)

    def pick(a, b):
        return jnp.where(active.reshape((-1,) + (1,) * (a.ndim - 1)), a, b)

    return jax.tree_util.tree_map(pick, new, old)


def make_batched(name: str, static: StaticConfig) -> Callable:
    """The program `name` over a leading trial axis K of settings and state (data shared).

    `iteration` takes a fourth argument `active` (K,) bool: inactive trials (pruned, failed or done)
    keep their state unchanged, so one program serves a batch whose trials end at different times.
    Constraints and regularisers that no running trial needs are skipped for the whole batch (`Gates`).
    """
    single = _MAKERS[name](static)
    if name == "init":
        return jax.vmap(single, in_axes=(0, None))
    if name == "iteration":
        vmapped = jax.vmap(single, in_axes=(0, 0, None, None))

        def iteration(state, settings, data, active):
            new_state, stats = vmapped(state, settings, data, batch_gates(state, settings, active))
            return keep_where(active, new_state, state), stats

        return iteration
    return jax.vmap(single, in_axes=(0, 0, None))


# --------------------------------------------------------------------------- compilation cache

_MAKERS: dict[str, Callable[[StaticConfig], Callable]] = {
    "init": make_init, "iteration": make_iteration, "heldout": make_heldout, "outputs": make_outputs,
    "fisher": make_fisher}
_COMPILED: dict[tuple, Any] = {}
_COMPILE_LOCK = threading.Lock()


def _signature(tree) -> tuple:
    leaves, treedef = jax.tree_util.tree_flatten(tree)
    return treedef, tuple((np.shape(x), np.asarray(x).dtype.str) for x in leaves)


def compiled(name: str, static: StaticConfig, *args, batched: bool = False) -> tuple[Any, float]:
    """The compiled program `name` for these argument shapes, and seconds spent compiling (0 if cached).

    `batched=True`: the program over a leading trial axis (see `make_batched`).
    """
    key = (name, batched, static, _signature(args))
    with _COMPILE_LOCK:
        if key in _COMPILED:
            return _COMPILED[key], 0.0
        t0 = time.perf_counter()
        fn = make_batched(name, static) if batched else _MAKERS[name](static)
        program = jax.jit(fn).lower(*args).compile()
        _COMPILED[key] = program
        return program, time.perf_counter() - t0


def compile_count() -> int:
    """Programs compiled (or loaded from the persistent cache) in this process."""
    return len(_COMPILED)


# --------------------------------------------------------------------------- trials per batch

#: Trials per batch on a CPU for study.trials_per_batch = auto: benchmarks/trial_throughput.py shows
#: batching slower per trial on CPUs (vmapped window gathers and gradient scatters cost more than
#: the launches they save), so CPUs run one trial at a time.
CPU_TRIALS_PER_BATCH = 1
#: Most trials one program batches, and the share of free device memory a batch may fill.
MAX_TRIALS_PER_BATCH = 64
MEMORY_FRACTION = 0.7


def free_device_bytes(device: Any | None = None) -> int | None:
    """Free memory of an accelerator in bytes; None on a CPU or when the device does not report it."""
    device = device or jax.devices()[0]
    stats = device.memory_stats() if device.platform != "cpu" else None
    if not stats or "bytes_limit" not in stats:
        return None
    return int(stats["bytes_limit"] - stats.get("bytes_in_use", 0))


def auto_trials_per_batch(trial_bytes: int, shared_bytes: int, device: Any | None = None) -> int:
    """K for study.trials_per_batch = auto: as many trials as fit in the accelerator's free memory
    (after the shared data), at most MAX_TRIALS_PER_BATCH; CPU_TRIALS_PER_BATCH on a CPU or when
    the device does not report its memory."""
    free = free_device_bytes(device)
    if free is None:
        return CPU_TRIALS_PER_BATCH
    return int(max(1, min(MAX_TRIALS_PER_BATCH, MEMORY_FRACTION * (free - shared_bytes) // max(trial_bytes, 1))))


def is_out_of_memory(err: BaseException) -> bool:
    """True for XLA's out-of-device-memory errors (the batch should be split)."""
    text = f"{type(err).__name__}: {err}"
    return "RESOURCE_EXHAUSTED" in text or "Out of memory" in text or "out of memory" in text
