"""Bad inputs give one clear ScoringError naming the problem; the CLI turns them into exit code 2."""

from __future__ import annotations

import json

import h5py
import numpy as np
import pytest
from metrics_helpers import DX_A, blobs, scan_positions

from metrics import GroundTruth, Scorer, ScoringError, final_data_loss, frc, heldout_loss
from metrics.cli import score_main

N = 64


@pytest.fixture()
def gt() -> GroundTruth:
    return GroundTruth(blobs(N), DX_A, periodic=False, positions_yx_A=scan_positions(8.0, 24.0))


@pytest.fixture()
def files(tmp_path):
    data, result = tmp_path / "data.h5", tmp_path / "result.h5"
    with h5py.File(data, "w") as f:
        f["ground_truth/phase_sum"] = blobs(N).astype(np.float32)
        f["ground_truth/V_slices"] = (blobs(N)[None] / 1e-3).astype(np.float32)
        f["scan/positions_yx_A"] = scan_positions(8.0, 24.0)
        f.attrs.update(dx_A=DX_A, sigma_rad_per_VA=1e-3, ground_truth_periodic=False)
    with h5py.File(result, "w") as f:
        f["object"] = np.exp(1j * blobs(N, (0.4, -0.2)))[None].astype(np.complex64)
        f["history/data_loss"] = np.array([3.0, 2.0])
        f.attrs.update(dx_A=DX_A, origin_yx_A=(0.0, 0.0), heldout_loss=0.7)
    return data, result


def test_nan_in_reconstruction(gt):
    image = blobs(N)
    image[5, 5] = np.nan
    with pytest.raises(ScoringError, match="NaN"):
        Scorer(gt).score_phase(image, DX_A, (0, 0))


def test_shape_mismatch(gt):
    with pytest.raises(ScoringError, match="shape mismatch"):
        Scorer(gt, weight=np.ones((5, 5)))
    with pytest.raises(ScoringError, match="shape mismatch"):
        Scorer(gt).score_phase(np.ones((2, N, N)), DX_A, (0, 0))
    with pytest.raises(ScoringError, match="same shape"):
        frc(np.ones((8, 8)), np.ones((8, 9)))


def test_empty_region(gt):
    with pytest.raises(ScoringError, match="empty region"):
        Scorer(gt, box_yx_A=(100.0, 100.0, 120.0, 120.0))
    with pytest.raises(ScoringError, match="empty region"):
        Scorer(gt, weight=np.zeros((N, N)))


def test_region_not_covered(gt):
    with pytest.raises(ScoringError, match="not covered"):
        Scorer(gt).score_phase(blobs(20), DX_A, (0, 0))


def test_missing_ground_truth_key(files):
    data, _ = files
    with pytest.raises(ScoringError, match=r"data\.h5.*missing dataset 'ground_truth/nope'"):
        GroundTruth.from_h5(data, "ground_truth/nope")


def test_unknown_option(gt):
    with pytest.raises(ScoringError, match="unknown scoring option"):
        Scorer(gt, margin=1.0)


def test_h5_readers_and_losses(files):
    data, result = files
    gt = GroundTruth.from_h5(data)
    assert not gt.periodic and gt.phase_slices.shape == (1, N, N)
    assert np.allclose(gt.phase_slices[0], gt.phase_yx, rtol=1e-5)  # sigma * V_slices
    assert heldout_loss(result) == pytest.approx(0.7)
    assert final_data_loss(result) == pytest.approx(2.0)  # falls back to history/data_loss[-1]


def test_cli_success_and_figure(files, tmp_path, capsys):
    data, result = files
    out = tmp_path / "fig.png"
    assert score_main([str(result), "--ground-truth", str(data), "--out", str(out), "--margin-A", "1"]) == 0
    scores = json.loads(capsys.readouterr().out)
    assert scores["nrmse"] < 0.05 and scores["heldout_loss"] == pytest.approx(0.7) and out.stat().st_size > 0


@pytest.mark.parametrize(
    "argv_tail, message",
    [
        (["--key", "ground_truth/nope"], "missing dataset 'ground_truth/nope'"),
        (["--margin-A", "abc"], "invalid float value"),
    ],
)
def test_cli_bad_input(files, capsys, argv_tail, message):
    data, result = files
    assert score_main([str(result), "--ground-truth", str(data), *argv_tail]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and message in err[0]


def test_cli_missing_file(files, capsys):
    data, _ = files
    assert score_main(["/nonexistent/result.h5", "--ground-truth", str(data)]) == 2
    assert capsys.readouterr().err.startswith("error: cannot open /nonexistent/result.h5")
