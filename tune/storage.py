"""Study storage that holds under concurrency.

SQLite (one machine): the workers' connections get a 60 s busy timeout and write-ahead logging,
and their transactions start with BEGIN IMMEDIATE, so that concurrent writers queue for the lock
instead of failing with "database is locked" when a read transaction tries to upgrade to a write.
PostgreSQL (several machines): `pool_pre_ping` drops connections the server closed.
Both are Optuna `RDBStorage`s with heartbeats, so trials of killed workers are failed and re-run.
"""
from __future__ import annotations

import sqlite3
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import optuna
import sqlalchemy
import sqlalchemy.exc
from optuna.storages import RDBStorage, RetryHeartbeatStaleTrialCallback

from recon.plan import PlanError
from tune.study import StudyConfig

SQLITE_BUSY_TIMEOUT_S = 60.0
T = TypeVar("T")


class _QueuedConnection(sqlite3.Connection):
    """A SQLite connection in write-ahead-log mode whose transactions queue for the write lock."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.execute("PRAGMA journal_mode = WAL")
        self.execute("PRAGMA synchronous = NORMAL")


def _begin_immediate(connection: sqlalchemy.engine.Connection) -> None:
    if isinstance(connection.connection.dbapi_connection, _QueuedConnection):
        connection.exec_driver_sql("BEGIN IMMEDIATE")


def _sqlite_engine_kwargs() -> dict[str, Any]:
    """Engine options for a SQLite file shared by several processes: busy timeout, WAL and
    BEGIN IMMEDIATE (the sqlite3 module's own transaction handling is turned off for that)."""
    if not sqlalchemy.event.contains(sqlalchemy.engine.Engine, "begin", _begin_immediate):
        sqlalchemy.event.listen(sqlalchemy.engine.Engine, "begin", _begin_immediate)
    return {"connect_args": {"timeout": SQLITE_BUSY_TIMEOUT_S, "factory": _QueuedConnection, "isolation_level": None}}


def open_storage(url: str, heartbeat_interval_s: int | None = None, grace_period_s: int | None = None,
                 max_retries: int = 0) -> RDBStorage:
    """An RDBStorage for `url`; with a heartbeat interval, stale trials are failed and re-queued
    (at most `max_retries` times) with the same parameters."""
    heartbeat: dict[str, Any] = {}
    if heartbeat_interval_s is not None:
        heartbeat = dict(heartbeat_interval=heartbeat_interval_s, grace_period=grace_period_s,
                         heartbeat_stale_trial_callback=RetryHeartbeatStaleTrialCallback(max_retry=max_retries))
    try:
        if not url.startswith("sqlite:"):
            return retry_on_race(lambda: RDBStorage(url, engine_kwargs={"pool_pre_ping": True}, **heartbeat))
        path = url.removeprefix("sqlite:///")
        if path != ":memory:":
            Path(path).parent.mkdir(parents=True, exist_ok=True)
        # Optuna's table set-up and version check nest a second connection inside an open
        # transaction, which BEGIN IMMEDIATE would deadlock: do them first with a plain engine.
        retry_on_race(lambda: RDBStorage(url, engine_kwargs={"connect_args": {"timeout": SQLITE_BUSY_TIMEOUT_S}}).engine.dispose())
        return RDBStorage(url, engine_kwargs=_sqlite_engine_kwargs(), skip_table_creation=True,
                          skip_compatibility_check=True, **heartbeat)
    except (ImportError, sqlalchemy.exc.ArgumentError, sqlalchemy.exc.OperationalError) as err:
        raise PlanError(f"cannot open storage {_redact(url)}: {str(err).splitlines()[0]}") from None


def retry_on_race(action: Callable[[], T], attempts: int = 8) -> T:
    """Run `action`, retrying the errors that concurrent start-up can raise (two processes
    creating the same tables or study at once) with a short, growing back-off."""
    for attempt in range(attempts):
        try:
            return action()
        except (sqlalchemy.exc.IntegrityError, sqlalchemy.exc.ProgrammingError, sqlalchemy.exc.OperationalError):
            if attempt == attempts - 1:
                raise
            time.sleep(0.05 * 2**attempt)
    raise AssertionError("unreachable")


def create_or_load(config: StudyConfig, storage: RDBStorage, sampler: optuna.samplers.BaseSampler | None = None,
                   pruner: optuna.pruners.BasePruner | None = None) -> optuna.Study:
    """Create the study or load it if it exists (safe when many workers start at once)."""
    study = retry_on_race(lambda: optuna.create_study(
        storage=storage, study_name=config.name, directions=list(config.directions),
        sampler=sampler, pruner=pruner, load_if_exists=True))
    existing = tuple(d.name.lower() for d in study.directions)
    if existing != config.directions:
        raise PlanError(f"{config.file}: objective: study {config.name!r} in {_redact(config.storage_url)} was created "
                        f"with directions {list(existing)}, the study file asks for {list(config.directions)}; "
                        "rename the study or use another storage")
    if study.metric_names is None:
        study.set_metric_names(list(config.spec.objective.metrics))
    return study


def load_existing(config: StudyConfig) -> optuna.Study:
    """The study of a study file that has been started before (never creates anything)."""
    url = config.storage_url
    if url.startswith("sqlite:///") and not Path(url.removeprefix("sqlite:///")).is_file():
        raise PlanError(f"no study yet: {url} does not exist (run tune start {config.file.name} first)")
    storage = open_storage(url)
    try:
        return optuna.load_study(study_name=config.name, storage=storage)
    except KeyError:
        raise PlanError(f"no study named {config.name!r} in {_redact(url)} (run tune start first)") from None


def _redact(url: str) -> str:
    """The URL without its password."""
    try:
        return sqlalchemy.engine.make_url(url).render_as_string(hide_password=True)
    except sqlalchemy.exc.ArgumentError:
        return url
