"""One trial: build its plan, reconstruct, score against the ground truth, record everything.

What a trial records (Optuna user attributes):
  worker, host, device, pid         who ran it
  plan, seed                        the fully resolved plan (YAML) and its random seed
  compile_s, run_s, score_s         seconds spent compiling, iterating and scoring
  compile_count, compiled           programs compiled by this worker so far / during this trial
  iterations_done, stop_reason      how the reconstruction ended
  loss_curve, data_loss_curve       the loss curves (one value per iteration)
  metrics                           every score: {nrmse, ssim, frc_..., heldout_loss, data_loss, runtime_s, ...}
  artifacts                         {phase_png | frc_png | result_h5: artifact id} in <output>/artifacts
  result_path                       the kept result HDF5 (output.keep)
  fail_reason                       why a trial failed (exception, out of memory, divergence, interruption)
  pruned_at                         the iteration at which it was pruned
  surplus                           true for a trial created after the budget was used (never run)
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

import numpy as np
import optuna
from optuna.artifacts import FileSystemArtifactStore, upload_artifact

import recon
from tune import budget
from tune.progress import best_trials
from tune.space import suggest, trial_plan
from tune.study import GROUND_TRUTH_METRICS, StudyConfig

#: How many points of a loss curve are stored per trial at most.
MAX_CURVE_POINTS = 1000


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
        self.current: optuna.Trial | None = None
        self._datasets: dict[Any, Any] = {}
        self._scorer: Any = None
        self._store = FileSystemArtifactStore(str(_mkdir(config.artifact_dir)))

    # ------------------------------------------------------------------ the trial
    def __call__(self, trial: optuna.Trial) -> float | list[float]:
        self.current = trial
        values = suggest(trial, self.config.params)
        _set_attrs(trial, worker=self.worker.index, host=self.worker.host, device=self.worker.device, pid=self.worker.pid)
        for stale in ("fail_reason", "pruned_at"):  # a re-run inherits the attributes of the attempt it replaces
            if trial.user_attrs.get(stale) is not None:
                trial.set_user_attr(stale, None)
        if self._budget_used_before(trial):
            trial.set_user_attr(budget.SURPLUS_ATTR, True)
            trial.study.stop()
            raise TrialFailed(f"surplus: trials before #{trial.number} already use the budget of {self.budget_size}")
        try:
            plan = trial_plan(self.config.base_plan, values, source=f"trial {trial.number}")
            _set_attrs(trial, plan=plan.to_yaml(), seed=plan.seed)
            return self._run(trial, plan)
        except (optuna.TrialPruned, TrialFailed):
            raise
        except KeyboardInterrupt:
            trial.set_user_attr("fail_reason", "interrupted: the worker was stopped (SIGINT/SIGTERM)")
            raise
        except Exception as err:  # one trial's error (out of memory included) never stops the worker
            raise _fail(trial, _one_line(err)) from None

    def _budget_used_before(self, trial: optuna.Trial) -> bool:
        earlier = budget.count(trial.study.get_trials(deepcopy=False), below=trial.number)
        return earlier.used >= self.budget_size

    def _run(self, trial: optuna.Trial, plan: recon.Plan) -> float | list[float]:
        dataset = self._dataset(plan.data)
        compiled_before = recon.compile_count()
        reporter = Reporter(trial, self._intermediate(), self.config.spec.objective.report_every,
                            prune=self.config.pruner.name != "none")
        result = recon.reconstruct(plan, dataset=dataset, callback=reporter)
        _set_attrs(trial, compile_s=result.compile_s, run_s=result.run_s, iterations_done=result.iterations_done,
                   stop_reason=result.stop_reason, compile_count=recon.compile_count(),
                   compiled=recon.compile_count() - compiled_before,
                   loss_curve=_curve(result.history.get("loss")), data_loss_curve=_curve(result.history.get("data_loss")))
        if result.fitted:  # fitted optics: {plan key: {value, stderr}}
            trial.set_user_attr("fitted", {k: {"value": v, "stderr": result.fitted_stderr.get(k)}
                                           for k, v in result.fitted.items()})
        if result.diverged:
            raise _fail(trial, f"diverged: {result.stop_reason}")
        if reporter.pruned_at is not None:
            trial.set_user_attr("pruned_at", reporter.pruned_at)
            raise optuna.TrialPruned(f"pruned at iteration {reporter.pruned_at}")

        start = time.perf_counter()
        scores, report = self._score(result)
        trial.set_user_attr("score_s", time.perf_counter() - start)
        trial.set_user_attr("metrics", {k: v if math.isfinite(v) else None for k, v in scores.items()})
        objective = [_objective_value(scores, m) for m in self.config.spec.objective.metrics]
        bad = [m for m, v in zip(self.config.spec.objective.metrics, objective) if not math.isfinite(v)]
        if bad:
            raise _fail(trial, f"objective {', '.join(bad)} is not a finite number")
        self._save_outputs(trial, result, report)
        return objective[0] if len(objective) == 1 else objective

    # ------------------------------------------------------------------ data and scoring
    def _dataset(self, data: Any) -> Any:
        if data not in self._datasets:
            self._datasets[data] = recon.load_dataset(data)
        return self._datasets[data]

    @property
    def scorer(self) -> Any:
        """The ground-truth scorer (None without a ground truth), built on first use."""
        key = self.config.spec.data.ground_truth
        if self._scorer is None and key is not None:
            import metrics

            truth = metrics.GroundTruth.from_h5(self.config.data_path, key=key)
            opts = self.config.spec.objective.scoring
            self._scorer = metrics.Scorer(truth, roi=opts.roi, margin_A=opts.margin_A)
        return self._scorer

    def _intermediate(self) -> Callable[[Any], float] | None:
        """The value reported every `report_every` iterations (None for multi-objective studies)."""
        metrics = self.config.spec.objective.metrics
        if len(metrics) > 1 or metrics[0] == "runtime_s":
            return None
        if metrics[0] not in GROUND_TRUTH_METRICS:
            return lambda progress: float(progress.data_loss)  # heldout_loss is pruned on the data loss
        import metrics as scoring

        name, scorer = metrics[0], self.scorer
        quick = name != "ssim"  # quick scores skip SSIM and register more coarsely

        def value(progress: Any) -> float:
            phase = scoring.Reconstruction(progress.object(), progress.dx_A, progress.origin_yx_A).phase_yx
            return _objective_value(scorer.score_phase(phase, progress.dx_A, progress.origin_yx_A, quick=quick), name)

        return value

    def _score(self, result: Any) -> tuple[dict[str, float], Any]:
        """Every score of a result (and the metrics ScoreReport, None without a ground truth)."""
        report = self.scorer.report(result) if self.scorer is not None else None
        scores = {k: float(v) for k, v in (report.scores if report is not None else {}).items()
                  if isinstance(v, (int, float)) and not isinstance(v, bool)}
        scores.update(heldout_loss=_float(result.heldout_loss), data_loss=_float(result.final_data_loss),
                      runtime_s=float(result.run_s))
        return scores, report

    # ------------------------------------------------------------------ artifacts and result files
    def _save_outputs(self, trial: optuna.Trial, result: Any, report: Any) -> None:
        """Keep the result file (output.keep) and upload the artifacts (output.artifacts)."""
        wanted, keep = self.config.artifacts, self.config.spec.output.keep
        ids: dict[str, str] = {}
        with tempfile.TemporaryDirectory(prefix="tune-") as tmp:
            stem = f"trial_{trial.number:05d}"
            if keep != "none" or "result_h5" in wanted:
                folder = _mkdir(self.config.output_dir / "trials") if keep != "none" else Path(tmp)
                result_file = result.save(folder / f"{stem}.h5")
                if keep != "none":
                    trial.set_user_attr("result_path", str(result_file))
                if "result_h5" in wanted:
                    ids["result_h5"] = self._upload(trial, result_file)
            if "score_png" in wanted and report is not None:
                from metrics.figure import save_score_figure

                ids["score_png"] = self._upload(trial, save_score_figure(Path(tmp) / f"{stem}_score.png", report,
                                                                         title=f"trial {trial.number}"))
            if "phase_png" in wanted:
                from metrics import Reconstruction
                from metrics.figure import save_phase_figure

                phase_png = save_phase_figure(Path(tmp) / f"{stem}_phase.png",
                                              Reconstruction(result.object, result.dx_A, result.origin_yx_A),
                                              title=f"trial {trial.number}")
                ids["phase_png"] = self._upload(trial, phase_png)
        if ids:
            trial.set_user_attr("artifacts", ids)

    def _upload(self, trial: optuna.Trial, path: Path) -> str:
        return upload_artifact(artifact_store=self._store, file_path=str(path), study_or_trial=trial)


class Reporter:
    """The reconstruction callback: reports an intermediate value every `every` iterations and
    stops the reconstruction (returns False) when the pruner says so."""

    def __init__(self, trial: optuna.Trial, value: Callable[[Any], float] | None, every: int, prune: bool) -> None:
        self.trial, self.value, self.every, self.prune = trial, value, every, prune
        self.pruned_at: int | None = None

    def __call__(self, progress: Any) -> bool | None:
        if self.value is None or progress.iteration % self.every:
            return None
        value = self.value(progress)
        if not math.isfinite(value):
            return None
        self.trial.report(value, progress.iteration)
        if self.prune and self.trial.should_prune():
            self.pruned_at = progress.iteration
            return False
        return None


def keep_best_results(study: optuna.Study, output_dir: Path) -> None:
    """Delete the result files of finished trials that are not (any longer) among the best."""
    best = {t.number for t in best_trials(study)}
    for t in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,)):
        path = t.user_attrs.get("result_path")
        if path and t.number not in best:
            Path(path).unlink(missing_ok=True)


#: Objective metric names that metrics.Scorer reports under another name.
SCORE_KEYS = {"frc_resolution_A": "frc_resolution_half_bit_A"}


def _objective_value(scores: dict[str, Any], name: str) -> float:
    """An objective metric from a dict of scores (NaN if missing)."""
    value = scores.get(SCORE_KEYS.get(name, name))
    return math.nan if value is None else float(value)


def _fail(trial: optuna.Trial, reason: str) -> TrialFailed:
    trial.set_user_attr("fail_reason", reason)
    return TrialFailed(reason)


def _one_line(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    return f"{type(err).__name__}: {text[0] if text else ''}"[:500]


def _float(value: Any) -> float:
    return math.nan if value is None else float(value)


def _curve(values: Any) -> list[float | None] | None:
    """A loss curve as JSON-safe floats (None for NaN/inf), thinned to MAX_CURVE_POINTS."""
    if values is None:
        return None
    arr = np.asarray(values, dtype=float)
    if arr.size > MAX_CURVE_POINTS:
        arr = arr[np.linspace(0, arr.size - 1, MAX_CURVE_POINTS).astype(int)]
    return [float(v) if math.isfinite(v) else None for v in arr]


def _set_attrs(trial: optuna.Trial, **attrs: Any) -> None:
    for key, value in attrs.items():
        if isinstance(value, float) and not math.isfinite(value):
            value = None  # JSON has no NaN; the dashboard could not read it
        trial.set_user_attr(key, value)


def _mkdir(path: Path) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    return path
