"""Score figure: aligned reconstruction, truth, difference, and the FRC curve with thresholds."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402  (after choosing the Agg backend)
import numpy as np  # noqa: E402

from .scorer import RESOLUTION_KEYS, ScoreReport  # noqa: E402

_THRESHOLD_STYLE = {"half_bit": ("1/2-bit", "C3", "-"), "0.5": ("0.5", "C2", "--"), "0.143": ("0.143", "C1", ":")}


def save_score_figure(path_png: str | Path, report: ScoreReport, *, title: str | None = None) -> Path:
    """Write the four-panel figure of a ``ScoreReport`` to a PNG and return its path."""
    al, curve, s = report.alignment, report.frc, report.scores
    y_A, x_A = report.region.coords_A(report.dx_A)
    extent = (x_A[0] - report.dx_A / 2, x_A[-1] + report.dx_A / 2, y_A[-1] + report.dx_A / 2, y_A[0] - report.dx_A / 2)
    lo, hi = np.percentile(al.truth, [0.5, 99.5])
    diff = al.difference
    dmax = float(np.max(np.abs(diff))) or 1.0

    fig, axes = plt.subplots(1, 4, figsize=(17, 4.2), gridspec_kw={"width_ratios": [1, 1, 1, 1.3]})
    panels = [
        (al.aligned, f"reconstruction, aligned (scale {s['scale']:.3f})", "gray", lo, hi),
        (al.truth, "ground truth", "gray", lo, hi),
        (diff, f"difference (NRMSE {s['nrmse']:.3f})", "RdBu_r", -dmax, dmax),
    ]
    for ax, (image, label, cmap, vmin, vmax) in zip(axes, panels):
        shown = ax.imshow(image, cmap=cmap, vmin=vmin, vmax=vmax, extent=extent)
        ax.set_title(label, fontsize=10)
        ax.set_xlabel("x (Å)")
        ax.set_ylabel("y (Å)")
        fig.colorbar(shown, ax=ax, fraction=0.046, label="phase (rad)")

    ax = axes[3]
    kept = curve.kept
    ax.plot(curve.q_invA[kept], curve.frc[kept], "k.-", label=f"FRC ({curve.window} window)")
    for name, (label, color, style) in _THRESHOLD_STYLE.items():
        res = s[RESOLUTION_KEYS[name]]
        at = f"{res:.2f} Å" if curve.crosses(name) else f"beyond the grid's Nyquist ({res:.2f} Å)"
        ax.plot(curve.q_invA[kept], curve.threshold(name)[kept], color=color, ls=style, label=f"{label}: {at}")
        ax.axvline(1.0 / res, color=color, ls=style, lw=0.8)
    ax.set_xlim(0, 0.5 / report.dx_A)
    ax.set_ylim(min(-0.1, float(curve.frc[kept].min(initial=0.0))), 1.05)
    ax.set_xlabel("spatial frequency q (1/Å), up to Nyquist")
    ax.set_ylabel("FRC")
    ax.set_title(f"FRC vs truth (area {s['frc_area']:.3f})", fontsize=10)
    ax.legend(fontsize=8, loc="lower left")
    ax.grid(alpha=0.3)

    dy, dx = al.shift_yx_px
    fig.suptitle(title or f"shift ({dy:+.3f}, {dx:+.3f}) px, Pearson r {s['pearson_r']:.4f}", fontsize=11)
    fig.tight_layout()
    path = Path(path_png)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def save_phase_figure(path_png: str | Path, reconstruction, *, title: str | None = None) -> Path:
    """Write the phase summed over slices on its Å axes (for results without a ground truth).

    `reconstruction` is a ``metrics.Reconstruction`` (or anything with ``phase_yx``, ``dx_A`` and
    ``origin_yx_A``).
    """
    phase, dx = reconstruction.phase_yx, reconstruction.dx_A
    (y0, x0), (ny, nx) = reconstruction.origin_yx_A, phase.shape
    fig, ax = plt.subplots(figsize=(4.5, 4), layout="constrained")
    extent = (x0 - dx / 2, x0 + (nx - 0.5) * dx, y0 + (ny - 0.5) * dx, y0 - dx / 2)
    fig.colorbar(ax.imshow(phase, cmap="gray", extent=extent), ax=ax, fraction=0.046, label="phase (rad)")
    ax.set_xlabel("x (Å)")
    ax.set_ylabel("y (Å)")
    if title:
        ax.set_title(title)
    fig.savefig(path_png, dpi=90)
    plt.close(fig)
    return Path(path_png)
