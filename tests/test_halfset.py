"""Half-set FRC: recon.halfset (the split and the two reconstructions) and metrics.halfset (the comparison)."""
from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
from scipy.signal import windows

import recon
from metrics import ScoringError
from metrics.halfset import compare_halves, field_pixels
from recon.halfset import checkerboard_halves, reconstruct_halves


@pytest.mark.parametrize("shape", [(4, 4), (5, 6), (7, 5)])
def test_checkerboard_halves_interleave_with_one_centroid(shape):
    a, b = checkerboard_halves(shape)
    ny, nx = shape
    assert len(a) == len(b) == (ny - ny % 2) * (nx - nx % 2) // 2
    assert not set(a) & set(b)
    ya, xa = np.divmod(a, nx)
    yb, xb = np.divmod(b, nx)
    assert ya.max() < ny - ny % 2 and xb.max() < nx - nx % 2               # an odd last row / column is left out
    np.testing.assert_allclose([ya.mean(), xa.mean()], [yb.mean(), xb.mean()])
    assert np.all((ya + xa) % 2 == 0) and np.all((yb + xb) % 2 == 1)        # every neighbour is in the other half
    with pytest.raises(recon.PlanError, match="2 × 2"):
        checkerboard_halves((1, 8))


def test_halves_share_the_object_grid(tiny_plan_dict):
    plan = recon.plan_from_dict({**tiny_plan_dict, "iterations": 2,
                                 "data": {**tiny_plan_dict["data"], "heldout_fraction": 0.2}})
    a, b = reconstruct_halves(plan)
    assert a.object.shape == b.object.shape and a.dx_A == b.dx_A
    np.testing.assert_allclose(a.origin_yx_A, b.origin_yx_A, atol=1e-6)
    assert len(a.positions_yx_A) == len(b.positions_yx_A) == 32                # 8 × 8 scan, nothing held out
    assert len(a.heldout_indices) == 0
    scores = compare_halves(a, b).scores()
    assert set(scores) >= {"halfset_frc_resolution_A", "halfset_frc_area"}
    assert all(np.isfinite(v) for v in scores.values())


def _band_limited(shape, cutoff_cycles_per_px, seed):
    """Random real image, flat spectrum up to the cutoff, tapered to zero over its outer fifth on
    every side (like a reconstruction's unilluminated margin)."""
    rng = np.random.default_rng(seed)
    f = np.hypot(np.fft.fftfreq(shape[0])[:, None], np.fft.fftfreq(shape[1])[None, :])
    image = np.fft.ifft2(np.fft.fft2(rng.standard_normal(shape)) * (f <= cutoff_cycles_per_px)).real
    return image * np.outer(windows.tukey(shape[0], 0.4), windows.tukey(shape[1], 0.4))


def _half(phase, dx_A=0.25, origin=(0.0, 0.0), positions=None):
    """A duck-typed half-set result holding a weak phase object."""
    return SimpleNamespace(object=np.exp(1j * phase)[None], dx_A=dx_A, origin_yx_A=origin, positions_yx_A=positions)


def _shift(image, delta_yx_px):
    """image(i − δ): an exact Fourier shift (periodic)."""
    ky = np.fft.fftfreq(image.shape[0])[:, None]
    kx = np.fft.fftfreq(image.shape[1])[None, :]
    return np.fft.ifft2(np.fft.fft2(image) * np.exp(-2j * np.pi * (ky * delta_yx_px[0] + kx * delta_yx_px[1]))).real


def test_identical_and_shifted_halves_correlate_fully():
    signal = 0.1 * _band_limited((96, 96), 0.45, 0)
    same = compare_halves(_half(signal), _half(signal)).scores()
    assert same["halfset_frc_area"] == pytest.approx(1.0, abs=1e-9)
    assert same["halfset_frc_resolution_A"] == pytest.approx(2 * 0.25, rel=0.05)   # never crosses: the grid limit
    moved = compare_halves(_half(signal), _half(_shift(signal, (0.3, -0.45)))).scores()
    assert (moved["halfset_shift_y_px"], moved["halfset_shift_x_px"]) == pytest.approx((0.3, -0.45), abs=0.02)
    assert moved["halfset_frc_area"] > 0.99


def test_origins_are_honoured_and_only_the_field_is_compared():
    signal = 0.1 * _band_limited((96, 96), 0.3, 1)
    later = _half(np.roll(signal, -4, axis=1), origin=(0.0, 1.0))              # same content, origin 4 px further
    assert compare_halves(_half(signal), later).scores()["halfset_frc_area"] > 0.99
    rows, cols = field_pixels(np.array([[2.0, 3.0], [6.0, 9.0]]), (0.0, 0.5), 0.25, (96, 96))
    assert (rows[0], rows[-1], cols[0], cols[-1]) == (8, 24, 10, 34)
    noise = np.random.default_rng(2).standard_normal((96, 96))
    inside = np.where(np.arange(96)[:, None] < 60, signal, noise)              # halves agree only inside the field
    field = np.array([[5.0, 5.0], [12.0, 18.0]])
    scores = compare_halves(_half(signal, positions=field), _half(inside, positions=field)).scores()
    assert scores["halfset_frc_area"] > 0.99


def test_resolution_is_where_the_common_signal_ends():
    """Two noisy copies of a signal band-limited to 1/(5 px): the ½-bit crossing sits near 5 px."""
    signal = _band_limited((128, 128), 0.2, 3)
    rng = np.random.default_rng(4)
    noise = 0.3 * signal.std()
    a, b = (signal + noise * rng.standard_normal(signal.shape) for _ in range(2))
    scores = compare_halves(_half(0.05 * a), _half(0.05 * b)).scores()
    assert scores["halfset_frc_resolution_A"] == pytest.approx(5 * 0.25, rel=0.1)
    assert 0.3 < scores["halfset_frc_area"] < 0.8


def test_halves_on_different_grids_are_an_error():
    with pytest.raises(ScoringError, match="differ in grid"):
        compare_halves(_half(np.zeros((32, 32))), _half(np.zeros((32, 40))))
    with pytest.raises(ScoringError, match="scanned field"):
        field_pixels(np.array([[1.0, 1.0], [1.5, 1.5]]), (0.0, 0.0), 0.25, (32, 32))
