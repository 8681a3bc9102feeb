"""tune.report (CSV + self-contained HTML) and tune.dashboard (optuna-dashboard server).

Small studies are built in tmp_path with the search parameters and trial records workers write
(`tune.space.suggest`, `tune.record.TrialRecord`), and small result / ground-truth HDF5 files
written here (no shared data, no reconstruction).
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
import yaml
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from optuna.artifacts import FileSystemArtifactStore, upload_artifact
from optuna.trial import TrialState

from tune.launch import write_study_report
from tune.readonly import close_storage, open_for_reading
from tune.record import TrialRecord, write
from tune.report import write_report
from tune.schema import SearchSpec, score_key
from tune.space import resolve_search, suggest
from tune.study import load_study

REPO = Path(__file__).resolve().parents[1]
DX_A = 0.25
SECTIONS = ("summary", "history", "importances", "parallel", "slices", "intermediate", "timeline", "reconstructions")
LR, DEFOCUS = "optimizers.object.learning_rate", "probe.defocus_A"
PARAMS = resolve_search({f"recon.{LR}": SearchSpec(low=1e-3, high=1.0, log=True),
                         f"recon.{DEFOCUS}": SearchSpec(low=-300, high=100),
                         "recon.noise_model.name": SearchSpec(choices=("amplitude", "poisson"))},
                        {"data": {"path": "data.h5"}}, "test")

optuna.logging.set_verbosity(optuna.logging.WARNING)


def truth_phase(n: int = 64) -> np.ndarray:
    """A smooth periodic 'lattice' of phase bumps (rad)."""
    y, x = np.mgrid[0:n, 0:n] * 2 * np.pi / n
    return 0.3 * (np.cos(4 * y) * np.cos(4 * x) + 1) + 0.1 * np.sin(3 * x + 2 * y)


def write_truth(path: Path, key: str = "ground_truth/phase_sum") -> Path:
    """A dataset file in the native layout: the true phase at `key`, scan positions, dx_A."""
    with h5py.File(path, "w") as f:
        f[key] = truth_phase()
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
    """What a worker records for a trial."""
    write(trial, TrialRecord(
        plan="iterations: 20\noptimizers:\n  object: {learning_rate: 0.05}\n", seed=trial.number, metrics=scores,
        compile_s=3.0 if trial.number < 2 else 0.0, run_s=1.5, score_s=0.2, stop_reason="completed",
        host="node1", device="cpu:0", worker=worker, compile_count=1, artifacts=artifacts))


def build_study(tmp_path: Path, directions: list[str], states: list[TrialState], results: bool = True) -> str:
    """A SQLite study with one trial per entry of ``states``; returns its URL."""
    url = f"sqlite:///{tmp_path / 'study.db'}"
    (tmp_path / "artifacts").mkdir()
    store = FileSystemArtifactStore(str(tmp_path / "artifacts"))
    study = optuna.create_study(study_name="s", storage=url, directions=directions)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        study.set_metric_names(["nrmse", "runtime_s"][: len(directions)])
    for number, state in enumerate(states):
        trial = study.ask()
        values = suggest(trial, PARAMS)
        lr, defocus = values[LR], values[DEFOCUS]
        nrmse = 0.2 + 0.1 * number + 0.05 * lr + abs(defocus + 100) / 1e4  # ranked by trial number
        artifacts = {"phase_png": upload_artifact(
            artifact_store=store, file_path=str(save(tmp_path / f"p{number}.png", png_bytes(nrmse))),
            study_or_trial=trial)}
        if results and number == 0:
            artifacts["result_h5"] = upload_artifact(
                artifact_store=store, file_path=str(write_result(tmp_path / "r0.h5", 0.02, 0)), study_or_trial=trial)
        if results and number == 1:
            write(trial, TrialRecord(result_path=str(write_result(tmp_path / "r1.h5", 0.05, 1))))
        scores = {"nrmse": nrmse, "ssim": 1 - nrmse, score_key("frc_resolution_A"): 1.0 + nrmse}
        record(trial, number % 2, scores, artifacts)
        if len(directions) == 1:
            for step in range(0, 6, 2):
                trial.report(nrmse + 1.0 / (step + 1), step)
        if number == len(states) - 1 and state == TrialState.FAIL:  # over the budget: failed, never run
            write(trial, TrialRecord(surplus=True))
        elif state == TrialState.FAIL:
            write(trial, TrialRecord(fail_reason="NaN loss at iteration 7"))
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
    assert len(paths.csv.read_text().splitlines()) == len(table) + 1  # one line per trial
    assert {f"params_{p.name}" for p in PARAMS} <= set(table.columns)
    assert_csv_holds_the_record(table.iloc[0], optuna.load_study(study_name="s", storage=url).trials[0])
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
    # figures: no title repeating the section heading, labels that say what they show
    assert "Optimization History Plot" not in page and "Trials per worker" not in page
    assert "optimizers.object..." not in page and f'"{LR}"' in page  # parallel coordinates: full axis names
    assert '"title":{"text":"iteration"}' in page and "nrmse (quick score)" in page


def assert_csv_holds_the_record(row: pd.Series, trial: optuna.trial.FrozenTrial) -> None:
    """Every recorded attribute is in the row: dictionaries flattened, the plan as one-line JSON."""
    record = TrialRecord.read(trial)
    assert len(record.model_fields_set) >= 10
    for name in record.model_fields_set:
        value, column = getattr(record, name), f"user_attrs_{name}"
        if isinstance(value, dict):
            assert {k: row[f"{column}_{k}"] for k in value} == pytest.approx(value), name
        elif isinstance(value, str) and "\n" in value:
            assert json.loads(row[column]) == yaml.safe_load(value), name
        else:
            assert row[column] == value, name


def test_report_uses_the_studys_ground_truth_key(tmp_path: Path) -> None:
    """The report scores the best reconstructions against the study's data.ground_truth, not the default key."""
    write_truth(tmp_path / "truth.h5", key="truth/phase")
    study_path = tmp_path / "study.yml"
    study_path.write_text("study: {name: s, n_trials: 2}\n"
                          "data: {path: truth.h5, patterns: dp, ground_truth: truth/phase}\n"
                          f"search: {{recon.{DEFOCUS}: {{low: -300, high: 100}}}}\n")
    config = load_study(study_path)
    study = optuna.create_study(study_name="s", storage=config.storage_url)
    trial = study.ask()
    suggest(trial, config.params)
    exact = write_result(tmp_path / "r.h5", 0.0, 0)  # the truth itself: its FRC never drops below a threshold
    write(trial, TrialRecord(result_path=str(exact), metrics={"nrmse": 0.0, score_key("frc_resolution_A"): 0.5}))
    study.tell(trial, 0.0)
    page = write_study_report(config).read_text()
    assert "Ground truth not used" not in page and "No ground truth given" not in page
    assert len(re.findall(r'<img alt="trial 0" src="data:image/png;base64,', page)) == 1
    assert "FRC ½-bit beyond the grid&#x27;s Nyquist (0.5 Å)" in page  # not a measured resolution


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
        open_for_reading(f"sqlite:///{tmp_path / 'missing.db'}")
    assert not (tmp_path / "missing.db").exists()


def test_read_only_storage_reads_and_refuses_writes(tmp_path: Path) -> None:
    url = build_study(tmp_path, ["minimize"], [TrialState.COMPLETE], results=False)
    storage = open_for_reading(url, read_only=True)
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


@pytest.mark.slow  # a server process
def test_dashboard_serves_studies_and_artifacts(tmp_path: Path) -> None:
    url = build_study(tmp_path, ["minimize"], [TrialState.COMPLETE, TrialState.COMPLETE])
    trial = optuna.load_study(study_name="s", storage=url).trials[1]
    artifact_id = TrialRecord.read(trial).artifacts["phase_png"]
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
