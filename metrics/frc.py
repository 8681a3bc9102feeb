"""Fourier ring correlation: rings, windows, the curve, thresholds, resolution and area.

FRC(q) = Re Σ_ring A·B* / sqrt(Σ_ring |A|² · Σ_ring |B|²), rings of width 1/(min(h, w)·dx_A) up to
Nyquist 1/(2·dx_A). The 1/2-bit threshold is van Heel & Schatz (2005), J. Struct. Biol. 151, 250.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy.signal import windows

from .errors import ScoringError

THRESHOLDS = ("half_bit", "0.5", "0.143")


def half_bit_threshold(n_px: np.ndarray) -> np.ndarray:
    """1/2-bit information threshold for rings of ``n_px`` Fourier pixels."""
    root = np.sqrt(np.maximum(n_px, 1))
    return (0.2071 + 1.9102 / root) / (1.2071 + 0.9102 / root)


def window_2d(shape: tuple[int, int], spec: str = "hann") -> np.ndarray:
    """Separable apodisation window: ``hann``, ``tukey`` (α = 0.5), ``tukey:ALPHA`` or ``none``."""
    name, _, arg = spec.partition(":")
    if name == "hann" and not arg:
        rows, cols = windows.hann(shape[0]), windows.hann(shape[1])
    elif name == "tukey":
        alpha = float(arg) if arg else 0.5
        rows, cols = windows.tukey(shape[0], alpha), windows.tukey(shape[1], alpha)
    elif name == "none" and not arg:
        rows, cols = np.ones(shape[0]), np.ones(shape[1])
    else:
        raise ScoringError(f"unknown window {spec!r}: use 'hann', 'tukey', 'tukey:ALPHA' or 'none'")
    return np.outer(rows, cols)


@dataclass(frozen=True)
class Rings:
    """Ring index of every Fourier pixel (−1 beyond Nyquist), pixels and frequency per ring."""

    labels: np.ndarray
    n_px: np.ndarray
    q_invA: np.ndarray
    kept: np.ndarray

    @classmethod
    def make(cls, shape: tuple[int, int], dx_A: float, min_ring_px: int = 16) -> Rings:
        """Rings for an image of ``shape`` with pixel ``dx_A``; rings with fewer than
        ``min_ring_px`` pixels (the lowest few) are marked not kept."""
        n_min = min(shape)
        dq = 1.0 / (n_min * dx_A)
        fy = np.fft.fftfreq(shape[0], d=dx_A)
        fx = np.fft.fftfreq(shape[1], d=dx_A)
        ring = np.rint(np.hypot(fy[:, None], fx[None, :]) / dq).astype(np.int64)
        n_rings = n_min // 2 + 1
        labels = np.where(ring < n_rings, ring, -1).ravel()
        n_px = np.bincount(labels[labels >= 0], minlength=n_rings)
        return cls(labels=labels, n_px=n_px, q_invA=np.arange(n_rings) * dq, kept=n_px >= min_ring_px)


@dataclass(frozen=True)
class FRCCurve:
    """FRC per ring; ``kept`` marks the rings used for resolution and area. Higher FRC is better."""

    q_invA: np.ndarray
    frc: np.ndarray
    n_px: np.ndarray
    kept: np.ndarray
    dx_A: float
    window: str

    def threshold(self, name: str = "half_bit") -> np.ndarray:
        """Threshold curve per ring: ``half_bit``, ``0.5`` or ``0.143``."""
        if name == "half_bit":
            return half_bit_threshold(self.n_px)
        if name in ("0.5", "0.143"):
            return np.full(self.frc.shape, float(name))
        raise ScoringError(f"unknown FRC threshold {name!r}: use one of {THRESHOLDS}")

    def crosses(self, threshold: str = "half_bit") -> bool:
        """Whether the FRC falls below the threshold within the grid (else `resolution_A` is only
        the period of the highest ring, the grid's Nyquist limit, not a measured resolution)."""
        return bool(np.any((self.frc - self.threshold(threshold))[self.kept] < 0))

    def resolution_A(self, threshold: str = "half_bit") -> float:
        """Period 1/q in Å where the FRC first falls below the threshold (linear interpolation
        between rings); 1/q of the highest ring if it never does. Lower is better."""
        q = self.q_invA[self.kept]
        diff = (self.frc - self.threshold(threshold))[self.kept]
        if q.size == 0:
            return float("nan")
        below = np.flatnonzero(diff < 0)
        if below.size == 0:
            return float(1.0 / q[-1])
        k = below[0]
        if k == 0:
            return float(1.0 / q[0])
        q_cross = q[k - 1] + (q[k] - q[k - 1]) * diff[k - 1] / (diff[k - 1] - diff[k])
        return float(1.0 / q_cross)

    def area(self, max_frac: float = 1.0) -> float:
        """Mean FRC over the kept rings up to ``max_frac`` · Nyquist (in [−1, 1]; higher is better)."""
        q_nyquist = 0.5 / self.dx_A
        use = self.kept & (self.q_invA <= max_frac * q_nyquist * (1 + 1e-9))
        return float(self.frc[use].mean()) if use.any() else float("nan")


def frc_from_fft(fa: np.ndarray, fb: np.ndarray, rings: Rings, dx_A: float, window: str) -> FRCCurve:
    """FRC of two spectra (``np.fft.fft2`` of the windowed images) on precomputed rings."""
    use = rings.labels >= 0
    lab = rings.labels[use]
    a, b = fa.ravel()[use], fb.ravel()[use]
    n = rings.n_px.size
    cross = np.bincount(lab, (a * b.conj()).real, minlength=n)
    pa = np.bincount(lab, (a * a.conj()).real, minlength=n)
    pb = np.bincount(lab, (b * b.conj()).real, minlength=n)
    denom = np.sqrt(pa * pb)
    curve = np.divide(cross, denom, out=np.zeros(n), where=denom > 0)
    return FRCCurve(q_invA=rings.q_invA, frc=curve, n_px=rings.n_px, kept=rings.kept, dx_A=dx_A, window=window)


def frc(
    image_a: np.ndarray,
    image_b: np.ndarray,
    dx_A: float = 1.0,
    *,
    window: str = "hann",
    min_ring_px: int = 16,
) -> FRCCurve:
    """FRC of two images of the same shape (means removed, then windowed)."""
    a, b = np.asarray(image_a, dtype=np.float64), np.asarray(image_b, dtype=np.float64)
    if a.shape != b.shape or a.ndim != 2:
        raise ScoringError(f"FRC needs two 2-D images of the same shape, got {a.shape} and {b.shape}")
    win = window_2d(a.shape, window)
    fa = np.fft.fft2((a - a.mean()) * win)
    fb = np.fft.fft2((b - b.mean()) * win)
    return frc_from_fft(fa, fb, Rings.make(a.shape, dx_A, min_ring_px), dx_A, window)
