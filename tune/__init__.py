"""tune: the study harness and the `tune` command.

The study file's schema (`tune.schema`) is validated into a `StudyConfig` (`tune.study`) with its
search space (`tune.space`) and sampler and pruner (`tune.strategy`). Workers (`tune.worker`) run
trials (`tune.objective`) through `recon`, score them with `metrics` and record them
(`tune.record`), sharing one Optuna storage (`tune.storage`) under a study-wide budget
(`tune.budget`). `tune.ranking` says which trials are best; `tune.refine` re-runs the best short
trials longer (`study.refine`); `tune.progress` shows them; `tune.final` writes the chosen plan and
its full reconstruction at the end of `tune start`; `tune.launch` runs one worker per device; the
report is `tune.report` (with `tune.report_data`,
`tune.figures`, `tune.panels`); `tune.cli` is the command line. Imports go one way: schema before
space before strategy before study, and nothing imports back.

From Python (a notebook): `tune.run_study("study.yml", workers=2)` does what `tune start` does.
"""
from tune.launch import StudyRun, run_study

__all__ = ["StudyRun", "run_study"]
