"""Small synthetic images for the metrics tests (no shared data)."""

from __future__ import annotations

import numpy as np

DX_A = 0.5


def blobs(n: int, shift_px: tuple[float, float] = (0.0, 0.0), seed: int = 0, sigma_A: float = 1.0) -> np.ndarray:
    """Non-periodic image of Gaussian blobs evaluated analytically at pixel (i, j) − shift."""
    rng = np.random.default_rng(seed)
    centres = rng.uniform(-5, n * DX_A + 5, size=(150, 2))
    amps = rng.uniform(0.2, 1.0, 150)
    y = (np.arange(n) - shift_px[0]) * DX_A
    x = (np.arange(n) - shift_px[1]) * DX_A
    gy = np.exp(-((y[None, :] - centres[:, :1]) ** 2) / (2 * sigma_A**2))
    gx = np.exp(-((x[None, :] - centres[:, 1:]) ** 2) / (2 * sigma_A**2))
    return np.einsum("k,ki,kj->ij", amps, gy, gx)


def band_limited_noise(n: int, q_max_cycles_per_px: float, seed: int) -> np.ndarray:
    """Periodic white noise low-passed to |q| ≤ q_max (cycles per pixel), unit variance."""
    rng = np.random.default_rng(seed)
    q = np.hypot(np.fft.fftfreq(n)[:, None], np.fft.fftfreq(n)[None, :])
    image = np.fft.ifft2(np.fft.fft2(rng.standard_normal((n, n))) * (q <= q_max_cycles_per_px)).real
    return image / image.std()


def scan_positions(lo_A: float, hi_A: float, n: int = 8) -> np.ndarray:
    """A square raster of scan positions (n², 2) between lo and hi Å."""
    axis = np.linspace(lo_A, hi_A, n)
    return np.stack(np.meshgrid(axis, axis, indexing="ij"), -1).reshape(-1, 2)
