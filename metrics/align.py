"""Put a reconstructed phase on the ground-truth grid: resampling, sub-pixel registration, and the
least-squares offset, linear ramp and scale."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import ndimage
from skimage.registration import phase_cross_correlation



def resample_lattice(phase_yx: np.ndarray, dx_A: float, target_dx_A: float) -> np.ndarray:
    """The image on a lattice of pitch ``target_dx_A`` with the same first pixel: periodic part as
    a band-limited Fourier series (low-passed to the target's Nyquist when coarser), smooth part
    (Moisan decomposition) by cubic spline."""
    ratio = target_dx_A / dx_A
    u = np.arange(int(np.floor((phase_yx.shape[0] - 1) / ratio)) + 1) * ratio
    v = np.arange(int(np.floor((phase_yx.shape[1] - 1) / ratio)) + 1) * ratio
    periodic, smooth = periodic_smooth(phase_yx)
    cutoff = 0.5 * min(1.0, 1.0 / ratio)
    ey, ex = _fourier_rows(u, phase_yx.shape[0], cutoff), _fourier_rows(v, phase_yx.shape[1], cutoff)
    out = (ey @ np.fft.fft2(periodic) @ ex.T).real / periodic.size
    uu, vv = np.meshgrid(u, v, indexing="ij")
    return out + ndimage.map_coordinates(smooth, [uu, vv], order=3, mode="nearest")


@dataclass(frozen=True)
class TruthShifter:
    """Sub-pixel shifts of a noise-free truth: exact Fourier shift when periodic; otherwise Fourier
    shift of the periodic part and cubic spline of the smooth part (Moisan decomposition)."""

    spectrum: np.ndarray
    shape: tuple[int, int]
    smooth_coeffs: np.ndarray | None

    @classmethod
    def make(cls, truth: np.ndarray, periodic: bool) -> TruthShifter:
        if periodic:
            return cls(np.fft.rfft2(truth), truth.shape, None)
        p, s = periodic_smooth(truth)
        return cls(np.fft.rfft2(p), truth.shape, ndimage.spline_filter(s, order=3, mode="nearest"))

    def region(self, rows: np.ndarray, cols: np.ndarray, delta_yx_px: np.ndarray) -> np.ndarray:
        """truth(i − δy, j − δx) at integer rows × cols (taken modulo the truth's size)."""
        ny, nx = self.shape
        ramp = _shift_ramp(ny, delta_yx_px[0])[:, None] * _shift_ramp(nx, delta_yx_px[1])[None, : nx // 2 + 1]
        full = np.fft.irfft2(self.spectrum * ramp, s=self.shape)
        out = full[(rows % ny)[:, None], (cols % nx)[None, :]]
        if self.smooth_coeffs is not None:
            uu, vv = np.meshgrid(rows - delta_yx_px[0], cols - delta_yx_px[1], indexing="ij")
            out = out + ndimage.map_coordinates(self.smooth_coeffs, [uu, vv], order=3, mode="nearest", prefilter=False)
        return out


def _shift_ramp(n: int, delta_px: float) -> np.ndarray:
    """Fourier factors of a shift by +δ (image(i − δ)); the Nyquist term of an even n as cos(πδ)."""
    freq = np.fft.fftfreq(n)
    ramp = np.exp(-2j * np.pi * freq * delta_px)
    if n % 2 == 0:
        ramp[n // 2] = np.cos(np.pi * delta_px)
    return ramp


def periodic_smooth(image: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Periodic plus smooth decomposition (L. Moisan, J. Math. Imaging Vis. 39, 161, 2011):
    image = periodic + smooth, the periodic part free of edge jumps."""
    ny, nx = image.shape
    jumps = np.zeros_like(image)
    jumps[0, :] += image[-1, :] - image[0, :]
    jumps[-1, :] -= image[-1, :] - image[0, :]
    jumps[:, 0] += image[:, -1] - image[:, 0]
    jumps[:, -1] -= image[:, -1] - image[:, 0]
    qy = 2 * np.cos(2 * np.pi * np.fft.fftfreq(ny))[:, None]
    qx = 2 * np.cos(2 * np.pi * np.fft.fftfreq(nx))[None, :]
    denom = qy + qx - 4
    denom[0, 0] = 1.0
    smooth_ft = np.fft.fft2(jumps) / denom
    smooth_ft[0, 0] = 0.0
    smooth = np.fft.ifft2(smooth_ft).real
    return image - smooth, smooth


def _fourier_rows(coords: np.ndarray, n: int, cutoff_cycles_per_px: float) -> np.ndarray:
    """Matrix (len(coords), n) evaluating a length-n DFT series at fractional coordinates,
    keeping |f| ≤ cutoff; the Nyquist term of an even n is taken as a cosine (half each side)."""
    freq = np.fft.fftfreq(n)
    weight = (np.abs(freq) <= cutoff_cycles_per_px + 1e-12).astype(np.float64)
    rows = np.exp(2j * np.pi * np.outer(coords, freq)) * weight
    if n % 2 == 0 and cutoff_cycles_per_px >= 0.5:
        rows[:, n // 2] = np.cos(np.pi * coords)
    return rows


@dataclass(frozen=True)
class PlaneFit:
    """Weighted least-squares fit of offset + linear ramp on a region (coordinates in Å from its centre)."""

    basis: np.ndarray
    solve: np.ndarray
    weight: np.ndarray

    @classmethod
    def make(cls, y_A: np.ndarray, x_A: np.ndarray, weight: np.ndarray) -> PlaneFit:
        yy, xx = np.meshgrid(y_A - y_A.mean(), x_A - x_A.mean(), indexing="ij")
        basis = np.stack([np.ones(yy.size), yy.ravel(), xx.ravel()], axis=1)
        w = weight.ravel()
        solve = np.linalg.pinv(basis.T @ (basis * w[:, None])) @ (basis * w[:, None]).T
        return cls(basis=basis, solve=solve, weight=w)

    def coefficients(self, image: np.ndarray) -> np.ndarray:
        """(offset at the centre, ramp_y, ramp_x) per Å."""
        return self.solve @ image.ravel()

    def detrend(self, image: np.ndarray) -> np.ndarray:
        """The image minus its best-fit plane."""
        return image - (self.basis @ self.coefficients(image)).reshape(image.shape)

    def dot(self, a: np.ndarray, b: np.ndarray) -> float:
        """Weighted inner product Σ w·a·b."""
        return float(np.dot(self.weight, (a * b).ravel()))


def registration_step(reference_ft: np.ndarray, moving: np.ndarray, upsample: int) -> np.ndarray:
    """Shift (dy, dx) px by which ``moving`` is displaced relative to the reference,
    i.e. moving(y + d) ≈ reference(y); both already detrended and windowed."""
    shift, _, _ = phase_cross_correlation(
        reference_ft, np.fft.fft2(moving), space="fourier", upsample_factor=upsample, normalization=None
    )
    return -np.asarray(shift, dtype=np.float64)


@dataclass(frozen=True)
class LinearFit:
    """recon ≈ scale·truth + offset + ramp·(y, x) (weighted least squares, ramp from the region's
    centre), and ``alpha``: the least-squares factor mapping the detrended recon onto the truth."""

    scale: float
    alpha: float
    offset_rad: float
    ramp_yx_rad_per_A: tuple[float, float]


def fit_linear(
    plane: PlaneFit, recon: np.ndarray, truth: np.ndarray, truth_detrended: np.ndarray
) -> tuple[LinearFit, np.ndarray]:
    """The fit and the detrended reconstruction."""
    recon_d = plane.detrend(recon)
    tt = plane.dot(truth_detrended, truth_detrended)
    rr = plane.dot(recon_d, recon_d)
    rt = plane.dot(recon_d, truth_detrended)
    scale = rt / tt if tt > 0 else 0.0
    alpha = rt / rr if rr > 0 else 0.0
    offset, ramp_y, ramp_x = plane.coefficients(recon - scale * truth)
    return LinearFit(scale, alpha, float(offset), (float(ramp_y), float(ramp_x))), recon_d
