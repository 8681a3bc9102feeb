"""End to end: worker processes on one SQLite study, on a tiny simulated dataset.

* several workers finish exactly the study's budget, each compiling once, recording everything;
  `tune best` -> `tune recon --score` reproduces the best score;
* a worker killed with SIGKILL mid-trial: its trial is failed after the grace period and re-run
  with the same parameters, and the study still completes its budget;
* SIGTERM fails the running trial cleanly, re-queues it, and the next worker runs it;
* failing and diverging trials are recorded with their reason and the worker goes on.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import optuna
import pytest
from optuna.trial import TrialState

from tune import budget, run_study
from tune.record import TrialRecord
from tune.storage import open_storage

pytestmark = pytest.mark.slow  # worker processes reconstructing for a minute or more
optuna.logging.set_verbosity(optuna.logging.WARNING)


def study_file(tmp_path: Path, data: Path, name: str, n_trials: int, *, iterations: int = 4, pruner: str = "{name: none}",
               search: str | None = None, sampler: str = "{name: tpe, seed: 0}", optimizer: str = "adam",
               extra: str = "") -> Path:
    search = search or ("{recon.probe.defocus_A: {low: -150, high: -50},"
                        " recon.optimizers.object.learning_rate: {low: 0.01, high: 0.2, log: true}}")
    path = tmp_path / f"{name}.yml"
    path.write_text(
        f"study: {{name: {name}, n_trials: {n_trials}, sampler: {sampler}, pruner: {pruner},"
        f" heartbeat_interval_s: 1, grace_period_s: 2}}\n"
        f"data: {{path: {data}, patterns: dp}}\n"
        f"recon: {{iterations: {iterations}, batch_size: 16, probe: {{defocus_A: -60}},"
        f" optimizers: {{object: {{name: {optimizer}}}}}}}\n"
        f"search: {search}\n"
        f"objective: {{metrics: [nrmse], report_every: 2}}\n{extra}")
    return path


def tune(*args: str, cwd: Path, timeout: float = 240) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "tune", *args], cwd=cwd, capture_output=True, text=True, timeout=timeout)


def spawn(*args: str, cwd: Path) -> subprocess.Popen[str]:
    return subprocess.Popen([sys.executable, "-m", "tune", *args], cwd=cwd, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)


def load(path: Path, name: str) -> optuna.Study:
    """The study, opened as workers open it (a plain RDBStorage would race them creating the tables)."""
    return optuna.load_study(study_name=name, storage=open_storage(f"sqlite:///{path.with_suffix('.db')}"))


def wait_for_running_trial(path: Path, name: str, timeout: float = 120) -> optuna.trial.FrozenTrial:
    """A RUNNING trial that has reported at least one intermediate value (so it is mid-reconstruction)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if path.with_suffix(".db").exists():
            try:
                for t in load(path, name).get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
                    if t.intermediate_values and TrialRecord.read(t).pid is not None:
                        return t
            except KeyError:  # study not created yet
                pass
        time.sleep(0.2)
    raise AssertionError("no trial started in time")


def test_several_workers_finish_exactly_the_budget(tmp_path, tiny_data_path):
    path = study_file(tmp_path, tiny_data_path, "budget", 12, pruner="{name: median, options: {n_startup_trials: 4}}",
                      extra="output: {keep: best, artifacts: [score_png, phase_png, result_h5]}\n")
    run = tune("start", str(path), "--workers", "3", cwd=tmp_path)
    assert run.returncode == 0, run.stdout + run.stderr
    assert "12/12 trials" in run.stdout and "report:" in run.stdout

    study = load(path, "budget")
    trials = study.get_trials()
    counts = budget.count(trials)
    assert counts.complete + counts.pruned == 12 and counts.failed == 0 and counts.running == 0
    # overshoot only as surplus, never run (a trial re-queued when a loaded machine let its heartbeat lapse is
    # replaced by its re-run)
    assert counts.finished == 12 and len(trials) - counts.surplus - counts.requeued == 12
    assert all(t.state == TrialState.FAIL for t in trials if budget.is_surplus(t))
    assert counts.surplus <= 3

    finished = [t for t in trials if t.state in (TrialState.COMPLETE, TrialState.PRUNED)]
    records = {t.number: TrialRecord.read(t) for t in finished}
    workers = {r.worker for r in records.values()}
    assert len(workers) >= 2
    for w in workers:  # each worker compiled once: only its first trial compiled anything
        mine = [records[n] for n in sorted(records) if records[n].worker == w]
        assert [r.compiled > 0 for r in mine] == [True] + [False] * (len(mine) - 1)
        assert len({r.compile_count for r in mine}) == 1

    artifact_dir = tmp_path / "out" / "budget" / "artifacts"
    for t in (t for t in finished if t.state == TrialState.COMPLETE):
        r = records[t.number]
        assert None not in (r.seed, r.compile_s, r.run_s, r.score_s, r.host, r.device, r.compile_count)
        assert {"nrmse", "ssim", "frc_resolution_half_bit_A", "frc_area", "data_loss", "runtime_s"} <= set(r.metrics)
        assert r.metrics["nrmse"] == pytest.approx(t.value)
        assert f"defocus_A: {t.params['probe.defocus_A']}" in r.plan
        assert r.iterations_done == 4
        assert set(r.artifacts) == {"curves_csv", "score_png", "phase_png", "result_h5"}
        for artifact_id in r.artifacts.values():
            assert (artifact_dir / artifact_id).is_file()
    kept = list((tmp_path / "out" / "budget" / "trials").glob("*.h5"))
    assert [p.name for p in kept] == [f"trial_{study.best_trial.number:05d}.h5"]  # output.keep: best
    report = tmp_path / "out" / "budget" / "report"
    assert (report / "report.html").is_file() and (report / "trials.csv").is_file()

    status = tune("status", str(path), cwd=tmp_path)
    assert status.returncode == 0 and "12 of 12 trials finished" in status.stdout
    assert f"best     trial {study.best_trial.number}" in status.stdout

    # the best trial, exported as a plan, reproduces its score
    exported = tune("best", str(path), "-o", "best.yml", cwd=tmp_path)
    assert exported.returncode == 0, exported.stderr
    again = tune("recon", "best.yml", "--score", "--out", "again.h5", cwd=tmp_path)
    assert again.returncode == 0, again.stdout + again.stderr
    scores = json.loads(again.stdout[again.stdout.index("{"):])
    assert scores["nrmse"] == pytest.approx(study.best_value, rel=1e-4)
    assert (tmp_path / "again.h5").is_file()


def test_sigkilled_worker_trial_is_rerun_with_the_same_parameters(tmp_path, tiny_data_path):
    path = study_file(tmp_path, tiny_data_path, "killed", 6, iterations=150)
    start = spawn("start", str(path), "--workers", "2", cwd=tmp_path)
    try:
        victim = wait_for_running_trial(path, "killed")
        os.kill(TrialRecord.read(victim).pid, signal.SIGKILL)
        output, _ = start.communicate(timeout=240)
    finally:
        start.kill()
    assert start.returncode == 0, output
    assert "exited with status -9" in output

    trials = load(path, "killed").get_trials()
    killed = next(t for t in trials if t.number == victim.number)
    assert killed.state == TrialState.FAIL
    reruns = [t for t in trials if t.system_attrs.get("failed_trial") == victim.number]
    assert len(reruns) == 1 and reruns[0].params == victim.params
    assert reruns[0].state == TrialState.COMPLETE and TrialRecord.read(reruns[0]).pid != TrialRecord.read(victim).pid
    counts = budget.count(trials)
    assert counts.finished == 6 and counts.complete == 6 and counts.requeued == 1 and counts.running == 0


def sigterm_mid_trial(path: Path, name: str, cwd: Path) -> optuna.trial.FrozenTrial:
    """Start worker 0, send it SIGTERM once a trial is mid-reconstruction; check it stopped cleanly
    (status 143, no traceback). Returns that trial as it was then."""
    worker = spawn("worker", str(path), "--index", "0", cwd=cwd)
    try:
        victim = wait_for_running_trial(path, name)
        worker.send_signal(signal.SIGTERM)
        output, _ = worker.communicate(timeout=60)
    finally:
        worker.kill()
    assert worker.returncode == 128 + signal.SIGTERM, output
    assert "Traceback" not in output
    return victim


def test_sigterm_fails_the_trial_cleanly_and_requeues_it(tmp_path, tiny_data_path):
    path = study_file(tmp_path, tiny_data_path, "stopped", 2, iterations=150)
    victim = sigterm_mid_trial(path, "stopped", tmp_path)

    trials = load(path, "stopped").get_trials()
    stopped = next(t for t in trials if t.number == victim.number)
    assert stopped.state == TrialState.FAIL and TrialRecord.read(stopped).fail_reason.startswith("interrupted")
    queued = [t for t in trials if t.state == TrialState.WAITING]
    assert len(queued) == 1 and queued[0].params == victim.params

    # the next worker runs the queued copy and completes the budget
    rerun = tune("worker", str(path), "--index", "1", cwd=tmp_path)
    assert rerun.returncode == 0, rerun.stdout + rerun.stderr
    trials = load(path, "stopped").get_trials()
    rerun_trial = next(t for t in trials if t.number == queued[0].number)
    assert rerun_trial.state == TrialState.COMPLETE and TrialRecord.read(rerun_trial).fail_reason is None
    assert budget.count(trials).complete == 2


def test_ctrl_c_in_a_terminal_stops_the_workers_cleanly(tmp_path, tiny_data_path):
    """A terminal's Ctrl-C goes to its whole foreground process group: only `tune start` must get it,
    and stop each worker with one SIGTERM (a worker that got both logged 'Signal 15 ignored due to
    race condition' tracebacks)."""
    path = study_file(tmp_path, tiny_data_path, "ctrlc", 4, iterations=150)
    start = subprocess.Popen([sys.executable, "-m", "tune", "start", str(path), "--workers", "1"], cwd=tmp_path,
                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                             start_new_session=True)  # its own process group, as a shell gives a foreground job
    try:
        wait_for_running_trial(path, "ctrlc")
        os.killpg(start.pid, signal.SIGINT)  # what the terminal does on Ctrl-C
        output, _ = start.communicate(timeout=120)
    finally:
        start.kill()
    assert start.returncode == 130, output
    assert "interrupted: stopping workers" in output and "Traceback" not in output
    text = (tmp_path / "out" / "ctrlc" / "logs" / "worker-0.log").read_text()
    assert "stopped by SIGTERM" in text and "SIGINT" not in text, text
    assert "Traceback" not in text and "race condition" not in text, text
    assert "Warning" not in text, text  # Optuna's notices for the features tune uses on purpose are silenced


def test_run_study_from_python(tmp_path, tiny_data_path):
    path = study_file(tmp_path, tiny_data_path, "api", 2)
    run = run_study(path, workers=1)
    assert run.status == 0 and run.report is not None and run.report.is_file()
    assert budget.count(run.study.get_trials()).complete == 2


def test_failing_and_diverging_trials_do_not_stop_the_worker(tmp_path, tiny_data_path):
    search = ("{recon.data.crop_px: {choices: [16, 64]},"  # 64 px: larger than the patterns -> an error
              " recon.optimizers.object.learning_rate: {choices: [0.05, 1.0e+6]}}")  # 1e6 with sgd: NaN
    path = study_file(tmp_path, tiny_data_path, "faults", 4, search=search, sampler="{name: grid, seed: 0}",
                      optimizer="sgd")
    run = tune("worker", str(path), "--index", "0", cwd=tmp_path)
    assert run.returncode == 0, run.stdout + run.stderr

    trials = load(path, "faults").get_trials()
    assert len(trials) == 4
    by_params = {(t.params["data.crop_px"], t.params["optimizers.object.learning_rate"]): t for t in trials}
    assert by_params[(16, 0.05)].state == TrialState.COMPLETE
    assert by_params[(16, 1.0e6)].state == TrialState.FAIL
    assert TrialRecord.read(by_params[(16, 1.0e6)]).fail_reason.startswith("diverged")
    for lr in (0.05, 1.0e6):
        failed = by_params[(64, lr)]
        assert failed.state == TrialState.FAIL and "crop_px" in TrialRecord.read(failed).fail_reason
    assert "trial 3" in run.stdout and "worker 0: done" in run.stdout
