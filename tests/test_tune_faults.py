"""Faults: a storage that goes away, workers killed on a journal file, outputs that cannot be written.

* PostgreSQL (a real server, started here as in test_tune_postgres.py): several workers on one
  study while the server is restarted (`pg_ctl restart -m fast`), one worker's connections are
  terminated (`pg_terminate_backend`) and one worker loses the server for good (its connections
  run through a TCP relay that the test cuts). Workers reconnect with back-off; the cut-off worker
  exits after `study.storage_timeout_s` with one line and status 75; its trial is re-run by the
  others; exactly the budget finishes.
* Journal file storage (`journal:///study.log`): the SIGKILL test of the SQLite workers, and
  `tune status` / `tune report` read the journal.
* Output faults: a full or read-only output folder fails the trial with a clear `fail_reason` and
  leaves no half-written result or artifact.
"""
from __future__ import annotations

import errno
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import optuna
import pytest
from optuna.trial import TrialState

from test_tune_postgres import local_postgres
from tune import budget
from tune.storage import STORAGE_EXIT_STATUS, open_storage
from tune.study import storage_url

optuna.logging.set_verbosity(optuna.logging.WARNING)
TUNE = [sys.executable, "-m", "tune"]


def fault_study(tmp_path: Path, data: Path, name: str, n_trials: int, storage: str | None = None, *,
                iterations: int = 4, grace: int = 10, storage_timeout: float = 15, extra: str = "") -> Path:
    path = tmp_path / f"{name}.yml"
    store = f" storage: '{storage}'," if storage else ""
    path.write_text(
        f"study: {{name: {name},{store} n_trials: {n_trials}, sampler: {{name: tpe, seed: 0}}, pruner: {{name: none}},"
        f" heartbeat_interval_s: 1, grace_period_s: {grace}, storage_timeout_s: {storage_timeout}}}\n"
        f"data: {{path: {data}, patterns: dp}}\n"
        f"recon: {{iterations: {iterations}, batch_size: 16, probe: {{defocus_A: -60}}}}\n"
        "search: {recon.probe.defocus_A: {low: -150, high: -50},"
        " recon.optimizers.object.learning_rate: {low: 0.01, high: 0.2, log: true}}\n"
        f"objective: {{metrics: [nrmse], report_every: 2}}\n{extra}")
    return path


def trials_of(url: str, name: str) -> list[optuna.trial.FrozenTrial]:
    """The study's trials, read through the retrying storage (the test reads while the server restarts)."""
    storage = open_storage(url, storage_timeout_s=60)
    try:
        return optuna.load_study(study_name=name, storage=storage).get_trials()
    except KeyError:
        return []


def wait_until(condition, timeout: float, what: str, poll: float = 0.5) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return
        time.sleep(poll)
    raise AssertionError(f"timed out waiting for {what}")


def assert_budget_met_once(trials: list[optuna.trial.FrozenTrial], n_trials: int) -> budget.Counts:
    """Exactly n_trials finished; every failed trial was re-queued and re-run once with its parameters."""
    counts = budget.count(trials)
    assert counts.finished == n_trials and counts.complete == n_trials, counts
    assert counts.failed == 0 and counts.running == 0 and counts.waiting == 0, counts
    real = [t for t in trials if not budget.is_surplus(t)]
    assert len(real) == n_trials + counts.requeued  # nothing run twice except Optuna's re-runs
    for failed in (t for t in real if t.state == TrialState.FAIL):
        reruns = [t for t in real if t.system_attrs.get("failed_trial") == failed.number]
        assert len(reruns) == 1 and reruns[0].params == failed.params
    return counts


# --------------------------------------------------------------------------- PostgreSQL under faults
@dataclass
class Server:
    url: str
    port: int
    restart_command: list[str]

    def restart(self) -> float:
        start = time.monotonic()
        subprocess.run(self.restart_command, check=True, capture_output=True, timeout=120)
        return time.monotonic() - start

    def terminate_connections_of(self, pid: int) -> int:
        """pg_terminate_backend on every connection of process `pid` (its application_name)."""
        import psycopg2

        with psycopg2.connect(host="127.0.0.1", port=self.port, user="tune", dbname="postgres") as conn:
            conn.autocommit = True
            with conn.cursor() as cur:
                cur.execute("SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity WHERE application_name = %s",
                            (f"ptytune pid {pid}",))
                return int(cur.fetchone()[0])


@pytest.fixture(scope="module")
def postgres_server() -> Iterator[Server]:
    with local_postgres("ptytune-pgfault-", "-c max_connections=200") as server:
        yield Server(server.url, server.port, [*server.pg_ctl, "-m", "fast", "restart"])


class Relay:
    """A TCP relay to the server; `cut()` closes it and every connection through it for good."""

    def __init__(self, target_port: int) -> None:
        self.target = ("127.0.0.1", target_port)
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.sockets: list[socket.socket] = []
        self.lock = threading.Lock()
        self.closed = False
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            with self.lock:
                if self.closed:
                    client.close()
                    return
            try:
                server = socket.create_connection(self.target)
            except OSError:
                client.close()
                continue
            with self.lock:
                self.sockets += [client, server]
            for a, b in ((client, server), (server, client)):
                threading.Thread(target=self._pump, args=(a, b), daemon=True).start()

    @staticmethod
    def _pump(source: socket.socket, sink: socket.socket) -> None:
        try:
            while data := source.recv(65536):
                sink.sendall(data)
        except OSError:
            pass
        for s in (source, sink):
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    def cut(self) -> None:
        with self.lock:
            self.closed = True
        try:
            self.listener.shutdown(socket.SHUT_RDWR)  # wakes the accept() blocked in the relay's thread
        except OSError:
            pass
        self.listener.close()
        with self.lock:
            for s in self.sockets:
                try:
                    s.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass
                s.close()


N_PG_WORKERS = int(os.environ.get("PTYTUNE_FAULT_WORKERS", "8"))


@pytest.mark.slow
@pytest.mark.postgres
def test_postgresql_restart_terminated_connection_and_lost_worker(tmp_path, tiny_data_path, postgres_server):
    n_trials = 48
    url = storage_url(postgres_server.url, tmp_path / "x.yml")
    study = fault_study(tmp_path, tiny_data_path, "pgfault", n_trials, grace=10, storage_timeout=15)
    relay = Relay(postgres_server.port)
    relayed_url = url.replace(f":{postgres_server.port}/", f":{relay.port}/")
    log = tmp_path / "events.txt"
    start = subprocess.Popen([*TUNE, "start", str(study), "--workers", str(N_PG_WORKERS - 1), "--storage", url,
                              "--no-report"], cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    # the relayed worker runs long trials (same study, more iterations) so that the cut finds it mid-trial
    (tmp_path / "lost").mkdir()
    slow = fault_study(tmp_path / "lost", tiny_data_path, "pgfault", n_trials, grace=10, storage_timeout=15,
                       iterations=400)
    lost = subprocess.Popen([*TUNE, "worker", str(slow), "--index", "99", "--storage", relayed_url], cwd=tmp_path,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    began = time.monotonic()
    events: list[str] = []

    def note(text: str) -> None:
        events.append(f"{time.monotonic() - began:6.1f} s  {text}")

    def finished() -> int:
        return budget.count(trials_of(url, "pgfault")).finished

    try:
        # 1. the server restarts while trials run
        wait_until(lambda: finished() >= 6, 400, "the first trials")
        note(f"{finished()} finished; restarting the server")
        note(f"server restarted in {postgres_server.restart():.1f} s")
        # 2. one worker's connections are terminated
        wait_until(lambda: finished() >= 16, 300, "trials after the restart")
        victim = next(t.user_attrs["pid"] for t in reversed(trials_of(url, "pgfault"))
                      if t.user_attrs.get("worker") not in (None, 99))
        note(f"{finished()} finished; terminated {postgres_server.terminate_connections_of(victim)} connections of pid {victim}")
        # 3. the relayed worker loses the server for good while it runs a trial
        def lost_worker_running() -> bool:
            return any(t.state == TrialState.RUNNING and t.user_attrs.get("worker") == 99 and t.intermediate_values
                       for t in trials_of(url, "pgfault"))
        wait_until(lambda: finished() >= 24 and lost_worker_running(), 300, "a trial of the relayed worker", poll=0.1)
        stranded = next(t for t in trials_of(url, "pgfault") if t.state == TrialState.RUNNING
                        and t.user_attrs.get("worker") == 99)
        relay.cut()
        note(f"{finished()} finished; cut the relayed worker off during trial {stranded.number}")
        lost_out, _ = lost.communicate(timeout=120)
        note(f"relayed worker exited with {lost.returncode}")
        out, _ = start.communicate(timeout=600)
        note(f"tune start exited with {start.returncode}")
    finally:
        for p in (start, lost):
            p.kill()
        log.write_text("\n".join(events) + "\n")
        print("\n".join(events))

    assert start.returncode == 0, out
    assert "warning: worker" not in out  # no worker of tune start died
    worker_logs = {p.name: p.read_text() for p in (tmp_path / "out" / "pgfault" / "logs").glob("worker-*.log")}
    assert len(worker_logs) == N_PG_WORKERS - 1
    for name, text in worker_logs.items():
        assert "Traceback" not in text and "done" in text, (name, text)
    assert lost.returncode == STORAGE_EXIT_STATUS, lost_out
    assert "Traceback" not in lost_out
    message = [line for line in lost_out.splitlines() if "cannot reach the storage" in line]
    assert len(message) == 1 and "exiting" in message[0] and ":" + str(relay.port) in message[0], lost_out

    trials = trials_of(url, "pgfault")
    counts = assert_budget_met_once(trials, n_trials)
    stranded_now = next(t for t in trials if t.number == stranded.number)
    assert stranded_now.state == TrialState.FAIL  # failed by the others once its heartbeats stopped
    rerun = next(t for t in trials if t.system_attrs.get("failed_trial") == stranded.number)
    assert rerun.state == TrialState.COMPLETE and rerun.user_attrs["worker"] != 99
    assert counts.requeued >= 1


# --------------------------------------------------------------------------- journal file storage
def test_journal_urls_resolve_beside_the_study_file(tmp_path):
    study = tmp_path / "sub" / "s.yml"
    assert storage_url("journal:///logs/s.log", study) == f"journal:///{tmp_path / 'sub' / 'logs' / 's.log'}"
    assert storage_url("journal:////abs/s.log", study) == "journal:////abs/s.log"


@pytest.mark.slow
def test_journal_storage_sigkilled_worker_is_rerun_and_readers_work(tmp_path, tiny_data_path):
    """The SQLite SIGKILL test (test_tune_workers.py) on a journal file; status, report, dashboard read it."""
    from tune.readonly import open_for_reading

    study = fault_study(tmp_path, tiny_data_path, "jkilled", 6, "journal:///jkilled.log", iterations=150, grace=2)
    url = f"journal:///{tmp_path / 'jkilled.log'}"
    start = subprocess.Popen([*TUNE, "start", str(study), "--workers", "2"], cwd=tmp_path,
                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        def running() -> list[optuna.trial.FrozenTrial]:
            if not (tmp_path / "jkilled.log").exists():
                return []
            return [t for t in trials_of(url, "jkilled")
                    if t.state == TrialState.RUNNING and t.intermediate_values and "pid" in t.user_attrs]
        wait_until(lambda: bool(running()), 240, "a running trial", poll=0.2)
        victim = running()[0]
        os.kill(victim.user_attrs["pid"], signal.SIGKILL)
        output, _ = start.communicate(timeout=300)
    finally:
        start.kill()
    assert start.returncode == 0, output
    assert "exited with status -9" in output and "report:" in output
    assert not (tmp_path / "jkilled.db").exists()  # nothing went to SQLite

    trials = trials_of(url, "jkilled")
    counts = assert_budget_met_once(trials, 6)
    assert counts.requeued == 1
    rerun = next(t for t in trials if t.system_attrs.get("failed_trial") == victim.number)
    assert rerun.user_attrs["pid"] != victim.user_attrs["pid"]

    status = subprocess.run([*TUNE, "status", str(study)], cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert status.returncode == 0 and "6 of 6 trials finished" in status.stdout, status.stdout + status.stderr
    report = tmp_path / "out" / "jkilled" / "report"
    assert (report / "report.html").is_file() and (report / "trials.csv").is_file()
    # the dashboard's storage: optuna-dashboard's API lists the study from the journal
    import optuna_dashboard
    from wsgiref.util import setup_testing_defaults

    environ: dict = {"PATH_INFO": "/api/studies", "REQUEST_METHOD": "GET"}
    setup_testing_defaults(environ)
    reply: list = []
    body = b"".join(optuna_dashboard.wsgi(open_for_reading(url))(environ, lambda s, h, *a: reply.append(s)))
    assert reply[0].startswith("200") and b"jkilled" in body


# --------------------------------------------------------------------------- output faults
def _mount_tmpfs(path: Path, options: str) -> None:
    path.mkdir(parents=True, exist_ok=True)
    if os.geteuid() != 0 or shutil.which("mount") is None:
        pytest.skip("needs root to mount a small tmpfs")
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(path)], capture_output=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.decode().strip()}")


@pytest.fixture
def full_dir(tmp_path) -> Iterator[Path]:
    """A folder on a file system with no space left."""
    path = tmp_path / "full"
    _mount_tmpfs(path, "size=256k")
    try:
        (path / "out").mkdir()
        with open(path / "filler", "wb", buffering=0) as f:
            try:
                while True:
                    f.write(bytes(4096))
            except OSError as err:
                assert err.errno == errno.ENOSPC
        yield path / "out"
    finally:
        subprocess.run(["umount", "-l", str(path)], capture_output=True)


@pytest.fixture
def read_only_dir(tmp_path) -> Iterator[Path]:
    """A folder nobody (root included) can write to."""
    path = tmp_path / "ro"
    if os.geteuid() != 0:
        path.mkdir()
        path.chmod(0o555)
        yield path
        path.chmod(0o755)
        return
    _mount_tmpfs(path, "ro,size=64k")
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], capture_output=True)


def _small_result():
    import numpy as np

    import recon
    from recon.result import Result

    plan = recon.plan.plan_from_dict({"data": {"path": "x.h5"}})
    return Result(object=np.ones((1, 64, 64), np.complex64), probe=np.ones((1, 16, 16), np.complex64),
                  positions_yx_A=np.zeros((4, 2)), dx_A=0.1, origin_yx_A=(0.0, 0.0), plan=plan,
                  history={"loss": np.arange(3.0)}, slice_thickness_A=1.0, energy_eV=8e4, sigma_rad_per_VA=1e-3,
                  iterations_done=3, diverged=False, converged=False, stop_reason="iterations")


@pytest.mark.parametrize("where", ["full", "read_only"])
def test_result_save_is_atomic_and_names_the_reason(where, request):
    from recon.result import ResultWriteError

    folder = request.getfixturevalue(f"{where}_dir")
    before = sorted(folder.iterdir())
    with pytest.raises(ResultWriteError) as err:
        _small_result().save(folder / "result.h5")
    message = str(err.value)
    assert len(message.splitlines()) == 1 and f"cannot write result file {folder / 'result.h5'}" in message
    assert ("No space left on device" if where == "full" else "Read-only file system") in message \
        or "Permission denied" in message
    assert sorted(folder.iterdir()) == before  # no half-written file, no temporary left behind


def test_result_save_replaces_only_when_complete(tmp_path, monkeypatch):
    from recon.result import Result, ResultWriteError

    good = _small_result().save(tmp_path / "r.h5")
    content = good.read_bytes()

    def disk_full(self, f):  # write some, then fail as a full disk does
        f["object"] = self.object
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(Result, "_write", disk_full)
    with pytest.raises(ResultWriteError, match="No space left on device"):
        _small_result().save(tmp_path / "r.h5")
    assert good.read_bytes() == content and sorted(p.name for p in tmp_path.iterdir()) == ["r.h5"]


def test_artifact_store_write_is_atomic(full_dir):
    import io

    from tune.storage import AtomicArtifactStore

    store = AtomicArtifactStore(str(full_dir / "artifacts"))
    with pytest.raises(OSError, match="cannot write artifact to .*No space left on device"):
        store.write("abc", io.BytesIO(bytes(1 << 20)))
    assert not list((full_dir / "artifacts").iterdir())


@pytest.mark.slow
@pytest.mark.parametrize("where", ["full", "read_only"])
def test_unwritable_output_fails_the_trial_with_its_reason(where, request, tmp_path, tiny_data_path):
    folder = request.getfixturevalue(f"{where}_dir")
    study = fault_study(tmp_path, tiny_data_path, f"out-{where}", 2,
                        extra=f"output: {{dir: {folder}, keep: all, artifacts: [score_png]}}\n")
    run = subprocess.run([*TUNE, "worker", str(study), "--index", "0"], cwd=tmp_path, capture_output=True, text=True,
                         timeout=300)
    assert run.returncode == 0 and "Traceback" not in run.stdout + run.stderr, run.stdout + run.stderr
    trials = optuna.load_study(study_name=f"out-{where}", storage=open_storage(storage_url(None, study))).get_trials()
    assert len(trials) == 2 and all(t.state == TrialState.FAIL for t in trials)
    reason = "No space left on device" if where == "full" else ("Read-only file system", "Permission denied")
    for t in trials:
        text = t.user_attrs["fail_reason"]
        # the first file a trial writes (its curves artifact, or the result file) fails, naming the folder
        assert text.startswith(("ResultWriteError: cannot write result file", "OSError: [Errno")), text
        assert str(folder) in text and text.endswith(reason), text
    assert not [p for p in folder.rglob("*") if p.is_file()]  # nothing half-written


# --------------------------------------------------------------------------- a trial taken over
def test_worker_goes_on_when_its_trial_was_taken_over(tmp_path, tiny_data_path):
    """A worker cut off for longer than the grace period (but shorter than the storage timeout)
    finds its trial failed and re-queued by another worker: it drops it and goes on."""
    from optuna.storages import RetryHeartbeatStaleTrialCallback

    from tune.storage import create_or_load, open_study_storage
    from tune.study import load_study
    from tune.worker import _work

    config = load_study(fault_study(tmp_path, tiny_data_path, "takeover", 3))
    study = create_or_load(config, open_study_storage(config))
    other = optuna.load_study(study_name="takeover", storage=open_study_storage(config))

    class Objective:
        current = None
        calls = 0

        def __call__(self, trial: optuna.Trial) -> float:
            self.current, self.calls = trial, self.calls + 1
            x = trial.suggest_float("x", 0, 1)
            if self.calls == 1:  # meanwhile another worker declared this trial stale
                other._storage.set_trial_state_values(trial._trial_id, TrialState.FAIL)
                RetryHeartbeatStaleTrialCallback(max_retry=3)(other, other.trials[trial.number])
                trial.set_user_attr("metrics", {})  # UpdateFinishedTrialError, as after a reconnect
            return x

    objective = Objective()
    _work(study, objective, config, lambda t: None)
    trials = study.get_trials()
    counts = assert_budget_met_once(trials, 3)
    assert counts.requeued == 1 and objective.calls == 4
    assert trials[0].state == TrialState.FAIL and trials[1].system_attrs["failed_trial"] == 0


def test_running_trial_that_never_had_a_heartbeat_is_failed_and_rerun(tmp_path, monkeypatch):
    """An orphan: a trial created (committed) by a call whose acknowledgement was lost, so that
    the retried call created another one. It would stay RUNNING and keep every worker waiting."""
    import tune.storage
    from optuna.storages import fail_stale_trials

    monkeypatch.setattr(tune.storage, "ORPHAN_MARGIN_S", 0.0)
    storage = open_storage(f"sqlite:///{tmp_path / 'o.db'}", heartbeat_interval_s=1, grace_period_s=1, max_retries=1)
    study = optuna.create_study(study_name="orphan", storage=storage)
    orphan = study.ask()
    orphan.suggest_float("x", 0, 1)
    beating = study.ask()
    storage.record_heartbeat(beating._trial_id)
    time.sleep(1.5)
    storage.record_heartbeat(beating._trial_id)
    fail_stale_trials(study)
    trials = study.get_trials()
    assert [t.state for t in trials] == [TrialState.FAIL, TrialState.RUNNING, TrialState.WAITING]
    assert trials[2].system_attrs["failed_trial"] == 0 and trials[2].params == trials[0].params
