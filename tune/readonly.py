"""Opening a stored study for reading beside running workers (the report, the dashboard).

Workers open their storage with `tune.storage.open_storage` (heartbeats, queued writes); readers
use `open_for_reading`, which never creates a database.

SQLite beside busy workers (optuna-dashboard #545, "database is locked"): the dashboard and the report
open the database with no connection pool (``NullPool``: a connection lives only for one request, so
no idle connection or open transaction lingers between requests) and a long busy timeout (SQLite
waits up to ``busy_timeout_s`` for a worker's write to finish instead of failing at once).
``read_only=True`` additionally opens the file with ``mode=ro``, so the dashboard can never take a
write lock (notes, deleting trials and other edits in the web UI then fail; the workers never do).
"""

from __future__ import annotations

from pathlib import Path

import optuna
from sqlalchemy.engine import make_url
from sqlalchemy.pool import NullPool

DEFAULT_BUSY_TIMEOUT_S = 60.0


def is_sqlite_url(url: str) -> bool:
    """True for ``sqlite:///...`` storage URLs."""
    return url.startswith("sqlite")


def sqlite_path(url: str) -> Path | None:
    """The database file of a SQLite URL (None for in-memory databases)."""
    database = make_url(url).database
    if not database or database == ":memory:":
        return None
    return Path(database.removeprefix("file:"))


def read_only_sqlite_url(url: str) -> str:
    """The same SQLite database opened through a read-only URI (``mode=ro``)."""
    path = sqlite_path(url)
    if path is None:
        raise ValueError(f"read-only needs a SQLite file, got {url!r}")
    return f"sqlite:///file:{path.resolve()}?mode=ro&uri=true"


def open_for_reading(
    url: str, *, busy_timeout_s: float = DEFAULT_BUSY_TIMEOUT_S, read_only: bool = False
) -> optuna.storages.BaseStorage:
    """Open an existing study storage for reading beside running workers.

    A URL with a scheme is an RDB (SQLite: no pool, ``busy_timeout_s``, optionally read-only;
    others: ``pool_pre_ping``); anything else is an Optuna journal file. Never creates a database.
    """
    url = url.removeprefix("journal:///")  # tune's journal URL: the file path after it
    if "://" not in url:
        if not Path(url).is_file():
            raise FileNotFoundError(f"no journal storage file {url}")
        backend = optuna.storages.journal.JournalFileBackend(url)
        return optuna.storages.JournalStorage(backend)
    engine_kwargs: dict[str, object]
    if is_sqlite_url(url):
        path = sqlite_path(url)
        if path is not None and not path.is_file():
            raise FileNotFoundError(f"no SQLite storage file {path}")
        engine_kwargs = {"poolclass": NullPool, "connect_args": {"timeout": busy_timeout_s}}
        if read_only:
            url = read_only_sqlite_url(url)
    else:
        engine_kwargs = {"pool_pre_ping": True}
    return optuna.storages.RDBStorage(
        url, engine_kwargs=engine_kwargs, skip_compatibility_check=True, skip_table_creation=True
    )


def close_storage(storage: optuna.storages.BaseStorage) -> None:
    """Release every connection a storage from :func:`open_for_reading` holds."""
    if isinstance(storage, optuna.storages.RDBStorage):
        storage.remove_session()
        storage.engine.dispose()
