"""Reconstruction plans: the validated, fully typed description of one reconstruction.

A plan is plain configuration (YAML on disk, a frozen pydantic model in memory). Every
floating-point value in it reaches the compiled engine as a traced array, so plans that differ
only in such values share one compiled program; integers that set array shapes (pattern size,
batch size, probe modes, slices, object size) and named choices (noise model, optimiser) are the
only things that may compile anew.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import (BaseModel, ConfigDict, Field, ValidationError, ValidationInfo, field_validator,
                      model_validator)


class PlanError(ValueError):
    """A plan (or study) file that cannot be used; the message is one line for the user."""


class _Frozen(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, validate_default=True)

    @model_validator(mode="before")
    @classmethod
    def _keep_group_defaults(cls, data: Any) -> Any:
        """A group given in part keeps what its default sets: `optimizers.object: {learning_rate:
        0.05}` keeps the object's cosine schedule instead of the optimiser class's constant one."""
        if not isinstance(data, dict):
            return data
        merged = dict(data)
        for name, value in data.items():
            field = cls.model_fields.get(name)
            default = field.default if field is not None else None
            if isinstance(value, dict) and isinstance(default, BaseModel) and default.model_fields_set:
                merged[name] = {**default.model_dump(include=default.model_fields_set), **value}
        return merged


# --------------------------------------------------------------------------- data
class SubsetSpec(_Frozen):
    """Which scan positions a quick trial uses (like PtyRAD's INDICES_MODE)."""

    mode: Literal["full", "sub", "center"] = "full"
    step: int = Field(2, ge=1, description="'sub': keep every step-th position along y and x")
    shape: tuple[int, int] | None = Field(None, description="'center': (ny, nx) positions kept around the centre")


class SimulationSpec(_Frozen):
    """A synthetic dataset with known ground truth, made by `recon.simulate`.

    The hard cases of real data: `aberrations` of the probe beyond defocus (Krivanek, Å and
    degrees), a scan grid rotated by `scan_rotation_deg` relative to the detector (the file stores
    the nominal, unrotated grid), partial spatial coherence from a Gaussian source of
    `source_fwhm_A` (demagnified onto the specimen), and the dose of the noisy patterns.
    """

    lattice: Literal["hexagonal", "square"] = "hexagonal"
    lattice_constant_A: float = Field(3.16, gt=0)
    atom_Z: tuple[int, ...] = (42, 16)
    energy_eV: float = Field(80_000.0, gt=0)
    semiangle_mrad: float = Field(21.0, gt=0)
    defocus_A: float = -100.0
    pattern_px: int = Field(48, ge=8)
    dk_invA: float = Field(0.0667, gt=0)
    scan_shape: tuple[int, int] = (16, 16)
    scan_step_A: float = Field(0.5, gt=0)
    slices: int = Field(1, ge=1)
    slice_thickness_A: float = Field(2.0, gt=0)
    dose_e_per_A2: tuple[float, ...] = (1.0e5,)
    seed: int = 0
    aberrations: Aberrations = Field(default_factory=lambda: Aberrations(),
                                     description="probe aberrations besides defocus (C10 = -defocus_A)")
    scan_rotation_deg: float = Field(0.0, description="true rotation of the scan grid (counter-clockwise, "
                                     "about its centroid); the file holds the unrotated grid")
    source_fwhm_A: float = Field(0.0, ge=0, description="FWHM of the Gaussian demagnified source (partial "
                                 "spatial coherence): patterns are averaged over probe positions it spreads")


class DataSpec(_Frozen):
    """Where the diffraction patterns come from and how they are prepared."""

    path: str | None = Field(None, description="HDF5 file (native layout or any dataset path), .npy, or a detector "
                             "file (EMPAD .xml, Merlin .mib, Gatan .dm3/.dm4, Dectris Arina _master.h5, EMD/py4DSTEM .h5)")
    format: Literal["auto", "hdf5", "npy", "empad", "mib", "dm", "arina", "emd"] = Field(
        "auto", description="file format; auto: from the extension and content")
    patterns: str = Field("dp", description="HDF5 dataset path of the patterns, e.g. dp or dp_noisy/dose_1e+05")
    simulate: SimulationSpec | None = None
    positions: str | None = Field(None, description="HDF5 dataset path or .npy of (n, 2) probe positions (y, x) in Å")
    scan_shape: tuple[int, int] | None = Field(None, description="(ny, nx) for 3D pattern stacks without positions")
    dc_centered: bool = Field(True, description="zero frequency at [N/2, N/2] on disk (fftshifted)")
    detector_mask: str | None = Field(None, description="HDF5 dataset path or .npy (ky, kx), nonzero = use pixel")
    center: Literal["auto", "none"] | tuple[float, float] | None = Field(
        None, description="zero frequency on disk: auto (mean pattern: centre of mass + disk fit), [cy, cx] px, "
                          "none; null: auto for detector formats, none for hdf5/npy")
    hot_pixels: Literal["auto", "none"] | None = Field(
        None, description="auto: mask hot and dead pixels found in the summed pattern; null: auto for detector "
                          "formats, none for hdf5/npy")
    descan: bool = Field(False, description="also undo a linear drift of the disk centre over the scan")
    normalize: Literal["none", "mean", "vacuum"] = Field(
        "none", description="divide patterns by the mean total intensity, or by the vacuum pattern's total")
    vacuum: str | None = Field(None, description="vacuum pattern (ky, kx) on the detector: .npy (relative to the "
                               "data file) or HDF5 path in the same file; centring and normalize: vacuum")
    crop_px: int | None = Field(None, ge=4, description="crop patterns to this size around the zero frequency")
    bin: int = Field(1, ge=1, description="sum bin × bin detector pixels")
    subset: SubsetSpec = SubsetSpec()
    heldout_fraction: float = Field(0.0, ge=0.0, lt=1.0, description="fraction of positions excluded from fitting")
    heldout_seed: int = 0

    @model_validator(mode="after")
    def _one_source(self) -> "DataSpec":
        if (self.path is None) == (self.simulate is None):
            raise ValueError("give exactly one of data.path or data.simulate")
        return self


# --------------------------------------------------------------------------- optics
ABERRATION_ORDERS = ("C10", "C12", "C21", "C23", "C30", "C32", "C34", "C41", "C43", "C45", "C50", "C52", "C54", "C56")


class Aberrations(_Frozen):
    """Krivanek coefficients in Å and their angles in degrees (C10 comes from defocus_A)."""

    C12_A: float = 0.0
    phi12_deg: float = 0.0
    C21_A: float = 0.0
    phi21_deg: float = 0.0
    C23_A: float = 0.0
    phi23_deg: float = 0.0
    C30_A: float = 0.0
    C32_A: float = 0.0
    phi32_deg: float = 0.0
    C34_A: float = 0.0
    phi34_deg: float = 0.0
    C41_A: float = 0.0
    phi41_deg: float = 0.0
    C43_A: float = 0.0
    phi43_deg: float = 0.0
    C45_A: float = 0.0
    phi45_deg: float = 0.0
    C50_A: float = 0.0
    C52_A: float = 0.0
    phi52_deg: float = 0.0
    C54_A: float = 0.0
    phi54_deg: float = 0.0
    C56_A: float = 0.0
    phi56_deg: float = 0.0


#: Probe optics that `probe.fit` may list: defocus and every aberration coefficient and angle.
PROBE_FIT_KEYS = Literal[("defocus_A", *Aberrations.model_fields)]


class ProbeSpec(_Frozen):
    """Illumination. Values left null are read from the data file's attributes."""

    energy_eV: float | None = Field(None, gt=0)
    semiangle_mrad: float | None = Field(None, gt=0)
    defocus_A: float | None = Field(None, description="= -C10; positive is underfocus")
    aberrations: Aberrations = Aberrations()
    aperture: Literal["hard", "soft"] = "soft"
    aperture_edge_px: float = Field(0.33, ge=0, description="soft aperture: width of the edge in detector pixels")
    aperture_supersample: int = Field(3, ge=1, le=9, description="points per pixel axis integrating the aperture")
    modes: int = Field(1, ge=1, le=16)
    main_mode_fraction: float = Field(0.8, gt=0, le=1, description="power in mode 0; the rest is split evenly")
    tilt_mrad: tuple[float, float] = (0.0, 0.0)
    fit: tuple[PROBE_FIT_KEYS, ...] = Field((), description="optics fitted with the object (the probe is "
                                                     "then aberration-parameterised); each value above is the start")
    fit_taper_px: float = Field(0.0, ge=0, le=64, description="fitted probe: taper it to zero over this many "
                                "pixels inside its window's outermost one (0: off); README, Fitted optics")


class DetectorSpec(_Frozen):
    """Reciprocal-space calibration."""

    dk_invA: float | None = Field(None, gt=0, description="detector pixel in 1/Å (sets dx = 1/(N dk))")


class ScanSpec(_Frozen):
    """Scan geometry applied to the nominal positions, about their centroid."""

    step_A: float | None = Field(None, gt=0, description="scan step; null: from the data")
    rotation_deg: float = 0.0
    affine: tuple[float, float, float, float] = Field((1.0, 0.0, 0.0, 1.0), description="(yy, yx, xy, xx)")
    fit: tuple[Literal["rotation_deg"], ...] = Field((), description="scan geometry fitted with the object")


class ObjectSpec(_Frozen):
    slices: int = Field(1, ge=1)
    slice_thickness_A: float | None = Field(None, gt=0, description="null: total thickness from the data / slices")
    parameterization: Literal["amp_phase", "complex"] = "amp_phase"
    supersample: int = Field(1, ge=1, le=4, description="object pixels per 1/(N dk): >1 represents object "
                             "frequencies beyond the detector grid's Nyquist (cost ~ supersample²)")
    band_limit: float = Field(2.0 / 3.0, gt=0, le=1.5, description="propagator band limit, fraction of Nyquist")
    margin_px: int = Field(8, ge=0, description="object pixels beyond the outermost probe windows")
    size_px: tuple[int, int] | None = Field(None, description="explicit object size; null: from the scan")
    init_amplitude: float = Field(1.0, gt=0)
    init_phase_rad: float = 0.0


class NoiseModel(_Frozen):
    name: Literal["amplitude", "anscombe", "poisson", "intensity"] = "poisson"
    eps: float = Field(1.0e-6, gt=0, description="guard added inside sqrt / log")


# --------------------------------------------------------------------------- optimisation
class OptimizerSpec(_Frozen):
    name: Literal["adam", "sgd", "momentum", "rmsprop", "adabelief", "lamb", "yogi"] = "adam"
    learning_rate: float = Field(1.0e-2, ge=0)
    start_iteration: int = Field(0, ge=0)
    schedule: Literal["constant", "cosine", "exponential", "warmup_cosine"] = "constant"
    decay_rate: float = Field(0.97, gt=0, le=1, description="exponential: factor per iteration")
    warmup_iterations: int = Field(5, ge=0)
    final_fraction: float = Field(0.1, ge=0, le=1, description="cosine schedules end at lr × this")
    momentum: float = Field(0.9, ge=0, lt=1, description="sgd with momentum / rmsprop decay")


class Optimizers(_Frozen):
    object: OptimizerSpec = OptimizerSpec(learning_rate=0.02, schedule="cosine")
    probe: OptimizerSpec = OptimizerSpec(learning_rate=0.001, schedule="cosine")
    positions: OptimizerSpec = OptimizerSpec(learning_rate=0.0, start_iteration=10)


class Regularizers(_Frozen):
    """Weights of the cost terms added to the data term (0 = off)."""

    object_l1: float = Field(0.0, ge=0)
    object_l2: float = Field(0.0, ge=0)
    object_tikhonov: float = Field(0.0, ge=0)
    object_tv: float = Field(0.0, ge=0)
    phase_l1: float = Field(0.0, ge=0)
    layer_tikhonov: float = Field(0.0, ge=0)
    layer_tv: float = Field(0.0, ge=0)
    probe_l2: float = Field(0.0, ge=0)
    tv_eps: float = Field(1.0e-8, gt=0)


class Schedule(_Frozen):
    """PtyRAD-style activity window: on at iterations start, start+step, ... < end."""

    enabled: bool = False
    start: int = Field(0, ge=0)
    step: int = Field(1, ge=1)
    end: int | None = Field(None, ge=0)


class FixProbeIntensity(Schedule):
    enabled: bool = True


class OrthogonalizeProbe(Schedule):
    enabled: bool = True


class ObjectAmplitude(Schedule):
    enabled: bool = True
    min: float = Field(0.0, ge=0)
    max: float = Field(1.0, gt=0)


class PhasePositivity(Schedule):
    relax: float = Field(1.0, ge=0, le=1, description="fraction of negative phase removed per application")


class LateralLowpass(Schedule):
    sigma_px: float = Field(0.5, ge=0)


class ZBlur(Schedule):
    sigma_slices: float = Field(1.0, ge=0)


class KzFilter(Schedule):
    beta: float = Field(1.0, gt=0)
    strength: float = Field(1.0, ge=0, le=1)


class ProbeFourierMask(Schedule):
    radius_factor: float = Field(1.2, gt=0, description="mask radius in units of the aperture radius")


class Constraints(_Frozen):
    fix_probe_intensity: FixProbeIntensity = FixProbeIntensity()
    orthogonalize_probe: OrthogonalizeProbe = OrthogonalizeProbe()
    object_amplitude: ObjectAmplitude = ObjectAmplitude()
    phase_positivity: PhasePositivity = PhasePositivity()
    lateral_lowpass: LateralLowpass = LateralLowpass()
    z_blur: ZBlur = ZBlur()
    kz_filter: KzFilter = KzFilter()
    phase_ramp_removal: Schedule = Schedule()
    probe_fourier_mask: ProbeFourierMask = ProbeFourierMask()
    position_recentering: Schedule = Schedule(enabled=True)


# --------------------------------------------------------------------------- engines
ENGINES = ("gradient", "epie", "rpie", "lsqml", "gauss_newton")
#: Noise models each engine's update is defined for (the projection engines: the modulus projection
#: for amplitude noise, a Poisson-likelihood step for Poisson noise; recon.epie.exit_wave_target).
ENGINE_NOISE_MODELS = {"gradient": ("amplitude", "anscombe", "poisson", "intensity"),
                       "epie": ("amplitude", "poisson"), "rpie": ("amplitude", "poisson"),
                       "lsqml": ("amplitude", "poisson"),
                       "gauss_newton": ("amplitude", "anscombe", "poisson", "intensity")}


class EngineSpec(_Frozen):
    """The reconstruction algorithm and its step parameters (every number is traced: tuning never recompiles)."""

    name: Literal[ENGINES] = "gradient"
    alpha: float = Field(1.0, ge=0, le=1, description="epie: object step; rpie: object regularisation α "
                         "(1 = ePIE's max-illumination normalisation)")
    beta: float = Field(1.0, ge=0, le=1, description="epie: probe step; rpie: probe regularisation β")
    lsqml_step: float = Field(0.9, gt=0, le=2, description="lsqml: fraction of the optimal step taken")
    lsqml_delta: float = Field(0.1, ge=0, description="lsqml: preconditioner regularisation δ, relative to "
                               "the maximum illumination")
    damping: float = Field(1.0e-2, gt=0, description="gauss_newton: initial Levenberg-Marquardt λ, relative to "
                           "each variable group's curvature (then adapted)")
    cg_iterations: int = Field(4, ge=1, le=100, description="gauss_newton: conjugate-gradient iterations per step "
                               "(a traced loop bound)")
    fit_damping: float = Field(1.0e-3, gt=0, description="fitted optics: initial Marquardt λ of their joint "
                               "Gauss-Newton step (then adapted)")
    fit_cg_iterations: int = Field(30, ge=1, le=1000, description="fitted optics: CG iterations eliminating the "
                                   "object from that step (a traced loop bound)")
    fit_start: int = Field(10, ge=0, description="fitted optics: iteration from which they move (the object "
                           "forms first with the starting optics)")


# --------------------------------------------------------------------------- the plan
class Plan(_Frozen):
    """One reconstruction: data, optics, object model, loss and optimisation."""

    iterations: int = Field(100, ge=1)
    batch_size: int = Field(32, ge=1)
    seed: int = 0
    data: DataSpec
    probe: ProbeSpec = ProbeSpec()
    detector: DetectorSpec = DetectorSpec()
    scan: ScanSpec = ScanSpec()
    object: ObjectSpec = ObjectSpec()
    noise_model: NoiseModel = NoiseModel()
    optimizers: Optimizers = Optimizers()
    regularizers: Regularizers = Regularizers()
    constraints: Constraints = Constraints()
    divergence_factor: float = Field(1.0e3, gt=1, description="stop when the loss exceeds its first value × this")
    engine: EngineSpec = EngineSpec()

    @field_validator("engine")
    @classmethod
    def _engine_defines(cls, engine: EngineSpec, info: ValidationInfo) -> EngineSpec:
        """What the chosen engine does not define: one line naming the plan key."""
        if engine.name == "gradient":
            return engine
        noise = info.data.get("noise_model")
        if noise is not None and noise.name not in ENGINE_NOISE_MODELS[engine.name]:
            raise ValueError(f"engine {engine.name} does not define noise_model.name {noise.name!r}; allowed with "
                             f"it: {', '.join(ENGINE_NOISE_MODELS[engine.name])}")
        regs = info.data.get("regularizers")
        used = [k for k, v in (regs.model_dump() if regs is not None else {}).items() if k != "tv_eps" and v > 0]
        if used:
            raise ValueError(f"engine {engine.name} does not use regularizers.{used[0]} (only the gradient "
                             f"engine does); set it to 0")
        opts = info.data.get("optimizers")
        if opts is not None and opts.positions.learning_rate > 0:
            raise ValueError(f"engine {engine.name} does not refine positions "
                             f"(optimizers.positions.learning_rate); set it to 0")
        return engine

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.model_dump(mode="json"), sort_keys=False)


def describe_validation_error(err: ValidationError, source: str, model: type[BaseModel] | None = None,
                              prefix: str = "") -> str:
    """One line naming the file, the key path, what was wrong and what is allowed.

    `model` is the schema that was validated (default Plan), used to list the allowed keys;
    `prefix` is put before the key path (e.g. "recon." for a plan inside a study file).
    """
    e = err.errors()[0]
    loc = [str(p) if str(p).isprintable() else repr(p) for p in e["loc"] if not str(p).startswith("function-")]
    key = prefix + ".".join(loc)
    msg = e["msg"].removeprefix("Value error, ")
    if e["type"] == "extra_forbidden":
        allowed = _fields_at(model or Plan, loc[:-1])
        msg = "unknown key" + (f"; allowed keys: {', '.join(allowed)}" if allowed else "")
    elif e["type"] == "missing":
        msg = "required key is missing"
    elif e["type"] == "literal_error":
        msg = msg.replace("Input should be", "allowed values are")
    got = e.get("input")
    shown = got is not None and not isinstance(got, (dict, list)) and len(repr(got)) < 60 and e["type"] != "missing"
    return f"{source}: {key or '(top level)'}: {msg}" + (f" (got {got!r})" if shown else "")


def _fields_at(model: Any, loc: list[str]) -> list[str]:
    """Field names of the model found by walking `loc` (dict entries are skipped)."""
    for part in loc:
        fields = getattr(model, "model_fields", None)
        if fields is None:
            return []
        if part not in fields:  # a key of a dict field, e.g. a search path
            continue
        model = model_in(fields[part].annotation)
    return list(getattr(model, "model_fields", {}))


def model_in(annotation: Any) -> Any:
    """The pydantic model inside an annotation such as `X | None` or `dict[str, X]` (None if none)."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    for arg in getattr(annotation, "__args__", ()):
        found = model_in(arg)
        if found is not None:
            return found
    return None


def plan_from_dict(raw: Any, source: str = "<plan>", base_dir: Path | None = None) -> Plan:
    """Validate a mapping as a Plan; relative data paths resolve against base_dir."""
    if not isinstance(raw, dict):
        raise PlanError(f"{source}: expected a mapping of plan keys, got {type(raw).__name__}")
    try:
        plan = Plan.model_validate(raw)
    except ValidationError as err:
        raise PlanError(describe_validation_error(err, source)) from None
    return resolve_paths(plan, base_dir) if base_dir is not None else plan


def resolve_paths(plan: Plan, base_dir: Path) -> Plan:
    """Make relative file paths in plan.data absolute against base_dir."""
    updates = {}
    for key in ("path", "positions", "detector_mask"):
        value = getattr(plan.data, key)
        is_file = key == "path" or (value or "").endswith(".npy")
        if value and is_file and not Path(value).expanduser().is_absolute():
            updates[key] = str((base_dir / Path(value).expanduser()).resolve())
    if not updates:
        return plan
    return plan.model_copy(update={"data": plan.data.model_copy(update=updates)})


def load_yaml(path: str | Path) -> Any:
    """Read YAML with the safe loader; a missing or malformed file is a PlanError."""
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except OSError as err:
        raise PlanError(f"{p}: cannot read file ({err.strerror})") from None
    except UnicodeDecodeError as err:
        raise PlanError(f"{p}: not a YAML text file (byte {err.start} is not UTF-8)") from None
    try:
        return yaml.safe_load(text)
    except RecursionError:
        raise PlanError(f"{p}: invalid YAML (nested too deeply)") from None
    except ValueError as err:  # e.g. a date such as 2024-13-01, which the YAML loader turns into a datetime
        raise PlanError(f"{p}: invalid YAML value ({str(err).splitlines()[0] if str(err) else type(err).__name__})") from None
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" line {mark.line + 1}" if mark else ""
        problem = getattr(err, "problem", None) or (str(err).splitlines() or [type(err).__name__])[0]
        raise PlanError(f"{p}:{where} invalid YAML ({problem})") from None


def load_plan(path: str | Path, overrides: dict[str, Any] | None = None) -> Plan:
    """Load and validate a plan file; `overrides` maps dotted keys to values."""
    p = Path(path)
    raw = load_yaml(p)
    if isinstance(raw, dict) and overrides:
        raw = apply_overrides(raw, overrides)
    return plan_from_dict(raw, str(p), base_dir=p.parent)


def parse_overrides(items: list[str]) -> dict[str, Any]:
    """Parse command-line `dotted.key=value` items; values are YAML scalars or lists (safe loader)."""
    out: dict[str, Any] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise PlanError(f"override {item!r}: expected dotted.key=value")
        out[key] = yaml.safe_load(value)
    return out


def apply_overrides(raw: dict[str, Any], overrides: dict[str, Any]) -> dict[str, Any]:
    """Return a deep copy of raw with dotted keys set (creating nested mappings as needed)."""
    out = _deep_copy(raw)
    for dotted, value in overrides.items():
        node = out
        parts = dotted.split(".")
        for part in parts[:-1]:
            child = node.get(part)
            if not isinstance(child, dict):
                child = {}
                node[part] = child
            node = child
        node[parts[-1]] = value
    return out


def _deep_copy(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _deep_copy(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_deep_copy(v) for v in value]
    return value
