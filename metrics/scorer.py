"""Score a reconstructed phase against the ground truth: alignment, error measures, SSIM and FRC.

``Scorer`` precomputes everything that depends only on the truth and the options (region, weights,
windows, FRC rings, spectra), so repeated scores during a reconstruction are cheap.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields, replace
from pathlib import Path
from typing import Any

import numpy as np
from skimage.metrics import structural_similarity

from .align import LinearFit, PlaneFit, TruthShifter, fit_linear, registration_step, resample_lattice
from .errors import ScoringError
from .frc import FRCCurve, Rings, frc_from_fft, window_2d
from .io import GROUND_TRUTH_KEY, GroundTruth, PathLike, Reconstruction, as_reconstruction
from .region import Region, make_region, region_weight

COARSE_UPSAMPLE = 10
RESAMPLE_PAD_PX = 48
RESOLUTION_KEYS = {
    "half_bit": "frc_resolution_half_bit_A",
    "0.5": "frc_resolution_05_A",
    "0.143": "frc_resolution_0143_A",
}


@dataclass(frozen=True)
class ScoreOptions:
    """Scoring options.

    roi: ``scan`` (bounding box of the scan positions) or ``full`` (the whole truth); ``box_yx_A``
    = (y_min, x_min, y_max, x_max) Å overrides it; ``margin_A`` grows the box.
    frc_window: ``hann``, ``tukey``, ``tukey:ALPHA`` or ``none``; rings with fewer than
    ``frc_min_ring_px`` Fourier pixels are skipped; ``frc_area`` averages the FRC up to
    ``frc_area_max_frac`` · Nyquist. Registration: ``register_iters`` rounds of upsampled
    cross-correlation, the first at 1/10 px, the others at 1/``upsample_factor`` px, each moving the
    truth by the current estimate; ``quick`` scores use the ``quick_*`` settings.
    """

    roi: str = "scan"
    margin_A: float = 0.0
    box_yx_A: tuple[float, float, float, float] | None = None
    frc_window: str = "hann"
    frc_min_ring_px: int = 16
    frc_area_max_frac: float = 1.0
    register: bool = True
    register_iters: int = 3
    upsample_factor: int = 100
    quick_register_iters: int = 2
    quick_upsample_factor: int = 20


@dataclass(frozen=True)
class Alignment:
    """The reconstruction on the truth's region. ``aligned`` is in truth units: the least-squares
    estimate of the truth from the reconstruction after offset and ramp removal. The shift is the
    displacement of the reconstruction relative to the truth: aligned(y) samples recon(y + shift)."""

    aligned: np.ndarray
    truth: np.ndarray
    weight: np.ndarray
    shift_yx_px: tuple[float, float]
    fit: LinearFit
    recon_detrended: np.ndarray

    @property
    def difference(self) -> np.ndarray:
        """aligned − truth, rad."""
        return self.aligned - self.truth


@dataclass(frozen=True)
class ScoreReport:
    """Scores, the alignment and the FRC curve (for figures)."""

    scores: dict[str, Any]
    alignment: Alignment
    frc: FRCCurve
    region: Region
    dx_A: float


@dataclass(frozen=True)
class _Target:
    """Truth-dependent quantities on the region."""

    truth: np.ndarray
    truth_detrended: np.ndarray
    std: float
    data_range: float
    frc_ft: np.ndarray


class Scorer:
    """Scores reconstructions against one ground truth with fixed options."""

    def __init__(
        self,
        ground_truth: GroundTruth,
        options: ScoreOptions | None = None,
        *,
        weight: np.ndarray | None = None,
        **overrides: Any,
    ) -> None:
        self.gt = ground_truth
        self.options = _options(options, overrides)
        opt = self.options
        self.region = make_region(ground_truth, opt.roi, opt.margin_A, opt.box_yx_A)
        self.rows = self.region.y0 + np.arange(self.region.h)
        self.cols = self.region.x0 + np.arange(self.region.w)
        self.weight = region_weight(weight, self.region, ground_truth.phase_yx.shape)
        self.weight_sum = max(float(self.weight.sum()), 1e-12)
        self.plane = PlaneFit.make(*self.region.coords_A(ground_truth.dx_A), self.weight)
        self.register_window = window_2d(self.region.shape, "hann") * self.weight
        self.frc_window = window_2d(self.region.shape, opt.frc_window) * self.weight
        self.rings = Rings.make(self.region.shape, ground_truth.dx_A, opt.frc_min_ring_px)
        self.shifter = TruthShifter.make(ground_truth.phase_yx, ground_truth.periodic)

    def score(self, result: Any, *, per_slice: bool = False, quick: bool = False) -> dict[str, Any]:
        """Scores of a result (HDF5 path, ``Reconstruction`` or duck-typed object)."""
        return self.report(result, per_slice=per_slice, quick=quick).scores

    def score_phase(
        self, phase_yx: np.ndarray, dx_A: float, origin_yx_A: tuple[float, float], *, quick: bool = False
    ) -> dict[str, Any]:
        """Scores of a phase image (y, x) in rad with pixel dx_A and origin origin_yx_A."""
        return self.report_phase(phase_yx, dx_A, origin_yx_A, quick=quick).scores

    def report(self, result: Any, *, per_slice: bool = False, quick: bool = False) -> ScoreReport:
        """Scores, alignment and FRC curve of a result; losses it carries are added to the scores."""
        rec = as_reconstruction(result)
        rep = self.report_phase(rec.phase_yx, rec.dx_A, rec.origin_yx_A, quick=quick, source=rec.source)
        if not math.isnan(rec.heldout_loss):
            rep.scores["heldout_loss"] = rec.heldout_loss
        if not math.isnan(rec.final_data_loss):
            rep.scores["final_data_loss"] = rec.final_data_loss
        if per_slice:
            rep.scores.update(self._slice_scores(rec, np.array(rep.alignment.shift_yx_px)))
        return rep

    def report_phase(
        self,
        phase_yx: np.ndarray,
        dx_A: float,
        origin_yx_A: tuple[float, float],
        *,
        quick: bool = False,
        source: str = "reconstruction",
    ) -> ScoreReport:
        """Scores, alignment and FRC curve of a phase image; ``quick`` skips SSIM and uses a
        coarser registration (for intermediate scores during a reconstruction)."""
        alignment = self.align_phase(phase_yx, dx_A, origin_yx_A, quick=quick, source=source)
        target = self._target(alignment.truth)
        scores, curve = self._compare(alignment.recon_detrended, alignment.fit, target, with_ssim=not quick)
        dy, dx = alignment.shift_yx_px
        scores.update(
            shift_y_px=dy,
            shift_x_px=dx,
            shift_y_A=dy * self.gt.dx_A,
            shift_x_A=dx * self.gt.dx_A,
            roi_y0_px=float(self.region.y0),
            roi_x0_px=float(self.region.x0),
            roi_h_px=float(self.region.h),
            roi_w_px=float(self.region.w),
            roi_weight_sum=float(self.weight.sum()),
            frc_window=self.options.frc_window,
            frc_area_max_frac=self.options.frc_area_max_frac,
        )
        return ScoreReport(scores, alignment, curve, self.region, self.gt.dx_A)

    def align_phase(
        self,
        phase_yx: np.ndarray,
        dx_A: float,
        origin_yx_A: tuple[float, float],
        *,
        quick: bool = False,
        source: str = "reconstruction",
    ) -> Alignment:
        """Register the reconstruction to the truth's region and fit offset, ramp and scale."""
        lattice, origin_px = self._lattice(phase_yx, dx_A, origin_yx_A, source)
        shift, recon, delta = self._register(lattice, origin_px, quick)
        truth = self.shifter.region(self.rows, self.cols, delta)
        truth_d = self.plane.detrend(truth)
        fit, recon_d = fit_linear(self.plane, recon, truth, truth_d)
        aligned = truth - truth_d + fit.alpha * recon_d
        return Alignment(aligned, truth, self.weight, (float(shift[0]), float(shift[1])), fit, recon_d)

    def _lattice(
        self, phase_yx: np.ndarray, dx_A: float, origin_yx_A: tuple[float, float], source: str
    ) -> tuple[np.ndarray, np.ndarray]:
        """The phase at the truth's pixel size (lattice anchored at its own origin), and that
        origin in truth pixels."""
        phase = np.asarray(phase_yx, dtype=np.float64)
        if phase.ndim != 2:
            raise ScoringError(f"shape mismatch: phase must be 2-D (y, x), got {phase.shape} ({source})")
        if not np.all(np.isfinite(phase)):
            raise ScoringError(f"NaN or inf in the reconstruction ({source})")
        if not (math.isfinite(dx_A) and dx_A > 0):
            raise ScoringError(f"reconstruction dx_A must be positive, got {dx_A} ({source})")
        origin = np.array([float(origin_yx_A[0]), float(origin_yx_A[1])])
        if abs(dx_A / self.gt.dx_A - 1) > 1e-6:
            phase, origin = self._crop_near_region(phase, dx_A, origin)
            phase = resample_lattice(phase, dx_A, self.gt.dx_A)
        origin_px = origin / self.gt.dx_A
        if self._pair(phase, origin_px, np.zeros(2)) is None:
            y_A, x_A = self.region.coords_A(self.gt.dx_A)
            ny, nx = phase.shape
            raise ScoringError(
                f"region of interest y {y_A[0]:.2f}..{y_A[-1]:.2f} Å, x {x_A[0]:.2f}..{x_A[-1]:.2f} Å is not covered"
                f" by the reconstruction (y {origin[0]:.2f}..{origin[0] + (ny - 1) * self.gt.dx_A:.2f} Å,"
                f" x {origin[1]:.2f}..{origin[1] + (nx - 1) * self.gt.dx_A:.2f} Å) ({source})"
            )
        return phase, origin_px

    def _crop_near_region(
        self, phase: np.ndarray, dx_A: float, origin: np.ndarray
    ) -> tuple[np.ndarray, np.ndarray]:
        """The part of a phase image within RESAMPLE_PAD_PX truth pixels of the region, and its origin."""
        pad_A = RESAMPLE_PAD_PX * self.gt.dx_A
        y_A, x_A = self.region.coords_A(self.gt.dx_A)
        lo = np.floor((np.array([y_A[0], x_A[0]]) - pad_A - origin) / dx_A).astype(int).clip(0)
        hi = np.ceil((np.array([y_A[-1], x_A[-1]]) + pad_A - origin) / dx_A).astype(int) + 1
        return phase[lo[0] : hi[0], lo[1] : hi[1]], origin + lo * dx_A

    def _pair(
        self, lattice: np.ndarray, origin_px: np.ndarray, shift: np.ndarray
    ) -> tuple[np.ndarray, np.ndarray] | None:
        """Reconstruction pixels facing the region for a shift, and the sub-pixel remainder δ
        (|δ| ≤ 0.5) by which the truth must be shifted to meet them; None if not covered."""
        total = shift - origin_px
        n = np.rint(total).astype(int)
        r0, c0 = self.region.y0 + n[0], self.region.x0 + n[1]
        if r0 < 0 or c0 < 0 or r0 + self.region.h > lattice.shape[0] or c0 + self.region.w > lattice.shape[1]:
            return None
        return lattice[r0 : r0 + self.region.h, c0 : c0 + self.region.w], total - n

    def _register(
        self, lattice: np.ndarray, origin_px: np.ndarray, quick: bool
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Shift (px) of the reconstruction relative to the truth, its pixels on the region, and δ."""
        opt = self.options
        iters = (opt.quick_register_iters if quick else opt.register_iters) if opt.register else 0
        final_upsample = opt.quick_upsample_factor if quick else opt.upsample_factor
        shift = np.zeros(2)
        recon, delta = self._pair(lattice, origin_px, shift)
        for it in range(iters):
            upsample = min(COARSE_UPSAMPLE, final_upsample) if it == 0 else final_upsample
            truth = self.shifter.region(self.rows, self.cols, delta)
            reference_ft = np.fft.fft2(self.plane.detrend(truth) * self.register_window)
            step = registration_step(reference_ft, self.plane.detrend(recon) * self.register_window, upsample)
            moved = self._pair(lattice, origin_px, shift + step)
            if moved is None or not np.any(step):
                break
            shift += step
            recon, delta = moved
            if upsample == final_upsample and np.max(np.abs(step)) < 2.0 / upsample:
                break
        return shift, recon, delta

    def _target(self, truth: np.ndarray) -> _Target:
        truth_d = self.plane.detrend(truth)
        mean = self.plane.dot(truth, np.ones_like(truth)) / self.weight_sum
        std = math.sqrt(self.plane.dot(truth - mean, truth - mean) / self.weight_sum)
        inside = truth[self.weight > 0]
        return _Target(truth, truth_d, std, float(inside.max() - inside.min()), np.fft.fft2(truth_d * self.frc_window))

    def _compare(
        self, recon_d: np.ndarray, fit: LinearFit, target: _Target, *, with_ssim: bool
    ) -> tuple[dict[str, Any], FRCCurve]:
        """Error measures, SSIM and FRC of a detrended reconstruction against a target."""
        diff = fit.alpha * recon_d - target.truth_detrended
        mse = self.plane.dot(diff, diff) / self.weight_sum
        rr = self.plane.dot(recon_d, recon_d)
        tt = self.plane.dot(target.truth_detrended, target.truth_detrended)
        rt = self.plane.dot(recon_d, target.truth_detrended)
        curve = frc_from_fft(
            np.fft.fft2(recon_d * self.frc_window), target.frc_ft, self.rings, self.gt.dx_A, self.options.frc_window
        )
        scores: dict[str, Any] = {
            "nrmse": math.sqrt(mse) / target.std if target.std > 0 else math.nan,
            "mse": mse,
            "psnr": 10 * math.log10(target.data_range**2 / mse) if mse > 0 else math.inf,
            "pearson_r": rt / math.sqrt(rr * tt) if rr > 0 and tt > 0 else 0.0,
        }
        if with_ssim:
            aligned = target.truth - target.truth_detrended + fit.alpha * recon_d
            scores["ssim"] = self._ssim(aligned, target)
        scores.update({key: curve.resolution_A(name) for name, key in RESOLUTION_KEYS.items()})
        scores.update(
            frc_area=curve.area(self.options.frc_area_max_frac),
            scale=fit.scale,
            offset_rad=fit.offset_rad,
            ramp_y_rad_per_A=fit.ramp_yx_rad_per_A[0],
            ramp_x_rad_per_A=fit.ramp_yx_rad_per_A[1],
        )
        return scores, curve

    def _ssim(self, aligned: np.ndarray, target: _Target) -> float:
        """Weighted mean of scikit-image's SSIM map (7×7 uniform window, data range of the truth)."""
        if target.data_range <= 0:
            return math.nan
        _, ssim_map = structural_similarity(aligned, target.truth, data_range=target.data_range, full=True)
        return self.plane.dot(ssim_map, np.ones_like(ssim_map)) / self.weight_sum

    def _slice_scores(self, rec: Reconstruction, shift: np.ndarray) -> dict[str, float]:
        """Per-slice scores against σ·V_slices at the shift found for the phase sum."""
        truth_slices = self.gt.phase_slices
        if truth_slices is None:
            raise ScoringError(f"per-slice scores need ground-truth slices (V_slices) in {self.gt.source}")
        phases = rec.slice_phases
        if len(phases) != len(truth_slices):
            raise ScoringError(
                f"shape mismatch: reconstruction has {len(phases)} slices, ground truth {len(truth_slices)}"
            )
        out: dict[str, float] = {}
        for k, (phase, truth_full) in enumerate(zip(phases, truth_slices)):
            lattice, origin_px = self._lattice(phase, rec.dx_A, rec.origin_yx_A, f"{rec.source} slice {k}")
            recon, delta = self._pair(lattice, origin_px, shift)
            truth = TruthShifter.make(truth_full, self.gt.periodic).region(self.rows, self.cols, delta)
            target = self._target(truth)
            fit, recon_d = fit_linear(self.plane, recon, target.truth, target.truth_detrended)
            scores, _ = self._compare(recon_d, fit, target, with_ssim=False)
            for name in ("nrmse", "pearson_r", "scale", "frc_area", "frc_resolution_half_bit_A"):
                out[f"slice{k}_{name}"] = scores[name]
        return out


def build_scorer(
    path: PathLike,
    key: str = GROUND_TRUTH_KEY,
    *,
    roi: str | None = None,
    margin_A: float = 0.0,
    weight: np.ndarray | None = None,
    **options: Any,
) -> Scorer:
    """The scorer of the ground truth at ``key`` in a dataset file, with scoring options.

    ``roi`` None: the scanned field when the file has scan positions, else the full truth.
    The one way the project builds a scorer from a file (trials, the report, ``tune recon --score``,
    ``tune score``)."""
    truth = GroundTruth.from_h5(path, key)
    roi = roi or ("scan" if truth.positions_yx_A is not None else "full")
    return Scorer(truth, weight=weight, roi=roi, margin_A=margin_A, **options)


def score(
    result: Any,
    ground_truth: GroundTruth | str | Path,
    *,
    key: str = GROUND_TRUTH_KEY,
    weight: np.ndarray | None = None,
    per_slice: bool = False,
    **options: Any,
) -> dict[str, Any]:
    """One-shot: scores of a result against a ground truth (object or dataset HDF5 path)."""
    return Scorer(_ground_truth(ground_truth, key), weight=weight, **options).score(result, per_slice=per_slice)


def align(
    result: Any,
    ground_truth: GroundTruth | str | Path,
    *,
    key: str = GROUND_TRUTH_KEY,
    weight: np.ndarray | None = None,
    **options: Any,
) -> Alignment:
    """One-shot: a result's phase sum aligned onto the ground truth's region."""
    rec = as_reconstruction(result)
    scorer = Scorer(_ground_truth(ground_truth, key), weight=weight, **options)
    return scorer.align_phase(rec.phase_yx, rec.dx_A, rec.origin_yx_A, source=rec.source)


def _ground_truth(ground_truth: GroundTruth | str | Path, key: str) -> GroundTruth:
    return ground_truth if isinstance(ground_truth, GroundTruth) else GroundTruth.from_h5(ground_truth, key)


def _options(options: ScoreOptions | None, overrides: dict[str, Any]) -> ScoreOptions:
    known = {f.name for f in fields(ScoreOptions)}
    unknown = sorted(set(overrides) - known)
    if unknown:
        raise ScoringError(f"unknown scoring option(s): {', '.join(unknown)}")
    return replace(options or ScoreOptions(), **overrides)
