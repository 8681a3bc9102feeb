"""The study file: one YAML document that describes a whole tuning study.

`load_study(path)` validates everything that can be checked without touching the storage or
the data (schema, search paths against the plan schema, sampler and pruner options, objective)
and returns a `StudyConfig`: the validated file plus everything derived from it.
`check_data(config)` then checks the data file and its keys. Errors are `PlanError`s with one
line naming the file, the key path and what is allowed.
"""
from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass
from importlib.util import find_spec
from pathlib import Path
from typing import Any

import h5py
from pydantic import ValidationError

from recon.detectors import detect_format
from recon.plan import Plan, PlanError, apply_overrides, describe_validation_error, load_yaml, plan_from_dict
from tune.schema import (DEFAULT_DIRECTIONS, GROUND_TRUTH_METRICS, HALFSET_METRICS, Direction, PrunerSpec, StudyData,
                         StudyFile)
from tune.refine import refined_values
from tune.space import SearchParam, grid, resolve_search
from tune.strategy import check_strategy

@dataclass(frozen=True)
class StudyConfig:
    """A validated study file and what follows from it."""

    file: Path
    spec: StudyFile
    storage_url: str
    output_dir: Path
    data_path: Path
    base_plan: Plan
    params: tuple[SearchParam, ...]  # in study-file order
    directions: tuple[Direction, ...]
    pruner: PrunerSpec
    budget: int  # n_trials, or the grid's size if that is smaller

    @property
    def name(self) -> str:
        return self.spec.study.name

    @property
    def artifact_dir(self) -> Path:
        return self.output_dir / "artifacts"

    @property
    def results_dir(self) -> Path:
        """Where result files are kept (output.keep), one per trial: `trial_stem(number)`.h5."""
        return self.output_dir / "trials"

    @property
    def artifacts(self) -> tuple[str, ...]:
        chosen = self.spec.output.artifacts
        if chosen is not None:
            return chosen
        return ("score_png",) if self.spec.data.ground_truth is not None else ("phase_png",)

    @property
    def grace_period_s(self) -> int:
        s = self.spec.study
        return s.grace_period_s or 3 * s.heartbeat_interval_s


def load_study(path: str | Path, storage: str | None = None) -> StudyConfig:
    """Read and validate a study file; `storage` overrides study.storage."""
    file = Path(path).resolve()
    source = str(Path(path))
    raw = load_yaml(file)
    if not isinstance(raw, dict):
        raise PlanError(f"{source}: expected a mapping with keys study, data, recon, search, objective, output")
    try:
        spec = StudyFile.model_validate(raw)
    except ValidationError as err:
        raise PlanError(describe_validation_error(err, source, StudyFile)) from None
    if "data" in spec.recon:
        raise PlanError(f"{source}: recon.data: give the data at the top level (data:), not inside recon")

    output_dir = _resolve(file.parent, spec.output.dir or f"out/{spec.study.name}")
    data_path = simulated_data_path(output_dir, spec.data) if spec.data.simulate else _resolve(file.parent, spec.data.path)
    base_raw = {**spec.recon, "data": plan_data(spec.data, data_path)}
    try:
        base_plan = Plan.model_validate(base_raw)
    except ValidationError as err:
        raise PlanError(describe_validation_error(err, source, Plan, prefix="recon.")) from None

    params = resolve_search(spec.search, base_raw, source)
    directions = spec.objective.directions or tuple(DEFAULT_DIRECTIONS[m] for m in spec.objective.metrics)
    pruner = _check_objective(spec, base_plan, source)
    _check_refine(spec, base_plan, base_raw, source)
    check_strategy(spec.study.sampler, pruner, params, source)
    budget = spec.study.n_trials
    if spec.study.sampler.name == "grid":
        budget = min(budget, math.prod(len(values) for values in grid(params).values()))
    return StudyConfig(
        file=file, spec=spec, storage_url=storage_url(storage or spec.study.storage, file),
        output_dir=output_dir, data_path=data_path, base_plan=base_plan, params=params,
        directions=directions, pruner=pruner, budget=budget,
    )


def _check_refine(spec: StudyFile, base_plan: Plan, base_raw: dict[str, Any], source: str) -> None:
    """The refined trials' plan (the base plan with study.refine's iterations and fitted optics) is valid,
    and with fitted optics it runs past engine.fit_start, where the optics begin to move."""
    refine = spec.study.refine
    if refine is None or not refine.fit:
        return
    try:
        plan = plan_from_dict(apply_overrides(base_raw, refined_values(refine, base_plan, {})), source)
    except PlanError as err:
        raise PlanError(f"{err} (the refined trials' plan, with study.refine.fit)") from None
    if refine.iterations <= plan.engine.fit_start:
        raise PlanError(f"{source}: study.refine.iterations: {refine.iterations} must exceed recon.engine.fit_start "
                        f"({plan.engine.fit_start}), the iteration from which fitted optics move")


def _check_objective(spec: StudyFile, base_plan: Plan, source: str) -> PrunerSpec:
    """Cross-checks between objective, data and pruner; returns the pruner to use."""
    metrics = spec.objective.metrics
    needs_truth = sorted(GROUND_TRUTH_METRICS.intersection(metrics))
    if needs_truth and spec.data.ground_truth is None:
        raise PlanError(f"{source}: data.ground_truth: metrics {', '.join(needs_truth)} need a ground truth; "
                        "without one use heldout_loss, data_loss or runtime_s")
    if "heldout_loss" in metrics and base_plan.data.heldout_fraction <= 0:
        raise PlanError(f"{source}: data.heldout_fraction: heldout_loss needs held-out positions (e.g. 0.1)")
    if "score_png" in (spec.output.artifacts or ()) and spec.data.ground_truth is None:
        raise PlanError(f"{source}: output.artifacts: score_png needs a ground truth; use phase_png")
    pruner = spec.study.pruner
    if len(metrics) > 1:
        if pruner is not None and pruner.name != "none":
            raise PlanError(f"{source}: study.pruner: pruning needs a single objective metric "
                            f"(got {len(metrics)}); allowed here: {{name: none}}")
        return PrunerSpec(name="none")
    if pruner is None:  # half-set trials could only be pruned on their data loss, another criterion
        pruner = PrunerSpec(name="none" if metrics[0] in HALFSET_METRICS else "median")
    if pruner.name != "none" and metrics[0] == "runtime_s":
        raise PlanError(f"{source}: study.pruner: runtime_s has no intermediate values to prune on; use {{name: none}}")
    return pruner


def plan_data(data: StudyData, data_path: Path) -> dict[str, Any]:
    """The plan's data section: the study's data with the (possibly simulated) file as its path."""
    raw = data.model_dump(mode="json", exclude={"ground_truth", "simulate"}, exclude_defaults=True)
    raw["path"] = str(data_path)
    return raw


def simulated_data_path(output_dir: Path, data: StudyData) -> Path:
    """Where a simulated dataset is written: named by a hash of its specification,
    so that editing `data.simulate` never reuses a stale file."""
    assert data.simulate is not None
    digest = hashlib.sha256(json.dumps(data.simulate.model_dump(mode="json"), sort_keys=True).encode()).hexdigest()
    return output_dir / f"data-{digest[:12]}.h5"


def storage_url(url: str | None, study_file: Path) -> str:
    """The storage URL; SQLite and journal file paths resolve against the study file's folder."""
    if url is None:
        return f"sqlite:///{study_file.with_suffix('.db')}"
    for prefix in ("sqlite:///", "journal:///"):
        if url.startswith(prefix) and url != prefix + ":memory:":
            return prefix + str(_resolve(study_file.parent, url[len(prefix):]))
    plain_pg = "postgresql://"
    if url.startswith(plain_pg) and find_spec("psycopg") is None and find_spec("psycopg2") is not None:
        return "postgresql+psycopg2://" + url[len(plain_pg):]  # SQLAlchemy 2.1's default driver is psycopg 3
    return url


def _resolve(base: Path, value: str | None) -> Path:
    assert value is not None
    p = Path(value).expanduser()
    return p if p.is_absolute() else (base / p).resolve()


#: Data formats that are not HDF5 files with named datasets (their keys cannot be checked here).
NOT_HDF5_FORMATS = frozenset({"npy", "empad", "mib", "dm"})


def check_data(config: StudyConfig) -> None:
    """Check that the data file and every dataset the study names exist (simulated data: nothing to check)."""
    data = config.spec.data
    if data.simulate is not None:
        return
    path = config.data_path
    if not path.is_file():
        raise PlanError(f"{config.file}: data.path: no such file: {path}")
    kind = detect_format(path, data.format)
    if kind in NOT_HDF5_FORMATS:  # read by recon.detectors when the worker loads the data
        if data.ground_truth is not None and GROUND_TRUTH_METRICS.intersection(config.spec.objective.metrics):
            raise PlanError(f"{config.file}: data.ground_truth: a {kind} data file has no ground truth; set it to null")
        return
    keys = {"data.patterns": data.patterns}
    if data.positions and not data.positions.endswith(".npy"):
        keys["data.positions"] = data.positions
    if data.ground_truth is not None:
        keys["data.ground_truth"] = data.ground_truth
    try:
        with h5py.File(path, "r") as f:
            for key, value in keys.items():
                if value not in f:
                    raise PlanError(f"{config.file}: {key}: no dataset {value!r} in {path}")
    except OSError as err:
        raise PlanError(f"{config.file}: data.path: cannot read {path} as HDF5 ({err})") from None
