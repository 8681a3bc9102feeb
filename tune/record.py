"""What a trial records: its Optuna user attributes, as one typed model.

The objective writes a trial's record in steps (`write(trial, TrialRecord(...))` sets exactly the
fields given, None included); status, report, export and the tests read it back with
`TrialRecord.read(trial)`. The attribute names are the field names below and nowhere else.
"""
from __future__ import annotations

import math
from typing import Any

import optuna
from optuna.trial import FrozenTrial
from pydantic import BaseModel, ConfigDict, Field


class TrialRecord(BaseModel):
    """A trial's user attributes (every field optional: a trial records them as it goes)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    # who ran it
    worker: int | None = Field(None, description="worker index (None: a worker joined without --index)")
    host: str | None = None
    device: str | None = Field(None, description="e.g. gpu:0, cpu:0")
    pid: int | None = None
    # what it ran
    plan: str | None = Field(None, description="the fully resolved plan, YAML")
    seed: int | None = None
    # how it ran
    compile_s: float | None = None
    run_s: float | None = None
    score_s: float | None = None
    compile_count: int | None = Field(None, description="programs compiled by its worker so far")
    compiled: int | None = Field(None, description="programs compiled during this trial")
    iterations_done: int | None = None
    stop_reason: str | None = None
    fitted: dict[str, dict[str, float | None]] = Field(
        {}, description="fitted optics: {plan key: {value, stderr}} (probe.fit, scan.fit)")
    batch: str | None = Field(None, description="batched trials: the batch it ran in (host:pid:n)")
    batch_size: int | None = Field(None, description="trials in that batch's program")
    batch_share: float | None = Field(None, description="its share of the batch's run time (iterations)")
    # what came out
    metrics: dict[str, float | None] = Field({}, description="every score: nrmse, ssim, frc_..., data_loss, runtime_s")
    artifacts: dict[str, str] = Field({}, description="{kind: artifact id} in <output.dir>/artifacts: curves_csv, "
                                                       "phase_png, score_png, result_h5")
    result_path: str | None = Field(None, description="the kept result HDF5 (output.keep)")
    # how it ended, when it did not complete
    fail_reason: str | None = None
    pruned_at: int | None = Field(None, description="the iteration at which it was pruned")
    surplus: bool = Field(False, description="created after the budget was used: failed, never run")
    # refinement (study.refine)
    refine_of: int | None = Field(None, description="a refined trial: the number of the short trial it re-runs")

    @classmethod
    def read(cls, trial: FrozenTrial | optuna.Trial) -> TrialRecord:
        """The record of a stored trial (attributes it never set take their defaults)."""
        attrs = trial.user_attrs
        return cls.model_construct(**{name: attrs[name] for name in cls.model_fields if name in attrs})


def is_refined(trial: FrozenTrial | optuna.Trial) -> bool:
    """A refined trial: a short trial re-run longer (`study.refine`)."""
    return TrialRecord.read(trial).refine_of is not None


def write(trial: optuna.Trial, record: TrialRecord) -> None:
    """Set the fields given to `record` (None included) as the trial's user attributes."""
    for name in sorted(record.model_fields_set):
        trial.set_user_attr(name, _json_safe(getattr(record, name)))


def _json_safe(value: Any) -> Any:
    """NaN and ±inf as None, in lists and dicts too (JSON has no NaN; the dashboard could not read it)."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _json_safe(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_json_safe(v) for v in value]
    return value
