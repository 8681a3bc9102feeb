"""The end of `tune start`: the chosen plan as `best.yml` and its full reconstruction in the report.

The chosen trial is the study's best (`tune.ranking.best_trials`: among the refined trials when the
study refines). Its plan is written as `<report dir>/best.yml` (what `tune best` writes). Its full
reconstruction is the trial's own result file when it was kept (`output.keep`; for a refined trial
that is the long reconstruction), else one run of the plan, saved as `final.h5`. The report shows it
(`final.png`, captioned by `final.json`): the phase summed over slices, the probe's amplitude and
phase (mode 0), and the FRC curves with the ½-bit threshold: the half-set FRC of the plan (always:
one more reconstruction, on the two halves of the scan) and, with a ground truth, the FRC against it.
`tune start --no-final` skips all of this.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402  (after choosing the Agg backend)
import numpy as np  # noqa: E402
import optuna  # noqa: E402
from optuna.trial import FrozenTrial  # noqa: E402

import metrics  # noqa: E402
import recon  # noqa: E402
from metrics.frc import FRCCurve  # noqa: E402
from metrics.halfset import compare_halves  # noqa: E402
from recon.halfset import reconstruct_halves  # noqa: E402
from tune.export import best_plan_text  # noqa: E402
from tune.ranking import best_trials  # noqa: E402
from tune.record import TrialRecord  # noqa: E402
from tune.study import StudyConfig  # noqa: E402

BEST_PLAN, FINAL_RESULT, FINAL_PNG, FINAL_JSON = "best.yml", "final.h5", "final.png", "final.json"


@dataclass(frozen=True)
class Final:
    """What the end of `tune start` wrote: the chosen trial's plan, the result shown and its figure."""

    trial: int
    plan_path: Path
    result_path: Path
    figure_path: Path
    caption: str


def write_final(study: optuna.Study, config: StudyConfig, out_dir: Path) -> Final | None:
    """best.yml, the final figure and its caption for the study's best trial (None: no complete trial)."""
    best = best_trials(study)
    if not best:
        return None
    trial = best[0]
    out_dir.mkdir(parents=True, exist_ok=True)
    text, summary = best_plan_text(study, config, trial.number, plan_name=BEST_PLAN)
    plan_path = out_dir / BEST_PLAN
    plan_path.write_text(text)
    plan = recon.load_plan(plan_path)
    dataset = recon.load_dataset(plan.data)
    result, result_path = final_result(trial, plan, dataset, out_dir / FINAL_RESULT)
    curves, notes = frc_curves(config, plan, dataset, result)
    caption = "; ".join([f"{summary}; {result.iterations_done} iterations ({result_path.name})", *notes])
    figure = save_final_figure(out_dir / FINAL_PNG, result, curves, title=caption)
    (out_dir / FINAL_JSON).write_text(json.dumps({"trial": trial.number, "caption": caption, "plan": str(plan_path),
                                                  "result": str(result_path)}))
    return Final(trial.number, plan_path, result_path, figure, caption)


def final_result(trial: FrozenTrial, plan: recon.Plan, dataset: recon.Dataset,
                 fallback: Path) -> tuple[recon.Result, Path]:
    """The trial's kept result file, else one run of its plan saved to `fallback`."""
    kept = TrialRecord.read(trial).result_path
    if kept and Path(kept).is_file():
        return recon.load_result(kept), Path(kept)
    result = recon.reconstruct(plan, dataset=dataset)
    return result, result.save(fallback)


def frc_curves(config: StudyConfig, plan: recon.Plan, dataset: recon.Dataset,
               result: recon.Result) -> tuple[dict[str, FRCCurve], list[str]]:
    """The half-set FRC of the plan and, with a ground truth, the result's FRC against it; and a
    note for each curve that could not be made (no scan grid, an unreadable truth)."""
    curves, notes = {}, []
    try:
        curves["half-set FRC"] = compare_halves(*reconstruct_halves(plan, dataset)).curve
    except (recon.PlanError, metrics.ScoringError) as err:
        notes.append(f"no half-set FRC: {err}")
    key = config.spec.data.ground_truth
    if key is not None:
        try:
            scorer = metrics.build_scorer(config.data_path, key, **config.spec.objective.scoring.model_dump())
            curves["FRC against the ground truth"] = scorer.report(result).frc
        except (OSError, metrics.ScoringError) as err:
            notes.append(f"no FRC against the ground truth: {err}")
    return curves, notes


def save_final_figure(path: Path, result: recon.Result, curves: dict[str, FRCCurve], title: str) -> Path:
    """Phase (y, x) on its Å axes, probe amplitude and phase (mode 0, phase where the amplitude is
    above 5 % of its peak), and the FRC curves, each with its ½-bit threshold."""
    probe = result.probe[0]
    amplitude = np.abs(probe)
    probe_phase = np.where(amplitude > 0.05 * amplitude.max(), np.angle(probe), np.nan)
    (y0, x0), dx = result.origin_yx_A, result.dx_A
    ny, nx = result.phase.shape
    fig, axes = plt.subplots(1, 4, figsize=(17, 4.2), gridspec_kw={"width_ratios": [1, 1, 1, 1.3]})
    images = [(result.phase, "phase summed over slices (rad)", "gray", (x0, x0 + nx * dx, y0 + ny * dx, y0), "Å"),
              (amplitude, "probe amplitude (mode 0)", "magma", None, "px"),
              (probe_phase, "probe phase (mode 0, rad)", "twilight", None, "px")]
    for ax, (image, label, cmap, extent, unit) in zip(axes, images):
        fig.colorbar(ax.imshow(image, cmap=cmap, extent=extent), ax=ax, fraction=0.046)
        ax.set_title(label, fontsize=10)
        ax.set_xlabel(f"x ({unit})")
        ax.set_ylabel(f"y ({unit})")
    ax = axes[3]
    for (label, curve), colour in zip(curves.items(), ("k", "C0")):
        kept = curve.kept
        ax.plot(curve.q_invA[kept], curve.frc[kept], ".-", color=colour,
                label=f"{label}: {curve.resolution_A('half_bit'):.2f} Å")
        ax.plot(curve.q_invA[kept], curve.threshold("half_bit")[kept], ":", color=colour, lw=1)
    if not curves:
        ax.text(0.5, 0.5, "no FRC curve (see the caption)", ha="center", transform=ax.transAxes)
    ax.set_xlabel("spatial frequency q (1/Å); dotted: ½-bit thresholds")
    ax.set_ylabel("FRC")
    ax.set_ylim(-0.1, 1.05)
    if curves:
        ax.legend(fontsize=8, loc="lower left")
    ax.grid(alpha=0.3)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def final_section(out_dir: Path) -> tuple[str, bytes] | None:
    """The caption and PNG of the final reconstruction written into `out_dir`, if there is one."""
    caption_file, figure = out_dir / FINAL_JSON, out_dir / FINAL_PNG
    if not (caption_file.is_file() and figure.is_file()):
        return None
    return json.loads(caption_file.read_text())["caption"], figure.read_bytes()
