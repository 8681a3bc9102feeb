"""Data integrity: corrupt inputs are one-line errors before any trial exists; a data file that
changed after the study was created keeps new workers out.

Corrupt inputs go through `tune start` itself (in this process): each must exit with status 2 and
one line naming the file and the key, and leave no storage file behind (the checks run before the
study is created). The fingerprint (tune.integrity) is recorded in the study and compared by every
worker that joins.
"""
from __future__ import annotations

import contextlib
import io
import os
import shutil
import subprocess
import sys
from pathlib import Path

import h5py
import numpy as np
import optuna
import pytest

from recon.plan import PlanError
from recon.validate import check_patterns
from tune.cli import main
from tune.integrity import FINGERPRINT_ATTR, check_fingerprint, fingerprint
from tune.storage import create_or_load, open_study_storage
from tune.study import load_study

optuna.logging.set_verbosity(optuna.logging.WARNING)


def study_file(tmp_path: Path, data: Path, name: str = "integrity") -> Path:
    path = tmp_path / f"{name}.yml"
    path.write_text(
        f"study: {{name: {name}, n_trials: 2, pruner: {{name: none}}}}\n"
        f"data: {{path: {data}, patterns: dp}}\n"
        "recon: {iterations: 2, batch_size: 16}\n"
        "search: {recon.probe.defocus_A: {low: -150, high: -50}}\n")
    return path


def tune_start(study: Path) -> tuple[int, str]:
    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        code = main(["start", str(study), "--workers", "1", "--no-report"])
    return code, err.getvalue()


def _truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def _set(key: str, value: float):
    def edit(path: Path) -> None:
        with h5py.File(path, "r+") as f:
            dp = f[key][()]
            dp[1, 2, 3, 4] = value
            f[key][...] = dp
    return edit


def _replace(**datasets: np.ndarray):
    def edit(path: Path) -> None:
        with h5py.File(path, "r+") as f:
            for key, value in datasets.items():
                key = key.replace("__", "/")
                del f[key]
                f[key] = value
    return edit


CORRUPTIONS = {
    "truncated": (_truncate, "data.path"),
    "nan": (_set("dp", np.nan), "data.patterns: 1 NaN/inf values"),
    "inf": (_set("dp", np.inf), "data.patterns: 1 NaN/inf values"),
    "negative": (_set("dp", -3.0), "data.patterns: 1 negative values"),
    "positions": (_replace(scan__positions_yx_A=np.zeros((10, 2))), "data.positions: expected shape (64, 2)"),
    "empty": (_replace(dp=np.zeros((0, 32, 32), np.float32), scan__positions_yx_A=np.zeros((0, 2))),
              "data.patterns: empty scan"),
}


@pytest.mark.parametrize("case", sorted(CORRUPTIONS))
def test_corrupt_data_is_one_line_before_the_study_exists(case, tmp_path, tiny_data_path):
    edit, expected = CORRUPTIONS[case]
    data = tmp_path / "bad.h5"
    shutil.copy(tiny_data_path, data)
    edit(data)
    study = study_file(tmp_path, data)
    code, err = tune_start(study)
    assert code == 2, err
    lines = err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and expected in lines[0], err
    assert str(data) in lines[0] or "bad.h5" in lines[0]  # names the file
    assert not study.with_suffix(".db").exists() and not (tmp_path / "out").exists()  # nothing created


def test_check_patterns_accepts_good_patterns_and_names_the_source():
    check_patterns(np.ones((4, 8, 8), np.float32), "f.h5::dp")
    with pytest.raises(PlanError, match=r"^f.h5::dp: data.patterns: empty scan"):
        check_patterns(np.ones((0, 8, 8), np.float32), "f.h5::dp")


def test_fingerprint_is_recorded_and_a_changed_file_is_refused(tmp_path, tiny_data_path):
    data = tmp_path / "data.h5"
    shutil.copy(tiny_data_path, data)
    config = load_study(study_file(tmp_path, data))
    study = create_or_load(config, open_study_storage(config, heartbeats=False))
    check_fingerprint(study, config)
    recorded = study.user_attrs[FINGERPRINT_ATTR]
    assert recorded["size"] == data.stat().st_size and recorded["shape"] == [8, 8, 32, 32]

    os.utime(data, (1, 1))  # a copy with another modification time is the same data
    shutil.copy(data, tmp_path / "copy.h5")
    check_fingerprint(study, config)
    assert fingerprint(tmp_path / "copy.h5", "dp") == fingerprint(data, "dp")

    _set("dp", 7.0)(data)  # same size and shape, other values
    with pytest.raises(PlanError, match=r"data.path: .*data.h5 changed since study 'integrity' was created "
                                        r"\(content \(sampled hash\) differs\)"):
        check_fingerprint(study, config)
    _replace(dp=np.ones((4, 16, 32, 32), np.float32))(data)
    with pytest.raises(PlanError, match=r"shape \[8, 8, 32, 32\] → \[4, 16, 32, 32\]"):
        check_fingerprint(study, config)


@pytest.mark.slow
def test_worker_refuses_to_join_when_the_data_changed(tmp_path, tiny_data_path):
    data = tmp_path / "data.h5"
    shutil.copy(tiny_data_path, data)
    study_path = study_file(tmp_path, data, "joined")
    config = load_study(study_path)
    check_fingerprint(create_or_load(config, open_study_storage(config, heartbeats=False)), config)
    _set("dp", 7.0)(data)
    run = subprocess.run([sys.executable, "-m", "tune", "worker", str(study_path), "--index", "0"], cwd=tmp_path,
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 2, run.stdout + run.stderr
    assert run.stderr.count("\n") == 1 and run.stderr.startswith("error: ") and "changed since" in run.stderr
    assert "Traceback" not in run.stdout + run.stderr
    trials = optuna.load_study(study_name="joined", storage=open_study_storage(config, heartbeats=False)).trials
    assert trials == []
