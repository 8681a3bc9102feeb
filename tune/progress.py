"""Text views of a study: the live progress of `tune start` and the report of `tune status`."""
from __future__ import annotations

import shutil
import sys
import time
from collections import Counter
from datetime import timedelta
from statistics import mean
from typing import TextIO

import optuna
from optuna.trial import FrozenTrial, TrialState
from tqdm import tqdm

from tune import budget
from tune.ranking import best_trials
from tune.record import TrialRecord
from tune.refine import describe_parent
from tune.study import StudyConfig


def progress_line(study: optuna.Study, config: StudyConfig) -> str:
    """One line: trials finished of the budget, by outcome, and the best so far."""
    c = budget.count(study.get_trials(deepcopy=False))
    refined = refine_text(c, config)
    return f"{c.finished}/{config.budget} trials: {outcome_text(c)}{refined} | {best_text(study, config)}"


def refine_text(c: budget.Counts, config: StudyConfig) -> str:
    """`; refined 2/3 at 100 iterations` once the refinement (`study.refine`) has begun, else empty."""
    refine = config.spec.study.refine
    if refine is None or not (c.refined or c.refining or c.refine_queued):
        return ""
    return f"; refined {c.refined}/{refine.top_k} at {refine.iterations} iterations"


def outcome_text(c: budget.Counts) -> str:
    """Trials by outcome, e.g. `10 complete, 2 pruned, 0 failed, 2 running`."""
    return (f"{c.complete} complete, {c.pruned} pruned, {c.failed} failed, {c.running} running"
            + (f", {c.waiting} queued" if c.waiting else ""))


def eta_s(finished: int, finished_at_start: int, budget_size: int, elapsed_s: float) -> float | None:
    """Seconds until the budget is used, at the rate trials finished since the start (None before one has)."""
    done = finished - finished_at_start
    if done <= 0:
        return None
    return max(budget_size - finished, 0) * elapsed_s / done


def clock_text(elapsed_s: float, eta: float | None) -> str:
    """`elapsed 0:01:02, ETA 0:03:10` (ETA `?` before a trial has finished)."""
    remaining = "?" if eta is None else str(timedelta(seconds=round(eta)))
    return f"elapsed {timedelta(seconds=round(elapsed_s))}, ETA {remaining}"


class TrialProgress:
    """The live progress of `tune start`. On a terminal: one line fitted to its width (tqdm) with
    trials finished of the budget, elapsed time, ETA (from the rate at which trials finished since
    this start), the best so far and the outcomes. Otherwise: a plain line whenever the counts or the
    best change."""

    def __init__(self, config: StudyConfig, finished_at_start: int, file: TextIO = sys.stdout,
                 terminal: bool | None = None) -> None:
        self.config, self.finished_at_start, self.file = config, finished_at_start, file
        self.started = time.monotonic()
        self.last = ""
        self.bar = None
        if file.isatty() if terminal is None else terminal:
            self.bar = tqdm(total=config.budget, initial=finished_at_start, unit="trial", file=file, smoothing=0,
                            leave=False, bar_format="{n_fmt}/{total_fmt} {bar:10} elapsed {elapsed}, ETA {remaining}{postfix}")

    def update(self, study: optuna.Study) -> None:
        c = budget.count(study.get_trials(deepcopy=False))
        if self.bar is not None:
            self.bar.set_postfix_str(f"{best_text(study, self.config)} | {outcome_text(c)}", refresh=False)
            self.bar.ncols = shutil.get_terminal_size().columns - 1  # the line is cut to fit, the end first
            self.bar.update(c.finished - self.bar.n)
            self.bar.refresh()
            return
        line = progress_line(study, self.config)
        if line != self.last:
            elapsed = time.monotonic() - self.started
            eta = eta_s(c.finished, self.finished_at_start, self.config.budget, elapsed)
            print(f"{line} | {clock_text(elapsed, eta)}", file=self.file, flush=True)
            self.last = line

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def best_text(study: optuna.Study, config: StudyConfig) -> str:
    best = best_trials(study)
    metrics = config.spec.objective.metrics
    if not best:
        return "no complete trial yet"
    if len(metrics) == 1:
        return f"best {metrics[0]} {best[0].value:.4g} (trial {best[0].number}){describe_parent(study, best[0])}"
    return f"{len(best)} trials on the Pareto front of {' vs '.join(metrics)}"


def status_report(study: optuna.Study, config: StudyConfig) -> str:
    """The text of `tune status`."""
    trials = study.get_trials(deepcopy=False)
    c = budget.count(trials)
    lines = [
        f"study    {config.name}",
        f"budget   {c.finished} of {config.budget} trials finished: {c.complete} complete, {c.pruned} pruned, "
        f"{c.failed} failed; {c.running} running, {c.waiting} queued",
    ]
    refine = config.spec.study.refine
    if refine is not None:
        lines.append(f"refine   {c.refined} of the {refine.top_k} best short trials re-run at {refine.iterations} "
                     f"iterations; {c.refining} running, {c.refine_queued} queued")
    if c.requeued or c.surplus:
        lines.append(f"         not counted: {c.requeued} re-queued after their worker stopped, {c.surplus} surplus")
    for t in best_trials(study)[:5]:
        values = ", ".join(f"{m} {v:.4g}" for m, v in zip(config.spec.objective.metrics, t.values))
        lines.append(f"best     trial {t.number}: {values}{describe_parent(study, t)}{batch_text(TrialRecord.read(t))}")
        lines.extend(f"           {name} = {value!r}" for name, value in t.params.items())
    failures = Counter((TrialRecord.read(t).fail_reason or "?").split(":")[0] for t in trials
                       if t.state == TrialState.FAIL and not budget.is_surplus(t))
    if failures:
        lines.append("failures " + ", ".join(f"{n} {reason}" for reason, n in failures.most_common()))
    lines.extend(_worker_lines(trials))
    lines.extend(_batch_lines(trials))
    return "\n".join(lines)


def batch_text(record: TrialRecord) -> str:
    """' (batch host:pid:n of K, x % of its time)' for a batched trial, '' otherwise."""
    if record.batch is None:
        return ""
    return f" (batch {record.batch} of {record.batch_size}, {100 * (record.batch_share or 0):.0f} % of its time)"


def _batch_lines(trials: list[FrozenTrial]) -> list[str]:
    """How many batched programs ran, their sizes, and each finished trial's batch."""
    batched = [(t.number, TrialRecord.read(t)) for t in trials if TrialRecord.read(t).batch is not None]
    if not batched:
        return []
    sizes = Counter(r.batch for _, r in batched)
    lines = [f"batches  {len(sizes)} batched programs, {min(sizes.values())}-{max(sizes.values())} trials each"]
    lines.extend(f"         trial {n}{batch_text(r)}" for n, r in batched)
    return lines


def _worker_lines(trials: list[FrozenTrial]) -> list[str]:
    by_worker: dict[str, list[TrialRecord]] = {}
    for t in trials:
        record = TrialRecord.read(t)
        if t.state.is_finished() and record.worker is not None and not record.surplus:
            key = f"{record.worker} ({record.host or '?'}, {record.device or '?'})"
            by_worker.setdefault(key, []).append(record)
    lines = []
    for key, records in sorted(by_worker.items()):
        runs = [r.run_s for r in records if r.run_s is not None]
        compiles = max((r.compile_count or 0 for r in records), default=0)
        mean_run = f", {mean(runs):.1f} s per run" if runs else ""
        lines.append(f"worker   {key}: {len(records)} trials{mean_run}, {compiles} programs compiled")
    return lines
