"""Alignment and scores against a synthetic ground truth."""

from __future__ import annotations

import json

import numpy as np
import pytest
from metrics_helpers import DX_A, blobs, scan_positions

from metrics import GroundTruth, Reconstruction, Scorer, align, score

N = 128


@pytest.fixture(scope="module")
def gt() -> GroundTruth:
    return GroundTruth(blobs(N), DX_A, periodic=False, positions_yx_A=scan_positions(16.0, 48.0))


def distort(image: np.ndarray) -> np.ndarray:
    yy, xx = np.meshgrid(np.arange(N) * DX_A, np.arange(N) * DX_A, indexing="ij")
    return 0.8 * image + 0.3 + 0.01 * yy - 0.02 * xx


def test_subpixel_shift_recovered_non_periodic(gt):
    for shift in [(0.37, -0.61), (3.3, -1.7), (-2.45, 1.15)]:
        al = Scorer(gt).align_phase(blobs(N, shift), DX_A, (0.0, 0.0))
        assert np.allclose(al.shift_yx_px, shift, atol=0.02), (shift, al.shift_yx_px)


def test_shifted_distorted_truth_scores_against_itself(gt):
    s = Scorer(gt).score_phase(distort(blobs(N, (3.3, -1.7))), DX_A, (0.0, 0.0))
    assert s["nrmse"] < 0.01
    assert s["scale"] == pytest.approx(0.8, abs=0.005)
    assert s["ramp_y_rad_per_A"] == pytest.approx(0.01, abs=1e-3)
    assert s["ramp_x_rad_per_A"] == pytest.approx(-0.02, abs=1e-3)
    assert (s["shift_y_px"], s["shift_x_px"]) == pytest.approx((3.3, -1.7), abs=0.02)
    assert s["pearson_r"] > 0.999 and s["ssim"] > 0.99


def test_origin_is_used_before_registration(gt):
    """A crop of the truth with its true origin needs no shift; a finer grid is resampled."""
    crop = blobs(N)[20:110, 25:105]
    s = Scorer(gt).score_phase(crop, DX_A, (20 * DX_A, 25 * DX_A))
    assert abs(s["shift_y_px"]) < 0.02 and abs(s["shift_x_px"]) < 0.02 and s["nrmse"] < 1e-6


def test_score_dict_keys_and_json(gt):
    s = Scorer(gt).score_phase(blobs(N) + 0.05 * np.random.default_rng(3).standard_normal((N, N)), DX_A, (0, 0))
    for key in [
        "nrmse", "mse", "psnr", "pearson_r", "ssim", "frc_resolution_half_bit_A", "frc_resolution_05_A",
        "frc_resolution_0143_A", "frc_area", "scale", "offset_rad", "ramp_y_rad_per_A", "ramp_x_rad_per_A",
        "shift_y_px", "shift_x_px", "roi_h_px", "roi_w_px", "frc_window",
    ]:
        assert key in s
    assert 0 < s["nrmse"] < 1 and s["frc_window"] == "hann"
    json.dumps(s, allow_nan=False)


def test_noise_worsens_scores_monotonically(gt):
    rng = np.random.default_rng(4)
    noise = rng.standard_normal((N, N))
    scorer = Scorer(gt)
    scores = [scorer.score_phase(blobs(N) + level * noise, DX_A, (0, 0)) for level in (0.02, 0.1, 0.3)]
    assert scores[0]["nrmse"] < scores[1]["nrmse"] < scores[2]["nrmse"] <= 1.0
    assert scores[0]["frc_area"] > scores[1]["frc_area"] > scores[2]["frc_area"]
    assert scores[0]["frc_resolution_half_bit_A"] <= scores[2]["frc_resolution_half_bit_A"]


def test_quick_score_matches_full(gt):
    scorer = Scorer(gt)
    image = distort(blobs(N, (1.2, 0.4)))
    full, quick = scorer.score_phase(image, DX_A, (0, 0)), scorer.score_phase(image, DX_A, (0, 0), quick=True)
    assert "ssim" not in quick
    assert quick["nrmse"] == pytest.approx(full["nrmse"], abs=0.01)


def test_weight_map_and_box(gt):
    image = blobs(N).copy()
    image[40:, :] += 0.5 * np.random.default_rng(6).standard_normal((N - 40, N))  # damage rows 40 and on
    weight = np.zeros((N, N))
    weight[:40, :] = 1.0
    box = (10.0, 10.0, 30.0, 50.0)
    masked = Scorer(gt, box_yx_A=box, weight=weight).score_phase(image, DX_A, (0, 0))
    plain = Scorer(gt, box_yx_A=box).score_phase(image, DX_A, (0, 0))
    assert masked["roi_h_px"] == 41 and masked["roi_w_px"] == 81
    assert masked["nrmse"] < 0.02 < plain["nrmse"]


def test_periodic_truth_wraps_region():
    truth = blobs(64, seed=5)
    gt = GroundTruth(truth, DX_A, periodic=True)
    rolled = np.roll(truth, (32 + 1, 32 - 2), axis=(0, 1))  # result pixel [i] sits at (i - 32)·dx
    s = Scorer(gt, box_yx_A=(-6.0, -6.0, 6.0, 6.0)).score_phase(rolled, DX_A, (-32 * DX_A, -32 * DX_A))
    assert (s["shift_y_px"], s["shift_x_px"]) == pytest.approx((1.0, -2.0), abs=0.02)
    assert s["nrmse"] < 1e-6


def test_result_object_losses_and_per_slice(gt, tmp_path):
    slices = np.stack([0.5 * blobs(N), 0.5 * blobs(N)])
    gt2 = GroundTruth(gt.phase_yx, DX_A, periodic=False, positions_yx_A=gt.positions_yx_A, phase_slices=slices)
    rec = Reconstruction(np.exp(1j * slices), DX_A, (0.0, 0.0), heldout_loss=0.25, final_data_loss=1.5)
    s = score(rec, gt2, per_slice=True)
    assert s["heldout_loss"] == 0.25 and s["final_data_loss"] == 1.5
    assert s["nrmse"] < 1e-6 and s["slice0_nrmse"] < 1e-6 and s["slice1_scale"] == pytest.approx(1.0)
    assert align(rec, gt2).fit.scale == pytest.approx(1.0)
