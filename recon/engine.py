"""The compiled reconstruction engine.

A plan splits into a hashable `StaticConfig` (shapes and named choices: what a compiled program
depends on) and a `settings` pytree of float32/int32 arrays (every number a study may tune). The
programs `init`, `iteration` and `heldout` are pure functions of (settings, data[, state]); they are
compiled once per StaticConfig with jax.jit's ahead-of-time API and reused for every plan that
shares it. One call of `iteration` runs every mini-batch of one pass over the data (lax.scan,
reshuffled each pass) and then the constraints, with no host synchronisation inside.
"""
from __future__ import annotations

import os
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

from . import constraints as cons_mod
from . import forward, noise, optim, physics, regularizers
from .plan import Plan, PlanError

# --------------------------------------------------------------------------- static configuration


@dataclass(frozen=True)
class StaticConfig:
    """Everything a compiled program depends on besides array values."""

    n_px: int
    n_fit: int
    n_heldout: int
    batch_size: int
    n_batches: int
    modes: int
    slices: int
    object_shape: tuple[int, int]
    noise_model: str
    parameterization: str
    optimizers: tuple[str, str, str]
    aperture_supersample: int = 3
    object_supersample: int = 1

    @property
    def window_px(self) -> int:
        """Probe window on the object grid: the detector size × object supersampling."""
        return self.n_px * self.object_supersample


OPTIMIZED = ("object", "probe", "positions")
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


# --------------------------------------------------------------------------- settings from a plan


def _f32(v) -> np.ndarray:
    return np.asarray(v, dtype=np.float32)


def _i32(v) -> np.ndarray:
    return np.asarray(v, dtype=np.int32)


def _optimizer_settings(spec) -> dict:
    return {
        "learning_rate": _f32(spec.learning_rate),
        "start_iteration": _i32(spec.start_iteration),
        "schedule_id": _i32(optim.SCHEDULES.index(spec.schedule)),
        "decay_rate": _f32(spec.decay_rate),
        "warmup_iterations": _f32(spec.warmup_iterations),
        "final_fraction": _f32(spec.final_fraction),
        "momentum": _f32(spec.momentum),
    }


def _schedule_settings(c) -> dict:
    extra = {k: _f32(v) for k, v in c.model_dump().items() if k not in ("enabled", "start", "step", "end")}
    return {"enabled": _i32(c.enabled), "start": _i32(c.start), "step": _i32(c.step),
            "end": _i32(cons_mod.NEVER if c.end is None else c.end), **extra}


def build_settings(plan: Plan, optics: "Optics") -> dict:
    """The traced settings pytree of a plan: every tunable number as a float32/int32 array."""
    ab = plan.probe.aberrations.model_dump()
    aberrations = {k.replace("_A", "").replace("_deg", ""): _f32(v) for k, v in ab.items()}
    return {
        "iterations": _i32(plan.iterations),
        "energy_eV": _f32(optics.energy_eV),
        "semiangle_mrad": _f32(optics.semiangle_mrad),
        "defocus_A": _f32(optics.defocus_A),
        "aberrations": aberrations,
        "aperture_edge_px": _f32(plan.probe.aperture_edge_px if plan.probe.aperture == "soft" else 0.0),
        "main_mode_fraction": _f32(plan.probe.main_mode_fraction),
        "tilt_mrad": _f32(plan.probe.tilt_mrad),
        "dk_invA": _f32(optics.dk_invA),
        "scan_step_A": _f32(optics.scan_step_A),
        "rotation_deg": _f32(plan.scan.rotation_deg),
        "affine": _f32(plan.scan.affine),
        "slice_thickness_A": _f32(optics.slice_thickness_A),
        "band_limit": _f32(plan.object.band_limit),
        "init_amplitude": _f32(plan.object.init_amplitude),
        "init_phase_rad": _f32(plan.object.init_phase_rad),
        "noise_eps": _f32(plan.noise_model.eps),
        "optimizers": {name: _optimizer_settings(getattr(plan.optimizers, name)) for name in OPTIMIZED},
        "regularizers": {k: _f32(v) for k, v in plan.regularizers.model_dump().items()},
        "constraints": {name: _schedule_settings(getattr(plan.constraints, name)) for name in cons_mod.CONSTRAINTS},
        "seed": _i32(plan.seed),
    }


@dataclass(frozen=True)
class Optics:
    """Optical and calibration values of a plan, with nulls filled from the dataset."""

    energy_eV: float
    semiangle_mrad: float
    defocus_A: float
    dk_invA: float
    scan_step_A: float
    slice_thickness_A: float


def resolve_optics(plan: Plan, dataset) -> Optics:
    """Fill every null optical value of the plan from the dataset, or fail naming the key."""
    def pick(plan_value, data_value, key):
        value = plan_value if plan_value is not None else data_value
        if value is None:
            raise PlanError(f"{dataset.source}: {key} is not in the data file; set it in the plan")
        return float(value)

    slices = plan.object.slices
    thickness = plan.object.slice_thickness_A
    if thickness is None:
        total = dataset.total_thickness_A
        thickness = total / slices if total else (1.0 if slices == 1 else None)
    return Optics(
        energy_eV=pick(plan.probe.energy_eV, dataset.energy_eV, "probe.energy_eV"),
        semiangle_mrad=pick(plan.probe.semiangle_mrad, dataset.semiangle_mrad, "probe.semiangle_mrad"),
        defocus_A=pick(plan.probe.defocus_A, dataset.defocus_A, "probe.defocus_A"),
        dk_invA=pick(plan.detector.dk_invA, dataset.dk_invA, "detector.dk_invA"),
        scan_step_A=pick(plan.scan.step_A, dataset.scan_step_A, "scan.step_A"),
        slice_thickness_A=pick(thickness, None, "object.slice_thickness_A"),
    )


def object_shape_px(positions_yx_A: np.ndarray, dx_A: float, n_px: int, margin_px: int) -> tuple[int, int]:
    """Object size covering every probe window for any scan rotation and a ±15 % step change.

    Rounded up to a multiple of 16 so that small calibration changes keep the same shape.
    """
    centred = positions_yx_A - positions_yx_A.mean(axis=0)
    diameter_px = 2.0 * 1.15 * np.max(np.hypot(centred[:, 0], centred[:, 1])) / dx_A
    size = int(np.ceil((diameter_px + n_px + 2 * margin_px + 2) / 16.0) * 16)
    return size, size


# --------------------------------------------------------------------------- data on the device


def build_data(dataset, fit: np.ndarray, heldout: np.ndarray, nominal_step_A: float) -> dict:
    """Arrays the compiled programs read (passed as arguments, never baked in as constants)."""
    patterns = dataset.patterns
    n_px = patterns.shape[-1]
    mask = dataset.detector_mask if dataset.detector_mask is not None else np.ones((n_px, n_px), np.float32)
    totals = (patterns[fit] * mask).sum(axis=(-2, -1))
    return {
        "patterns": _f32(patterns[fit]),
        "positions_A": _f32(dataset.positions_yx_A[fit]),
        "heldout_patterns": _f32(patterns[heldout]),
        "heldout_positions_A": _f32(dataset.positions_yx_A[heldout]),
        "centroid_A": _f32(dataset.positions_yx_A.mean(axis=0)),
        "nominal_step_A": _f32(nominal_step_A),
        "mask": _f32(mask),
        "mean_total": _f32(max(float(totals.mean()), 1e-30)),
        "mean_pixel": _f32(max(float(totals.mean()) / mask.sum(), 1e-30)),
    }


# --------------------------------------------------------------------------- derived quantities


def scan_positions(positions_A, settings, data):
    """Positions after scan step, affine and rotation about the scan centroid (n, 2) Å.

    Rotation is counter-clockwise as displayed with y pointing down.
    """
    c = data["centroid_A"]
    d = (positions_A - c) * (settings["scan_step_A"] / data["nominal_step_A"])
    a = settings["affine"].reshape(2, 2)
    d = d @ a.T
    t = jnp.deg2rad(settings["rotation_deg"])
    rot = jnp.array([[jnp.cos(t), -jnp.sin(t)], [jnp.sin(t), jnp.cos(t)]])
    return c + d @ rot.T


def derive(settings, data, static: StaticConfig) -> dict:
    """Quantities computed from traced settings once per program call."""
    n = static.window_px
    dx = 1.0 / (n * settings["dk_invA"])
    lam = physics.wavelength_A(settings["energy_eV"])
    ny, nx = static.object_shape
    origin = data["centroid_A"] - dx * jnp.array([ny / 2.0, nx / 2.0])
    return {
        "dx_A": dx,
        "origin_yx_A": origin,
        "propagator": forward.fresnel_propagator(n, settings["dk_invA"], lam, settings["slice_thickness_A"],
                                                 settings["tilt_mrad"], settings["band_limit"]),
        "positions_A": scan_positions(data["positions_A"], settings, data),
        "heldout_positions_A": scan_positions(data["heldout_positions_A"], settings, data),
        "probe_unit": probe_unit(data),
        "probe_power": jnp.asarray(float(static.n_px**2), jnp.float32),
    }


# --------------------------------------------------------------------------- parameters


def complex_object(params, static: StaticConfig):
    """The complex transmission (S, Y, X) held by the optimised object parameters."""
    if static.parameterization == "amp_phase":
        return params["amp"] * jnp.exp(1j * params["phase"])
    return params["obj_re"] + 1j * params["obj_im"]


def object_params(obj, static: StaticConfig) -> dict:
    """The object parameters of a complex transmission (the inverse of complex_object)."""
    if static.parameterization == "amp_phase":
        return {"amp": jnp.abs(obj), "phase": jnp.angle(obj)}
    return {"obj_re": jnp.real(obj), "obj_im": jnp.imag(obj)}


def transmission(params, static: StaticConfig):
    """Complex transmission (S, Y, X) and its phase from the optimised object parameters."""
    obj = complex_object(params, static)
    return obj, params["phase"] if static.parameterization == "amp_phase" else jnp.angle(obj)


def _to_amp_phase(params, static):
    if static.parameterization == "amp_phase":
        return params
    obj = complex_object(params, static)
    rest = {k: v for k, v in params.items() if k not in ("obj_re", "obj_im")}
    return {**rest, "amp": jnp.abs(obj), "phase": jnp.angle(obj)}


def _from_amp_phase(params, static):
    if static.parameterization == "amp_phase":
        return params
    rest = {k: v for k, v in params.items() if k not in ("amp", "phase")}
    return {**rest, **object_params(params["amp"] * jnp.exp(1j * params["phase"]), static)}


def probe_unit(data):
    """Probe parameters are stored in units of √(mean pixel intensity)."""
    return jnp.sqrt(data["mean_pixel"])


def _object_keys(static):
    return ("amp", "phase") if static.parameterization == "amp_phase" else ("obj_re", "obj_im")


def _groups(static):
    """Which parameter arrays each optimiser updates."""
    return {"object": _object_keys(static), "probe": ("probe",), "positions": ("offsets",)}


# --------------------------------------------------------------------------- programs


def make_init(static: StaticConfig) -> Callable:
    """init(settings, data) -> state: object, probe from the optics, zero position offsets."""
    def init(settings, data):
        shape = (static.slices, *static.object_shape)
        amp = jnp.full(shape, settings["init_amplitude"], jnp.float32)
        phase = jnp.full(shape, settings["init_phase_rad"], jnp.float32)
        psi0 = physics.probe_from_aberrations(
            static.window_px, settings["dk_invA"], settings["energy_eV"], settings["semiangle_mrad"],
            settings["defocus_A"], settings["aberrations"], settings["aperture_edge_px"], static.aperture_supersample)
        probe = physics.mixed_state_probe(psi0, static.modes, settings["main_mode_fraction"]) * static.n_px
        params = _from_amp_phase({"amp": amp, "phase": phase, "probe": probe,
                                  "offsets": jnp.zeros((static.n_fit, 2), jnp.float32)}, static)
        opt_states = {g: _direction(static, settings, g).init({k: params[k] for k in keys})
                      for g, keys in _groups(static).items()}
        return {"params": params, "opt": opt_states, "iteration": jnp.zeros((), jnp.int32),
                "key": jax.random.PRNGKey(settings["seed"])}

    return init


def _direction(static, settings, group):
    name = static.optimizers[OPTIMIZED.index(group)]
    return optim.direction(name, settings["optimizers"][group]["momentum"])


def _model_intensities(params, static, drv, positions):
    obj, _ = transmission(params, static)
    probe = params["probe"] * drv["probe_unit"]
    return forward.predict_intensities(obj, probe, positions, drv["origin_yx_A"], drv["dx_A"], drv["propagator"],
                                       static.n_px)


def _loss(params, static, settings, data, drv, idx, weights):
    positions = drv["positions_A"][idx] + params["offsets"][idx]
    model = _model_intensities(params, static, drv, positions)
    per_pattern = noise.pattern_losses(static.noise_model, model, data["patterns"][idx], data["mask"],
                                       settings["noise_eps"], data["mean_total"], data["mean_pixel"])
    data_term = jnp.sum(per_pattern * weights) / jnp.sum(weights)
    obj, phase = transmission(params, static)
    return data_term + regularizers.penalty(obj, phase, params["probe"] / static.n_px, settings["regularizers"]), data_term


def _batches(key, static: StaticConfig):
    """Shuffled position indices (n_batches, B) and weights (0 for padding)."""
    total = static.n_batches * static.batch_size
    perm = jax.random.permutation(key, static.n_fit)
    padded = jnp.concatenate([perm, perm[: total - static.n_fit]]) if total > static.n_fit else perm
    weights = (jnp.arange(total) < static.n_fit).astype(jnp.float32)
    return padded.reshape(static.n_batches, static.batch_size), weights.reshape(static.n_batches, static.batch_size)


def make_iteration(static: StaticConfig) -> Callable:
    """iteration(state, settings, data) -> (state, stats): one pass over all mini-batches."""
    groups = _groups(static)

    def iteration(state, settings, data):
        drv = derive(settings, data, static)
        key, sub = jax.random.split(state["key"])
        it = state["iteration"]
        idx, w = _batches(sub, static)
        rates = {g: optim.learning_rate(settings["optimizers"][g], it, settings["iterations"]) for g in OPTIMIZED}

        def step(carry, batch):
            params, opt = carry
            (_, data_term), grads = jax.value_and_grad(_loss, has_aux=True)(
                params, static, settings, data, drv, batch[0], batch[1])
            grads = {k: jnp.conj(g) if jnp.iscomplexobj(g) else g for k, g in grads.items()}  # Wirtinger
            new_params, new_opt = dict(params), dict(opt)
            for g, keys in groups.items():
                sub_grads = {k: grads[k] for k in keys}
                updates, state_g = _direction(static, settings, g).update(sub_grads, opt[g], {k: params[k] for k in keys})
                on = it >= settings["optimizers"][g]["start_iteration"]
                new_opt[g] = jax.tree_util.tree_map(lambda a, b, on=on: jnp.where(on, a, b), state_g, opt[g])
                for k in keys:
                    new_params[k] = params[k] - rates[g] * updates[k].astype(params[k].dtype)
            return (new_params, new_opt), data_term

        (params, opt), data_terms = jax.lax.scan(step, (state["params"], state["opt"]), (idx, w))
        ctx = {"probe_power": drv["probe_power"], "dx_A": drv["dx_A"], "dz_A": settings["slice_thickness_A"],
               "dk_invA": settings["dk_invA"], "energy_eV": settings["energy_eV"],
               "semiangle_mrad": settings["semiangle_mrad"], "aperture_edge_px": settings["aperture_edge_px"]}
        params = _from_amp_phase(cons_mod.apply_constraints(_to_amp_phase(params, static), settings["constraints"],
                                                            it, ctx), static)
        obj, phase = transmission(params, static)
        regs = regularizers.regularizer_values(obj, phase, params["probe"] / static.n_px,
                                               settings["regularizers"]["tv_eps"])
        data_loss = jnp.mean(data_terms)
        stats = {"loss": data_loss + regularizers.weighted_sum(regs, settings["regularizers"]),
                 "data_loss": data_loss, **{f"reg_{k}": v for k, v in regs.items()}}
        return {"params": params, "opt": opt, "iteration": it + 1, "key": key}, stats

    return iteration


def make_heldout(static: StaticConfig) -> Callable:
    """heldout(state, settings, data) -> mean noise-model loss on the held-out positions."""
    def heldout(state, settings, data):
        drv = derive(settings, data, static)
        model = _model_intensities(state["params"], static, drv, drv["heldout_positions_A"])
        losses = noise.pattern_losses(static.noise_model, model, data["heldout_patterns"], data["mask"],
                                      settings["noise_eps"], data["mean_total"], data["mean_pixel"])
        return jnp.mean(losses)

    return heldout


def make_outputs(static: StaticConfig) -> Callable:
    """outputs(state, settings, data) -> object (S, Y, X), probe (M, N, N), positions, dx, origin."""
    def outputs(state, settings, data):
        drv = derive(settings, data, static)
        obj, _ = transmission(state["params"], static)
        return {"object": obj.astype(jnp.complex64),
                "probe": (state["params"]["probe"] * drv["probe_unit"]).astype(jnp.complex64),
                "positions_yx_A": drv["positions_A"] + state["params"]["offsets"],
                "heldout_positions_yx_A": drv["heldout_positions_A"],
                "dx_A": drv["dx_A"], "origin_yx_A": drv["origin_yx_A"]}

    return outputs


# --------------------------------------------------------------------------- compilation cache

_MAKERS = {"init": make_init, "iteration": make_iteration, "heldout": make_heldout, "outputs": make_outputs}
_COMPILED: dict[tuple, Any] = {}
_COMPILE_LOCK = threading.Lock()


def _signature(tree) -> tuple:
    leaves, treedef = jax.tree_util.tree_flatten(tree)
    return treedef, tuple((np.shape(x), np.asarray(x).dtype.str) for x in leaves)


def compiled(name: str, static: StaticConfig, *args) -> tuple[Any, float]:
    """The compiled program `name` for these argument shapes, and seconds spent compiling (0 if cached)."""
    key = (name, static, _signature(args))
    with _COMPILE_LOCK:
        if key in _COMPILED:
            return _COMPILED[key], 0.0
        t0 = time.perf_counter()
        program = jax.jit(_MAKERS[name](static)).lower(*args).compile()
        _COMPILED[key] = program
        return program, time.perf_counter() - t0


def compile_count() -> int:
    """Programs compiled (or loaded from the persistent cache) in this process."""
    return len(_COMPILED)
