"""Batched trials end to end: K trials per compiled program on a worker (study.trials_per_batch).

* the budget is met exactly; every trial records what a trial run alone records, plus its batch;
* the same settings give the same objective batched and alone;
* a diverging or failing trial fails alone; a mixed batch (two static configurations) runs as groups;
* SIGTERM fails and re-queues every trial of the batch; SIGKILL: the others re-run them.
"""
from __future__ import annotations

import os
import signal

import pytest
from optuna.trial import TrialState

from test_tune_workers import load, sigterm_mid_trial, spawn, study_file, tune, wait_for_running_trial
from tune import budget
from tune.record import TrialRecord

pytestmark = pytest.mark.slow  # worker processes


def test_a_batched_worker_meets_the_budget_and_records_every_trial(tmp_path, tiny_data_path):
    path = study_file(tmp_path, tiny_data_path, "batched", 8, pruner="{name: median, options: {n_startup_trials: 2}}",
                      extra="output: {keep: best, artifacts: [phase_png]}\n")
    text = path.read_text().replace("grace_period_s: 2}", "grace_period_s: 2, trials_per_batch: 4}")
    path.write_text(text)
    run = tune("worker", str(path), "--index", "0", cwd=tmp_path)
    assert run.returncode == 0, run.stdout + run.stderr
    assert "4 trials per batch" in run.stdout

    study = load(path, "batched")
    trials = study.get_trials()
    counts = budget.count(trials)
    assert counts.finished == 8 and counts.failed == 0 and len(trials) == 8
    records = {t.number: TrialRecord.read(t) for t in trials}
    batches = {r.batch for r in records.values()}
    assert len(batches) == 2 and all(r.batch_size == 4 for r in records.values())
    for batch in batches:
        shares = [r.batch_share for r in records.values() if r.batch == batch]
        assert sum(shares) == pytest.approx(1.0)
    assert [records[n].compiled > 0 for n in sorted(records)] == [True] * 4 + [False] * 4  # one compile per worker
    for t in trials:
        r = records[t.number]
        assert t.intermediate_values, t.number  # reported every report_every iterations, per trial
        if t.state == TrialState.COMPLETE:
            assert r.metrics["nrmse"] == pytest.approx(t.value) and r.iterations_done == 4
            assert "phase_png" in r.artifacts and r.seed is not None and f"{t.params['probe.defocus_A']}" in r.plan
        else:
            assert t.state == TrialState.PRUNED and r.pruned_at is not None and r.iterations_done == r.pruned_at
    # the settings of one batch differ: asks do not land on one point
    assert len({tuple(sorted(t.params.items())) for t in trials}) == 8
    status = tune("status", str(path), cwd=tmp_path)
    assert status.returncode == 0 and "batch" in status.stdout


def test_the_same_settings_score_the_same_batched_and_alone(tmp_path, tiny_data_path):
    search = "{recon.probe.defocus_A: {choices: [-140, -110, -80, -60]}}"
    values = {}
    for k in (1, 4):
        path = study_file(tmp_path, tiny_data_path, f"same{k}", 4, search=search, sampler="{name: grid, seed: 0}",
                          )
        path.write_text(path.read_text().replace("grace_period_s: 2}", f"grace_period_s: 2, trials_per_batch: {k}}}")
                        .replace("batch_size: 16,", "batch_size: 16, noise_model: {name: intensity},"))
        run = tune("worker", str(path), "--index", "0", cwd=tmp_path)
        assert run.returncode == 0, run.stdout + run.stderr
        values[k] = {t.params["probe.defocus_A"]: t.value for t in load(path, f"same{k}").get_trials()}
    assert set(values[1]) == set(values[4]) and len(values[1]) == 4
    for defocus, alone in values[1].items():
        assert values[4][defocus] == pytest.approx(alone, rel=1e-3)


def test_failing_trials_fail_alone_in_a_mixed_batch(tmp_path, tiny_data_path):
    search = ("{recon.data.crop_px: {choices: [16, 64, 32]},"  # 64: an error; 16 and 32: two static configurations
              " recon.optimizers.object.learning_rate: {choices: [0.05, 1.0e+6]}}")  # 1e6 with sgd: NaN
    path = study_file(tmp_path, tiny_data_path, "mixed", 6, search=search, sampler="{name: grid, seed: 0}",
                      optimizer="sgd")
    path.write_text(path.read_text().replace("grace_period_s: 2}", "grace_period_s: 2, trials_per_batch: 6}"))
    run = tune("worker", str(path), "--index", "0", cwd=tmp_path)
    assert run.returncode == 0, run.stdout + run.stderr
    trials = load(path, "mixed").get_trials()
    by = {(t.params["data.crop_px"], t.params["optimizers.object.learning_rate"]): t for t in trials}
    assert len(by) == 6
    for crop in (16, 32):
        assert by[(crop, 0.05)].state == TrialState.COMPLETE
        assert TrialRecord.read(by[(crop, 0.05)]).batch_size == 2  # grouped by static configuration
        assert by[(crop, 1.0e6)].state == TrialState.FAIL
        assert TrialRecord.read(by[(crop, 1.0e6)]).fail_reason.startswith("diverged")
    for lr in (0.05, 1.0e6):
        assert by[(64, lr)].state == TrialState.FAIL and "crop_px" in TrialRecord.read(by[(64, lr)]).fail_reason


def test_sigterm_requeues_the_whole_batch_and_sigkill_is_rerun(tmp_path, tiny_data_path):
    path = study_file(tmp_path, tiny_data_path, "stopbatch", 3, iterations=200)
    path.write_text(path.read_text().replace("grace_period_s: 2}", "grace_period_s: 2, trials_per_batch: 3}"))
    sigterm_mid_trial(path, "stopbatch", tmp_path)
    trials = load(path, "stopbatch").get_trials()
    stopped = [t for t in trials if t.state == TrialState.FAIL]
    queued = [t for t in trials if t.state == TrialState.WAITING]
    assert len(stopped) == 3 and all(TrialRecord.read(t).fail_reason.startswith("interrupted") for t in stopped)
    assert sorted(map(str, (t.params for t in queued))) == sorted(map(str, (t.params for t in stopped)))

    # a batched worker picks the queued copies up; SIGKILL it mid-batch: a plain worker re-runs them
    worker = spawn("worker", str(path), "--index", "1", cwd=tmp_path)
    try:
        victim = wait_for_running_trial(path, "stopbatch")
        os.kill(TrialRecord.read(victim).pid, signal.SIGKILL)
        worker.wait(timeout=30)
    finally:
        worker.kill()
    path.write_text(path.read_text().replace("iterations: 200", "iterations: 4"))
    rerun = tune("worker", str(path), "--index", "2", cwd=tmp_path)
    assert rerun.returncode == 0, rerun.stdout + rerun.stderr
    trials = load(path, "stopbatch").get_trials()
    counts = budget.count(trials)
    assert counts.complete == 3 and counts.running == 0 and counts.waiting == 0
    assert {TrialRecord.read(t).worker for t in trials if t.state == TrialState.COMPLETE} == {2}
