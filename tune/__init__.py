"""tune: the study harness and the `tune` command.

A study file (`tune.study`) describes the search; workers (`tune.worker`) run trials built from
pure configuration (`tune.space`) through `recon` and score them with `metrics`
(`tune.objective`), sharing one Optuna storage (`tune.storage`) under a study-wide budget
(`tune.budget`). `tune.launch` runs one worker per device; `tune.cli` is the command line.
"""
