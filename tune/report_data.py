"""The report's data: an in-memory snapshot of a stored study, the CSV of all trials and the tables.

The study is read once into memory (load, copy trials, close) so the report never holds a
connection beside running workers. Surplus trials (created over the trial budget, failed and never
run) are kept in the CSV and left out of every table.
"""
from __future__ import annotations

import json
import statistics
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import optuna
import pandas as pd
import yaml
from optuna.exceptions import ExperimentalWarning
from optuna.storages import RetryHeartbeatStaleTrialCallback
from optuna.study import StudyDirection
from optuna.trial import FrozenTrial, TrialState

from tune import budget
from tune.ranking import ranked_trials
from tune.readonly import close_storage, open_for_reading
from tune.record import TrialRecord
from tune.refine import parent_values

#: Trial states in the order the report lists them, with their colours.
STATE_COLOURS = {
    "COMPLETE": "#2ca02c",
    "PRUNED": "#ff7f0e",
    "FAIL": "#d62728",
    "RUNNING": "#1f77b4",
    "WAITING": "#7f7f7f",
}
CSV_ATTRS = ("number", "state", "value", "datetime_start", "datetime_complete", "duration", "params", "user_attrs")


@dataclass(frozen=True)
class StudyMetric:
    """One objective metric of a study: its index among the trial values, name and direction."""

    index: int
    name: str
    direction: StudyDirection

    def value(self, trial: FrozenTrial) -> float:
        """This metric's value of a complete trial."""
        return trial.values[self.index]

    def loss(self, trial: FrozenTrial) -> float:
        """The value, negated for a maximised metric (lower is better)."""
        sign = -1.0 if self.direction == StudyDirection.MAXIMIZE else 1.0
        return sign * self.value(trial)


def snapshot_study(storage: str | optuna.storages.BaseStorage, study_name: str) -> optuna.Study:
    """An in-memory copy of a stored study (trials with their numbers, directions, metric names).

    ``storage``: a URL or journal path (opened and closed here) or a storage object (left open)."""
    backend = open_for_reading(storage) if isinstance(storage, str) else storage
    try:
        source = optuna.load_study(study_name=study_name, storage=backend)
        verbosity = optuna.logging.get_verbosity()
        optuna.logging.set_verbosity(optuna.logging.WARNING)  # no "A new study created in memory"
        try:
            copy = optuna.create_study(study_name=study_name, directions=source.directions)
        finally:
            optuna.logging.set_verbosity(verbosity)
        copy.add_trials(source.get_trials(deepcopy=False))
        if source.metric_names is not None:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", ExperimentalWarning)  # set_metric_names
                copy.set_metric_names(source.metric_names)
    finally:
        if isinstance(storage, str):
            close_storage(backend)
    return copy


def trials_table(study: optuna.Study) -> pd.DataFrame:
    """``study.trials_dataframe()`` without system attrs, one line per trial: dict user attrs
    flattened into columns, lists and YAML texts (the plan) as one-line JSON."""
    frame = study.trials_dataframe(attrs=CSV_ATTRS, multi_index=False)
    for column in [c for c in frame.columns if c.startswith("user_attrs_")]:
        values = frame[column]
        if values.map(lambda v: isinstance(v, dict)).any():
            flat = pd.json_normalize(values.map(lambda v: v if isinstance(v, dict) else {}).tolist())
            flat.index = frame.index
            flat.columns = [f"{column}_{key}" for key in flat.columns]
            frame = pd.concat([frame.drop(columns=column), flat], axis=1)
        else:
            frame[column] = values.map(_one_line)
    return frame


def _one_line(value: Any) -> Any:
    """A list, or a text of several lines (YAML), as one-line JSON; anything else as it is."""
    if isinstance(value, list):
        return json.dumps(value)
    if isinstance(value, str) and "\n" in value:
        return json.dumps(yaml.safe_load(value), separators=(",", ":"))
    return value


def counted_trials(study: optuna.Study) -> list[FrozenTrial]:
    """All trials except the surplus ones (created over the trial budget, never run)."""
    return [t for t in study.get_trials(deepcopy=False) if not budget.is_surplus(t)]


def complete_trials(study: optuna.Study) -> list[FrozenTrial]:
    """Complete trials, in trial order (surplus trials never run, so none is surplus)."""
    return study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))


def study_metrics(study: optuna.Study) -> list[StudyMetric]:
    """The study's objective metrics, named by its metric names where set."""
    names = study.metric_names or (
        ["Objective Value"] if len(study.directions) == 1 else [f"Objective {i}" for i in range(len(study.directions))]
    )
    return [StudyMetric(i, name, d) for i, (name, d) in enumerate(zip(names, study.directions))]


def varying_params(trials: Sequence[FrozenTrial]) -> list[str]:
    """Parameters that take more than one value across ``trials``."""
    names = sorted({name for t in trials for name in t.params})
    return [n for n in names if len({repr(t.params.get(n)) for t in trials}) > 1]


def worker_label(trial: FrozenTrial) -> str:
    """``host · worker N`` from the trial's record (``unknown`` when not recorded)."""
    record = TrialRecord.read(trial)
    label = "unknown" if record.worker is None else f"worker {record.worker}"
    return f"{record.host} · {label}" if record.host else label


def state_counts(trials: Sequence[FrozenTrial]) -> pd.DataFrame:
    """Number of trials per state (every state listed)."""
    counts = dict.fromkeys([*STATE_COLOURS, *(s.name for s in TrialState)], 0)
    for t in trials:
        counts[t.state.name] += 1
    return pd.DataFrame({"state": list(counts), "trials": list(counts.values())})


def best_table(study: optuna.Study, top_k: int) -> pd.DataFrame:
    """Values and parameters of the best trials (`tune.ranking.ranked_trials`); a refined trial
    also names its parent and the parent's short values."""
    rows = []
    for t in ranked_trials(study, top_k):
        row: dict[str, Any] = {"trial": t.number}
        row.update({m.name: m.value(t) for m in study_metrics(study)})
        parent, short = TrialRecord.read(t).refine_of, parent_values(study, t)
        if parent is not None:
            row["refined from trial"] = parent
            row.update({f"{m.name}, short": v for m, v in zip(study_metrics(study), short or ())})
        row.update(t.params)
        rows.append(row)
    return pd.DataFrame(rows)


def timing_table(trials: Sequence[FrozenTrial]) -> pd.DataFrame:
    """Per worker: trials, compilations and total/median compile, run and score seconds."""
    rows = []
    for label in sorted({worker_label(t) for t in trials}):
        records = [TrialRecord.read(t) for t in trials if worker_label(t) == label]
        row: dict[str, Any] = {"worker": label, "trials": len(records)}
        counts = [r.compile_count for r in records if r.compile_count is not None]
        row["compilations"] = max(counts) if counts else None
        for step, seconds in (("compile", [r.compile_s for r in records]), ("run", [r.run_s for r in records]),
                              ("score", [r.score_s for r in records])):
            known = [float(s) for s in seconds if s is not None]
            row[f"{step} total"] = round(sum(known), 2) if known else None
            row[f"{step} median"] = round(statistics.median(known), 3) if known else None
        rows.append(row)
    return pd.DataFrame(rows)


def batch_table(trials: Sequence[FrozenTrial]) -> pd.DataFrame:
    """Batched trials: the batch each ran in, its size and the trial's share of the batch's run time."""
    rows = [{"trial": t.number, "state": t.state.name.lower(), "batch": r.batch, "trials in batch": r.batch_size,
             "share of batch time": None if r.batch_share is None else round(r.batch_share, 3),
             "batch run s": r.run_s}
            for t in trials if (r := TrialRecord.read(t)).batch is not None]
    return pd.DataFrame(rows)


def rerun_as(trials: Sequence[FrozenTrial]) -> dict[int, int]:
    """Failed trial number → the number of the trial that re-ran it (stale heartbeat, re-queued)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ExperimentalWarning)  # retry_history
        histories = {t.number: RetryHeartbeatStaleTrialCallback.retry_history(t) for t in trials}
    return {history[-1]: number for number, history in histories.items() if history}


def failure_table(trials: Sequence[FrozenTrial]) -> pd.DataFrame:
    """Failed trials, their recorded reasons and the trial that re-ran each re-queued one."""
    reruns = rerun_as(trials)
    rows = [
        {
            "trial": t.number,
            "reason": TrialRecord.read(t).fail_reason or "(not recorded: worker lost?)",
            "re-run as": reruns.get(t.number),
        }
        for t in trials
        if t.state == TrialState.FAIL
    ]
    return pd.DataFrame(rows, columns=["trial", "reason", "re-run as"])
