"""Batched trials (`study.trials_per_batch` = K > 1): K trials of one worker as one compiled program.

A worker asks Optuna for up to K trials (never past the study's budget; each trial's settings are
suggested before the next is asked, so TPE's constant liar and GP's running-trial handling see
them), groups them by static configuration (`recon.static_key`: shapes and named choices), and
runs each group with `recon.reconstruct_batch`: one vmapped program over one copy of the patterns.
Every trial then records, scores, saves and is told exactly as a trial run alone; a pruned or
diverged trial stops changing while the rest of its batch goes on. Heartbeats are sent for every
trial of the batch. Out of device memory, a group is split in half and retried; a single trial
that still does not fit fails with that reason.
"""
from __future__ import annotations

import itertools
import os
import socket
import threading
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import optuna
from optuna.trial import FrozenTrial, TrialState

import recon
from recon.engine import CPU_TRIALS_PER_BATCH, auto_trials_per_batch, free_device_bytes, is_out_of_memory
from recon.lower import lower, trial_bytes
from tune import budget
from tune.objective import BatchInfo, Objective, TrialFailed
from tune.record import TrialRecord, write
from tune.study import StudyConfig

_BATCH_NUMBERS = itertools.count()


@dataclass
class Pending:
    """A trial asked for and started (its plan built), not yet told."""

    trial: optuna.Trial
    plan: recon.Plan


def resolve_trials_per_batch(config: StudyConfig, objective: Objective) -> int:
    """study.trials_per_batch, with `auto` from the device's free memory and the base plan's shapes
    (one trial at a time on a CPU, or when the base plan alone cannot be lowered)."""
    chosen = config.spec.study.trials_per_batch
    if chosen != "auto":
        return int(chosen)
    if free_device_bytes() is None:  # a CPU: nothing to size, and no lowering needed
        return CPU_TRIALS_PER_BATCH
    plan = config.base_plan
    try:
        low = lower(plan, objective.dataset(plan.data))
    except recon.PlanError:  # the base plan needs a searched value (e.g. an optic the file lacks)
        return 1
    shared = sum(getattr(low.data, name).nbytes for name in low.data._fields)
    return auto_trials_per_batch(trial_bytes(low.static), shared)


def ask_batch(study: optuna.Study, objective: Objective, k: int, budget_size: int,
              told: Callable[[FrozenTrial], None]) -> list[Pending]:
    """Up to k started trials; stops at the budget. A trial that fails to start (surplus, a bad plan)
    is told FAIL at once and reported through `told`."""
    pending: list[Pending] = []
    while len(pending) < k:
        counts = budget.count(study.get_trials(deepcopy=False))
        if counts.used >= budget_size and not counts.waiting:
            break
        trial = study.ask()
        objective.current_batch.append(trial)
        try:
            pending.append(Pending(trial, objective.start(trial)))
        except TrialFailed:
            told(_tell(study, objective, trial, TrialState.FAIL))
            if budget.is_surplus(trial):
                break
    return pending


def run_batch(study: optuna.Study, objective: Objective, pending: Sequence[Pending], storage,
              told: Callable[[FrozenTrial], None]) -> None:
    """Run started trials as batched programs (one per static configuration) and tell each outcome."""
    batch_id = f"{socket.gethostname()}:{os.getpid()}:{next(_BATCH_NUMBERS)}"
    with heartbeats(storage, [p.trial for p in pending]):
        for group in _groups(study, objective, pending, told):
            for p, outcome in _run_group(objective, group, batch_id):
                told(_finish(study, objective, p.trial, outcome))


def _groups(study: optuna.Study, objective: Objective, pending: Sequence[Pending],
            told: Callable[[FrozenTrial], None]) -> list[list[Pending]]:
    """Trials that can share one program, in asking order (a trial whose plan cannot be lowered fails)."""
    groups: dict[tuple, list[Pending]] = {}
    for p in pending:
        try:
            key = objective.guard(p.trial, lambda p=p: recon.static_key(p.plan, objective.dataset(p.plan.data)))
        except TrialFailed:
            told(_tell(study, objective, p.trial, TrialState.FAIL))
            continue
        groups.setdefault(key, []).append(p)
    return list(groups.values())


def _run_group(objective: Objective, group: list[Pending], batch_id: str) -> Iterator[tuple[Pending, Callable]]:
    """(trial, its outcome as a step for `Objective.guard`) per trial of one static configuration.
    Out of device memory, each half is run on its own (recursively)."""
    reporters = [objective.reporter(p.trial) for p in group]
    compiled_before = recon.compile_count()
    try:
        results = recon.reconstruct_batch([p.plan for p in group], dataset=objective.dataset(group[0].plan.data),
                                          callbacks=reporters)
    except Exception as err:  # noqa: BLE001 - fails every trial of the group through guard
        if len(group) > 1 and is_out_of_memory(err):
            half = len(group) // 2
            yield from _run_group(objective, group[:half], batch_id)
            yield from _run_group(objective, group[half:], batch_id)
            return
        for p in group:
            yield p, lambda err=err: _reraise(err)
        return
    compiled = recon.compile_count() - compiled_before
    lane_iterations = [max(r.iterations_done, 1) for r in results]
    for p, result, reporter, n in zip(group, results, reporters, lane_iterations):
        info = BatchInfo(batch_id, len(group), n / sum(lane_iterations))
        yield p, lambda p=p, r=result, rep=reporter, info=info: objective.finish(p.trial, r, rep, compiled, info)


def _reraise(err: BaseException) -> None:
    raise err


def _finish(study: optuna.Study, objective: Objective, trial: optuna.Trial,
            step: Callable[[], float | list[float]]) -> FrozenTrial:
    """Tell the trial's outcome: its objective values, PRUNED or FAIL."""
    try:
        values = objective.guard(trial, step)
    except optuna.TrialPruned:
        return _tell(study, objective, trial, TrialState.PRUNED)
    except TrialFailed:
        return _tell(study, objective, trial, TrialState.FAIL)
    return _tell(study, objective, trial, TrialState.COMPLETE, values)


def _tell(study: optuna.Study, objective: Objective, trial: optuna.Trial, state: TrialState,
          values: float | list[float] | None = None) -> FrozenTrial:
    """Tell one outcome; the trial leaves the worker's list of running batch trials.

    The grid sampler calls study.stop() once its grid is used, which Optuna refuses outside
    study.optimize; the outcome is stored before that (Optuna stores it in a `finally`). A trial
    another worker failed meanwhile (this worker's heartbeats could not reach the storage for the
    grace period; it is re-queued there) keeps that state.
    """
    try:
        study.tell(trial, values, state=None if values is not None else state, skip_if_finished=True)
    except RuntimeError as err:
        if "Study.stop" not in str(err):
            raise
    objective.current_batch.remove(trial)
    return next(t for t in study.get_trials(deepcopy=False) if t.number == trial.number)


def fail_unfinished(study: optuna.Study, objective: Objective) -> list[int]:
    """Fail the batch's trials not told yet (the worker is being stopped); returns their numbers."""
    numbers = []
    for trial in list(objective.current_batch):
        write(trial, TrialRecord(fail_reason="interrupted: the worker was stopped (SIGINT/SIGTERM)"))
        _tell(study, objective, trial, TrialState.FAIL)
        numbers.append(trial.number)
    return numbers


@contextmanager
def heartbeats(storage, trials: Sequence[optuna.Trial]) -> Iterator[None]:
    """Record a heartbeat for every trial now and every heartbeat interval until the block ends
    (study.optimize does this for one trial; batched trials are asked and told by hand, and Optuna
    has no public trial id: `Trial._trial_id` is what its own heartbeat thread uses)."""
    interval = storage.get_heartbeat_interval() if hasattr(storage, "get_heartbeat_interval") else None
    if not interval:
        yield
        return
    stop = threading.Event()

    def beat() -> None:
        while True:
            for t in trials:
                try:
                    storage.record_heartbeat(t._trial_id)
                except Exception:  # noqa: BLE001 - a finished trial or a storage hiccup: next beat
                    pass
            if stop.wait(interval):
                return

    thread = threading.Thread(target=beat, name="tune-heartbeats", daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join(timeout=interval + 5)
