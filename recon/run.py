"""Running a plan: prepare, compile (once per shape), iterate, and collect a Result."""
from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

from . import engine, physics
from .data import Dataset, heldout_indices, load_dataset
from .plan import Plan, PlanError
from .result import Result


@dataclass(frozen=True)
class Prepared:
    """A plan bound to its data: the static configuration, traced settings and device arrays."""

    plan: Plan
    optics: engine.Optics
    static: engine.StaticConfig
    settings: dict
    data: dict
    fit_indices: np.ndarray
    heldout_indices: np.ndarray


def prepare(plan: Plan, dataset: Dataset) -> Prepared:
    """Split a plan into what is compiled (shapes, choices) and what is traced (every number)."""
    optics = engine.resolve_optics(plan, dataset)
    n = len(dataset.patterns)
    heldout = heldout_indices(n, plan.data.heldout_fraction, plan.data.heldout_seed)
    fit = np.setdiff1d(np.arange(n), heldout)
    n_px = dataset.n_px
    batch = min(plan.batch_size, len(fit))
    s = plan.object.supersample
    dx = 1.0 / (s * n_px * optics.dk_invA)
    shape = plan.object.size_px or engine.object_shape_px(dataset.positions_yx_A, dx, s * n_px, s * plan.object.margin_px)
    static = engine.StaticConfig(
        n_px=n_px, n_fit=len(fit), n_heldout=len(heldout), batch_size=batch, n_batches=math.ceil(len(fit) / batch),
        modes=plan.probe.modes, slices=plan.object.slices, object_shape=tuple(shape),
        noise_model=plan.noise_model.name, parameterization=plan.object.parameterization,
        optimizers=tuple(getattr(plan.optimizers, g).name for g in engine.OPTIMIZED),
        aperture_supersample=plan.probe.aperture_supersample, object_supersample=s)
    nominal_step = dataset.scan_step_A if dataset.scan_step_A is not None else optics.scan_step_A
    return Prepared(plan, optics, static, engine.build_settings(plan, optics),
                    engine.build_data(dataset, fit, heldout, nominal_step), fit, heldout)


@dataclass(frozen=True)
class Progress:
    """What a callback sees after each iteration."""

    iteration: int
    loss: float
    data_loss: float
    dx_A: float
    origin_yx_A: tuple[float, float]
    _fetch_object: Callable[[], np.ndarray]

    def object(self) -> np.ndarray:
        """Current object transmission (slices, y, x), complex64 (copied from the device)."""
        return self._fetch_object()


def _resume_state(state, previous: Result, prep: Prepared):
    """Start from a saved result's object, probe and position corrections."""
    params = dict(state["params"])
    if previous.object.shape != (prep.static.slices, *prep.static.object_shape):
        raise PlanError(f"resume: object shape {previous.object.shape} does not match the plan's "
                        f"{(prep.static.slices, *prep.static.object_shape)}")
    if previous.probe.shape != (prep.static.modes, prep.static.window_px, prep.static.window_px):
        raise PlanError(f"resume: probe shape {previous.probe.shape} does not match the plan")
    params.update(engine.object_params(jnp.asarray(previous.object), prep.static))
    params["probe"] = jnp.asarray(previous.probe / engine.probe_unit(prep.data), jnp.complex64)
    if len(previous.positions_yx_A) == len(prep.heldout_indices) + prep.static.n_fit:
        nominal = np.asarray(engine.scan_positions(prep.data["positions_A"], prep.settings, prep.data))
        params["offsets"] = jnp.asarray(previous.positions_yx_A[prep.fit_indices] - nominal, jnp.float32)
    return {**state, "params": params, "iteration": jnp.asarray(previous.iterations_done, jnp.int32)}


def reconstruct(plan: Plan, dataset: Dataset | None = None, callback: Callable[[Progress], bool | None] | None = None,
                resume: Result | None = None) -> Result:
    """Run `plan` and return its Result; never raises for a diverging loss (see Result.diverged).

    `callback(progress)` runs after every iteration; returning False stops the run.
    `resume` continues from a saved result (object, probe and positions; optimiser moments restart).
    """
    engine.enable_persistent_cache()
    dataset = dataset if dataset is not None else load_dataset(plan.data)
    prep = prepare(plan, dataset)
    static, settings, data = prep.static, prep.settings, prep.data
    init, t_init = engine.compiled("init", static, settings, data)
    state = init(settings, data)
    if resume is not None:
        state = _resume_state(state, resume, prep)
    step, t_step = engine.compiled("iteration", static, state, settings, data)
    outputs, t_out = engine.compiled("outputs", static, state, settings, data)
    compile_s = t_init + t_step + t_out

    history: dict[str, list[float]] = {}
    first_loss = None
    stop_reason, diverged = "completed", False
    start_iteration = int(state["iteration"])
    run_t0 = time.perf_counter()
    for _ in range(start_iteration, plan.iterations):
        t0 = time.perf_counter()
        new_state, stats = step(state, settings, data)
        stats = {k: float(v) for k, v in jax.device_get(stats).items()}
        elapsed = time.perf_counter() - t0
        loss = stats["loss"]
        first_loss = loss if first_loss is None else first_loss
        if not math.isfinite(loss) or loss > abs(first_loss) * plan.divergence_factor:
            diverged = True
            stop_reason = f"diverged: loss {loss:.3g} at iteration {int(new_state['iteration'])}"
            break
        state = new_state
        for k, v in {**stats, "time_s": elapsed}.items():
            history.setdefault(k, []).append(v)
        if callback is not None:
            progress = _progress(state, stats, prep, outputs)
            if callback(progress) is False:
                stop_reason = f"stopped by callback at iteration {progress.iteration}"
                break
    run_s = time.perf_counter() - run_t0

    heldout_loss = float("nan")
    if static.n_heldout:
        heldout, t_held = engine.compiled("heldout", static, state, settings, data)
        compile_s += t_held
        heldout_loss = float(heldout(state, settings, data))
    out = jax.device_get(outputs(state, settings, data))
    positions = np.zeros((len(prep.fit_indices) + len(prep.heldout_indices), 2))
    positions[prep.fit_indices] = out["positions_yx_A"]
    positions[prep.heldout_indices] = out["heldout_positions_yx_A"]
    hist = {k: np.asarray(v) for k, v in history.items()}
    return Result(
        object=np.asarray(out["object"]), probe=np.asarray(out["probe"]), positions_yx_A=positions,
        dx_A=float(out["dx_A"]), origin_yx_A=tuple(float(v) for v in out["origin_yx_A"]), plan=plan,
        history=hist, slice_thickness_A=prep.optics.slice_thickness_A, energy_eV=prep.optics.energy_eV,
        sigma_rad_per_VA=float(physics.sigma_rad_per_VA(prep.optics.energy_eV)),
        iterations_done=int(state["iteration"]), diverged=diverged,
        converged=not diverged and _flat(hist.get("loss")), stop_reason=stop_reason,
        heldout_indices=prep.heldout_indices, heldout_loss=heldout_loss,
        final_data_loss=float(hist["data_loss"][-1]) if "data_loss" in hist else float("nan"),
        compile_s=compile_s, run_s=run_s)


def _flat(loss: np.ndarray | None, window: int = 5, tolerance: float = 0.01) -> bool:
    """Converged: the loss changed by less than `tolerance` (relative) over the last iterations."""
    if loss is None or len(loss) <= window:
        return False
    return bool(abs(loss[-1] - loss[-1 - window]) <= tolerance * abs(loss[-1 - window]))


def _progress(state, stats, prep: Prepared, outputs) -> Progress:
    cache: dict[str, np.ndarray] = {}

    def fetch():
        if "object" not in cache:
            cache.update(jax.device_get(outputs(state, prep.settings, prep.data)))
        return np.asarray(cache["object"])

    dx = 1.0 / (prep.static.window_px * float(prep.settings["dk_invA"]))
    origin = prep.data["centroid_A"] - dx * np.asarray(prep.static.object_shape) / 2.0
    return Progress(iteration=int(state["iteration"]), loss=stats["loss"], data_loss=stats["data_loss"],
                    dx_A=dx, origin_yx_A=tuple(float(v) for v in origin), _fetch_object=fetch)
