"""A worker process: runs trials of one study until the study-wide budget is used.

Any number of workers, on any machines that reach the storage, may run at once (`tune start`
spawns them; `tune worker` joins by hand or from a Slurm job). A worker

* builds its sampler (own seed) and the pruner from the study file;
* runs trials with `study.optimize` and heartbeats, so a worker killed outright leaves a trial
  that is failed after the grace period and re-queued with the same parameters;
* stops asking for trials when the budget is used, but before it exits waits until no trial is
  RUNNING any more, failing stale ones (`fail_stale_trials`) and running their re-queued copies;
* then, with `study.refine`, queues the best short trials again (`tune.refine`) and runs them, alone;
* on SIGTERM or Ctrl-C fails its running trial, re-queues it for another worker and exits
  (exit status 143 or 130);
* retries storage calls through outages (tune.storage) and exits with one line and status 75 when
  the storage stays unreachable for `study.storage_timeout_s`; its trial is re-run by the others.
"""
from __future__ import annotations

import os
import signal
import time
from collections.abc import Callable
from types import FrameType

import optuna
from optuna.exceptions import UpdateFinishedTrialError
from optuna.storages import RetryHeartbeatStaleTrialCallback, fail_stale_trials
from optuna.trial import FrozenTrial, TrialState

from tune import budget
from recon.simulate import write_dataset
from tune.batch import ask_batch, fail_unfinished, resolve_trials_per_batch, run_batch
from tune.integrity import check_fingerprint, load_checked_data, storage_failure
from tune.objective import Objective, TrialFailed, WorkerInfo, keep_best_results, stop_optimize
from tune.record import TrialRecord
from tune.refine import queue_refinements
from tune.storage import STORAGE_EXIT_STATUS, create_or_load, open_study_storage
from tune.strategy import build_pruner, build_sampler
from tune.study import StudyConfig, check_data

#: Seconds between looks at the storage while waiting for other workers' trials to end.
WAIT_POLL_S = 1.0


class Interrupted(KeyboardInterrupt):
    """SIGINT or SIGTERM arrived."""

    def __init__(self, signum: int) -> None:
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


def _raise_interrupted(signum: int, _frame: FrameType | None) -> None:
    for s in (signal.SIGINT, signal.SIGTERM):
        signal.signal(s, signal.SIG_IGN)  # the clean-up below must not be interrupted again
    raise Interrupted(signum)


def ensure_data(config: StudyConfig) -> None:
    """Write the simulated dataset of the study if it does not exist yet. Several processes may
    race here: each writes its own temporary file and the first rename wins, so the file is
    always complete."""
    spec = config.spec.data.simulate
    path = config.data_path
    if spec is None or path.is_file():
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.stem}.{os.getpid()}.tmp.h5")
    try:
        write_dataset(spec, tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def join_study(config: StudyConfig, storage: optuna.storages.BaseStorage, index: int | None) -> optuna.Study:
    """The study (created if needed) with the pruner and this worker's sampler, seeded anew at
    every start from the trials already stored (`tune.strategy.worker_seed`)."""
    study = create_or_load(config, storage, pruner=build_pruner(config.pruner))
    stored = len(study.get_trials(deepcopy=False))
    study.sampler = build_sampler(config.spec.study.sampler, config.params, index, stored)
    return study


def run_worker(config: StudyConfig, index: int | None, device: str,
               log: Callable[[str], None] = lambda line: print(line, flush=True)) -> int:
    """Run trials until the budget is used; returns the exit status (0, or 130/143 if stopped)."""
    for s in (signal.SIGINT, signal.SIGTERM):
        signal.signal(s, _raise_interrupted)
    optuna.logging.set_verbosity(optuna.logging.ERROR)
    name = f"worker {index}" if index is not None else f"worker pid {os.getpid()}"
    study: optuna.Study | None = None
    objective: Objective | None = None
    try:
        ensure_data(config)
        check_data(config)
        objective = Objective(config, WorkerInfo.here(index, device), config.budget)
        objective.preload(load_checked_data(config))  # a corrupt data file: PlanError before the study is touched
        storage = open_study_storage(config)
        study = join_study(config, storage, index)
        check_fingerprint(study, config)  # refuse to join when the data file changed since the study began
        k = resolve_trials_per_batch(config, objective)
        log(f"{name}: joined study {config.name} on {device}" + (f", {k} trials per batch" if k > 1 else ""))
        _work(study, objective, config, lambda t: log(f"{name}: {describe_trial(t)}"), k, storage)
    except Interrupted as stop:
        _requeue_interrupted(study, objective, config.spec.study.max_retries)
        log(f"{name}: stopped by {stop}")
        return 128 + stop.signum
    except Exception as err:
        lost = storage_failure(err)
        if lost is None:
            raise
        log(f"{name}: {lost}; exiting (its running trial is re-run by the other workers)")
        return STORAGE_EXIT_STATUS
    log(f"{name}: done")
    return 0


def _work(study: optuna.Study, objective: Objective, config: StudyConfig, report: Callable[[FrozenTrial], None],
          trials_per_batch: int = 1, storage: optuna.storages.BaseStorage | None = None) -> None:
    """Run trials (alone, or `trials_per_batch` at a time as one program) until the budget is used."""
    deadline = time.monotonic() + (config.spec.study.timeout_s or float("inf"))

    def after_trial(study: optuna.Study, trial: FrozenTrial) -> None:
        objective.current = None
        if not budget.is_surplus(trial):
            report(trial)
        if config.spec.output.keep == "best" and trial.state == TrialState.COMPLETE:
            keep_best_results(study, config.results_dir)
        if budget.count(study.get_trials(deepcopy=False)).used >= config.budget:
            stop_optimize(study)

    refine = config.spec.study.refine
    while time.monotonic() < deadline:
        fail_stale_trials(study)
        counts = budget.count(study.get_trials(deepcopy=False))
        if (counts.used < config.budget or counts.waiting) and trials_per_batch > 1:
            pending = ask_batch(study, objective, trials_per_batch, config.budget, lambda t: after_trial(study, t))
            run_batch(study, objective, pending, storage, lambda t: after_trial(study, t))
        elif counts.used < config.budget or counts.waiting or counts.refine_queued:
            try:
                study.optimize(objective, callbacks=[after_trial], catch=(TrialFailed,), gc_after_trial=False,
                               timeout=None if deadline == float("inf") else max(deadline - time.monotonic(), 0.0))
            except (UpdateFinishedTrialError, ValueError):  # "Cannot tell a FAIL trial": see _taken_over
                if not _taken_over(study, objective):
                    raise
        elif counts.running or counts.refining:
            time.sleep(WAIT_POLL_S)  # other workers' trials may still die and be re-queued
        elif refine is None or not queue_refinements(study, refine.top_k):
            return


def _taken_over(study: optuna.Study, objective: Objective) -> bool:
    """True when this worker's trial was failed (and re-queued) by another worker meanwhile: its
    heartbeats could not reach the storage for longer than the grace period. The worker goes on."""
    if objective.current is None:
        return False
    trial = next((t for t in study.get_trials(deepcopy=False) if t.number == objective.current.number), None)
    return trial is not None and trial.state == TrialState.FAIL


def _requeue_interrupted(study: optuna.Study | None, objective: Objective | None, max_retries: int) -> None:
    """Queue the trials this worker was running when it was stopped (alone or a whole batch), with
    the same parameters."""
    if study is None or objective is None:
        return
    numbers = set(fail_unfinished(study, objective))
    if objective.current is not None:
        numbers.add(objective.current.number)
    for trial in study.get_trials(deepcopy=False):
        if trial.number in numbers and trial.state == TrialState.FAIL and not budget.is_surplus(trial):
            RetryHeartbeatStaleTrialCallback(max_retry=max_retries)(study, trial)


def describe_trial(t: FrozenTrial) -> str:
    """One line about a finished trial."""
    state = t.state.name.lower()
    record = TrialRecord.read(t)
    if t.state == TrialState.COMPLETE:
        detail = " ".join(f"{v:.4g}" for v in t.values)
    elif t.state == TrialState.PRUNED:
        detail = f"at iteration {record.pruned_at}"
    else:
        detail = record.fail_reason or ""
    timing = ""
    if record.run_s is not None:
        timing = f" (run {record.run_s:.1f} s, compile {record.compile_s or 0:.1f} s)"
    refined = f" refining trial {record.refine_of}" if record.refine_of is not None else ""
    return f"trial {t.number}{refined} {state} {detail}{timing}".rstrip()

