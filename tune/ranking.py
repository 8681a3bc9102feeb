"""The best trials of a study: one definition for progress, `tune status`, the report, `tune best`
and the result files kept with `output.keep: best`.

With refinement (`study.refine`, `tune.refine`) the best is chosen among the complete refined
trials (the long reconstructions) as soon as there is one; the short trials still rank which of
them are refined (`ranked_short_trials`).
"""
from __future__ import annotations

import math
from collections.abc import Sequence

import optuna
from optuna.study import StudyDirection
from optuna.trial import FrozenTrial, TrialState

from tune.record import is_refined


def ranked_trials(study: optuna.Study, top_k: int | None = None) -> list[FrozenTrial]:
    """Complete trials, best first: all of them by value (one metric), or the Pareto-optimal ones
    by the first metric (several metrics); among the refined trials when there is a complete one;
    at most `top_k`."""
    complete = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    refined = [t for t in complete if is_refined(t)]
    return _ranked(refined or complete, study.directions, top_k)


def ranked_short_trials(study: optuna.Study, top_k: int | None = None) -> list[FrozenTrial]:
    """Like `ranked_trials`, among the complete short trials only (those refinement chooses from)."""
    complete = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    return _ranked([t for t in complete if not is_refined(t)], study.directions, top_k)


def best_trials(study: optuna.Study) -> list[FrozenTrial]:
    """The best trial (one metric) or the Pareto front (several), best in the first metric first;
    empty before any trial completes."""
    ranked = ranked_trials(study)
    return ranked[:1] if len(study.directions) == 1 else ranked


def _ranked(trials: Sequence[FrozenTrial], directions: Sequence[StudyDirection],
            top_k: int | None) -> list[FrozenTrial]:
    """Finite trials sorted by the first metric; with several metrics, only the Pareto-optimal ones."""
    signs = [-1.0 if d == StudyDirection.MAXIMIZE else 1.0 for d in directions]
    finite = [t for t in trials if all(math.isfinite(v) for v in t.values)]
    if len(signs) > 1:
        finite = _pareto_front(finite, signs)
    return sorted(finite, key=lambda t: signs[0] * t.values[0])[:top_k]


def _pareto_front(trials: Sequence[FrozenTrial], signs: Sequence[float]) -> list[FrozenTrial]:
    """Trials no other trial dominates (all values as good, one better; values oriented by `signs`)."""
    oriented = [[s * v for s, v in zip(signs, t.values)] for t in trials]

    def dominated(a: list[float]) -> bool:
        return any(all(x <= y for x, y in zip(b, a)) and any(x < y for x, y in zip(b, a)) for b in oriented)

    return [t for t, values in zip(trials, oriented) if not dominated(values)]
