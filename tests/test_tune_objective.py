"""One worker's objective, in this process, on the tiny simulated dataset: what a complete and a
pruned trial record and store (no worker processes; see test_tune_workers.py for those)."""
from __future__ import annotations

import io
from pathlib import Path

import optuna
import pandas as pd
from optuna.artifacts import FileSystemArtifactStore
from optuna.trial import TrialState

from tune.objective import Objective, TrialFailed, WorkerInfo
from tune.record import TrialRecord
from tune.strategy import build_pruner
from tune.study import load_study

optuna.logging.set_verbosity(optuna.logging.WARNING)


def run_trials(tmp_path: Path, data: Path, pruner: str, n_trials: int) -> tuple[optuna.Study, FileSystemArtifactStore]:
    path = tmp_path / "study.yml"
    path.write_text(f"study: {{name: obj, n_trials: {n_trials}, pruner: {pruner}}}\n"
                    f"data: {{path: {data}, patterns: dp}}\n"
                    "recon: {iterations: 4, batch_size: 16}\n"
                    "search: {recon.probe.defocus_A: {low: -150, high: -50}}\n"
                    "objective: {metrics: [nrmse], report_every: 2}\n")
    config = load_study(path)
    study = optuna.create_study(pruner=build_pruner(config.pruner))
    study.optimize(Objective(config, WorkerInfo.here(0, "cpu:0"), n_trials), n_trials=n_trials, catch=(TrialFailed,))
    return study, FileSystemArtifactStore(str(config.artifact_dir))


def read_curves(store: FileSystemArtifactStore, record: TrialRecord) -> pd.DataFrame:
    with store.open_reader(record.artifacts["curves_csv"]) as reader:
        return pd.read_csv(io.BytesIO(reader.read()), index_col="iteration")


def test_a_complete_trial_keeps_its_curves_as_an_artifact(tmp_path, tiny_data_path):
    study, store = run_trials(tmp_path, tiny_data_path, "{name: none}", 1)
    trial = study.trials[0]
    record = TrialRecord.read(trial)
    assert trial.state == TrialState.COMPLETE and set(record.artifacts) == {"curves_csv", "score_png"}
    curves = read_curves(store, record)
    assert list(curves.index) == [1, 2, 3, 4] == list(range(1, record.iterations_done + 1))
    assert {"loss", "data_loss"} <= set(curves.columns)
    assert not any(isinstance(v, list) for v in trial.user_attrs.values())  # no long attribute for the dashboard


def test_a_pruned_trial_keeps_a_phase_image(tmp_path, tiny_data_path):
    study, store = run_trials(tmp_path, tiny_data_path, "{name: threshold, options: {upper: 0.0}}", 1)
    trial = study.trials[0]
    record = TrialRecord.read(trial)
    assert trial.state == TrialState.PRUNED and record.pruned_at == 2
    assert set(record.artifacts) == {"curves_csv", "phase_png"}
    with store.open_reader(record.artifacts["phase_png"]) as reader:
        assert reader.read(8) == b"\x89PNG\r\n\x1a\n"
    assert list(read_curves(store, record).index) == [1, 2]
    # the dashboard lists and downloads artifacts by these names: trial and kind, with an extension
    names = {meta.artifact_id: meta.filename for meta in optuna.artifacts.get_all_artifact_meta(trial, storage=study._storage)}
    assert {kind: names[i] for kind, i in record.artifacts.items()} == {
        "curves_csv": "trial_00000_curves.csv", "phase_png": "trial_00000_phase.png"}
