"""`tune best`: a finished trial as a plan file that `tune recon` runs again."""
from __future__ import annotations

import optuna
from optuna.trial import FrozenTrial, TrialState

from recon.plan import PlanError
from tune.ranking import best_trials
from tune.record import TrialRecord
from tune.refine import describe_parent
from tune.schema import ScoringSpec
from tune.study import StudyConfig


def chosen_trial(study: optuna.Study, config: StudyConfig, number: int | None) -> FrozenTrial:
    """Trial `number`, or the best trial (several metrics: the Pareto trial best in the first)."""
    if number is not None:
        trial = next((t for t in study.get_trials(deepcopy=False) if t.number == number), None)
        if trial is None or TrialRecord.read(trial).plan is None:
            raise PlanError(f"study {config.name!r} has no trial {number} with a recorded plan")
        return trial
    best = best_trials(study)
    if not best:
        raise PlanError(f"study {config.name!r} has no complete trial yet")
    return best[0]


def best_plan_text(study: optuna.Study, config: StudyConfig, number: int | None = None,
                   plan_name: str = "PLAN") -> tuple[str, str]:
    """The plan file of a trial (its resolved plan under a comment header) and a one-line summary."""
    trial = chosen_trial(study, config, number)
    record = TrialRecord.read(trial)
    assert record.plan is not None
    values = ", ".join(f"{m} {v:.6g}" for m, v in zip(config.spec.objective.metrics, trial.values or ()))
    parent = describe_parent(study, trial)
    summary = f"trial {trial.number} ({trial.state.name.lower()}{': ' + values if values else ''}){parent}"
    command = f"tune recon {plan_name} --score" + score_options(config.spec.objective.scoring)
    header = (f"# Trial {trial.number} of study {config.name} ({config.file.name}): "
              f"{values or trial.state.name.lower()}{parent}\n"
              f"# Reproduce: {command}\n")
    if record.fitted:
        header += f"# Fitted (start values below; ± Fisher standard error): {fitted_text(record.fitted)}\n"
    if trial.state != TrialState.COMPLETE:
        header += f"# Note: this trial did not complete ({record.fail_reason or trial.state.name})\n"
    return header + record.plan, summary


def fitted_text(fitted: dict[str, dict[str, float | None]]) -> str:
    """'probe.defocus_A = -100.3 ± 0.22, scan.rotation_deg = -0.02 ± 0.03' from TrialRecord.fitted."""
    def one(key: str, v: dict[str, float | None]) -> str:
        stderr = v.get("stderr")
        return f"{key} = {v['value']:.5g}" + ("" if stderr is None else f" ± {stderr:.2g}")

    return ", ".join(one(k, v) for k, v in fitted.items())


def score_options(scoring: ScoringSpec) -> str:
    """The `tune recon` options that score like the study did."""
    default = ScoringSpec()
    options = ""
    if scoring.roi != default.roi:
        options += f" --roi {scoring.roi}"
    if scoring.margin_A != default.margin_A:
        options += f" --margin-A {scoring.margin_A:g}"
    return options
