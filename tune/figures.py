"""The report's plotly figures of a study snapshot, and why a figure cannot be drawn.

Figures carry no title of their own: the report's section headings (and, for several metrics, a
heading per metric) name them."""
from __future__ import annotations

import warnings
from collections.abc import Callable, Sequence
from datetime import datetime

import optuna
import pandas as pd
import plotly.express as px
import plotly.graph_objects as go
from optuna.trial import FrozenTrial

from tune.report_data import STATE_COLOURS, complete_trials, study_metrics, varying_params, worker_label
from tune.schema import GROUND_TRUTH_METRICS

Titled = list[tuple[str, go.Figure]]


def per_metric(study: optuna.Study, plot: Callable[..., go.Figure], title: str) -> Titled:
    """One figure per objective metric (``target`` set for multi-objective studies)."""
    if len(study.directions) == 1:
        made = [(title, plot(study, target_name=study_metrics(study)[0].name))]
    else:
        made = [(f"{title}: {m.name}", plot(study, target=m.value, target_name=m.name)) for m in study_metrics(study)]
    return [(heading, untitled(fig)) for heading, fig in made]


def untitled(fig: go.Figure) -> go.Figure:
    """The figure without its own title (the report's heading names it)."""
    return fig.update_layout(title=None, margin={"t": 30})


def history_figures(study: optuna.Study) -> Titled:
    """Each metric's value per trial and the best so far."""
    return per_metric(study, optuna.visualization.plot_optimization_history, "History")


def parallel_figures(study: optuna.Study) -> Titled:
    """Each complete trial's parameters and value as a line across parallel axes. Optuna cuts the
    axis labels (plan key paths, long) to ``optimizers.object...``: they get their full names back,
    slanted, with room below the axes."""
    names = sorted({name for t in complete_trials(study) for name in t.params})
    made = per_metric(study, optuna.visualization.plot_parallel_coordinate, "Parallel coordinates")
    for _, fig in made:
        labels = [full_name(str(text), names) for text in fig.layout.xaxis.ticktext or ()]
        fig.update_xaxes(ticktext=labels, tickangle=-25)
        for line in fig.data:  # each trial's line: hover text of (axis label, value) pairs
            if line.customdata is not None:
                line.customdata = [[full_name(str(label), names), value] for label, value in line.customdata]
        fig.update_layout(margin={"t": 30, "b": 160})
    return made


def full_name(label: str, names: Sequence[str]) -> str:
    """The parameter name an axis label cut with ``...`` stands for (the label if none or several)."""
    matches = [n for n in names if label.endswith("...") and n.startswith(label[:-3])]
    return matches[0] if len(matches) == 1 else label


def slice_figures(study: optuna.Study) -> Titled:
    """Each metric against each parameter."""
    return per_metric(study, optuna.visualization.plot_slice, "Slices")


def importance_figures(study: optuna.Study) -> Titled:
    """PED-ANOVA importances per metric (a maximised metric enters negated: lower is better)."""
    plot = optuna.visualization.plot_param_importances
    if len(study.directions) == 1:
        return [("Parameter importances", untitled(plot(study, target_name=study_metrics(study)[0].name)))]
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="PedAnovaImportanceEvaluator computes")
        return [(f"Parameter importances: {m.name}", untitled(plot(study, target=m.loss, target_name=m.name)))
                for m in study_metrics(study)]


def importance_note(study: optuna.Study) -> str | None:
    """Why parameter importances cannot be computed, or None when they can."""
    trials = complete_trials(study)
    if len(trials) < 2:
        return f"Parameter importances need at least 2 complete trials ({len(trials)} so far)."
    if not varying_params(trials):
        return "Parameter importances need at least one parameter that varies across complete trials."
    return None


def intermediate_figures(study: optuna.Study) -> Titled:
    """The intermediate values every trial reported (the pruner's input), against the iteration."""
    fig = untitled(optuna.visualization.plot_intermediate_values(study))
    fig.update_layout(xaxis_title="iteration", yaxis_title=intermediate_label(study_metrics(study)[0].name))
    return [("Intermediate values", fig)]


def intermediate_label(metric: str) -> str:
    """What trials report during the reconstruction for an objective metric: a quick score of the
    current object against the truth, or the data loss (held-out and data-loss objectives)."""
    if metric in GROUND_TRUTH_METRICS:
        return f"{metric} (quick score)"
    return "data loss" if metric in ("heldout_loss", "data_loss") else metric


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
    fig.update_layout(yaxis_title=None, height=160 + 40 * frame["worker"].nunique(), margin={"t": 30})
    return fig
