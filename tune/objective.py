"""One trial: suggest settings, build their plan, reconstruct, score against the ground truth,
record everything (`tune.record.TrialRecord`) and save the outputs (result file, images, curves).

Artifacts (`<output.dir>/artifacts`, named by artifact id; the file name the dashboard shows is
`trial_00007_<kind>.<ext>`): every trial that ran has `curves_csv` (loss, data loss, ... per
iteration); a pruned trial has `phase_png` of its object when it was pruned; a complete one has the
kinds of `output.artifacts`.

With a half-set objective metric (`halfset_frc_resolution_A`, `halfset_frc_area`) the trial's plan is
also reconstructed on the two halves of the scan (`recon.halfset`) and compared (`metrics.halfset`).
A refined trial (`tune.refine`) runs its parent's settings for `study.refine.iterations`, with the
optics of `study.refine.fit` fitted, and is never pruned.
"""
from __future__ import annotations

import math
import os
import socket
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import optuna
import pandas as pd
from optuna.artifacts import upload_artifact

import metrics
import recon
from metrics.figure import save_phase_figure, save_score_figure
from metrics.halfset import compare_halves
from recon.halfset import reconstruct_halves
from tune import budget
from tune.ranking import best_trials
from tune.record import TrialRecord, write
from tune.refine import is_duplicate, refined_values
from tune.schema import GROUND_TRUTH_METRICS, HALFSET_METRICS, score_key
from tune.space import suggest, trial_plan
from tune.storage import AtomicArtifactStore, StorageUnreachable
from tune.study import StudyConfig

class TrialFailed(Exception):
    """A trial failed for the reason recorded in its `fail_reason`; the worker goes on."""


@dataclass(frozen=True)
class WorkerInfo:
    """Who runs the trials."""

    index: int | None
    device: str
    host: str
    pid: int

    @classmethod
    def here(cls, index: int | None, device: str) -> WorkerInfo:
        return cls(index, device, socket.gethostname(), os.getpid())


class Objective:
    """The Optuna objective of one worker. Datasets and the scorer are loaded once per worker;
    everything else is rebuilt from configuration for each trial."""

    def __init__(self, config: StudyConfig, worker: WorkerInfo, budget_size: int) -> None:
        self.config = config
        self.worker = worker
        self.budget_size = budget_size
        self.current: optuna.Trial | None = None  # the trial run alone now
        self.current_batch: list[optuna.Trial] = []  # batched trials asked and not told yet
        self._datasets: dict[Any, recon.Dataset] = {}
        self._scorer: metrics.Scorer | None = None
        self._store = AtomicArtifactStore(str(config.artifact_dir))  # created on first write (a trial's error)

    # ------------------------------------------------------------------ the trial
    def __call__(self, trial: optuna.Trial) -> float | list[float]:
        """One trial run alone (study.optimize): start, reconstruct, finish."""
        self.current = trial
        plan = self.start(trial)
        return self.guard(trial, lambda: self.finish(trial, *self.run(trial, plan)))

    def start(self, trial: optuna.Trial) -> recon.Plan:
        """Suggest the trial's settings and build its plan; a trial past the budget (or a second
        refinement of one parent) fails as surplus."""
        values = suggest(trial, self.config.params)
        self._record_worker(trial)
        surplus = self._surplus(trial)
        if surplus:
            write(trial, TrialRecord(surplus=True))
            stop_optimize(trial.study)
            raise TrialFailed(f"surplus: {surplus}")
        return self.guard(trial, lambda: self._plan(trial, values))

    def guard(self, trial: optuna.Trial, step: Callable[[], Any]) -> Any:
        """Run one step of a trial: any error fails that trial only (out of memory included), with its
        reason recorded; pruning, interruption, a lost storage and a recorded failure pass through."""
        try:
            return step()
        except (optuna.TrialPruned, TrialFailed, StorageUnreachable):
            raise
        except KeyboardInterrupt:
            write(trial, TrialRecord(fail_reason="interrupted: the worker was stopped (SIGINT/SIGTERM)"))
            raise
        except Exception as err:  # one trial's error never stops the worker
            raise _fail(trial, _one_line(err)) from None

    def reporter(self, trial: optuna.Trial) -> Reporter:
        """The reconstruction callback of a trial: intermediate values and pruning."""
        prune = self.config.pruner.name != "none" and TrialRecord.read(trial).refine_of is None
        return Reporter(trial, self._intermediate(), self.config.spec.objective.report_every, prune=prune)

    def run(self, trial: optuna.Trial, plan: recon.Plan) -> tuple[recon.Result, Reporter, int]:
        """Reconstruct one plan alone; returns the result, its reporter and the programs compiled."""
        compiled_before = recon.compile_count()
        reporter = self.reporter(trial)
        result = recon.reconstruct(plan, dataset=self.dataset(plan.data), callback=reporter)
        return result, reporter, recon.compile_count() - compiled_before

    def finish(self, trial: optuna.Trial, result: recon.Result, reporter: Reporter, compiled: int,
               batch: BatchInfo | None = None) -> float | list[float]:
        """Record how the reconstruction went, then score it and save its outputs; raises when the
        trial diverged or was pruned or its objective is not a finite number."""
        write(trial, TrialRecord(
            compile_s=result.compile_s, run_s=result.run_s, iterations_done=result.iterations_done,
            stop_reason=result.stop_reason, compile_count=recon.compile_count(), compiled=compiled))
        if batch is not None:
            write(trial, TrialRecord(batch=batch.batch_id, batch_size=batch.size, batch_share=batch.share))
        if result.fitted:  # fitted optics (probe.fit, scan.fit) with their Fisher standard errors
            write(trial, TrialRecord(fitted={k: {"value": v, "stderr": result.fitted_stderr.get(k)}
                                             for k, v in result.fitted.items()}))
        artifacts = {"curves_csv": self._save_curves(trial, result)}
        write(trial, TrialRecord(artifacts=artifacts))
        if result.diverged:
            raise _fail(trial, f"diverged: {result.stop_reason}")
        if reporter.pruned is not None:
            self._record_pruned(trial, reporter.pruned, artifacts)
        scores, report = self._score(trial, result)
        objective = self._objective(trial, scores)
        write(trial, TrialRecord(artifacts={**artifacts, **self._save_outputs(trial, result, report)}))
        return objective

    def _record_worker(self, trial: optuna.Trial) -> None:
        """Who runs the trial; a re-run drops the outcome of the attempt it replaces."""
        w = self.worker
        write(trial, TrialRecord(worker=w.index, host=w.host, device=w.device, pid=w.pid))
        earlier = TrialRecord.read(trial)
        if earlier.fail_reason is not None or earlier.pruned_at is not None:
            write(trial, TrialRecord(fail_reason=None, pruned_at=None))

    def _surplus(self, trial: optuna.Trial) -> str | None:
        """Why the trial must not run: the short trials before it use the budget, or it refines a
        parent that already has a refined trial (None: it runs)."""
        parent = TrialRecord.read(trial).refine_of
        if parent is not None:
            return f"trial {parent} already has a refined trial" if is_duplicate(trial) else None
        earlier = budget.count(trial.study.get_trials(deepcopy=False), below=trial.number)
        if earlier.used >= self.budget_size:
            return f"trials before #{trial.number} already use the budget of {self.budget_size}"
        return None

    def _plan(self, trial: optuna.Trial, values: dict[str, Any]) -> recon.Plan:
        """The base plan with the suggested values (a refined trial: and the refinement's
        iterations), validated, recorded with its seed."""
        refine = self.config.spec.study.refine
        if TrialRecord.read(trial).refine_of is not None and refine is not None:
            values = refined_values(refine, self.config.base_plan, values)
        plan = trial_plan(self.config.base_plan, values, source=f"trial {trial.number}")
        write(trial, TrialRecord(plan=plan.to_yaml(), seed=plan.seed))
        return plan

    def _record_pruned(self, trial: optuna.Trial, pruned: Pruned, artifacts: dict[str, str]) -> None:
        """Keep a small phase image of the object the pruner stopped, and raise TrialPruned."""
        with tempfile.TemporaryDirectory(prefix="tune-") as tmp:
            png = save_phase_figure(Path(tmp) / f"{trial_stem(trial.number)}_phase.png", pruned.reconstruction,
                                    title=f"trial {trial.number}, pruned at iteration {pruned.iteration}")
            artifacts = {**artifacts, "phase_png": self._upload(trial, png)}
        write(trial, TrialRecord(pruned_at=pruned.iteration, artifacts=artifacts))
        raise optuna.TrialPruned(f"pruned at iteration {pruned.iteration}")

    def _score(self, trial: optuna.Trial, result: recon.Result) -> tuple[dict[str, float], metrics.ScoreReport | None]:
        """Every score of a result (and the metrics ScoreReport, None without a ground truth), recorded;
        the half-set scores of its plan when an objective metric needs them."""
        start = time.perf_counter()
        scorer = self.scorer
        report = scorer.report(result) if scorer is not None else None
        scores = {k: float(v) for k, v in (report.scores if report is not None else {}).items()
                  if isinstance(v, (int, float)) and not isinstance(v, bool)}
        scores.update(heldout_loss=_float(result.heldout_loss), data_loss=_float(result.final_data_loss),
                      runtime_s=float(result.run_s))
        if HALFSET_METRICS.intersection(self.config.spec.objective.metrics):
            scores.update(self._halfset_scores(result.plan))
        write(trial, TrialRecord(score_s=time.perf_counter() - start, metrics=scores))
        return scores, report

    def _objective(self, trial: optuna.Trial, scores: dict[str, float]) -> float | list[float]:
        """The objective metrics' values; a trial fails when one is not a finite number."""
        names = self.config.spec.objective.metrics
        values = [_objective_value(scores, m) for m in names]
        bad = [m for m, v in zip(names, values) if not math.isfinite(v)]
        if bad:
            raise _fail(trial, f"objective {', '.join(bad)} is not a finite number")
        return values[0] if len(values) == 1 else values

    def _halfset_scores(self, plan: recon.Plan) -> dict[str, float]:
        """The half-set FRC scores of the plan (`halfset_s`: seconds for both halves and the comparison)."""
        start = time.perf_counter()
        half_a, half_b = reconstruct_halves(plan, self.dataset(plan.data))
        if half_a.diverged or half_b.diverged:
            return dict.fromkeys(HALFSET_METRICS, math.nan)
        return {**compare_halves(half_a, half_b).scores(), "halfset_s": time.perf_counter() - start}

    # ------------------------------------------------------------------ data and scoring
    def preload(self, dataset: recon.Dataset) -> None:
        """Use `dataset` (already loaded and checked) for trials on the base plan's data."""
        self._datasets[self.config.base_plan.data] = dataset

    def dataset(self, data: Any) -> recon.Dataset:
        """The prepared dataset of a plan's data section (loaded once per worker)."""
        if data not in self._datasets:
            self._datasets[data] = recon.load_dataset(data)
        return self._datasets[data]

    @property
    def scorer(self) -> metrics.Scorer | None:
        """The ground-truth scorer (None without a ground truth), built on first use."""
        key = self.config.spec.data.ground_truth
        if self._scorer is None and key is not None:
            scoring = self.config.spec.objective.scoring
            self._scorer = metrics.build_scorer(self.config.data_path, key, **scoring.model_dump())
        return self._scorer

    def _intermediate(self) -> Callable[[Any], float] | None:
        """The value reported every `report_every` iterations (None for multi-objective studies)."""
        names = self.config.spec.objective.metrics
        if len(names) > 1 or names[0] == "runtime_s":
            return None
        if names[0] not in GROUND_TRUTH_METRICS:
            return lambda progress: float(progress.data_loss)  # heldout_loss is pruned on the data loss
        name, scorer = names[0], self.scorer
        assert scorer is not None
        quick = name != "ssim"  # quick scores skip SSIM and register more coarsely

        def value(progress: Any) -> float:
            phase = metrics.Reconstruction(progress.object(), progress.dx_A, progress.origin_yx_A).phase_yx
            return _objective_value(scorer.score_phase(phase, progress.dx_A, progress.origin_yx_A, quick=quick), name)

        return value

    # ------------------------------------------------------------------ artifacts and result files
    def _save_curves(self, trial: optuna.Trial, result: recon.Result) -> str:
        """Upload the per-iteration history (loss, data loss, regularisers, seconds) as CSV."""
        with tempfile.TemporaryDirectory(prefix="tune-") as tmp:
            path = Path(tmp) / f"{trial_stem(trial.number)}_curves.csv"
            curves = pd.DataFrame({name: list(values) for name, values in result.history.items()})
            curves.index = pd.RangeIndex(1, len(curves) + 1, name="iteration")
            curves.to_csv(path)
            return self._upload(trial, path)

    def _save_outputs(self, trial: optuna.Trial, result: recon.Result,
                      report: metrics.ScoreReport | None) -> dict[str, str]:
        """Keep the result file (output.keep) and upload the artifacts (output.artifacts); their ids."""
        wanted, keep = self.config.artifacts, self.config.spec.output.keep
        ids: dict[str, str] = {}
        with tempfile.TemporaryDirectory(prefix="tune-") as tmp:
            stem = trial_stem(trial.number)
            if keep != "none" or "result_h5" in wanted:
                folder = self.config.results_dir if keep != "none" else Path(tmp)  # save() creates it
                result_file = result.save(folder / f"{stem}.h5")
                if keep != "none":
                    write(trial, TrialRecord(result_path=str(result_file)))
                if "result_h5" in wanted:
                    ids["result_h5"] = self._upload(trial, result_file)
            if "score_png" in wanted and report is not None:
                ids["score_png"] = self._upload(trial, save_score_figure(Path(tmp) / f"{stem}_score.png", report,
                                                                         title=f"trial {trial.number}"))
            if "phase_png" in wanted:
                phase_png = save_phase_figure(Path(tmp) / f"{stem}_phase.png",
                                              metrics.Reconstruction(result.object, result.dx_A, result.origin_yx_A),
                                              title=f"trial {trial.number}")
                ids["phase_png"] = self._upload(trial, phase_png)
        return ids

    def _upload(self, trial: optuna.Trial, path: Path) -> str:
        return upload_artifact(artifact_store=self._store, file_path=str(path), study_or_trial=trial)


@dataclass(frozen=True)
class BatchInfo:
    """Which batch a trial ran in (tune.batch): its id, its number of trials and the trial's share
    of the batch's run time (its iterations over all trials' iterations)."""

    batch_id: str
    size: int
    share: float


@dataclass(frozen=True)
class Pruned:
    """Where the pruner stopped a reconstruction: the iteration and the object then."""

    iteration: int
    reconstruction: metrics.Reconstruction


class Reporter:
    """The reconstruction callback: reports an intermediate value every `every` iterations and
    stops the reconstruction (returns False) when the pruner says so."""

    def __init__(self, trial: optuna.Trial, value: Callable[[Any], float] | None, every: int, prune: bool) -> None:
        self.trial, self.value, self.every, self.prune = trial, value, every, prune
        self.pruned: Pruned | None = None

    def __call__(self, progress: Any) -> bool | None:
        if self.value is None or progress.iteration % self.every:
            return None
        value = self.value(progress)
        if not math.isfinite(value):
            return None
        self.trial.report(value, progress.iteration)
        if self.prune and self.trial.should_prune():
            self.pruned = Pruned(progress.iteration,
                                 metrics.Reconstruction(progress.object(), progress.dx_A, progress.origin_yx_A))
            return False
        return None


def trial_stem(number: int) -> str:
    """The name of a trial's files: trial_00007."""
    return f"trial_{number:05d}"


def keep_best_results(study: optuna.Study, results_dir: Path) -> None:
    """Delete the result files of finished trials that are not (any longer) among the best. Files
    are found by name, so the file of a trial failed by another worker (its heartbeat lapsed) while
    its own worker went on and saved it goes too."""
    best = {trial_stem(t.number) for t in best_trials(study)}
    finished = {trial_stem(t.number) for t in study.get_trials(deepcopy=False) if t.state.is_finished()}
    for path in results_dir.glob("trial_*.h5"):
        if path.stem in finished and path.stem not in best:
            path.unlink(missing_ok=True)


def stop_optimize(study: optuna.Study) -> None:
    """End study.optimize after the current trial; batched trials (asked by hand) need no stop."""
    try:
        study.stop()
    except RuntimeError:  # not inside study.optimize
        pass


def _objective_value(scores: dict[str, Any], name: str) -> float:
    """An objective metric from a dict of scores (NaN if missing)."""
    value = scores.get(score_key(name))
    return math.nan if value is None else float(value)


def _fail(trial: optuna.Trial, reason: str) -> TrialFailed:
    write(trial, TrialRecord(fail_reason=reason))
    return TrialFailed(reason)


def _one_line(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    return f"{type(err).__name__}: {text[0] if text else ''}"[:500]


def _float(value: Any) -> float:
    return math.nan if value is None else float(value)
