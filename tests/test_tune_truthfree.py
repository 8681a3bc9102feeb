"""Tuning without ground truth: the half-set FRC objective, refinement of the best short trials,
and the end of `tune start` (best.yml and the final reconstruction in the report)."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import optuna
import pytest
import yaml
from optuna.distributions import FloatDistribution
from optuna.trial import TrialState, create_trial

import recon
from recon.plan import PlanError
from tune import budget
from tune.ranking import best_trials, ranked_short_trials
from tune.record import TrialRecord
from tune.refine import is_duplicate, pending_parents, queue_refinements, refined_values
from tune.storage import open_storage
from tune.study import load_study

optuna.logging.set_verbosity(optuna.logging.WARNING)
DISTRIBUTIONS = {"probe.defocus_A": FloatDistribution(-150, -50)}


def _trial(number: int, value: float, refine_of: int | None = None, state: TrialState = TrialState.COMPLETE):
    attrs = {} if refine_of is None else {"refine_of": refine_of}
    return create_trial(state=state, value=value if state == TrialState.COMPLETE else None,
                        params={"probe.defocus_A": -100.0 + number}, distributions=DISTRIBUTIONS, user_attrs=attrs)


def _study(trials) -> optuna.Study:
    study = optuna.create_study(direction="minimize")
    for t in trials:
        study.add_trial(t)
    return study


def test_refined_trials_are_the_best_and_do_not_use_the_budget():
    study = _study([_trial(0, 0.30), _trial(1, 0.20), _trial(2, 0.25), _trial(3, 0.22, refine_of=1),
                    _trial(4, 0.21, refine_of=2), _trial(5, 0.0, refine_of=0, state=TrialState.RUNNING)])
    assert [t.number for t in ranked_short_trials(study, 2)] == [1, 2]
    assert [t.number for t in best_trials(study)] == [4]          # among the refined, not trial 1's short 0.20
    counts = budget.count(study.get_trials())
    assert counts.complete == 3 and counts.used == 3 and counts.running == 0
    assert (counts.refined, counts.refining, counts.refine_queued) == (2, 1, 0)
    assert pending_parents(study, 3) == []                        # 1, 2 refined; 0 is being refined
    assert pending_parents(_study([_trial(0, 0.3), _trial(1, 0.2)]), 1) == [1]


def test_a_parent_queued_twice_is_refined_once():
    study = _study([_trial(0, 0.3), _trial(1, 0.2)])
    assert queue_refinements(study, 1) == [1] and queue_refinements(study, 1) == []
    study.enqueue_trial({"probe.defocus_A": -99.0}, user_attrs={"refine_of": 1})   # a second worker, same moment
    first, second = study.ask(DISTRIBUTIONS), study.ask(DISTRIBUTIONS)
    assert first.params == {"probe.defocus_A": -99.0} and TrialRecord.read(first).refine_of == 1
    assert not is_duplicate(first) and is_duplicate(second)


def _write_study(tmp_path: Path, data: Path, extra: str, objective: str = "[halfset_frc_area]") -> Path:
    path = tmp_path / "truthfree.yml"
    path.write_text(
        "study: {name: truthfree, n_trials: 3, sampler: {name: random, seed: 0}, pruner: {name: none}}\n"
        f"data: {{path: {data}, patterns: dp, ground_truth: null}}\n"
        "recon: {iterations: 3, batch_size: 16, probe: {defocus_A: -60}}\n"
        "search: {recon.probe.defocus_A: {low: -150, high: -50}}\n"
        f"objective: {{metrics: {objective}}}\n{extra}")
    return path


def test_halfset_metrics_need_no_ground_truth_and_refine_is_checked(tmp_path, tiny_data_path):
    config = load_study(_write_study(tmp_path, tiny_data_path, "", "[halfset_frc_resolution_A, halfset_frc_area]"))
    assert config.directions == ("minimize", "maximize")
    alone = _write_study(tmp_path, tiny_data_path, "", "[halfset_frc_area]")
    alone.write_text(alone.read_text().replace(", pruner: {name: none}", ""))
    assert load_study(alone).pruner.name == "none"          # not pruned on the data loss unless asked
    bad = _write_study(tmp_path, tiny_data_path, "", "[halfset_frc_area]")
    bad.write_text(bad.read_text().replace("pruner: {name: none}", "pruner: {name: none}, refine: {top_k: 0, iterations: 5}"))
    with pytest.raises(PlanError, match="study.refine.top_k"):
        load_study(bad)


def test_refine_fit_is_checked_and_adds_the_fitted_optics_to_the_plan(tmp_path, tiny_data_path):
    def study(refine: str) -> Path:
        path = _write_study(tmp_path, tiny_data_path, "", "[halfset_frc_area]")
        path.write_text(path.read_text().replace("pruner: {name: none}", f"pruner: {{name: none}}, refine: {refine}"))
        return path

    config = load_study(study("{top_k: 2, iterations: 20, fit: [recon.probe.defocus_A, scan.rotation_deg, "
                              "probe.aberrations.C12_A]}"))
    assert config.spec.study.refine.fit == ("probe.defocus_A", "scan.rotation_deg", "probe.aberrations.C12_A")
    base = config.base_plan.model_copy(update={"probe": config.base_plan.probe.model_copy(update={"fit": ("C30_A",)})})
    values = refined_values(config.spec.study.refine, base, {"probe.defocus_A": -80.0})
    assert values == {"probe.defocus_A": -80.0, "iterations": 20, "probe.fit": ["C30_A", "defocus_A", "C12_A"],
                      "scan.fit": ["rotation_deg"]}
    for refine, message in [("{top_k: 2, iterations: 20, fit: [probe.semiangle_mrad]}", "study.refine.fit.0"),
                            ("{top_k: 2, iterations: 8, fit: [probe.defocus_A]}", "must exceed recon.engine.fit_start")]:
        with pytest.raises(PlanError, match=message) as err:
            load_study(study(refine))
        assert "\n" not in str(err.value)
    assert "probe.defocus_A" in str(pytest.raises(PlanError, load_study, study(
        "{top_k: 2, iterations: 20, fit: [probe.semiangle_mrad]}")).value)   # names the allowed keys


def _tune(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "tune", *args], cwd=cwd, capture_output=True, text=True, timeout=600)


@pytest.mark.slow
def test_start_refines_the_best_and_shows_the_final_reconstruction(tmp_path, tiny_data_path):
    path = _write_study(tmp_path, tiny_data_path, "")      # the refined trials fit the defocus from iteration 2
    path.write_text(path.read_text().replace("pruner: {name: none}", "pruner: {name: none}, refine: {top_k: 2, iterations: 6, "
                                             "fit: [recon.probe.defocus_A]}").replace("probe:", "engine: {fit_start: 2}, probe:"))
    run = _tune("start", str(path), cwd=tmp_path)
    assert run.returncode == 0, run.stdout + run.stderr
    study = optuna.load_study(study_name="truthfree", storage=open_storage(f"sqlite:///{path.with_suffix('.db')}"))
    trials = [t for t in study.get_trials() if not budget.is_surplus(t)]
    short = [t for t in trials if TrialRecord.read(t).refine_of is None]
    refined = [t for t in trials if TrialRecord.read(t).refine_of is not None]
    assert len(short) == 3 and len(refined) == 2
    top = sorted(short, key=lambda t: -t.value)[:2]
    for t in refined:
        record = TrialRecord.read(t)
        assert t.state == TrialState.COMPLETE and record.iterations_done == 6
        parent = next(p for p in short if p.number == record.refine_of)
        assert t.params == parent.params and parent in top
        assert {"halfset_frc_area", "halfset_frc_resolution_A"} <= set(record.metrics)
        assert set(record.fitted) == {"probe.defocus_A"} and record.fitted["probe.defocus_A"]["stderr"] > 0
        assert recon.plan_from_dict(yaml.safe_load(record.plan)).probe.fit == ("defocus_A",)
        assert not TrialRecord.read(parent).fitted
    best = best_trials(study)[0]
    assert best in refined and best.value == max(t.value for t in refined)
    report = tmp_path / "out" / "truthfree" / "report"
    plan = recon.load_plan(report / "best.yml")
    assert plan.iterations == 6 and plan.probe.defocus_A == pytest.approx(best.params["probe.defocus_A"])
    assert plan.probe.fit == ("defocus_A",) and "# Fitted (start values below" in (report / "best.yml").read_text()
    page = (report / "report.html").read_text()
    assert "Final reconstruction" in page and "refined from trial" in page
    assert (report / "final.png").is_file()
    status = _tune("status", str(path), cwd=tmp_path)
    assert f"best     trial {best.number}" in status.stdout and "refined from trial" in status.stdout

    again = _tune("start", str(path), "--no-final", cwd=tmp_path)         # resumes: nothing left to run
    assert again.returncode == 0, again.stdout + again.stderr
    assert "best plan:" in run.stdout and "best plan:" not in again.stdout
    assert "Final reconstruction" not in (report / "report.html").read_text()
    assert len([t for t in study.get_trials() if not budget.is_surplus(t)]) == 5
