"""The best trials of a study: one definition for progress, `tune status`, the report, `tune best`
and the result files kept with `output.keep: best`."""
from __future__ import annotations

import math

import optuna
from optuna.study import StudyDirection
from optuna.trial import FrozenTrial, TrialState


def ranked_trials(study: optuna.Study, top_k: int | None = None) -> list[FrozenTrial]:
    """Complete trials, best first: all of them by value (one metric), or the Pareto-optimal ones
    by the first metric (several metrics); at most `top_k`."""
    if len(study.directions) == 1:
        pool = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    else:
        pool = study.best_trials
    sign = -1.0 if study.directions[0] == StudyDirection.MAXIMIZE else 1.0
    finite = [t for t in pool if math.isfinite(t.values[0])]
    return sorted(finite, key=lambda t: sign * t.values[0])[:top_k]


def best_trials(study: optuna.Study) -> list[FrozenTrial]:
    """The best trial (one metric) or the Pareto front (several), best in the first metric first;
    empty before any trial completes."""
    ranked = ranked_trials(study)
    return ranked[:1] if len(study.directions) == 1 else ranked
