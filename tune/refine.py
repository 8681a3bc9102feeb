"""Refinement: the best short trials run again, longer, once the budget of short trials is used.

`study.refine: {top_k: K, iterations: N, fit: [...]}`. Short trials rank settings by their state after the base
plan's iterations, while users keep the settings for a long reconstruction. So when the study's
`n_trials` short trials have finished, the K best by the objective (`tune.ranking`) are queued
again with the same parameters as new trials that name their parent (user attribute `refine_of`)
and run N iterations; with `fit` (plan key paths of optics), those optics are fitted from the
parent's values (recon's `probe.fit` / `scan.fit`: Gauss-Newton with the object, Fisher errors
recorded per trial), so a study searches the optics coarsely and fits them finely. Refined trials are never pruned and do not use `n_trials`; the study's best
(`tune status`, the report, `tune best`, `output.keep: best`) is chosen among the complete refined
trials, shown with its parent's short score. Any worker may queue them; a refined trial whose parent
already has an earlier one (two workers queued it at the same moment) is surplus and never runs.
"""
from __future__ import annotations

from typing import Any, Sequence

import optuna
from optuna.trial import FrozenTrial, TrialState

from recon.plan import Plan
from tune import budget
from tune.ranking import ranked_short_trials
from tune.record import TrialRecord
from tune.schema import RefineSpec

#: The user attribute that names a refined trial's parent (a `TrialRecord` field).
PARENT_ATTR = "refine_of"


def fit_overrides(keys: Sequence[str], probe_fit: Sequence[str] = (), scan_fit: Sequence[str] = ()) -> dict[str, list[str]]:
    """Plan overrides that fit `keys` (plan key paths, `schema.FITTABLE_KEYS`) beside the plan's own
    `probe.fit` / `scan.fit` (recon's names: defocus_A, C12_A, rotation_deg); {} when nothing is added."""
    probe = [k.rsplit(".", 1)[1] for k in keys if k.startswith("probe.")]
    scan = [k.rsplit(".", 1)[1] for k in keys if k.startswith("scan.")]
    out = {}
    if probe:
        out["probe.fit"] = list(dict.fromkeys([*probe_fit, *probe]))
    if scan:
        out["scan.fit"] = list(dict.fromkeys([*scan_fit, *scan]))
    return out


def refined_values(refine: RefineSpec, plan: Plan, values: dict[str, Any]) -> dict[str, Any]:
    """A refined trial's plan values: its parent's, the refinement's iterations and fitted optics."""
    return {**values, "iterations": refine.iterations, **fit_overrides(refine.fit, plan.probe.fit, plan.scan.fit)}


def refined_parents(trials: list[FrozenTrial]) -> set[int]:
    """Parents that have a refined trial that counts (queued, running or finished; not surplus)."""
    return {parent for t in trials if (parent := TrialRecord.read(t).refine_of) is not None and not budget.is_surplus(t)}


def pending_parents(study: optuna.Study, top_k: int) -> list[int]:
    """Numbers of the `top_k` best short trials that have no refined trial yet."""
    done = refined_parents(study.get_trials(deepcopy=False))
    return [t.number for t in ranked_short_trials(study, top_k) if t.number not in done]


def queue_refinements(study: optuna.Study, top_k: int) -> list[int]:
    """Queue a refined copy (same parameters, `refine_of` set) of each pending parent; their numbers."""
    parents = pending_parents(study, top_k)
    params = {t.number: t.params for t in study.get_trials(deepcopy=False)}
    for number in parents:
        study.enqueue_trial(params[number], user_attrs={PARENT_ATTR: number})
    return parents


def is_duplicate(trial: optuna.Trial) -> bool:
    """A refined trial whose parent already has an earlier refined trial that counts."""
    parent = TrialRecord.read(trial).refine_of
    trials = trial.study.get_trials(deepcopy=False)
    requeued = budget.requeued_numbers(trials)
    return any(TrialRecord.read(t).refine_of == parent and t.number < trial.number and t.number not in requeued
               and not budget.is_surplus(t) for t in trials)


def parent_values(study: optuna.Study, trial: FrozenTrial) -> tuple[float, ...] | None:
    """The objective values of a refined trial's parent (None for a short trial or an incomplete parent)."""
    parent = TrialRecord.read(trial).refine_of
    found = [t for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)) if t.number == parent]
    return tuple(found[0].values) if parent is not None and found else None


def describe_parent(study: optuna.Study, trial: FrozenTrial) -> str:
    """' (refined from trial P, short: V)' for a refined trial, '' for a short one."""
    parent = TrialRecord.read(trial).refine_of
    if parent is None:
        return ""
    values = parent_values(study, trial)
    short = "" if values is None else ", short: " + ", ".join(f"{v:.4g}" for v in values)
    return f" (refined from trial {parent}{short})"
