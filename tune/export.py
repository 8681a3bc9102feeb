"""`tune best`: a finished trial as a plan file that `tune recon` runs again."""
from __future__ import annotations

import optuna
from optuna.trial import FrozenTrial, TrialState

from recon.plan import PlanError
from tune.progress import best_trials
from tune.study import ScoringSpec, StudyConfig


def chosen_trial(study: optuna.Study, config: StudyConfig, number: int | None) -> FrozenTrial:
    """Trial `number`, or the best trial (several metrics: the Pareto trial best in the first)."""
    if number is not None:
        trial = next((t for t in study.get_trials(deepcopy=False) if t.number == number), None)
        if trial is None or "plan" not in trial.user_attrs:
            raise PlanError(f"study {config.name!r} has no trial {number} with a recorded plan")
        return trial
    best = best_trials(study)
    if not best:
        raise PlanError(f"study {config.name!r} has no complete trial yet")
    first_max = config.directions[0] == "maximize"
    return sorted(best, key=lambda t: t.values[0], reverse=first_max)[0]


def best_plan_text(study: optuna.Study, config: StudyConfig, number: int | None = None,
                   plan_name: str = "PLAN") -> tuple[str, str]:
    """The plan file of a trial (its resolved plan under a comment header) and a one-line summary."""
    trial = chosen_trial(study, config, number)
    values = ", ".join(f"{m} {v:.6g}" for m, v in zip(config.spec.objective.metrics, trial.values or ()))
    summary = f"trial {trial.number} ({trial.state.name.lower()}{': ' + values if values else ''})"
    command = f"tune recon {plan_name} --score" + score_options(config.spec.objective.scoring)
    header = (f"# Trial {trial.number} of study {config.name} ({config.file.name}): "
              f"{values or trial.state.name.lower()}\n"
              f"# Reproduce: {command}\n")
    if trial.state != TrialState.COMPLETE:
        header += f"# Note: this trial did not complete ({trial.user_attrs.get('fail_reason', trial.state.name)})\n"
    return header + trial.user_attrs["plan"], summary


def score_options(scoring: ScoringSpec) -> str:
    """The `tune recon` options that score like the study did."""
    default = ScoringSpec()
    options = ""
    if scoring.roi != default.roi:
        options += f" --roi {scoring.roi}"
    if scoring.margin_A != default.margin_A:
        options += f" --margin-A {scoring.margin_A:g}"
    return options
