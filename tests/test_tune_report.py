"""tune.report (CSV + self-contained HTML) and tune.dashboard (optuna-dashboard server).

Small studies are built in tmp_path with the user attributes the workers record, and small
result / ground-truth HDF5 files written here (no shared data, no JAX).
"""

from __future__ import annotations

import io
import json
import re
import socket
import subprocess
import sys
import time
import urllib.request
import warnings
from pathlib import Path

import h5py
import numpy as np
import optuna
import pandas as pd
import pytest
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from optuna.artifacts import FileSystemArtifactStore, upload_artifact
from optuna.trial import TrialState

from tune.dashboard import close_storage, open_storage
from tune.report import write_report

REPO = Path(__file__).resolve().parents[1]
DX_A = 0.25
SECTIONS = ("summary", "history", "importances", "parallel", "slices", "intermediate", "timeline", "reconstructions")

optuna.logging.set_verbosity(optuna.logging.WARNING)


def truth_phase(n: int = 64) -> np.ndarray:
    """A smooth periodic 'lattice' of phase bumps (rad)."""
    y, x = np.mgrid[0:n, 0:n] * 2 * np.pi / n
    return 0.3 * (np.cos(4 * y) * np.cos(4 * x) + 1) + 0.1 * np.sin(3 * x + 2 * y)


def write_truth(path: Path) -> Path:
    """A dataset file in the native layout: /ground_truth/phase_sum, scan positions, dx_A."""
    with h5py.File(path, "w") as f:
        f["ground_truth/phase_sum"] = truth_phase()
        grid = np.arange(4.0, 12.01, 1.0)
        f["scan/positions_yx_A"] = np.stack(np.meshgrid(grid, grid, indexing="ij"), -1).reshape(-1, 2)
        f.attrs["dx_A"] = DX_A
    return path


def write_result(path: Path, noise: float, seed: int) -> Path:
    """A recon result: the truth shifted by one pixel, with noise, phase offset and a 2-slice object."""
    rng = np.random.default_rng(seed)
    phase = np.roll(truth_phase(), (1, -1), axis=(0, 1)) + 0.7 + noise * rng.standard_normal((64, 64))
    obj = np.stack([np.exp(0.5j * phase)] * 2).astype(np.complex64)
    with h5py.File(path, "w") as f:
        f["object"] = obj
        f.attrs["dx_A"] = DX_A
        f.attrs["origin_yx_A"] = (DX_A, -DX_A)
    return path


def png_bytes(value: float) -> bytes:
    """A tiny PNG standing in for a worker's phase image."""
    fig = Figure(figsize=(1, 1))
    fig.subplots().imshow(np.full((4, 4), value))
    buffer = io.BytesIO()
    FigureCanvasAgg(fig).print_png(buffer)
    return buffer.getvalue()


def record(trial: optuna.Trial, worker: int, scores: dict[str, float], artifacts: dict[str, str]) -> None:
    """The user attributes a worker records (contract with tune's core)."""
    attrs = {
        "plan": "iterations: 20\noptimizers:\n  object: {learning_rate: 0.05}\n",
        "seed": trial.number,
        "metrics": scores,
        "loss_curve": [1.0, 0.5, 0.25],
        "compile_s": 3.0 if trial.number < 2 else 0.0,
        "run_s": 1.5,
        "score_s": 0.2,
        "host": "node1",
        "device": "cpu:0",
        "worker": worker,
        "compile_count": 1,
        "artifacts": artifacts,
    }
    for key, value in attrs.items():
        trial.set_user_attr(key, value)


def build_study(tmp_path: Path, directions: list[str], states: list[TrialState], results: bool = True) -> str:
    """A SQLite study with one trial per entry of ``states``; returns its URL."""
    url = f"sqlite:///{tmp_path / 'study.db'}"
    (tmp_path / "artifacts").mkdir()
    store = FileSystemArtifactStore(str(tmp_path / "artifacts"))
    study = optuna.create_study(study_name="s", storage=url, directions=directions)
    if len(directions) == 2:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            study.set_metric_names(["nrmse", "runtime_s"])
    for number, state in enumerate(states):
        trial = study.ask()
        lr = trial.suggest_float("lr", 1e-3, 1.0, log=True)
        defocus = trial.suggest_float("defocus_A", -300, 100)
        trial.suggest_categorical("noise_model", ["amplitude", "poisson"])
        nrmse = 0.2 + 0.1 * number + 0.05 * lr + abs(defocus + 100) / 1e4  # ranked by trial number
        artifacts = {"phase_png": upload_artifact(
            artifact_store=store, file_path=str(save(tmp_path / f"p{number}.png", png_bytes(nrmse))),
            study_or_trial=trial)}
        if results and number == 0:
            artifacts["result_h5"] = upload_artifact(
                artifact_store=store, file_path=str(write_result(tmp_path / "r0.h5", 0.02, 0)), study_or_trial=trial)
        if results and number == 1:
            trial.set_user_attr("result_path", str(write_result(tmp_path / "r1.h5", 0.05, 1)))
        record(trial, number % 2, {"nrmse": nrmse, "ssim": 1 - nrmse, "frc_resolution_A": 1.0 + nrmse}, artifacts)
        if len(directions) == 1:
            for step in range(0, 6, 2):
                trial.report(nrmse + 1.0 / (step + 1), step)
        if number == len(states) - 1 and state == TrialState.FAIL:  # over the budget: failed, never run
            trial.set_user_attr("surplus", True)
        elif state == TrialState.FAIL:
            trial.set_user_attr("fail_reason", "NaN loss at iteration 7")
        if state == TrialState.RUNNING:
            continue
        values = [nrmse, 1.0 + lr][: len(directions)] if state == TrialState.COMPLETE else None
        study.tell(trial, values, state=state)
    return url


def save(path: Path, data: bytes) -> Path:
    """Write bytes to ``path``."""
    path.write_bytes(data)
    return path


MIXED = [TrialState.COMPLETE] * 4 + [TrialState.PRUNED, TrialState.FAIL, TrialState.RUNNING, TrialState.FAIL]


def assert_self_contained(page: str) -> None:
    """No external scripts, styles or images; plotly.js inlined exactly once."""
    assert not re.search(r"<script[^>]*\ssrc=", page)
    assert not re.search(r"<(img|link|iframe)[^>]*(src|href)=\"https?:", page)
    assert page.count("Plotly.newPlot") >= 1
    assert page.count("* plotly.js v") == 1


def test_report_sections_csv_and_images(tmp_path: Path) -> None:
    url = build_study(tmp_path, ["minimize"], MIXED)
    failed = optuna.load_study(study_name="s", storage=url).trials[5]
    rerun = optuna.trial.create_trial(  # what RetryHeartbeatStaleTrialCallback leaves for a lost worker's trial
        params=failed.params, distributions=failed.distributions, value=0.9,
        system_attrs={"failed_trial": 5, "retry_history": [5]})
    optuna.load_study(study_name="s", storage=url).add_trial(rerun)
    truth = write_truth(tmp_path / "truth.h5")
    paths = write_report(url, "s", tmp_path / "out", ground_truth=truth, top_k=3, artifact_dir=tmp_path / "artifacts")

    table = pd.read_csv(paths.csv)
    assert len(table) == len(MIXED) + 1
    assert {"user_attrs_metrics_nrmse", "user_attrs_artifacts_phase_png", "params_lr"} <= set(table.columns)
    assert json.loads(table["user_attrs_loss_curve"][0]) == [1.0, 0.5, 0.25]
    assert table["user_attrs_surplus"].fillna(False).astype(bool).sum() == 1

    page = paths.html.read_text()
    assert_self_contained(page)
    for key in SECTIONS:
        assert f'<section id="{key}">' in page
    assert "Surplus trials left out: 1" in page
    assert "<td>NaN loss at iteration 7</td>\n      <td>8</td>" in page  # trial 5, re-run as 8
    assert "<td>7</td>" not in page  # the surplus trial
    assert "node1 · worker 0" in page
    assert "Could not draw" not in page
    # trials 0 and 1 are drawn against the truth from their result files, trial 2 falls back to its image
    assert len(re.findall(r'<img alt="trial \d+" src="data:image/png;base64,', page)) == 3
    assert "(images stored by the worker)" in page


def test_zero_complete_trials(tmp_path: Path) -> None:
    states = [TrialState.FAIL, TrialState.PRUNED, TrialState.RUNNING]
    url = build_study(tmp_path, ["minimize"], states)
    paths = write_report(url, "s", tmp_path / "out")
    assert len(pd.read_csv(paths.csv)) == 3
    page = paths.html.read_text()
    assert_self_contained(page)
    assert "No trial has completed yet" in page
    assert '<section id="summary">' in page and '<section id="timeline">' in page


def test_importance_guard_and_no_ground_truth(tmp_path: Path) -> None:
    url = build_study(tmp_path, ["minimize"], [TrialState.COMPLETE, TrialState.FAIL])
    page = write_report(url, "s", tmp_path / "out", artifact_dir=tmp_path / "artifacts").html.read_text()
    assert "Parameter importances need at least 2 complete trials (1 so far)" in page
    assert "No ground truth given" in page
    assert len(re.findall(r'<img alt="trial \d+" src="data:image/png;base64,', page)) == 1


def test_unreadable_ground_truth_is_a_note(tmp_path: Path) -> None:
    url = build_study(tmp_path, ["minimize"], [TrialState.COMPLETE, TrialState.COMPLETE])
    page = write_report(url, "s", tmp_path / "out", ground_truth=tmp_path / "missing.h5").html.read_text()
    assert "Ground truth not used" in page
    assert '<section id="reconstructions">' in page


def test_multi_objective(tmp_path: Path) -> None:
    url = build_study(tmp_path, ["minimize", "minimize"], MIXED, results=False)
    page = write_report(url, "s", tmp_path / "out").html.read_text()
    assert_self_contained(page)
    for key in SECTIONS:
        assert f'<section id="{key}">' in page
    assert "History: nrmse" in page and "History: runtime_s" in page
    assert "Parameter importances: runtime_s" in page
    assert "Multi-objective study: no intermediate values" in page
    assert "Pareto-optimal trials" in page


def test_open_storage_never_creates_a_database(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError):
        open_storage(f"sqlite:///{tmp_path / 'missing.db'}")
    assert not (tmp_path / "missing.db").exists()


def test_read_only_storage_reads_and_refuses_writes(tmp_path: Path) -> None:
    url = build_study(tmp_path, ["minimize"], [TrialState.COMPLETE], results=False)
    storage = open_storage(url, read_only=True)
    try:
        study = optuna.load_study(study_name="s", storage=storage)
        assert len(study.trials) == 1
        with pytest.raises(optuna.exceptions.StorageInternalError):
            study.set_user_attr("note", "from the dashboard")
    finally:
        close_storage(storage)


def test_journal_storage_report(tmp_path: Path) -> None:
    journal = tmp_path / "study.log"
    backend = optuna.storages.journal.JournalFileBackend(str(journal))
    study = optuna.create_study(study_name="j", storage=optuna.storages.JournalStorage(backend))
    study.optimize(lambda trial: trial.suggest_float("x", -1, 1) ** 2, n_trials=3)
    paths = write_report(str(journal), "j", tmp_path / "out")
    assert len(pd.read_csv(paths.csv)) == 3
    assert '<section id="history">' in paths.html.read_text()


def free_port() -> int:
    """A TCP port nothing listens on right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def get(url: str, deadline: float) -> bytes:
    """GET ``url``, retrying until the server answers or ``deadline`` (monotonic) passes."""
    while True:
        try:
            with urllib.request.urlopen(url, timeout=5) as response:
                return response.read()
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.2)


def test_dashboard_serves_studies_and_artifacts(tmp_path: Path) -> None:
    url = build_study(tmp_path, ["minimize"], [TrialState.COMPLETE, TrialState.COMPLETE])
    trial = optuna.load_study(study_name="s", storage=url).trials[1]
    artifact_id = trial.user_attrs["artifacts"]["phase_png"]
    port = free_port()
    code = f"from tune.dashboard import serve; serve({url!r}, {str(tmp_path / 'artifacts')!r}, port={port})"
    server = subprocess.Popen([sys.executable, "-c", code], cwd=REPO, stderr=subprocess.PIPE)
    try:
        base = f"http://127.0.0.1:{port}"
        studies = json.loads(get(f"{base}/api/studies", time.monotonic() + 30))["study_summaries"]
        assert [s["study_name"] for s in studies] == ["s"]
        study_id = studies[0]["study_id"]
        image = get(f"{base}/artifacts/{study_id}/{trial._trial_id}/{artifact_id}", time.monotonic() + 5)
        assert image == (tmp_path / "p1.png").read_bytes()
    finally:
        server.terminate()
        server.wait(timeout=10)
