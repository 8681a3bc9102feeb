"""`tune report`: a CSV of all trials and one self-contained HTML page of a study.

The HTML embeds plotly.js once and every image as a base64 data URI: it opens offline. Its parts:
`tune.report_data` (snapshot, CSV, tables), `tune.figures` (plotly figures), `tune.panels` (images
of the best reconstructions); this module assembles the page.
"""

from __future__ import annotations

import base64
import html
import logging
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

import optuna
import pandas as pd
import plotly.graph_objects as go
from optuna.trial import FrozenTrial
from plotly.offline import get_plotlyjs

import metrics
from tune import figures
from tune.panels import ReconInputs, build_scorer, reconstruction_panels
from tune.ranking import ranked_trials
from tune.report_data import (
    batch_table,
    best_table,
    complete_trials,
    counted_trials,
    failure_table,
    snapshot_study,
    state_counts,
    study_metrics,
    timing_table,
    trials_table,
)

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ReportPaths:
    """Files written by :func:`write_report`."""

    csv: Path
    html: Path


def write_report(
    storage: str | optuna.storages.BaseStorage,
    study_name: str,
    out_dir: Path,
    ground_truth: Path | None = None,
    top_k: int = 3,
    artifact_dir: Path | None = None,
    score_options: Mapping[str, Any] | None = None,
    ground_truth_key: str = metrics.GROUND_TRUTH_KEY,
    final: tuple[str, bytes] | None = None,
) -> ReportPaths:
    """Write ``out_dir/trials.csv`` and ``out_dir/report.html`` for one study.

    ``storage``: a URL or journal path (opened and closed here) or a storage object (left open).
    ``ground_truth``: dataset HDF5 to compare the best ``top_k`` reconstructions with, the true phase
    at ``ground_truth_key`` in it. ``artifact_dir``: the study's artifact store, for result files and
    images kept only there. ``score_options``: `metrics.build_scorer` options (the study's scoring).
    ``final``: caption and PNG of the chosen plan's full reconstruction (`tune.final`), shown first.
    """
    study = snapshot_study(storage, study_name)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = ReportPaths(csv=out_dir / "trials.csv", html=out_dir / "report.html")
    trials_table(study).to_csv(paths.csv, index=False)
    inputs = ReconInputs(ground_truth, ground_truth_key, top_k, artifact_dir, out_dir, dict(score_options or {}))
    paths.html.write_text(render_report(study, inputs, final=final), encoding="utf-8")
    return paths


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


def figures_html(make: Callable[[], figures.Titled]) -> str:
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
    directions = ", ".join(f"{m.name} ({m.direction.name.lower()})" for m in study_metrics(study))
    best_title = "Best trials" if len(study.directions) == 1 else "Pareto-optimal trials (by the first objective)"
    parts = [
        f"<p>Objectives: {html.escape(directions)}. Surplus trials left out: {surplus}.</p>",
        "<h3>Trials by state</h3>", table_html(state_counts(trials)),
        f"<h3>{best_title}</h3>", table_html(best_table(study, top_k)),
        "<h3>Time per worker (seconds)</h3>", table_html(timing_table(trials)),
        "<h3>Failed trials</h3>", table_html(failure_table(trials)),
    ]
    batches = batch_table(trials)
    if not batches.empty:
        parts += ["<h3>Batched trials (one compiled program per batch)</h3>", table_html(batches)]
    return "\n".join(parts)


def reconstructions_html(trials: Sequence[FrozenTrial], inputs: ReconInputs) -> str:
    """The best reconstructions' images (beside the truth when it can be read), or notes why not."""
    scorer, intro = None, note_html("No ground truth given: reconstructions are shown alone, without FRC.")
    if inputs.ground_truth is not None:
        try:
            scorer, intro = build_scorer(inputs), ""
        except (OSError, metrics.ScoringError) as error:
            intro = note_html(f"Ground truth not used: {error}")
    items = []
    for panel in reconstruction_panels(trials, scorer, inputs):
        body = "".join(png_html(png, f"trial {panel.trial}") for png in panel.images) or note_html(panel.note)
        items.append(f"<figure><figcaption>{html.escape(panel.caption)}</figcaption>{body}</figure>")
    return intro + ("\n".join(items) if items else note_html("No complete trial to show."))


def final_html(caption: str, png: bytes) -> str:
    """The chosen plan's full reconstruction: phase, probe amplitude and phase, FRC curves."""
    return f"<figure><figcaption>{html.escape(caption)}</figcaption>{png_html(png, 'final reconstruction')}</figure>"


def render_report(study: optuna.Study, inputs: ReconInputs, now: datetime | None = None,
                  final: tuple[str, bytes] | None = None) -> str:
    """The whole HTML page of a study snapshot (``final``: caption and PNG of the final reconstruction)."""
    now = now or datetime.now()
    trials = counted_trials(study)
    surplus = len(study.trials) - len(trials)
    sections = [section_html("summary", "Summary", summary_html(study, trials, surplus, inputs.top_k))]
    if final is not None:
        sections.append(section_html("final", "Final reconstruction (best.yml)", final_html(*final)))
    timeline = figures.timeline_figure(trials, now)
    timeline_body = figure_html(timeline) if timeline else note_html("No trial has started.")
    if not complete_trials(study):
        sections.insert(0, note_html("No trial has completed yet: there is nothing to plot or rank."))
        sections.append(section_html("timeline", "Worker timeline", timeline_body))
        return page_html(study.study_name, now, sections)
    note = figures.importance_note(study)
    importances = note_html(note) if note else figures_html(lambda: figures.importance_figures(study))
    note = figures.intermediate_note(study)
    intermediate = note_html(note) if note else figures_html(lambda: figures.intermediate_figures(study))
    sections += [
        section_html("history", "Optimisation history", figures_html(lambda: figures.history_figures(study))),
        section_html("importances", "Parameter importances", importances),
        section_html("parallel", "Parallel coordinates", figures_html(lambda: figures.parallel_figures(study))),
        section_html("slices", "Slices", figures_html(lambda: figures.slice_figures(study))),
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
