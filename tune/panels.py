"""Images of the best reconstructions for the report: each result aligned to the ground truth
(`metrics.figure`), its phase alone without a truth, or the images its worker stored."""
from __future__ import annotations

import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import optuna
from optuna.artifacts import FileSystemArtifactStore
from optuna.trial import FrozenTrial

import metrics
from metrics.figure import save_phase_figure, save_score_figure
from tune.record import TrialRecord
from tune.schema import score_key

HALF_BIT_RESOLUTION = score_key("frc_resolution_A")
#: Scores shown under each reconstruction, when the trial recorded them.
CAPTION_SCORES = ("nrmse", "ssim", HALF_BIT_RESOLUTION, "frc_area")
#: Artifact kinds that are images, in the order they are shown.
IMAGE_ARTIFACTS = ("score_png", "phase_png")


@dataclass(frozen=True)
class ReconInputs:
    """Where the report finds the best reconstructions and how it compares them with the truth.

    ``ground_truth``: dataset HDF5 and ``ground_truth_key`` the dataset of the true phase in it (the
    study's `data.ground_truth`); ``artifact_dir``: the study's artifact store; ``base_dir``: what
    relative result paths are relative to; ``score_options``: options of `metrics.build_scorer`
    (the study's `objective.scoring`).
    """

    ground_truth: Path | None = None
    ground_truth_key: str = metrics.GROUND_TRUTH_KEY
    top_k: int = 3
    artifact_dir: Path | None = None
    base_dir: Path = Path(".")
    score_options: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class ReconPanel:
    """What the report shows for one of the best trials: PNG images, or a note why there are none."""

    trial: int
    caption: str
    images: tuple[bytes, ...] = ()
    note: str = ""


def build_scorer(inputs: ReconInputs) -> metrics.Scorer:
    """The scorer of the study's ground truth (raises OSError or metrics.ScoringError)."""
    assert inputs.ground_truth is not None
    return metrics.build_scorer(inputs.ground_truth, inputs.ground_truth_key, **inputs.score_options)


def trial_caption(trial: FrozenTrial, frc: metrics.FRCCurve | None = None) -> str:
    """``trial N`` and the headline scores it recorded; with its FRC curve, a ½-bit resolution the
    curve never reached is named as the grid's Nyquist limit it is."""
    scores = TrialRecord.read(trial).metrics
    shown = [f"{k} {scores[k]:.4g}" for k in CAPTION_SCORES if isinstance(scores.get(k), (int, float))]
    resolution = scores.get(HALF_BIT_RESOLUTION)
    if frc is not None and not frc.crosses("half_bit") and isinstance(resolution, (int, float)):
        shown = [s if not s.startswith(HALF_BIT_RESOLUTION) else
                 f"FRC ½-bit beyond the grid's Nyquist ({resolution:.3g} Å)" for s in shown]
    return " · ".join([f"trial {trial.number}", *shown])


def result_file(trial: FrozenTrial, store: FileSystemArtifactStore | None, base_dir: Path, scratch: Path) -> Path | None:
    """The trial's result HDF5: its kept result file (relative to ``base_dir`` if not absolute and
    not found as is) or its ``result_h5`` artifact downloaded into ``scratch``."""
    record = TrialRecord.read(trial)
    if record.result_path:
        for candidate in (Path(record.result_path), base_dir / record.result_path):
            if candidate.is_file():
                return candidate
    artifact_id = record.artifacts.get("result_h5")
    if store is None or artifact_id is None:
        return None
    target = scratch / f"trial{trial.number}.h5"
    optuna.artifacts.download_artifact(artifact_store=store, artifact_id=artifact_id, file_path=str(target))
    return target


def artifact_images(trial: FrozenTrial, store: FileSystemArtifactStore | None) -> tuple[bytes, ...]:
    """The image artifacts the worker stored that the store holds."""
    ids = TrialRecord.read(trial).artifacts
    if store is None:
        return ()
    images = []
    for kind in IMAGE_ARTIFACTS:
        if kind in ids:
            with store.open_reader(ids[kind]) as reader:
                images.append(reader.read())
    return tuple(images)


def trial_panel(
    trial: FrozenTrial, scorer: metrics.Scorer | None, store: FileSystemArtifactStore | None, base_dir: Path, scratch: Path
) -> ReconPanel:
    """The images of one trial: drawn from its result file, else its stored artifact images."""
    caption = trial_caption(trial)
    png = scratch / f"trial{trial.number}.png"
    try:
        result = result_file(trial, store, base_dir, scratch)
        if result is not None and scorer is not None:
            report = scorer.report(result)
            caption = trial_caption(trial, report.frc)
            save_score_figure(png, report, title=caption)
            return ReconPanel(trial.number, caption, (png.read_bytes(),))
        if result is not None:
            save_phase_figure(png, metrics.load_reconstruction(result), title=f"trial {trial.number}")
            return ReconPanel(trial.number, caption, (png.read_bytes(),))
        images = artifact_images(trial, store)
    except (OSError, KeyError, metrics.ScoringError) as error:
        return ReconPanel(trial.number, caption, note=f"Could not draw trial {trial.number}: {error}")
    if images:
        return ReconPanel(trial.number, f"{caption} (images stored by the worker)", images)
    if store is None and TrialRecord.read(trial).artifacts:
        return ReconPanel(trial.number, caption, note="Its images are in the artifact store, which was not given.")
    return ReconPanel(trial.number, caption, note=f"Trial {trial.number} kept no result file and no images.")


def reconstruction_panels(
    trials: Sequence[FrozenTrial], scorer: metrics.Scorer | None, inputs: ReconInputs
) -> list[ReconPanel]:
    """Panels for the given trials, compared with the ground truth when there is a scorer."""
    store = FileSystemArtifactStore(str(inputs.artifact_dir)) if inputs.artifact_dir is not None else None
    with tempfile.TemporaryDirectory(prefix="ptytune-report-") as scratch:
        return [trial_panel(t, scorer, store, inputs.base_dir, Path(scratch)) for t in trials]
