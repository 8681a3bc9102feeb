"""The study-wide trial budget (`study.n_trials`), shared by all workers.

A trial *uses* the budget when it is COMPLETE, PRUNED, RUNNING or WAITING, or FAIL and neither
re-queued nor surplus. Refined trials (`study.refine`, `tune.refine`) are counted apart: they run
after the budget of short trials is used and never use it. A re-queued trial (its worker died or was stopped) is replaced by a
WAITING copy with the same parameters, so it does not count twice.

Several workers can create trials at the same moment. So each worker, once its trial exists,
counts the trials numbered below its own: if those already use the whole budget, its trial is
*surplus*: it is marked FAIL with the user attribute `surplus = true`, is never run and is left
out of every count (`tune status`, the report). In the normal case exactly `n_trials` trials finish.
"""
from __future__ import annotations

import warnings
from collections.abc import Sequence
from dataclasses import dataclass

from optuna.exceptions import ExperimentalWarning
from optuna.storages import RetryHeartbeatStaleTrialCallback
from optuna.trial import FrozenTrial, TrialState

from tune.record import TrialRecord, is_refined


def requeued_numbers(trials: Sequence[FrozenTrial]) -> set[int]:
    """Numbers of the trials that were failed and re-queued as a WAITING copy."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ExperimentalWarning)
        return {n for t in trials for n in RetryHeartbeatStaleTrialCallback.retry_history(t)}


def is_surplus(trial: FrozenTrial) -> bool:
    """Created after the budget was used: failed, never run, counted nowhere."""
    return bool(TrialRecord.read(trial).surplus)


@dataclass(frozen=True)
class Counts:
    """Trials of a study by what they mean for the budget."""

    complete: int = 0
    pruned: int = 0
    failed: int = 0  # not re-queued, not surplus
    running: int = 0
    waiting: int = 0
    requeued: int = 0
    surplus: int = 0
    refined: int = 0        # refined trials finished (complete, pruned or failed)
    refining: int = 0       # refined trials running
    refine_queued: int = 0  # refined trials waiting to run

    @property
    def finished(self) -> int:
        return self.complete + self.pruned + self.failed

    @property
    def used(self) -> int:
        """Trials that use the budget: finished, running or waiting to run."""
        return self.finished + self.running + self.waiting


def count(trials: Sequence[FrozenTrial], below: int | None = None) -> Counts:
    """Count trials (only those numbered below `below`, if given)."""
    requeued = requeued_numbers(trials)
    n = dict(complete=0, pruned=0, failed=0, running=0, waiting=0, requeued=0, surplus=0, refined=0, refining=0,
             refine_queued=0)
    for t in trials:
        if below is not None and t.number >= below:
            continue
        if is_surplus(t):
            n["surplus"] += 1
        elif t.state == TrialState.FAIL and t.number in requeued:
            n["requeued"] += 1
        elif is_refined(t):
            n["refined" if t.state.is_finished() else "refining" if t.state == TrialState.RUNNING else "refine_queued"] += 1
        else:
            key = {TrialState.COMPLETE: "complete", TrialState.PRUNED: "pruned", TrialState.FAIL: "failed",
                   TrialState.RUNNING: "running", TrialState.WAITING: "waiting"}[t.state]
            n[key] += 1
    return Counts(**n)
