"""Optuna's notices about the experimental features tune relies on deliberately, silenced by name;
every other warning (an experimental sampler or pruner a study file chooses, say) still shows."""
from __future__ import annotations

import warnings

from optuna.exceptions import ExperimentalWarning

#: The experimental Optuna features tune uses on purpose: heartbeats, failing and re-queueing the
#: trials of lost workers, and metric names.
DELIBERATE = ("heartbeat_interval", "RetryHeartbeatStaleTrialCallback", "fail_stale_trials", "retry_history",
              "set_metric_names")


def silence_deliberate_notices() -> None:
    """Ignore Optuna's ExperimentalWarning for the features in DELIBERATE (in this process)."""
    for feature in DELIBERATE:
        warnings.filterwarnings("ignore", message=rf".*\b{feature}\b.*experimental", category=ExperimentalWarning)
