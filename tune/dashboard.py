"""`tune dashboard`: optuna-dashboard on a study's storage and artifact store."""

from __future__ import annotations

from pathlib import Path

import optuna
import optuna_dashboard

from tune.readonly import DEFAULT_BUSY_TIMEOUT_S, close_storage, open_for_reading


def serve(
    storage_url: str,
    artifact_dir: Path,
    host: str = "127.0.0.1",
    port: int = 8080,
    *,
    busy_timeout_s: float = DEFAULT_BUSY_TIMEOUT_S,
    read_only: bool = False,
) -> None:
    """Serve optuna-dashboard for ``storage_url`` with per-trial artifacts from ``artifact_dir``.

    Blocks until interrupted. Binds to 127.0.0.1 by default: the dashboard has no authentication
    and can delete studies, so expose it only through an SSH tunnel or a trusted network.
    """
    storage = open_for_reading(storage_url, busy_timeout_s=busy_timeout_s, read_only=read_only)
    store = optuna.artifacts.FileSystemArtifactStore(str(artifact_dir))
    try:
        optuna_dashboard.run_server(storage, host=host, port=port, artifact_store=store)
    finally:
        close_storage(storage)
