"""`tune report`: a CSV of all trials and one self-contained HTML dashboard of a study.

The study is read once into memory (load, copy trials, close) so the report never holds a
connection beside running workers. The HTML embeds plotly.js once and every image as a base64
data URI: it opens offline. Surplus trials (user attribute ``surplus``: created over the trial
budget, failed and never run) are kept in the CSV and left out of the page.
"""

from __future__ import annotations

import base64
import contextlib
import html
import json
import logging
import math
import statistics
import tempfile
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import optuna
import pandas as pd
import plotly.express as px
import plotly.graph_objects as go
from optuna.artifacts import FileSystemArtifactStore
from optuna.storages import RetryHeartbeatStaleTrialCallback
from optuna.trial import FrozenTrial, TrialState
from plotly.offline import get_plotlyjs

import metrics
from metrics.figure import save_phase_figure, save_score_figure
from tune import budget
from tune.dashboard import close_storage, open_storage

log = logging.getLogger(__name__)

STATE_COLOURS = {
    "COMPLETE": "#2ca02c",
    "PRUNED": "#ff7f0e",
    "FAIL": "#d62728",
    "RUNNING": "#1f77b4",
    "WAITING": "#7f7f7f",
}
TIMING_ATTRS = ("compile_s", "run_s", "score_s")
CAPTION_METRICS = ("nrmse", "ssim", "frc_resolution_half_bit_A", "frc_resolution_A", "frc_area")
CSV_ATTRS = ("number", "state", "value", "datetime_start", "datetime_complete", "duration", "params", "user_attrs")
IMAGE_ARTIFACTS = ("score_png", "phase_png", "frc_png")


@dataclass(frozen=True)
class ReportPaths:
    """Files written by :func:`write_report`."""

    csv: Path
    html: Path


@dataclass(frozen=True)
class ReconInputs:
    """Where the report finds the best reconstructions and how it compares them with the truth.

    ``ground_truth``: dataset HDF5; ``artifact_dir``: the study's artifact store; ``base_dir``:
    what relative ``result_path`` attrs are relative to; ``score_options``: ``metrics.Scorer``
    options (e.g. ``roi``, ``margin_A``; ``roi`` defaults to ``full`` without scan positions).
    """

    ground_truth: Path | None = None
    top_k: int = 3
    artifact_dir: Path | None = None
    base_dir: Path = Path(".")
    score_options: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Objective:
    """One objective of a study: its index, display name and direction."""

    index: int
    name: str
    direction: optuna.study.StudyDirection

    def value(self, trial: FrozenTrial) -> float:
        """This objective's value of a complete trial."""
        return trial.values[self.index]

    def loss(self, trial: FrozenTrial) -> float:
        """The value, negated for a maximised objective (lower is better)."""
        sign = -1.0 if self.direction == optuna.study.StudyDirection.MAXIMIZE else 1.0
        return sign * self.value(trial)


def write_report(
    storage: str | optuna.storages.BaseStorage,
    study_name: str,
    out_dir: Path,
    ground_truth: Path | None = None,
    top_k: int = 3,
    artifact_dir: Path | None = None,
    score_options: Mapping[str, Any] | None = None,
) -> ReportPaths:
    """Write ``out_dir/trials.csv`` and ``out_dir/report.html`` for one study.

    ``storage``: a URL or journal path (opened and closed here) or a storage object (left open).
    ``ground_truth``: dataset HDF5 to compare the best ``top_k`` reconstructions with.
    ``artifact_dir``: the study's artifact store, for result files and images kept only there.
    ``score_options``: ``metrics.Scorer`` options for that comparison (the study's scoring spec).
    """
    study = snapshot_study(storage, study_name)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = ReportPaths(csv=out_dir / "trials.csv", html=out_dir / "report.html")
    trials_table(study).to_csv(paths.csv, index=False)
    inputs = ReconInputs(ground_truth, top_k, artifact_dir, out_dir, dict(score_options or {}))
    page = render_report(study, inputs)
    paths.html.write_text(page, encoding="utf-8")
    return paths


def snapshot_study(storage: str | optuna.storages.BaseStorage, study_name: str) -> optuna.Study:
    """An in-memory copy of a stored study (trials with their numbers, directions, metric names)."""
    backend = open_storage(storage) if isinstance(storage, str) else storage
    try:
        source = optuna.load_study(study_name=study_name, storage=backend)
        with quiet_optuna():
            copy = optuna.create_study(study_name=study_name, directions=source.directions)
        copy.add_trials(source.get_trials(deepcopy=False))
        copy_metric_names(source, copy)
    finally:
        if isinstance(storage, str):
            close_storage(backend)
    return copy


def trials_table(study: optuna.Study) -> pd.DataFrame:
    """``study.trials_dataframe()`` without system attrs, dict user attrs flattened, lists as JSON text."""
    frame = study.trials_dataframe(attrs=CSV_ATTRS, multi_index=False)
    for column in [c for c in frame.columns if c.startswith("user_attrs_")]:
        values = frame[column]
        if values.map(lambda v: isinstance(v, dict)).any():
            flat = pd.json_normalize(values.map(lambda v: v if isinstance(v, dict) else {}).tolist())
            flat.index = frame.index
            flat.columns = [f"{column}_{key}" for key in flat.columns]
            frame = pd.concat([frame.drop(columns=column), flat], axis=1)
        elif values.map(lambda v: isinstance(v, list)).any():
            frame[column] = values.map(lambda v: json.dumps(v) if isinstance(v, list) else v)
    return frame


def counted_trials(study: optuna.Study) -> list[FrozenTrial]:
    """All trials except the surplus ones (created over the trial budget, never run)."""
    return [t for t in study.get_trials(deepcopy=False) if not budget.is_surplus(t)]


@contextlib.contextmanager
def quiet_optuna() -> Iterator[None]:
    """Silence Optuna's info messages (e.g. "A new study created in memory") for a moment."""
    verbosity = optuna.logging.get_verbosity()
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    try:
        yield
    finally:
        optuna.logging.set_verbosity(verbosity)


def copy_metric_names(source: optuna.Study, target: optuna.Study) -> None:
    """Give ``target`` the objective names of ``source`` (if it has any)."""
    if source.metric_names is not None:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            target.set_metric_names(source.metric_names)


def objectives(study: optuna.Study) -> list[Objective]:
    """The study's objectives, named by its metric names where set."""
    names = study.metric_names or (
        ["Objective Value"] if len(study.directions) == 1 else [f"Objective {i}" for i in range(len(study.directions))]
    )
    return [Objective(i, name, d) for i, (name, d) in enumerate(zip(names, study.directions))]


def complete_trials(study: optuna.Study) -> list[FrozenTrial]:
    """Complete trials, in trial order (surplus trials never run, so none is surplus)."""
    return study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))


def ranked_trials(study: optuna.Study, top_k: int) -> list[FrozenTrial]:
    """The best ``top_k`` complete trials: by value, or the Pareto front by the first objective."""
    first = objectives(study)[0]
    pool = complete_trials(study) if len(study.directions) == 1 else study.best_trials
    finite = [t for t in pool if math.isfinite(first.value(t))]
    return sorted(finite, key=first.loss)[:top_k]


def varying_params(trials: Sequence[FrozenTrial]) -> list[str]:
    """Parameters that take more than one value across ``trials``."""
    names = sorted({name for t in trials for name in t.params})
    return [n for n in names if len({repr(t.params.get(n)) for t in trials}) > 1]


def worker_label(trial: FrozenTrial) -> str:
    """``host · worker N`` from the trial's user attrs (``unknown`` when not recorded)."""
    worker = trial.user_attrs.get("worker")
    host = trial.user_attrs.get("host")
    label = "unknown" if worker is None else f"worker {worker}"
    return f"{host} · {label}" if host else label


# --- figures --------------------------------------------------------------------------------


def per_objective(
    study: optuna.Study, plot: Callable[..., go.Figure], title: str
) -> list[tuple[str, go.Figure]]:
    """One figure per objective (``target`` set for multi-objective studies)."""
    if len(study.directions) == 1:
        return [(title, plot(study, target_name=objectives(study)[0].name))]
    return [(f"{title}: {o.name}", plot(study, target=o.value, target_name=o.name)) for o in objectives(study)]


def importance_figures(study: optuna.Study) -> list[tuple[str, go.Figure]]:
    """PED-ANOVA importances per objective (a maximised objective enters negated: lower is better)."""
    plot = optuna.visualization.plot_param_importances
    if len(study.directions) == 1:
        return [("Parameter importances", plot(study, target_name=objectives(study)[0].name))]
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="PedAnovaImportanceEvaluator computes")
        return [
            (f"Parameter importances: {o.name}", plot(study, target=o.loss, target_name=o.name))
            for o in objectives(study)
        ]


def importance_note(study: optuna.Study) -> str | None:
    """Why parameter importances cannot be computed, or None when they can."""
    trials = complete_trials(study)
    if len(trials) < 2:
        return f"Parameter importances need at least 2 complete trials ({len(trials)} so far)."
    if not varying_params(trials):
        return "Parameter importances need at least one parameter that varies across complete trials."
    return None


def intermediate_note(study: optuna.Study) -> str | None:
    """Why there is no intermediate-values plot, or None when there is one."""
    if len(study.directions) > 1:
        return "Multi-objective study: no intermediate values (pruning is single-objective)."
    if not any(t.intermediate_values for t in study.get_trials(deepcopy=False)):
        return "No trial reported intermediate values."
    return None


def timeline_figure(trials: Sequence[FrozenTrial], now: datetime) -> go.Figure | None:
    """Trial start to end per worker, coloured by state (running trials end ``now``)."""
    rows = [
        {
            "worker": worker_label(t),
            "start": t.datetime_start,
            "end": t.datetime_complete or now,
            "state": t.state.name,
            "trial": t.number,
        }
        for t in trials
        if t.datetime_start is not None
    ]
    if not rows:
        return None
    frame = pd.DataFrame(rows).sort_values("worker")
    fig = px.timeline(
        frame, x_start="start", x_end="end", y="worker", color="state",
        color_discrete_map=STATE_COLOURS, hover_data=["trial"],
    )
    fig.update_layout(title="Trials per worker", yaxis_title=None, height=160 + 40 * frame["worker"].nunique())
    return fig


# --- tables ---------------------------------------------------------------------------------


def state_counts(trials: Sequence[FrozenTrial]) -> pd.DataFrame:
    """Number of trials per state (every state listed)."""
    counts = dict.fromkeys([*STATE_COLOURS, *(s.name for s in TrialState)], 0)
    for t in trials:
        counts[t.state.name] += 1
    return pd.DataFrame({"state": list(counts), "trials": list(counts.values())})


def best_table(study: optuna.Study, top_k: int) -> pd.DataFrame:
    """Values and parameters of the best trials (ranked as in :func:`ranked_trials`)."""
    rows = []
    for t in ranked_trials(study, top_k):
        row: dict[str, Any] = {"trial": t.number}
        row.update({o.name: o.value(t) for o in objectives(study)})
        row.update(t.params)
        rows.append(row)
    return pd.DataFrame(rows)


def timing_table(trials: Sequence[FrozenTrial]) -> pd.DataFrame:
    """Per worker: trials, compilations and total/median compile, run and score seconds."""
    rows = []
    for label in sorted({worker_label(t) for t in trials}):
        mine = [t for t in trials if worker_label(t) == label]
        row: dict[str, Any] = {"worker": label, "trials": len(mine)}
        counts = [t.user_attrs["compile_count"] for t in mine if "compile_count" in t.user_attrs]
        row["compilations"] = max(counts) if counts else None
        for attr in TIMING_ATTRS:
            seconds = [float(t.user_attrs[attr]) for t in mine if attr in t.user_attrs]
            row[f"{attr} total"] = round(sum(seconds), 2) if seconds else None
            row[f"{attr} median"] = round(statistics.median(seconds), 3) if seconds else None
        rows.append(row)
    return pd.DataFrame(rows)


def rerun_as(trials: Sequence[FrozenTrial]) -> dict[int, int]:
    """Failed trial number → the number of the trial that re-ran it (stale heartbeat, re-queued)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        histories = {t.number: RetryHeartbeatStaleTrialCallback.retry_history(t) for t in trials}
    return {history[-1]: number for number, history in histories.items() if history}


def failure_table(trials: Sequence[FrozenTrial]) -> pd.DataFrame:
    """Failed trials, their recorded reasons and the trial that re-ran each re-queued one."""
    reruns = rerun_as(trials)
    rows = [
        {
            "trial": t.number,
            "reason": t.user_attrs.get("fail_reason", "(not recorded: worker lost?)"),
            "re-run as": reruns.get(t.number),
        }
        for t in trials
        if t.state == TrialState.FAIL
    ]
    return pd.DataFrame(rows, columns=["trial", "reason", "re-run as"])


# --- reconstructions ------------------------------------------------------------------------


@dataclass(frozen=True)
class ReconPanel:
    """What the report shows for one of the best trials: PNG images, or a note why there are none."""

    trial: int
    caption: str
    images: tuple[bytes, ...] = ()
    note: str = ""


def trial_caption(trial: FrozenTrial) -> str:
    """``trial N`` and the headline scores it recorded."""
    scores = trial.user_attrs.get("metrics", {})
    shown = [f"{k} {scores[k]:.4g}" for k in CAPTION_METRICS if isinstance(scores.get(k), (int, float))]
    return " · ".join([f"trial {trial.number}", *shown])


def result_file(trial: FrozenTrial, store: FileSystemArtifactStore | None, base_dir: Path, scratch: Path) -> Path | None:
    """The trial's result HDF5: its ``result_path`` (relative to ``base_dir`` if not absolute and
    not found as is) or its ``result_h5`` artifact downloaded into ``scratch``."""
    kept = trial.user_attrs.get("result_path")
    if kept:
        for candidate in (Path(kept), base_dir / kept):
            if candidate.is_file():
                return candidate
    artifact_id = trial.user_attrs.get("artifacts", {}).get("result_h5")
    if store is None or artifact_id is None:
        return None
    target = scratch / f"trial{trial.number}.h5"
    optuna.artifacts.download_artifact(artifact_store=store, artifact_id=artifact_id, file_path=str(target))
    return target


def artifact_images(trial: FrozenTrial, store: FileSystemArtifactStore | None) -> tuple[bytes, ...]:
    """The image artifacts the worker stored (``score_png``, ``phase_png``, ``frc_png``) that the store holds."""
    ids = trial.user_attrs.get("artifacts", {})
    if store is None:
        return ()
    images = []
    for name in IMAGE_ARTIFACTS:
        if name in ids:
            with store.open_reader(ids[name]) as reader:
                images.append(reader.read())
    return tuple(images)


def make_scorer(ground_truth: Path, options: Mapping[str, Any]) -> metrics.Scorer:
    """A scorer with ``options``; by default on the scanned field, or the whole truth without scan positions."""
    truth = metrics.GroundTruth.from_h5(ground_truth)
    roi = "scan" if truth.positions_yx_A is not None else "full"
    return metrics.Scorer(truth, **{"roi": roi, **options})


def trial_panel(
    trial: FrozenTrial, scorer: metrics.Scorer | None, store: FileSystemArtifactStore | None, base_dir: Path, scratch: Path
) -> ReconPanel:
    """The images of one trial: drawn from its result file, else its stored artifact images."""
    caption = trial_caption(trial)
    png = scratch / f"trial{trial.number}.png"
    try:
        result = result_file(trial, store, base_dir, scratch)
        if result is not None and scorer is not None:
            save_score_figure(png, scorer.report(result), title=caption)
            return ReconPanel(trial.number, caption, (png.read_bytes(),))
        if result is not None:
            save_phase_figure(png, metrics.load_reconstruction(result), title=f"trial {trial.number}")
            return ReconPanel(trial.number, caption, (png.read_bytes(),))
        images = artifact_images(trial, store)
    except (OSError, KeyError, metrics.ScoringError) as error:
        return ReconPanel(trial.number, caption, note=f"Could not draw trial {trial.number}: {error}")
    if images:
        return ReconPanel(trial.number, f"{caption} (images stored by the worker)", images)
    if store is None and trial.user_attrs.get("artifacts"):
        return ReconPanel(trial.number, caption, note="Its images are in the artifact store, which was not given.")
    return ReconPanel(trial.number, caption, note=f"Trial {trial.number} kept no result file and no images.")


def reconstruction_panels(
    trials: Sequence[FrozenTrial], scorer: metrics.Scorer | None, inputs: ReconInputs
) -> list[ReconPanel]:
    """Panels for the given trials, compared with the ground truth when there is a scorer."""
    store = FileSystemArtifactStore(str(inputs.artifact_dir)) if inputs.artifact_dir is not None else None
    with tempfile.TemporaryDirectory(prefix="ptytune-report-") as scratch:
        return [trial_panel(t, scorer, store, inputs.base_dir, Path(scratch)) for t in trials]


# --- HTML -----------------------------------------------------------------------------------


def figure_html(fig: go.Figure) -> str:
    """A plotly figure as an HTML fragment (plotly.js is inlined once, in the page head)."""
    return fig.to_html(full_html=False, include_plotlyjs=False, config={"displaylogo": False})


def table_html(frame: pd.DataFrame) -> str:
    """A DataFrame as an escaped HTML table (a dash when empty)."""
    if frame.empty:
        return "<p>—</p>"
    return frame.to_html(index=False, border=0, classes="table", na_rep="", float_format=lambda v: f"{v:.4g}")


def note_html(text: str) -> str:
    """An escaped note paragraph."""
    return f'<p class="note">{html.escape(text)}</p>'


def section_html(key: str, title: str, body: str) -> str:
    """A titled section with id ``key``."""
    return f'<section id="{key}"><h2>{html.escape(title)}</h2>\n{body}\n</section>'


def png_html(png: bytes, alt: str) -> str:
    """A PNG embedded as a base64 data URI."""
    data = base64.b64encode(png).decode("ascii")
    return f'<img alt="{html.escape(alt)}" src="data:image/png;base64,{data}">'


def figures_html(make: Callable[[], list[tuple[str, go.Figure]]]) -> str:
    """Figures from ``make`` (titled when several), or a note with the error when Optuna cannot draw them."""
    try:
        made = make()
    except (ValueError, RuntimeError, ZeroDivisionError) as error:
        log.warning("figure not drawn: %s", error)
        return note_html(f"Could not draw this figure: {error}")
    if len(made) == 1:
        return figure_html(made[0][1])
    return "\n".join(f"<h3>{html.escape(title)}</h3>\n{figure_html(fig)}" for title, fig in made)


def summary_html(study: optuna.Study, trials: Sequence[FrozenTrial], surplus: int, top_k: int) -> str:
    """Counts by state, best trials, timing per worker and failure reasons."""
    directions = ", ".join(f"{o.name} ({o.direction.name.lower()})" for o in objectives(study))
    best_title = "Best trials" if len(study.directions) == 1 else "Pareto-optimal trials (by the first objective)"
    parts = [
        f"<p>Objectives: {html.escape(directions)}. Surplus trials left out: {surplus}.</p>",
        "<h3>Trials by state</h3>", table_html(state_counts(trials)),
        f"<h3>{best_title}</h3>", table_html(best_table(study, top_k)),
        "<h3>Time per worker (seconds)</h3>", table_html(timing_table(trials)),
        "<h3>Failed trials</h3>", table_html(failure_table(trials)),
    ]
    return "\n".join(parts)


def reconstructions_html(trials: Sequence[FrozenTrial], inputs: ReconInputs) -> str:
    """The best reconstructions' images (beside the truth when it can be read), or notes why not."""
    scorer, intro = None, note_html("No ground truth given: reconstructions are shown alone, without FRC.")
    if inputs.ground_truth is not None:
        try:
            scorer, intro = make_scorer(inputs.ground_truth, inputs.score_options), ""
        except (OSError, metrics.ScoringError) as error:
            intro = note_html(f"Ground truth not used: {error}")
    items = []
    for panel in reconstruction_panels(trials, scorer, inputs):
        body = "".join(png_html(png, f"trial {panel.trial}") for png in panel.images) or note_html(panel.note)
        items.append(f"<figure><figcaption>{html.escape(panel.caption)}</figcaption>{body}</figure>")
    return intro + ("\n".join(items) if items else note_html("No complete trial to show."))


def render_report(study: optuna.Study, inputs: ReconInputs, now: datetime | None = None) -> str:
    """The whole HTML page of a study snapshot."""
    now = now or datetime.now()
    trials = counted_trials(study)
    surplus = len(study.trials) - len(trials)
    sections = [section_html("summary", "Summary", summary_html(study, trials, surplus, inputs.top_k))]
    timeline = timeline_figure(trials, now)
    timeline_body = figure_html(timeline) if timeline else note_html("No trial has started.")
    if not complete_trials(study):
        sections.insert(0, note_html("No trial has completed yet: there is nothing to plot or rank."))
        sections.append(section_html("timeline", "Worker timeline", timeline_body))
        return page_html(study.study_name, now, sections)
    vis = optuna.visualization
    note = importance_note(study)
    importances = note_html(note) if note else figures_html(lambda: importance_figures(study))
    note = intermediate_note(study)
    intermediate = note_html(note) if note else figures_html(
        lambda: [("Intermediate values", vis.plot_intermediate_values(study))]
    )
    sections += [
        section_html("history", "Optimisation history", figures_html(
            lambda: per_objective(study, vis.plot_optimization_history, "History"))),
        section_html("importances", "Parameter importances", importances),
        section_html("parallel", "Parallel coordinates", figures_html(
            lambda: per_objective(study, vis.plot_parallel_coordinate, "Parallel coordinates"))),
        section_html("slices", "Slices", figures_html(
            lambda: per_objective(study, vis.plot_slice, "Slices"))),
        section_html("intermediate", "Intermediate values", intermediate),
        section_html("timeline", "Worker timeline", timeline_body),
        section_html("reconstructions", f"Best {inputs.top_k} reconstructions",
                     reconstructions_html(ranked_trials(study, inputs.top_k), inputs)),
    ]
    return page_html(study.study_name, now, sections)


STYLE = """
body { font-family: system-ui, sans-serif; margin: 2em; max-width: 1200px; }
table.table { border-collapse: collapse; margin: 0.5em 0; }
table.table td, table.table th { padding: 2px 8px; border-bottom: 1px solid #ddd; text-align: right; }
p.note { background: #fff6e0; padding: 0.5em; border-left: 4px solid #f0a000; }
figure { display: inline-block; margin: 0.5em; }
img { max-width: 100%; }
"""


def page_html(title: str, now: datetime, sections: Sequence[str]) -> str:
    """The complete HTML document."""
    name = html.escape(title)
    return (
        f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
        f"<title>ptytune report: {name}</title><style>{STYLE}</style>\n"
        f'<script type="text/javascript">{get_plotlyjs()}</script></head>\n<body>\n'
        f"<h1>Study {name}</h1><p>Written {now:%Y-%m-%d %H:%M:%S}.</p>\n"
        + "\n".join(sections)
        + "\n</body></html>\n"
    )
