"""Typed pytrees the compiled programs read and write (optax style: NamedTuples of arrays).

`Settings` holds every number a study may tune, each a float32/int32 array, so two plans that differ
only in such numbers share one compiled program. `EngineData` holds the measured arrays (read, never
baked in as constants). `EngineState` is what one iteration carries to the next. With batched trials
(`recon.batch`) every leaf of `Settings` and `EngineState` gains a leading trial axis K; `EngineData`
is shared by all trials of a batch.
"""
from __future__ import annotations

from typing import Any, Generic, NamedTuple, TypeVar

import jax
import numpy as np

Array = Any  # a jax.Array or numpy array; shapes and dtypes are in the docstrings
T = TypeVar("T")


# --------------------------------------------------------------------------- settings (traced)


class OptimizerSettings(NamedTuple):
    """One variable's optimiser: traced, so changing any of them never recompiles.

    learning_rate: () f32, per iteration; start_iteration: () i32; schedule_id: () i32, an index into
    `recon.optim.SCHEDULES`; decay_rate: () f32 per iteration (exponential); warmup_iterations: () f32;
    final_fraction: () f32 (cosine schedules end at lr × this); momentum: () f32 (momentum, rmsprop).
    """

    learning_rate: Array
    start_iteration: Array
    schedule_id: Array
    decay_rate: Array
    warmup_iterations: Array
    final_fraction: Array
    momentum: Array


class Groups(NamedTuple, Generic[T]):
    """One value per optimised variable group: the object, the probe and the position corrections."""

    object: T
    probe: T
    positions: T


class ScheduleSettings(NamedTuple):
    """A constraint's activity window: on at iterations start, start + step, ... < end (all () i32)."""

    enabled: Array
    start: Array
    step: Array
    end: Array


class ConstraintSettings(NamedTuple):
    """Every constraint's schedule and strengths (each () f32 unless a ScheduleSettings)."""

    fix_probe_intensity: ScheduleSettings
    orthogonalize_probe: ScheduleSettings
    object_amplitude: ScheduleSettings
    phase_positivity: ScheduleSettings
    lateral_lowpass: ScheduleSettings
    z_blur: ScheduleSettings
    kz_filter: ScheduleSettings
    phase_ramp_removal: ScheduleSettings
    probe_fourier_mask: ScheduleSettings
    position_recentering: ScheduleSettings
    amplitude_min: Array
    amplitude_max: Array
    positivity_relax: Array  # fraction of negative phase removed per application
    lowpass_sigma_px: Array  # object pixels
    z_blur_sigma_slices: Array
    kz_beta: Array
    kz_strength: Array
    fourier_mask_radius_factor: Array  # in units of the aperture radius


class RegularizerWeights(NamedTuple):
    """Weights (() f32, 0 = off) of the cost terms in `recon.regularizers`, and the TV guard ε."""

    object_l1: Array
    object_l2: Array
    object_tikhonov: Array
    object_tv: Array
    phase_l1: Array
    layer_tikhonov: Array
    layer_tv: Array
    probe_l2: Array
    tv_eps: Array


class AberrationSettings(NamedTuple):
    """Krivanek coefficients C_nm in Å and angles φ_nm in degrees (each () f32; C10 is −defocus)."""

    C12: Array
    phi12: Array
    C21: Array
    phi21: Array
    C23: Array
    phi23: Array
    C30: Array
    C32: Array
    phi32: Array
    C34: Array
    phi34: Array
    C41: Array
    phi41: Array
    C43: Array
    phi43: Array
    C45: Array
    phi45: Array
    C50: Array
    C52: Array
    phi52: Array
    C54: Array
    phi54: Array
    C56: Array
    phi56: Array


class EngineSettings(NamedTuple):
    """The reconstruction algorithm's step parameters (`plan.engine`), each () f32 unless noted.

    alpha, beta: ePIE object/probe steps, rPIE object/probe regularisation; lsqml_step: fraction of
    the LSQML optimal step; lsqml_delta: LSQML preconditioner regularisation (relative to the maximum
    illumination); damping: initial Levenberg-Marquardt λ (relative); cg_iterations: () i32, the
    traced bound of the conjugate-gradient loop; fit_damping: initial Marquardt λ of the fitted-optics
    step; fit_cg_iterations: () i32, CG iterations of that step; fit_start: () i32, the iteration from
    which the fitted optics move.
    """

    alpha: Array
    beta: Array
    lsqml_step: Array
    lsqml_delta: Array
    damping: Array
    cg_iterations: Array
    fit_damping: Array
    fit_cg_iterations: Array
    fit_start: Array


class Settings(NamedTuple):
    """Every tunable number of a plan. Scalars are () arrays; units in the names.

    tilt_mrad: (2,) f32 (y, x); affine: (4,) f32 (yy, yx, xy, xx); aperture_edge_px: () f32, 0 for a
    hard aperture; band_limit: () f32, fraction of Nyquist; seed: () i32.
    """

    iterations: Array
    energy_eV: Array
    semiangle_mrad: Array
    defocus_A: Array
    aberrations: AberrationSettings
    aperture_edge_px: Array
    main_mode_fraction: Array
    tilt_mrad: Array
    dk_invA: Array
    scan_step_A: Array
    rotation_deg: Array
    affine: Array
    slice_thickness_A: Array
    band_limit: Array
    init_amplitude: Array
    init_phase_rad: Array
    noise_eps: Array
    optimizers: Groups[OptimizerSettings]
    regularizers: RegularizerWeights
    constraints: ConstraintSettings
    seed: Array
    engine: EngineSettings


# --------------------------------------------------------------------------- data (shared, read-only)


class EngineData(NamedTuple):
    """The measured arrays, on the device once per worker and shared by every trial.

    patterns: (n_fit, N, N) f32 counts, zero frequency at [0, 0]; positions_A: (n_fit, 2) f32 nominal
    probe positions (y, x) Å; heldout_patterns (n_heldout, N, N) and heldout_positions_A (n_heldout, 2)
    likewise for the held-out positions; centroid_A: (2,) f32 of all positions; nominal_step_A: () f32,
    the step the positions were written with; mask: (N, N) f32 detector mask (1 = use);
    mean_total: () f32 mean counts per pattern; mean_pixel: () f32 mean counts per used pixel.
    """

    patterns: Array
    positions_A: Array
    heldout_patterns: Array
    heldout_positions_A: Array
    centroid_A: Array
    nominal_step_A: Array
    mask: Array
    mean_total: Array
    mean_pixel: Array


# --------------------------------------------------------------------------- state (carried)


class Params(NamedTuple):
    """The optimised variables.

    object_a, object_b: (S, Y, X) f32 — amplitude and phase in rad (parameterization amp_phase) or the
    real and imaginary part of the transmission (complex); probe: (M, W, W) c64 real-space modes in
    units of √(mean pixel intensity) (W the window: detector size × object supersampling);
    offsets_A: (n_fit, 2) f32 position corrections (y, x) in Å.
    """

    object_a: Array
    object_b: Array
    probe: Array
    offsets_A: Array


class EngineState(NamedTuple):
    """What one iteration hands to the next: parameters, optax states per group, iteration () i32
    (iterations done), and the PRNG key (2,) u32 that shuffles the mini-batches; fitted: (P,) f32 the
    fitted optics in plan units (`StaticConfig.fit` order, P = 0 without fitting); damping: () f32
    the Levenberg-Marquardt λ carried by the gauss_newton engine; fit_damping: () f32 that of the
    fitted optics' step."""

    params: Params
    opt: Groups[Any]
    iteration: Array
    key: Array
    fitted: Array
    damping: Array
    fit_damping: Array


class Stats(NamedTuple):
    """Per-iteration values (each () f32): loss = data_loss + Σ weight × regulariser, the mean data
    term over the mini-batches, and every regulariser's unweighted value."""

    loss: Array
    data_loss: Array
    regularizers: dict[str, Array]  # keyed by recon.regularizers.REGULARIZERS

    def as_dict(self) -> dict[str, float]:
        """Flat {name: float} history entry: loss, data_loss, reg_<name>."""
        regs = {f"reg_{k}": float(v) for k, v in self.regularizers.items()}
        return {"loss": float(self.loss), "data_loss": float(self.data_loss), **regs}


def to_numpy(tree: Any) -> Any:
    """A pytree with every leaf as a numpy array (host copy)."""
    return jax.tree_util.tree_map(np.asarray, jax.device_get(tree))
