"""Samplers and pruners built from the study file.

Optuna does not store samplers or pruners with the study: every worker builds its own from the
study file. Each worker's sampler seed is derived from the study seed, the worker index and the
number of trials stored when it starts, so workers do not propose identical settings and a worker
started again on a resumed study draws new points instead of replaying its first ones (QMC is the
exception: its workers must share one seed, and the sequence index comes from the trial number).
"""
from __future__ import annotations

import importlib.util
import inspect
import warnings
from typing import Any

import numpy as np
import optuna
from optuna import pruners, samplers

from recon.plan import PlanError
from tune.schema import PrunerSpec, SamplerSpec
from tune.space import SearchParam, grid

SAMPLERS: dict[str, Any] = {
    "tpe": samplers.TPESampler, "gp": samplers.GPSampler, "cmaes": samplers.CmaEsSampler,
    "random": samplers.RandomSampler, "qmc": samplers.QMCSampler, "grid": samplers.GridSampler,
    "nsga2": samplers.NSGAIISampler,
}
PRUNERS: dict[str, Any] = {
    "none": pruners.NopPruner, "median": pruners.MedianPruner, "percentile": pruners.PercentilePruner,
    "successive_halving": pruners.SuccessiveHalvingPruner, "hyperband": pruners.HyperbandPruner,
    "wilcoxon": pruners.WilcoxonPruner, "threshold": pruners.ThresholdPruner, "patient": pruners.PatientPruner,
}
#: Samplers that need a package beyond the default install.
SAMPLER_PACKAGES = {"gp": "torch", "cmaes": "cmaes"}


def worker_seed(study_seed: int | None, worker_index: int | None, trials_stored: int) -> int | None:
    """A sampler seed for one worker start, derived from the study seed, the worker index and the
    number of trials the study held when the worker started (so every start draws new points).

    Without a worker index (a worker joined by hand) the seed is drawn at random, so that two
    such workers never propose the same settings."""
    if study_seed is None:
        return None
    if worker_index is None:
        return int(np.random.SeedSequence().generate_state(1)[0])
    return int(np.random.SeedSequence([study_seed, worker_index, trials_stored]).generate_state(1)[0])


def build_sampler(spec: SamplerSpec, params: tuple[SearchParam, ...], worker_index: int | None,
                  trials_stored: int) -> optuna.samplers.BaseSampler:
    """The sampler of one worker start (see `worker_seed`)."""
    seed = spec.seed if spec.name == "qmc" else worker_seed(spec.seed, worker_index, trials_stored)
    options = dict(spec.options)
    if spec.name == "grid":
        return samplers.GridSampler(grid(params), seed=seed, **options)
    return SAMPLERS[spec.name](seed=seed, **options)


def build_pruner(spec: PrunerSpec) -> optuna.pruners.BasePruner:
    """The pruner of the study (the same in every worker)."""
    if spec.name == "patient":
        wrapped = build_pruner(spec.wrapped) if spec.wrapped is not None else None
        return pruners.PatientPruner(wrapped, **spec.options)
    return PRUNERS[spec.name](**spec.options)


def check_strategy(sampler: SamplerSpec, pruner: PrunerSpec, params: tuple[SearchParam, ...], source: str) -> None:
    """Build the sampler and pruner once so that bad names, options or combinations fail early."""
    package = SAMPLER_PACKAGES.get(sampler.name)
    if package and importlib.util.find_spec(package) is None:
        raise PlanError(f"{source}: study.sampler.name: sampler {sampler.name!r} needs the Python package "
                        f"{package!r} (pip install {package}); other samplers: tpe, random, qmc, grid, nsga2")
    if sampler.name == "grid" and grid(params) is None:
        raise PlanError(f"{source}: study.sampler: the grid sampler needs choices, integer ranges or ranges with a step "
                        "for every search key")
    _check_options("study.sampler", SAMPLERS[sampler.name], lambda: build_sampler(sampler, params, 0, 0), source)
    if pruner.wrapped is not None and pruner.name != "patient":
        raise PlanError(f"{source}: study.pruner.wrapped: only the patient pruner wraps another pruner")
    if pruner.wrapped is not None:
        _check_options("study.pruner.wrapped", PRUNERS[pruner.wrapped.name], lambda: build_pruner(pruner.wrapped), source)
    _check_options("study.pruner", PRUNERS[pruner.name], lambda: build_pruner(pruner), source)


def _check_options(key: str, cls: Any, build: Any, source: str) -> None:
    allowed = [p for p in inspect.signature(cls).parameters if p not in ("self", "seed", "search_space", "wrapped_pruner")]
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            build()
    except (TypeError, ValueError) as err:
        raise PlanError(f"{source}: {key}.options: {err}; allowed options: {', '.join(allowed) or 'none'}") from None
