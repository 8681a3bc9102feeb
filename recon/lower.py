"""Lowering: a plan bound to its data becomes the engine's inputs, in one place.

`lower(plan, dataset)` resolves the optics (plan values, else the data file's), fixes the object
grid (pixel size `dx_A`, origin and shape), and splits the plan into the hashable `StaticConfig`
(shapes and named choices: what a compiled program depends on), the traced `Settings` (every
tunable number) and the `EngineData` arrays. Nothing else in the package converts a plan.
"""
from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from . import optim
from .data import Dataset, heldout_indices
from .plan import Plan, PlanError, Schedule
from .state import (AberrationSettings, ConstraintSettings, EngineData, EngineSettings, Groups, OptimizerSettings,
                    RegularizerWeights, ScheduleSettings, Settings)

#: The optimised variable groups, in the order of `StaticConfig.optimizers`.
OPTIMIZED = Groups._fields
#: End of a constraint schedule without an end.
NEVER = 2**30


@dataclass(frozen=True)
class StaticConfig:
    """Everything a compiled program depends on besides array values (hashable)."""

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
    engine: str = "gradient"
    fit: tuple[str, ...] = ()  # fitted optics as plan key paths, e.g. ("probe.defocus_A", "scan.rotation_deg")
    fit_taper_px: float = 0.0  # the fitted probe's edge taper (probe.fit_taper_px; 0 unless probe optics are fitted)

    @property
    def window_px(self) -> int:
        """Probe window on the object grid: the detector size × object supersampling."""
        return self.n_px * self.object_supersample


@dataclass(frozen=True)
class Optics:
    """Optical and calibration values of a plan, with nulls filled from the dataset."""

    energy_eV: float
    semiangle_mrad: float
    defocus_A: float
    dk_invA: float
    scan_step_A: float
    slice_thickness_A: float


@dataclass(frozen=True)
class ObjectGrid:
    """Where object pixel [i, j] sits: (y, x) = origin_yx_A + (i, j) · dx_A; shape (Y, X)."""

    dx_A: float
    origin_yx_A: tuple[float, float]
    shape: tuple[int, int]


@dataclass(frozen=True)
class Lowered:
    """A plan bound to its data: what the engine compiles (static), traces (settings) and reads (data)."""

    plan: Plan
    optics: Optics
    grid: ObjectGrid
    static: StaticConfig
    settings: Settings
    data: EngineData
    fit_indices: np.ndarray      # int64 (n_fit,) into the dataset's patterns
    heldout_indices: np.ndarray  # int64 (n_heldout,)


# --------------------------------------------------------------------------- the object grid


def pixel_size_A(dk_invA, window_px: int):
    """Real-space pixel dx = 1 / (W · dk) in Å (numpy or traced)."""
    return 1.0 / (window_px * dk_invA)


def grid_origin_A(centroid_A, dx_A, shape: tuple[int, int]):
    """(y, x) in Å of object pixel [0, 0], the grid centred on the scan centroid (numpy or traced)."""
    return centroid_A - dx_A * np.array([shape[0] / 2.0, shape[1] / 2.0], np.float32)


def object_shape_px(positions_yx_A: np.ndarray, dx_A: float, n_px: int, margin_px: int) -> tuple[int, int]:
    """Object size covering every probe window for any scan rotation and a ±15 % step change.

    Rounded up to a multiple of 16 so that small calibration changes keep the same shape.
    """
    centred = positions_yx_A - positions_yx_A.mean(axis=0)
    diameter_px = 2.0 * 1.15 * np.max(np.hypot(centred[:, 0], centred[:, 1])) / dx_A
    size = int(np.ceil((diameter_px + n_px + 2 * margin_px + 2) / 16.0) * 16)
    return size, size


def object_grid(plan: Plan, dataset: Dataset, optics: Optics) -> ObjectGrid:
    """The plan's object grid (explicit object.size_px, else sized to the scan)."""
    s = plan.object.supersample
    window = s * dataset.n_px
    dx = pixel_size_A(optics.dk_invA, window)
    shape = plan.object.size_px or object_shape_px(dataset.positions_yx_A, dx, window, s * plan.object.margin_px)
    origin = grid_origin_A(dataset.positions_yx_A.mean(axis=0), dx, tuple(shape))
    return ObjectGrid(float(dx), (float(origin[0]), float(origin[1])), (int(shape[0]), int(shape[1])))


# --------------------------------------------------------------------------- optics


def resolve_optics(plan: Plan, dataset: Dataset) -> Optics:
    """Fill every null optical value of the plan from the dataset, or fail naming the key."""
    def pick(plan_value, data_value, key, missing="is not in the data file"):
        value = plan_value if plan_value is not None else data_value
        if value is None:
            raise PlanError(f"{dataset.source}: {key} {missing}; set it in the plan")
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
        scan_step_A=pick(plan.scan.step_A, None if dataset.positions_in_steps else dataset.scan_step_A,
                         "scan.step_A", "is not in the data file (it has a scan grid but no positions in Å)"),
        slice_thickness_A=pick(thickness, None, "object.slice_thickness_A"),
    )


# --------------------------------------------------------------------------- settings


def _f32(v) -> np.ndarray:
    return np.asarray(v, dtype=np.float32)


def _i32(v) -> np.ndarray:
    return np.asarray(v, dtype=np.int32)


def _optimizer_settings(spec) -> OptimizerSettings:
    return OptimizerSettings(
        learning_rate=_f32(spec.learning_rate), start_iteration=_i32(spec.start_iteration),
        schedule_id=_i32(optim.SCHEDULES.index(spec.schedule)), decay_rate=_f32(spec.decay_rate),
        warmup_iterations=_f32(spec.warmup_iterations), final_fraction=_f32(spec.final_fraction),
        momentum=_f32(spec.momentum))


def _schedule(c) -> ScheduleSettings:
    return ScheduleSettings(enabled=_i32(c.enabled), start=_i32(c.start), step=_i32(c.step),
                            end=_i32(NEVER if c.end is None else c.end))


def constraint_settings(c) -> ConstraintSettings:
    """Schedules and strengths of a plan's `constraints` section."""
    schedules = {name: _schedule(getattr(c, name)) for name in ConstraintSettings._fields
                 if isinstance(getattr(c, name, None), Schedule)}
    return ConstraintSettings(
        **schedules,
        amplitude_min=_f32(c.object_amplitude.min), amplitude_max=_f32(c.object_amplitude.max),
        positivity_relax=_f32(c.phase_positivity.relax), lowpass_sigma_px=_f32(c.lateral_lowpass.sigma_px),
        z_blur_sigma_slices=_f32(c.z_blur.sigma_slices), kz_beta=_f32(c.kz_filter.beta),
        kz_strength=_f32(c.kz_filter.strength), fourier_mask_radius_factor=_f32(c.probe_fourier_mask.radius_factor))


def build_settings(plan: Plan, optics: Optics) -> Settings:
    """The traced settings of a plan: every tunable number as a float32/int32 array."""
    ab = {k.replace("_A", "").replace("_deg", ""): _f32(v) for k, v in plan.probe.aberrations.model_dump().items()}
    return Settings(
        iterations=_i32(plan.iterations),
        energy_eV=_f32(optics.energy_eV),
        semiangle_mrad=_f32(optics.semiangle_mrad),
        defocus_A=_f32(optics.defocus_A),
        aberrations=AberrationSettings(**ab),
        aperture_edge_px=_f32(plan.probe.aperture_edge_px if plan.probe.aperture == "soft" else 0.0),
        main_mode_fraction=_f32(plan.probe.main_mode_fraction),
        tilt_mrad=_f32(plan.probe.tilt_mrad),
        dk_invA=_f32(optics.dk_invA),
        scan_step_A=_f32(optics.scan_step_A),
        rotation_deg=_f32(plan.scan.rotation_deg),
        affine=_f32(plan.scan.affine),
        slice_thickness_A=_f32(optics.slice_thickness_A),
        band_limit=_f32(plan.object.band_limit),
        init_amplitude=_f32(plan.object.init_amplitude),
        init_phase_rad=_f32(plan.object.init_phase_rad),
        noise_eps=_f32(plan.noise_model.eps),
        optimizers=Groups(*(_optimizer_settings(getattr(plan.optimizers, g)) for g in OPTIMIZED)),
        regularizers=RegularizerWeights(**{k: _f32(v) for k, v in plan.regularizers.model_dump().items()}),
        constraints=constraint_settings(plan.constraints),
        seed=_i32(plan.seed),
        engine=engine_settings(plan.engine),
    )


def engine_settings(e) -> EngineSettings:
    """The traced step parameters of a plan's `engine` section."""
    return EngineSettings(alpha=_f32(e.alpha), beta=_f32(e.beta), lsqml_step=_f32(e.lsqml_step),
                          lsqml_delta=_f32(e.lsqml_delta), damping=_f32(e.damping),
                          cg_iterations=_i32(e.cg_iterations), fit_damping=_f32(e.fit_damping),
                          fit_cg_iterations=_i32(e.fit_cg_iterations), fit_start=_i32(e.fit_start))


def fitted_keys(plan: Plan) -> tuple[str, ...]:
    """The fitted optics as plan key paths (probe.defocus_A, probe.aberrations.C12_A, scan.rotation_deg)."""
    probe = tuple(f"probe.{k}" if k == "defocus_A" else f"probe.aberrations.{k}" for k in plan.probe.fit)
    return tuple(dict.fromkeys(probe + tuple(f"scan.{k}" for k in plan.scan.fit)))


# --------------------------------------------------------------------------- data


def build_data(dataset: Dataset, fit: np.ndarray, heldout: np.ndarray, nominal_step_A: float) -> EngineData:
    """The arrays the compiled programs read (passed as arguments, never baked in as constants)."""
    patterns = dataset.patterns
    n_px = patterns.shape[-1]
    mask = dataset.detector_mask if dataset.detector_mask is not None else np.ones((n_px, n_px), np.float32)
    totals = (patterns[fit] * mask).sum(axis=(-2, -1))
    return EngineData(
        patterns=_f32(patterns[fit]),
        positions_A=_f32(dataset.positions_yx_A[fit]),
        heldout_patterns=_f32(patterns[heldout]),
        heldout_positions_A=_f32(dataset.positions_yx_A[heldout]),
        centroid_A=_f32(dataset.positions_yx_A.mean(axis=0)),
        nominal_step_A=_f32(nominal_step_A),
        mask=_f32(mask),
        mean_total=_f32(max(float(totals.mean()), 1e-30)),
        mean_pixel=_f32(max(float(totals.mean()) / mask.sum(), 1e-30)),
    )


# --------------------------------------------------------------------------- the whole plan


@dataclass(frozen=True)
class _Bound:
    """The cheap part of lowering: everything but the settings and the data arrays."""

    optics: Optics
    grid: ObjectGrid
    static: StaticConfig
    fit: np.ndarray
    heldout: np.ndarray
    nominal_step_A: float

    def key(self, plan: Plan) -> tuple:
        """Plans with equal keys read the same data arrays (and can share one batched program)."""
        return (self.static, self.nominal_step_A, plan.data)


def _bind(plan: Plan, dataset: Dataset) -> _Bound:
    optics = resolve_optics(plan, dataset)
    n = len(dataset.patterns)
    heldout = heldout_indices(n, plan.data.heldout_fraction, plan.data.heldout_seed)
    fit = np.setdiff1d(np.arange(n), heldout)
    batch = min(plan.batch_size, len(fit))
    grid = object_grid(plan, dataset, optics)
    static = StaticConfig(
        n_px=dataset.n_px, n_fit=len(fit), n_heldout=len(heldout), batch_size=batch,
        n_batches=math.ceil(len(fit) / batch), modes=plan.probe.modes, slices=plan.object.slices,
        object_shape=grid.shape, noise_model=plan.noise_model.name, parameterization=plan.object.parameterization,
        optimizers=tuple(getattr(plan.optimizers, g).name for g in OPTIMIZED),
        aperture_supersample=plan.probe.aperture_supersample, object_supersample=plan.object.supersample,
        engine=plan.engine.name, fit=fitted_keys(plan),
        fit_taper_px=plan.probe.fit_taper_px if plan.probe.fit else 0.0)
    nominal_step = 1.0 if dataset.positions_in_steps else (
        dataset.scan_step_A if dataset.scan_step_A is not None else optics.scan_step_A)
    return _Bound(optics, grid, static, fit, heldout, float(nominal_step))


def static_key(plan: Plan, dataset: Dataset) -> tuple:
    """What decides whether two plans can share one batched program: static configuration and data
    (computed without building the data arrays)."""
    return _bind(plan, dataset).key(plan)


def lower(plan: Plan, dataset: Dataset) -> Lowered:
    """Bind `plan` to `dataset`: optics, object grid, static configuration, settings and data."""
    b = _bind(plan, dataset)
    return Lowered(plan, b.optics, b.grid, b.static, build_settings(plan, b.optics),
                   build_data(dataset, b.fit, b.heldout, b.nominal_step_A), b.fit, b.heldout)


def lower_batch(plans: Sequence[Plan], dataset: Dataset) -> list[Lowered]:
    """Lower K plans on one dataset, building the data arrays once for all of them (they must share a
    `static_key`: a batched program reads one copy of the data)."""
    bound = [_bind(p, dataset) for p in plans]
    keys = {b.key(p) for b, p in zip(bound, plans)}
    if len(keys) > 1:
        raise PlanError("reconstruct_batch: plans differ in shapes, named choices or data (static configuration); "
                        "group them with recon.static_key first")
    first = bound[0]
    data = build_data(dataset, first.fit, first.heldout, first.nominal_step_A)
    return [Lowered(p, b.optics, b.grid, b.static, build_settings(p, b.optics), data, b.fit, b.heldout)
            for p, b in zip(plans, bound)]


# --------------------------------------------------------------------------- cost model


def fft_passes_per_iteration(static: StaticConfig) -> int:
    """2-D FFTs of one probe window per iteration (forward and gradient, all positions and modes).

    Forward per position and mode: one sub-pixel shift, 2(S − 1) slice propagations and the far
    field = 2S FFTs; the gradient costs as many again.
    """
    return 4 * static.modes * static.slices * static.n_fit


def fft_bytes_per_iteration(static: StaticConfig) -> int:
    """Memory traffic of those FFTs: each reads and writes W² complex64 values (16 W² bytes)."""
    return fft_passes_per_iteration(static) * 16 * static.window_px**2


def trial_bytes(static: StaticConfig) -> int:
    """Device memory one trial needs beyond the shared data, from its shapes (an upper estimate).

    State: object (2 float32 arrays) and probe with two optimiser moments each, offsets; work: one
    mini-batch's wave fields kept for the gradient (~(4S + 6) arrays of B·M·W² complex64) and the
    object gradient.
    """
    obj = static.slices * static.object_shape[0] * static.object_shape[1] * 4 * 2
    probe = static.modes * static.window_px**2 * 8
    state = 3 * (obj + probe) + 3 * static.n_fit * 2 * 4
    work = static.batch_size * static.modes * static.window_px**2 * 8 * (4 * static.slices + 6) + 2 * obj
    return int(state + work)
