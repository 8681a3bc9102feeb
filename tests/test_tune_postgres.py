"""Several workers on one study in a real PostgreSQL server (the several-machines set-up).

The test starts its own server in a temporary folder (initdb + pg_ctl, as an unprivileged user
when run as root, on a free loopback port) and stops it afterwards. It is skipped only when no
PostgreSQL server binaries exist; .ci/run installs Debian's postgresql so CI always runs it.
"""
from __future__ import annotations

import contextlib
import glob
import os
import pwd
import shutil
import socket
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import optuna
import pytest
from optuna.trial import TrialState

from tune import budget
from tune.record import TrialRecord
from tune.study import storage_url

pytestmark = [pytest.mark.postgres, pytest.mark.slow]  # a database server and worker processes


def server_binaries() -> Path | None:
    initdb = shutil.which("initdb") or next(iter(sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"))[::-1]), None)
    return Path(initdb).resolve().parent if initdb else None


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass(frozen=True)
class LocalServer:
    """A PostgreSQL server started by a test: its URL, port and `pg_ctl` command (as the server's user,
    with its data folder, log and options) to which an action such as `restart` is appended."""

    url: str
    port: int
    pg_ctl: list[str]


@contextlib.contextmanager
def local_postgres(prefix: str, options: str = "") -> Iterator[LocalServer]:
    """initdb + pg_ctl start in a temporary folder (as an unprivileged user when run as root, on a free
    loopback port), stopped and removed afterwards; skips the test without server binaries or psycopg2."""
    bin_dir = server_binaries()
    if bin_dir is None:
        pytest.skip("no PostgreSQL server binaries (initdb, pg_ctl) on this machine")
    pytest.importorskip("psycopg2", reason="the PostgreSQL test needs psycopg2 (pip install -e '.[test]')")
    root = Path(tempfile.mkdtemp(prefix=prefix))
    as_user: list[str] = []
    if os.geteuid() == 0:  # PostgreSQL refuses to run as root
        user = "postgres" if _user_exists("postgres") else "nobody"
        entry = pwd.getpwnam(user)
        os.chown(root, entry.pw_uid, entry.pw_gid)
        as_user = ["runuser", "-u", user, "--"]
    data, port = root / "data", free_port()
    subprocess.run([*as_user, str(bin_dir / "initdb"), "-D", str(data), "-U", "tune", "--auth=trust",
                    "-E", "UTF8", "--no-sync"], check=True, capture_output=True, timeout=120)
    pg_ctl = [*as_user, str(bin_dir / "pg_ctl"), "-D", str(data), "-l", str(root / "server.log"), "-w",
              "-o", f"-p {port} -k {root} -h 127.0.0.1 -F {options}".rstrip()]
    subprocess.run([*pg_ctl, "start"], check=True, capture_output=True, timeout=120)
    try:
        yield LocalServer(f"postgresql://tune@127.0.0.1:{port}/postgres", port, pg_ctl)
    finally:
        subprocess.run([*as_user, str(bin_dir / "pg_ctl"), "-D", str(data), "-m", "immediate", "stop"],
                       capture_output=True, timeout=60)
        shutil.rmtree(root, ignore_errors=True)


@pytest.fixture(scope="module")
def postgres_url() -> Iterator[str]:
    with local_postgres("ptytune-pg-") as server:
        yield server.url


def _user_exists(name: str) -> bool:
    try:
        pwd.getpwnam(name)
    except KeyError:
        return False
    return True


def test_workers_share_a_postgresql_study(tmp_path, tiny_data_path, postgres_url):
    study = tmp_path / "pg.yml"
    study.write_text(
        "study: {name: pg, n_trials: 8, sampler: {name: tpe, seed: 0}, pruner: {name: none},"
        " heartbeat_interval_s: 1, grace_period_s: 3}\n"
        f"data: {{path: {tiny_data_path}, patterns: dp}}\n"
        "recon: {iterations: 4, batch_size: 16}\n"
        "search: {recon.probe.defocus_A: {low: -150, high: -50}}\n")
    command = [sys.executable, "-m", "tune"]
    # a worker from `tune start` and one joining from "another node" at the same moment
    joiner = subprocess.Popen([*command, "worker", str(study), "--index", "7", "--storage", postgres_url],
                              cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    start = subprocess.run([*command, "start", str(study), "--workers", "1", "--storage", postgres_url, "--no-report"],
                           cwd=tmp_path, capture_output=True, text=True, timeout=300)
    joined, _ = joiner.communicate(timeout=300)
    assert start.returncode == 0, start.stdout + start.stderr
    assert joiner.returncode == 0, joined
    assert not (tmp_path / "pg.db").exists()  # nothing went to the default SQLite file

    trials = optuna.load_study(study_name="pg", storage=storage_url(postgres_url, study)).get_trials()
    counts = budget.count(trials)
    assert counts.complete == 8 and counts.failed == 0 and counts.running == 0 and counts.finished == 8
    assert {TrialRecord.read(t).worker for t in trials if t.state == TrialState.COMPLETE} <= {0, 7}
    assert "worker 7: joined study pg" in joined and "worker 7: done" in joined
    status = subprocess.run([*command, "status", str(study), "--storage", postgres_url], cwd=tmp_path,
                            capture_output=True, text=True, timeout=120)
    assert status.returncode == 0 and "8 of 8 trials finished" in status.stdout
