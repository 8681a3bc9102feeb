"""Fourier ring correlation."""

from __future__ import annotations

import numpy as np
import pytest
from metrics_helpers import band_limited_noise

from metrics import frc, half_bit_threshold


def test_frc_of_image_with_itself_is_one():
    image = np.random.default_rng(0).standard_normal((96, 80))
    curve = frc(image, image, dx_A=0.3)
    assert np.allclose(curve.frc[curve.kept], 1.0)
    assert curve.resolution_A() == pytest.approx(1.0 / curve.q_invA[curve.kept][-1])
    assert not curve.crosses()  # that "resolution" is only the grid's Nyquist limit


def test_frc_of_independent_noise_is_near_zero():
    rng = np.random.default_rng(1)
    curve = frc(rng.standard_normal((128, 128)), rng.standard_normal((128, 128)))
    kept = curve.frc[curve.kept]
    assert abs(kept.mean()) < 0.03 and np.abs(kept).mean() < 0.1
    assert abs(curve.area()) < 0.03


@pytest.mark.parametrize("q_max", [0.15, 0.3])
def test_half_bit_resolution_matches_band_limit(q_max):
    n, dx_A = 256, 0.2
    signal = band_limited_noise(n, q_max, seed=2)
    rng = np.random.default_rng(3)
    a = signal + 0.3 * rng.standard_normal((n, n))
    b = signal + 0.3 * rng.standard_normal((n, n))
    band_limit_A = dx_A / q_max
    for other in (b, signal):  # two noisy copies, and against the clean truth
        curve = frc(a, other, dx_A, window="hann")
        assert curve.crosses() and curve.resolution_A("half_bit") == pytest.approx(band_limit_A, rel=0.1)


def test_thresholds_and_windows():
    assert half_bit_threshold(np.array([1e12]))[0] == pytest.approx(0.2071 / 1.2071, rel=1e-4)
    image = np.random.default_rng(4).standard_normal((64, 64))
    for window in ("hann", "tukey", "tukey:0.25", "none"):
        curve = frc(image, image, window=window)
        assert curve.window == window and np.allclose(curve.frc[curve.kept], 1.0)
    assert frc(image, image).kept[:2].tolist() == [False, False]  # the lowest rings are skipped
