"""Running plans: lower, compile (once per shape), iterate, and collect Results.

`reconstruct(plan)` runs one plan. `reconstruct_batch(plans)` runs K plans that share a
`StaticConfig` as one vmapped program over one copy of the data; each trial keeps its own
history, callback (pruning), divergence check and Result, exactly as if it ran alone.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from . import engine, physics
from .data import Dataset, load_dataset
from .lower import Lowered, ObjectGrid, lower, lower_batch
from .plan import Plan, PlanError
from .result import Result
from .state import EngineState, to_numpy

Callback = Callable[["Progress"], "bool | None"]


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


@dataclass
class _Track:
    """The host-side bookkeeping of one reconstruction: history, stop reason, divergence."""

    plan: Plan
    callback: Callback | None
    history: dict[str, list[float]] = field(default_factory=dict)
    first_loss: float | None = None
    stop_reason: str = "completed"
    diverged: bool = False
    active: bool = True

    def record(self, stats: dict[str, float], elapsed_s: float, iteration: int) -> bool:
        """Check the new loss and append it; False (and inactive) when the run diverged."""
        loss = stats["loss"]
        self.first_loss = loss if self.first_loss is None else self.first_loss
        if not math.isfinite(loss) or loss > abs(self.first_loss) * self.plan.divergence_factor:
            self.diverged, self.active = True, False
            self.stop_reason = f"diverged: loss {loss:.3g} at iteration {iteration}"
            return False
        for k, v in {**stats, "time_s": elapsed_s}.items():
            self.history.setdefault(k, []).append(v)
        return True

    def notify(self, progress: Progress) -> None:
        """Run the callback; it may stop this reconstruction."""
        if self.callback is not None and self.callback(progress) is False:
            self.stop_reason = f"stopped by callback at iteration {progress.iteration}"
            self.active = False

    def finish(self, iterations_done: int) -> None:
        if self.active and iterations_done >= self.plan.iterations:
            self.active = False


def resume_state(state: EngineState, previous: Result, low: Lowered) -> EngineState:
    """Start from a saved result's object, probe and position corrections (optimiser moments restart)."""
    static = low.static
    if previous.object.shape != (static.slices, *static.object_shape):
        raise PlanError(f"resume: object shape {previous.object.shape} does not match the plan's "
                        f"{(static.slices, *static.object_shape)}")
    if previous.probe.shape != (static.modes, static.window_px, static.window_px):
        raise PlanError(f"resume: probe shape {previous.probe.shape} does not match the plan")
    a, b = engine.object_params(jnp.asarray(previous.object), static)
    params = state.params._replace(object_a=a, object_b=b,
                                   probe=jnp.asarray(previous.probe / engine.probe_unit(low.data), jnp.complex64))
    if len(previous.positions_yx_A) == len(low.heldout_indices) + static.n_fit:
        nominal = np.asarray(engine.scan_positions(low.data.positions_A, low.settings, low.data))
        params = params._replace(offsets_A=jnp.asarray(previous.positions_yx_A[low.fit_indices] - nominal, jnp.float32))
    return state._replace(params=params, iteration=jnp.asarray(previous.iterations_done, jnp.int32))


def _result(low: Lowered, track: _Track, out: engine.Outputs, iterations_done: int, heldout_loss: float,
            compile_s: float, run_s: float, preprocessing: dict, fitted: engine.Fitted | None = None) -> Result:
    """The Result of one reconstruction from its host-side outputs."""
    positions = np.zeros((len(low.fit_indices) + len(low.heldout_indices), 2))
    positions[low.fit_indices] = out.positions_yx_A
    positions[low.heldout_indices] = out.heldout_positions_yx_A
    hist = {k: np.asarray(v) for k, v in track.history.items()}
    return Result(
        object=np.asarray(out.object), probe=np.asarray(out.probe), positions_yx_A=positions,
        dx_A=float(out.dx_A), origin_yx_A=tuple(float(v) for v in out.origin_yx_A), plan=low.plan,
        history=hist, slice_thickness_A=low.optics.slice_thickness_A, energy_eV=low.optics.energy_eV,
        sigma_rad_per_VA=float(physics.sigma_rad_per_VA(low.optics.energy_eV)),
        iterations_done=iterations_done, diverged=track.diverged,
        converged=not track.diverged and _flat(hist.get("loss")), stop_reason=track.stop_reason,
        heldout_indices=low.heldout_indices, heldout_loss=heldout_loss,
        final_data_loss=float(hist["data_loss"][-1]) if "data_loss" in hist else float("nan"),
        compile_s=compile_s, run_s=run_s, preprocessing=preprocessing,
        fitted={k: float(v) for k, v in zip(low.static.fit, fitted.values)} if fitted else {},
        fitted_stderr={k: float(v) for k, v in zip(low.static.fit, fitted.stderr)} if fitted else {})


def _flat(loss: np.ndarray | None, window: int = 5, tolerance: float = 0.01) -> bool:
    """Converged: the loss changed by less than `tolerance` (relative) over the last iterations."""
    if loss is None or len(loss) <= window:
        return False
    return bool(abs(loss[-1] - loss[-1 - window]) <= tolerance * abs(loss[-1 - window]))


def _once(fetch: Callable[[], np.ndarray]) -> Callable[[], np.ndarray]:
    """`fetch`, called (a device-to-host copy) on the first call only."""
    cache: list[np.ndarray] = []

    def fetch_once() -> np.ndarray:
        if not cache:
            cache.append(fetch())
        return cache[0]

    return fetch_once


def _progress(iteration: int, stats: dict[str, float], grid: ObjectGrid, fetch: Callable[[], np.ndarray]) -> Progress:
    return Progress(iteration=iteration, loss=stats["loss"], data_loss=stats["data_loss"], dx_A=grid.dx_A,
                    origin_yx_A=grid.origin_yx_A, _fetch_object=_once(fetch))


# --------------------------------------------------------------------------- one plan


def reconstruct(plan: Plan, dataset: Dataset | None = None, callback: Callback | None = None,
                resume: Result | None = None) -> Result:
    """Run `plan` and return its Result; never raises for a diverging loss (see Result.diverged).

    `callback(progress)` runs after every iteration; returning False stops the run.
    `resume` continues from a saved result (object, probe and positions; optimiser moments restart).
    """
    engine.enable_persistent_cache()
    dataset = dataset if dataset is not None else load_dataset(plan.data)
    low = lower(plan, dataset)
    static, settings, data = low.static, low.settings, low.data
    init, t_init = engine.compiled("init", static, settings, data)
    state = init(settings, data)
    if resume is not None:
        state = resume_state(state, resume, low)
    step, t_step = engine.compiled("iteration", static, state, settings, data)
    outputs, t_out = engine.compiled("outputs", static, state, settings, data)
    compile_s = t_init + t_step + t_out

    track = _Track(plan, callback)
    done = int(state.iteration)
    run_t0 = time.perf_counter()
    while done < plan.iterations and track.active:
        t0 = time.perf_counter()
        new_state, stats = step(state, settings, data)
        values = jax.device_get(stats).as_dict()
        if not track.record(values, time.perf_counter() - t0, done + 1):
            break
        state, done = new_state, done + 1
        track.notify(_progress(done, values, low.grid,
                               lambda s=state: np.asarray(jax.device_get(outputs(s, settings, data).object))))
    run_s = time.perf_counter() - run_t0

    heldout_loss = float("nan")
    if static.n_heldout:
        heldout, t_held = engine.compiled("heldout", static, state, settings, data)
        compile_s += t_held
        heldout_loss = float(heldout(state, settings, data))
    fitted = None
    if static.fit:
        fisher, t_fisher = engine.compiled("fisher", static, state, settings, data)
        compile_s += t_fisher
        fitted = to_numpy(fisher(state, settings, data))
    out = to_numpy(outputs(state, settings, data))
    return _result(low, track, out, done, heldout_loss, compile_s, run_s, dataset.preprocessing, fitted)


# --------------------------------------------------------------------------- K plans as one program


def _stack(trees: Sequence) -> object:
    """Stack pytrees of equal structure along a new leading (trial) axis."""
    return jax.tree_util.tree_map(lambda *xs: np.stack([np.asarray(x) for x in xs]), *trees)


def _lane(tree, i: int):
    return jax.tree_util.tree_map(lambda x: x[i], tree)


def reconstruct_batch(plans: Sequence[Plan], dataset: Dataset | None = None,
                      callbacks: Sequence[Callback | None] | None = None) -> list[Result]:
    """Run K plans as one vmapped program (same StaticConfig); one Result per plan, in order.

    Each plan gets its own callback (returning False stops that plan only), its own divergence
    check and history; a stopped or diverged plan's state stops changing while the others go on,
    and the program stops when every plan is done. Results equal those of `reconstruct` run alone
    up to floating-point reassociation in the batched program.
    """
    engine.enable_persistent_cache()
    dataset = dataset if dataset is not None else load_dataset(plans[0].data)
    lowered = lower_batch(plans, dataset)
    callbacks = list(callbacks) if callbacks is not None else [None] * len(plans)
    static, data = lowered[0].static, lowered[0].data
    settings = _stack([low.settings for low in lowered])
    init, t_init = engine.compiled("init", static, settings, data, batched=True)
    state = init(settings, data)
    active = np.ones(len(plans), bool)
    step, t_step = engine.compiled("iteration", static, state, settings, data, active, batched=True)
    outputs, t_out = engine.compiled("outputs", static, state, settings, data, batched=True)
    compile_s = t_init + t_step + t_out

    tracks = [_Track(low.plan, cb) for low, cb in zip(lowered, callbacks)]
    done = np.zeros(len(plans), int)
    run_t0 = time.perf_counter()
    while any(t.active for t in tracks):
        active = np.array([t.active for t in tracks])
        t0 = time.perf_counter()
        new_state, stats = step(state, settings, data, active)
        stats = jax.device_get(stats)
        elapsed = time.perf_counter() - t0
        bad = np.zeros(len(plans), bool)
        for i, track in enumerate(tracks):
            if active[i] and not track.record(_lane(stats, i).as_dict(), elapsed, int(done[i]) + 1):
                bad[i] = True
        state = engine.keep_where(active & ~bad, new_state, state)  # a diverged lane keeps its last finite state
        done = done + (active & ~bad)
        objects = _once(lambda s=state: np.asarray(jax.device_get(outputs(s, settings, data).object)))  # (K, S, Y, X)
        for i, track in enumerate(tracks):
            if active[i] and not bad[i]:
                track.notify(_progress(int(done[i]), _lane(stats, i).as_dict(), lowered[i].grid,
                                       lambda i=i: objects()[i]))
                track.finish(int(done[i]))
    run_s = time.perf_counter() - run_t0

    heldout_losses = np.full(len(plans), np.nan)
    if static.n_heldout:
        heldout, t_held = engine.compiled("heldout", static, state, settings, data, batched=True)
        compile_s += t_held
        heldout_losses = np.asarray(heldout(state, settings, data), float)
    fitted = None
    if static.fit:
        fisher, t_fisher = engine.compiled("fisher", static, state, settings, data, batched=True)
        compile_s += t_fisher
        fitted = to_numpy(fisher(state, settings, data))
    out = to_numpy(outputs(state, settings, data))
    return [_result(low, track, _lane(out, i), int(done[i]), float(heldout_losses[i]), compile_s, run_s,
                    dataset.preprocessing, _lane(fitted, i) if fitted is not None else None)
            for i, (low, track) in enumerate(zip(lowered, tracks))]
