"""The study file's schema: pydantic models of every section, validated by `tune.study.load_study`.

Pure configuration: this module imports nothing of tune, so every other module may import it.
"""
from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from recon.plan import Aberrations, DataSpec

Metric = Literal["nrmse", "mse", "frc_resolution_A", "frc_area", "ssim", "heldout_loss", "data_loss", "runtime_s",
                 "halfset_frc_resolution_A", "halfset_frc_area"]
Direction = Literal["minimize", "maximize"]
Scalar = bool | int | float | str | None

#: The direction each objective metric is optimised in unless the study file says otherwise.
DEFAULT_DIRECTIONS: dict[str, Direction] = {
    "nrmse": "minimize", "mse": "minimize", "frc_resolution_A": "minimize", "frc_area": "maximize",
    "ssim": "maximize", "heldout_loss": "minimize", "data_loss": "minimize", "runtime_s": "minimize",
    "halfset_frc_resolution_A": "minimize", "halfset_frc_area": "maximize",
}
#: Metrics that need a ground-truth phase.
GROUND_TRUTH_METRICS = frozenset({"nrmse", "mse", "frc_resolution_A", "frc_area", "ssim"})
#: Metrics of the two half-set reconstructions (`recon.halfset`, `metrics.halfset`): no ground truth needed.
HALFSET_METRICS = frozenset({"halfset_frc_resolution_A", "halfset_frc_area"})
#: Objective metrics that metrics.Scorer reports under another name.
SCORE_KEYS: dict[str, str] = {"frc_resolution_A": "frc_resolution_half_bit_A"}


def score_key(metric: str) -> str:
    """The key of an objective metric among a trial's recorded scores."""
    return SCORE_KEYS.get(metric, metric)


class _Frozen(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class SamplerSpec(_Frozen):
    """Which Optuna sampler proposes the settings; `options` are its keyword arguments."""

    name: Literal["tpe", "gp", "cmaes", "random", "qmc", "grid", "nsga2"] = "tpe"
    seed: int | None = Field(0, description="study seed; each worker's seed is derived from it and its index")
    options: dict[str, Scalar | list[Scalar]] = {}


class PrunerSpec(_Frozen):
    """Which Optuna pruner stops unpromising trials early; `options` are its keyword arguments."""

    name: Literal["none", "median", "percentile", "successive_halving", "hyperband", "wilcoxon",
                  "threshold", "patient"] = "median"
    options: dict[str, Scalar] = {}
    wrapped: PrunerSpec | None = Field(None, description="patient only: the pruner it wraps")


#: Plan key paths that `study.refine.fit` may fit (recon's probe.fit and scan.fit, as plan key paths).
FITTABLE_KEYS = ("probe.defocus_A", *(f"probe.aberrations.{k}" for k in Aberrations.model_fields), "scan.rotation_deg")


class RefineSpec(_Frozen):
    """Re-run the `top_k` best short trials at `iterations` once the short trials have used the budget,
    optionally with the optics in `fit` fitted from each trial's values (recon's probe.fit / scan.fit)."""

    top_k: int = Field(ge=1, description="how many of the best short trials are refined")
    iterations: int = Field(ge=1, description="iterations of each refined trial (the long reconstruction)")
    fit: tuple[Literal[FITTABLE_KEYS], ...] = Field(
        (), description="optics the refined trials fit (Gauss-Newton with the object, Fisher errors), "
                        "starting from the trial's values: search coarsely, fit finely")

    @field_validator("fit", mode="before")
    @classmethod
    def _plan_keys(cls, keys: Any) -> Any:
        """Accept the search section's spelling too (recon.probe.defocus_A)."""
        if isinstance(keys, (list, tuple)):
            return [k.removeprefix("recon.") if isinstance(k, str) else k for k in keys]
        return keys


class StudySection(_Frozen):
    """Name, storage, budget and fault tolerance of the study."""

    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$", max_length=100)
    storage: str | None = Field(None, description="SQLAlchemy URL; default sqlite:///<study file stem>.db beside it")
    sampler: SamplerSpec = SamplerSpec()
    pruner: PrunerSpec | None = Field(None, description="default: median (one metric), none (several)")
    n_trials: int = Field(ge=1, description="for the whole study, across all workers")
    timeout_s: float | None = Field(None, gt=0, description="per worker: start no trial after this many seconds")
    heartbeat_interval_s: int = Field(10, ge=1, description="seconds between a running trial's heartbeats")
    grace_period_s: int | None = Field(None, ge=1, description="silence after which a trial counts as dead; default 3 heartbeats")
    max_retries: int = Field(3, ge=0, description="re-runs of a trial whose worker died or was stopped")
    refine: RefineSpec | None = Field(None, description="re-run the best short trials longer; the best is chosen "
                                      "among them (tune.refine)")
    storage_timeout_s: float = Field(120.0, gt=0, description="a worker that cannot reach the storage this long exits")
    trials_per_batch: Annotated[int, Field(ge=1)] | Literal["auto"] = Field(
        "auto", description="trials per compiled program on a worker's device; auto: as many as fit in a GPU's "
                            "free memory (one on a CPU, where batching is slower per trial)")


class StudyData(DataSpec):
    """The plan's `data` section plus where the ground truth lives in the data file."""

    ground_truth: str | None = Field("ground_truth/phase_sum", description="HDF5 dataset of the true phase; null: none")


class SearchSpec(_Frozen):
    """A range (`low`, `high`, optional `log` or `step`) or a list of `choices`."""

    low: float | None = None
    high: float | None = None
    log: bool = False
    step: float | None = Field(None, gt=0)
    choices: tuple[Scalar, ...] | None = None

    @model_validator(mode="after")
    def _range_or_choices(self) -> SearchSpec:
        if self.choices is not None:
            if self.low is not None or self.high is not None or self.log or self.step is not None:
                raise ValueError("give either choices or low/high, not both")
            if not self.choices:
                raise ValueError("choices is empty")
            if len(set(map(repr, self.choices))) != len(self.choices):
                raise ValueError("choices has duplicates")
            return self
        if self.low is None or self.high is None:
            raise ValueError("give low and high (a range) or choices")
        if not self.low < self.high:
            raise ValueError(f"empty range: low ({self.low:g}) must be below high ({self.high:g})")
        if self.log and self.low <= 0:
            raise ValueError(f"a log range needs low > 0 (got {self.low:g})")
        if self.log and self.step is not None:
            raise ValueError("log and step cannot be combined")
        return self


class ScoringSpec(_Frozen):
    """Options of metrics.Scorer: region of interest and margin around the scanned field."""

    roi: Literal["scan", "full"] = "scan"
    margin_A: float = Field(0.0, ge=0)


class ObjectiveSpec(_Frozen):
    """What a trial returns: one or more metrics and their directions."""

    metrics: tuple[Metric, ...] = Field(("nrmse",), min_length=1)
    directions: tuple[Direction, ...] | None = Field(None, description="default: each metric's natural direction")
    report_every: int = Field(2, ge=1, description="iterations between intermediate scores (pruning)")
    scoring: ScoringSpec = ScoringSpec()

    @model_validator(mode="after")
    def _consistent(self) -> ObjectiveSpec:
        if len(set(self.metrics)) != len(self.metrics):
            raise ValueError("metrics has duplicates")
        if self.directions is not None and len(self.directions) != len(self.metrics):
            raise ValueError(f"{len(self.directions)} directions for {len(self.metrics)} metrics")
        return self


class OutputSpec(_Frozen):
    """Where results go: artifacts per trial and which result files are kept."""

    dir: str | None = Field(None, description="default out/<study name> beside the study file")
    artifacts: tuple[Literal["score_png", "phase_png", "result_h5"], ...] | None = Field(
        None, description="per trial: score_png (phase, truth, difference, FRC), phase_png, result_h5; "
                          "default score_png with a ground truth, else phase_png")
    keep: Literal["best", "all", "none"] = Field("best", description="result files kept under <dir>/trials/")


class StudyFile(_Frozen):
    """The whole study file."""

    study: StudySection
    data: StudyData
    recon: dict[str, Any] = Field({}, description="the base plan: every key a default for each trial")
    search: dict[str, SearchSpec] = Field(min_length=1, description="dotted paths recon.<plan key> to ranges or choices")
    objective: ObjectiveSpec = ObjectiveSpec()
    output: OutputSpec = OutputSpec()
