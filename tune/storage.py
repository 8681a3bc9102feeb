"""Study storage that holds under concurrency and under faults.

Three kinds, chosen by the URL (`study.storage`):

* SQLite (`sqlite:///file.db`, one machine): the workers' connections get a 60 s busy timeout and
  write-ahead logging, and their transactions start with BEGIN IMMEDIATE, so that concurrent writers
  queue for the lock instead of failing with "database is locked" when a read transaction tries to
  upgrade to a write.
* PostgreSQL (`postgresql://...`, several machines): `pool_pre_ping` drops connections the server
  closed; connections time out after 10 s and use TCP keep-alives, so a vanished server is noticed.
* Optuna's journal file (`journal:///file.log`, several machines with a shared file system and no
  database server): an append-only log with a lock file (`JournalFileBackend`). Optuna 5.1's
  `JournalStorage` has no heartbeat; `HeartbeatJournalStorage` adds one (a trial system attribute
  holding the wall-clock time of its last beat), so trials of killed workers are failed and re-run
  as with the RDB storages.

RDB storages are `ReconnectingRDBStorage`s: every storage call that fails because the database
cannot be reached (server restart, a terminated connection, a network outage, a lock held too long)
is retried on a fresh session with bounded exponential back-off, until the storage has been
unreachable for `storage_timeout_s` seconds (study key `study.storage_timeout_s`); then it raises
`StorageUnreachable` (one line), and a worker exits with `STORAGE_EXIT_STATUS`.
"""
from __future__ import annotations

import functools
import os
import random
import shutil
import sqlite3
import threading
import time
import warnings
from datetime import datetime, timedelta
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import optuna
import sqlalchemy
import sqlalchemy.exc
import sqlalchemy.orm
from optuna.artifacts import FileSystemArtifactStore
from optuna.exceptions import ExperimentalWarning, StorageInternalError, UpdateFinishedTrialError
from optuna.storages import BaseStorage, JournalStorage, RDBStorage, RetryHeartbeatStaleTrialCallback
from optuna.storages._heartbeat import BaseHeartbeat
from optuna.storages._rdb import models as rdb_models
from optuna.storages.journal import JournalFileBackend
from optuna.trial import FrozenTrial, TrialState

from recon.plan import PlanError
from tune.study import StudyConfig

SQLITE_BUSY_TIMEOUT_S = 60.0
#: Default of study.storage_timeout_s: how long a worker keeps retrying an unreachable storage.
DEFAULT_STORAGE_TIMEOUT_S = 120.0
#: First and longest pause between retries of a failed storage call (doubling, with ±25 % jitter).
RETRY_FIRST_S, RETRY_MAX_S = 0.1, 5.0
#: A RUNNING trial with no heartbeat this long past the grace period is an orphan (see _get_stale_trial_ids).
ORPHAN_MARGIN_S = 60.0
#: Exit status of a worker that gave up on the storage (EX_TEMPFAIL: try again later).
STORAGE_EXIT_STATUS = 75
JOURNAL_PREFIX = "journal:///"
#: Trial system attribute with the time (seconds since the epoch) of a journal trial's last heartbeat.
HEARTBEAT_ATTR = "ptytune:heartbeat"
T = TypeVar("T")


class StorageUnreachable(ConnectionError):
    """The storage could not be reached for longer than the storage timeout; one line for the user."""


# --------------------------------------------------------------------------- SQLite set-up
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


def _postgres_engine_kwargs() -> dict[str, Any]:
    """Drop closed connections before use, give up connecting after 10 s, notice a vanished server
    through TCP keep-alives, and name the connection after the process (pg_stat_activity)."""
    return {"pool_pre_ping": True, "connect_args": {
        "connect_timeout": 10, "keepalives": 1, "keepalives_idle": 30, "keepalives_interval": 10,
        "keepalives_count": 3, "application_name": f"ptytune pid {os.getpid()}"}}


# --------------------------------------------------------------------------- retries
def _is_transient(err: BaseException) -> bool:
    """True for errors that mean "the database cannot be reached right now" (worth a retry)."""
    if isinstance(err, StorageInternalError) and err.__cause__ is not None:
        err = err.__cause__
    if isinstance(err, sqlalchemy.exc.DBAPIError) and err.connection_invalidated:
        return True
    return isinstance(err, (sqlalchemy.exc.OperationalError, sqlalchemy.exc.InterfaceError,
                            sqlalchemy.exc.PendingRollbackError, sqlalchemy.exc.DisconnectionError,
                            sqlalchemy.exc.TimeoutError))


def _reason(err: BaseException) -> str:
    if isinstance(err, StorageInternalError) and err.__cause__ is not None:
        err = err.__cause__
    inner = getattr(err, "orig", None) or err
    text = str(inner).strip().splitlines()
    return f"{type(inner).__name__}: {text[0] if text else ''}"[:300]


class ReconnectingRDBStorage(RDBStorage):
    """An `RDBStorage` whose calls survive a database restart or a dropped connection.

    A call that fails with a connection error is retried on a fresh session, with back-off from
    RETRY_FIRST_S doubling to RETRY_MAX_S, until the storage has been unreachable for
    `storage_timeout_s` (counted from the first failure of the current outage, across calls);
    then `StorageUnreachable`. Heartbeats are retried for one heartbeat interval and otherwise
    skipped (a missed beat is harmless; the grace period covers several). Works inside Optuna's
    `_CachedStorage` like a plain `RDBStorage`.
    """

    storage_timeout_s: float = DEFAULT_STORAGE_TIMEOUT_S
    _outage_start: float | None = None
    _display_url: str = "storage"

    def _with_retries(self, call: Callable[[], T], timeout_s: float | None = None) -> T:
        """Run `call`, retrying connection errors. With `timeout_s` (heartbeats, in their own
        thread) the outage is timed for this call alone and the worker's outage clock is left alone."""
        own_clock = timeout_s is not None
        timeout_s = self.storage_timeout_s if timeout_s is None else timeout_s
        attempt = 0
        local_start: float | None = None
        while True:
            try:
                result = call()
            except Exception as err:
                if not _is_transient(err):
                    raise
                now = time.monotonic()
                if own_clock:
                    start = local_start = local_start or now
                else:
                    start = self._outage_start = self._outage_start or now
                self._drop_session()
                if now - start >= timeout_s:
                    raise StorageUnreachable(f"cannot reach the storage {self._display_url} for {now - start:.0f} s "
                                             f"({_reason(err)})") from None
                pause = min(RETRY_MAX_S, RETRY_FIRST_S * 2**attempt) * random.uniform(0.75, 1.25)
                time.sleep(max(0.0, min(pause, start + timeout_s - now)))
                attempt += 1
            else:
                if not own_clock:
                    self._outage_start = None
                return result

    def _drop_session(self) -> None:
        try:
            self.scoped_session.remove()
        except Exception:  # noqa: BLE001 - closing a broken session may fail again; it is gone either way
            pass

    def set_trial_state_values(self, trial_id: int, state: TrialState, values: Any = None) -> bool:
        attempts = 0

        def call() -> bool:
            nonlocal attempts
            attempts += 1
            try:
                return RDBStorage.set_trial_state_values(self, trial_id, state, values)
            except UpdateFinishedTrialError:
                # a retry of a commit whose acknowledgement was lost finds its own change
                if attempts > 1 and state.is_finished() and RDBStorage.get_trial(self, trial_id).state == state:
                    return True
                raise

        return self._with_retries(call)

    def _get_stale_trial_ids(self, study_id: int) -> list[int]:
        """Optuna's stale trials (heartbeat older than the grace period) plus orphans: RUNNING
        trials that never got a heartbeat and started more than grace + ORPHAN_MARGIN_S ago (a
        trial whose creation was committed but whose acknowledgement a dropped connection lost,
        so that the retried call created another). Without this they would stay RUNNING forever."""
        def stale() -> list[int]:
            found = RDBStorage._get_stale_trial_ids(self, study_id)
            grace = self.grace_period or 2 * (self.heartbeat_interval or 1)
            cutoff = datetime.now() - timedelta(seconds=grace + ORPHAN_MARGIN_S)
            with self.scoped_session() as session:
                running = (session.query(rdb_models.TrialModel)
                           .options(sqlalchemy.orm.selectinload(rdb_models.TrialModel.heartbeats))
                           .filter(rdb_models.TrialModel.state == TrialState.RUNNING,
                                   rdb_models.TrialModel.study_id == study_id).all())
                found += [t.trial_id for t in running
                          if not t.heartbeats and t.datetime_start is not None and t.datetime_start < cutoff]
            self.scoped_session.remove()
            return sorted(set(found))

        return self._with_retries(stale)

    def record_heartbeat(self, trial_id: int) -> None:
        interval = float(self.heartbeat_interval or 1)
        try:
            self._with_retries(lambda: RDBStorage.record_heartbeat(self, trial_id), timeout_s=interval)
        except StorageUnreachable:
            pass  # a missed beat; the worker's own calls time the outage and give up
        except Exception as err:  # noqa: BLE001 - the heartbeat thread must never die with a traceback
            if not _is_transient(err):
                raise


def _retried(name: str) -> Callable[..., Any]:
    method = getattr(RDBStorage, name)

    @functools.wraps(method)
    def call(self: ReconnectingRDBStorage, *args: Any, **kwargs: Any) -> Any:
        return self._with_retries(lambda: method(self, *args, **kwargs))

    return call


for _name in ("create_new_study", "delete_study", "set_study_user_attr", "set_study_system_attr",
              "get_study_id_from_name", "get_study_name_from_id", "get_study_directions", "get_study_user_attrs",
              "get_study_system_attrs", "get_all_studies", "_create_new_trial", "_set_trial_param",
              "get_trial_param", "get_trial_id_from_study_id_trial_number", "set_trial_intermediate_value",
              "set_trial_user_attr", "set_trial_system_attr", "get_trial", "get_all_trials", "_get_trials",
              "get_best_trial", "_get_best_trial_id", "get_trial_user_attrs", "get_trial_system_attrs"):
    setattr(ReconnectingRDBStorage, _name, _retried(_name))


# --------------------------------------------------------------------------- journal storage
class HeartbeatJournalStorage(JournalStorage, BaseHeartbeat):
    """Optuna's `JournalStorage` with heartbeats (Optuna 5.1's has none).

    A running trial's heartbeat is the trial system attribute HEARTBEAT_ATTR (the writer's
    wall-clock time); a RUNNING trial whose last beat (or, before the first, its start) is older
    than the grace period is stale. Clocks of the machines sharing the journal must agree to well
    within the grace period (NTP). Each beat appends one line to the journal.
    """

    def __init__(self, backend: JournalFileBackend, heartbeat_interval: int | None = None,
                 grace_period: int | None = None,
                 heartbeat_stale_trial_callback: Callable[[optuna.Study, FrozenTrial], None] | None = None) -> None:
        super().__init__(backend)
        self.heartbeat_interval = heartbeat_interval
        self.grace_period = grace_period
        self.heartbeat_stale_trial_callback = heartbeat_stale_trial_callback

    def record_heartbeat(self, trial_id: int) -> None:
        try:
            self.set_trial_system_attr(trial_id, HEARTBEAT_ATTR, time.time())
        except (UpdateFinishedTrialError, KeyError, OSError):
            pass  # the trial already ended (or the file system hiccupped): nothing to keep alive

    def _get_stale_trial_ids(self, study_id: int) -> list[int]:
        assert self.heartbeat_interval is not None
        grace = self.grace_period or 2 * self.heartbeat_interval
        now = time.time()
        stale = []
        for trial in self.get_all_trials(study_id, deepcopy=False, states=(TrialState.RUNNING,)):
            beat = trial.system_attrs.get(HEARTBEAT_ATTR)
            if beat is None and trial.datetime_start is not None:
                beat = trial.datetime_start.timestamp()  # naive local time, as the journal replays it
            if isinstance(beat, (int, float)) and now - beat > grace:
                stale.append(trial._trial_id)
        return stale

    def get_heartbeat_interval(self) -> int | None:
        return self.heartbeat_interval

    def get_heartbeat_stale_trial_callback(self) -> Callable[[optuna.Study, FrozenTrial], None] | None:
        return self.heartbeat_stale_trial_callback


def journal_path(url: str) -> Path | None:
    """The file of a `journal:///path` URL (None for other URLs)."""
    return Path(url.removeprefix(JOURNAL_PREFIX)) if url.startswith(JOURNAL_PREFIX) else None


# --------------------------------------------------------------------------- opening
def open_storage(url: str, heartbeat_interval_s: int | None = None, grace_period_s: int | None = None,
                 max_retries: int = 0, storage_timeout_s: float = DEFAULT_STORAGE_TIMEOUT_S) -> BaseStorage:
    """The storage for `url`; with a heartbeat interval, stale trials are failed and re-queued
    (at most `max_retries` times) with the same parameters. RDB calls are retried for up to
    `storage_timeout_s` seconds of outage."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ExperimentalWarning)  # heartbeats are "experimental" since Optuna 2.9
        return _open(url, heartbeat_interval_s, grace_period_s, max_retries, storage_timeout_s)


def _open(url: str, heartbeat_interval_s: int | None, grace_period_s: int | None, max_retries: int,
          storage_timeout_s: float) -> BaseStorage:
    heartbeat: dict[str, Any] = {}
    if heartbeat_interval_s is not None:
        heartbeat = dict(heartbeat_interval=heartbeat_interval_s, grace_period=grace_period_s,
                         heartbeat_stale_trial_callback=RetryHeartbeatStaleTrialCallback(max_retry=max_retries))
    journal = journal_path(url)
    if journal is not None:
        try:
            journal.parent.mkdir(parents=True, exist_ok=True)
            return HeartbeatJournalStorage(JournalFileBackend(str(journal)), **heartbeat)
        except (OSError, ValueError) as err:
            raise PlanError(f"cannot open storage {url}: {str(err).splitlines()[0] if str(err) else err!r}") from None
    try:
        if not url.startswith("sqlite:"):
            engine = _postgres_engine_kwargs() if url.startswith("postgresql") else {"pool_pre_ping": True}
            storage = retry_on_race(lambda: ReconnectingRDBStorage(url, engine_kwargs=engine, **heartbeat))
        else:
            path = url.removeprefix("sqlite:///")
            if path != ":memory:":
                Path(path).parent.mkdir(parents=True, exist_ok=True)
            # Optuna's table set-up and version check nest a second connection inside an open
            # transaction, which BEGIN IMMEDIATE would deadlock: do them first with a plain engine.
            retry_on_race(lambda: RDBStorage(url, engine_kwargs={"connect_args": {"timeout": SQLITE_BUSY_TIMEOUT_S}}).engine.dispose())
            storage = ReconnectingRDBStorage(url, engine_kwargs=_sqlite_engine_kwargs(), skip_table_creation=True,
                                             skip_compatibility_check=True, **heartbeat)
    except (ImportError, sqlalchemy.exc.ArgumentError, sqlalchemy.exc.OperationalError) as err:
        raise PlanError(f"cannot open storage {_redact(url)}: {str(err).splitlines()[0]}") from None
    storage.storage_timeout_s = storage_timeout_s
    storage._display_url = _redact(url)
    return storage


def open_study_storage(config: StudyConfig, heartbeats: bool = True) -> BaseStorage:
    """The storage of a study as its workers open it (heartbeats, retries, the study's timeout)."""
    s = config.spec.study
    if not heartbeats:
        return open_storage(config.storage_url, storage_timeout_s=s.storage_timeout_s)
    return open_storage(config.storage_url, s.heartbeat_interval_s, config.grace_period_s, s.max_retries,
                        storage_timeout_s=s.storage_timeout_s)


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


def create_or_load(config: StudyConfig, storage: BaseStorage, sampler: optuna.samplers.BaseSampler | None = None,
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
    journal = journal_path(url)
    if journal is not None and not journal.is_file():
        raise PlanError(f"no study yet: {journal} does not exist (run tune start {config.file.name} first)")
    storage = open_storage(url, storage_timeout_s=config.spec.study.storage_timeout_s)
    try:
        return optuna.load_study(study_name=config.name, storage=storage)
    except KeyError:
        raise PlanError(f"no study named {config.name!r} in {_redact(url)} (run tune start first)") from None


# --------------------------------------------------------------------------- artifacts
class AtomicArtifactStore(FileSystemArtifactStore):
    """Optuna's file-system artifact store, writing each artifact under a temporary name in the
    same folder and renaming it, so a full or read-only folder never leaves a half-written artifact;
    the error names the artifact folder and the reason."""

    def write(self, artifact_id: str, content_body: Any) -> None:
        target = Path(self._get_filepath(artifact_id))
        tmp = target.with_name(f".{artifact_id}.{os.getpid()}.{threading.get_ident()}.part")
        try:
            target.parent.mkdir(parents=True, exist_ok=True)
            with open(tmp, "wb") as f:
                shutil.copyfileobj(content_body, f)
            os.replace(tmp, target)
        except OSError as err:
            try:
                tmp.unlink(missing_ok=True)
            except OSError:
                pass  # a read-only folder: nothing was written
            reason = os.strerror(err.errno) if err.errno is not None else str(err)
            raise OSError(err.errno, f"cannot write artifact to {target.parent}: {reason}") from None


def _redact(url: str) -> str:
    """The URL without its password."""
    try:
        return sqlalchemy.engine.make_url(url).render_as_string(hide_password=True)
    except sqlalchemy.exc.ArgumentError:
        return url
