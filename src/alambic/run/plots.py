"""The report's plots (matplotlib, headless): training and validation curves, accuracy against size and
latency, and the figure helpers the compress report shares."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from alambic.files import writing
from alambic.run.numbers import is_number


def _stages_in_order(records: list[dict[str, Any]], kind: str) -> dict[str, list[dict[str, Any]]]:
    """Records of one kind grouped by stage, stages in order of first appearance."""
    grouped: dict[str, list[dict[str, Any]]] = {}
    for record in records:
        if record.get("kind") == kind:
            grouped.setdefault(str(record.get("stage", "?")), []).append(record)
    return grouped


def new_figure(width: float, height: float) -> Any:
    """A matplotlib Figure on an Agg canvas; no pyplot, so no global state and no leaked figures."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(width, height), dpi=110, layout="constrained")
    FigureCanvasAgg(figure)
    return figure


def term_label(term: str, weight: Any) -> str:
    """A curve's legend: the term as it enters the total, ``0.1 x ce`` (the logged values are weighted)."""
    return f"{weight:g} x {term}" if is_number(weight) and weight != 1 else term


def plot_training_curves(
    records: list[dict[str, Any]], path: Path, weights: dict[str, dict[str, float]] | None = None
) -> bool:
    """One subplot per stage: every loss term against step (log y), test loss as markers.

    ``weights``: ``{stage: {term: weight}}``; a weighted term's legend says so (``0.1 x ce``), as its logged
    values are weighted. Short stages get integer step ticks."""
    from matplotlib.ticker import MaxNLocator

    weights = weights or {}
    train, evals = _stages_in_order(records, "train"), _stages_in_order(records, "eval")
    stages = list(dict.fromkeys([*train, *evals]))
    if not stages:
        return False
    # Terms in order of first appearance over all stages, so a term keeps its colour in every subplot.
    all_terms = list(
        dict.fromkeys(
            key
            for stage_records in train.values()
            for record in stage_records
            for key in record.get("losses", {})
        )
    )
    all_terms.sort(key=lambda term: term == "total")  # the sum last in every legend (the sort is stable)
    figure = new_figure(5.0 * len(stages), 3.8)
    axes = figure.subplots(1, len(stages), squeeze=False)[0]
    for axis, stage in zip(axes, stages, strict=True):
        stage_records = train.get(stage, [])
        terms = [
            term for term in all_terms if any(term in record.get("losses", {}) for record in stage_records)
        ]
        all_values = []
        for term in terms:
            points = [
                (record.get("step"), record["losses"][term])
                for record in stage_records
                if is_number(record.get("losses", {}).get(term)) and is_number(record.get("step"))
            ]
            if points:
                steps, values = zip(*points, strict=True)
                all_values += values
                # The sum is dashed: with one dominant term it lies on top of that term's line.
                style = {"linewidth": 2.0, "linestyle": "--"} if term == "total" else {"linewidth": 1.2}
                label = term_label(term, weights.get(stage, {}).get(term))
                axis.plot(steps, values, label=label, color=f"C{all_terms.index(term) % 10}", **style)
        test = [
            (r["step"], r["loss"])
            for r in evals.get(stage, [])
            if is_number(r.get("loss")) and is_number(r.get("step"))
        ]
        if test:
            steps, values = zip(*test, strict=True)
            all_values += values
            axis.plot(steps, values, "o--", color="black", markersize=4, linewidth=1, label="test ce")
        # Log scale where the losses span a decade or more; a linear one reads better below (2.23 to 2.30),
        # and a log axis cannot show zero or negative values.
        if all_values and min(all_values) > 0 and max(all_values) >= 10 * min(all_values):
            log_axis_labels(axis, "y", math.log10(max(all_values) / min(all_values)))
        axis.set_title(f"{stage}")
        axis.xaxis.set_major_locator(MaxNLocator(integer=True))
        axis.set_xlabel("step")
        axis.set_ylabel("loss")
        axis.grid(True, which="both", alpha=0.3)
        if terms or test:
            axis.legend(fontsize="small")
    with writing(path):
        figure.savefig(path)
    return True


def plot_accuracy_curves(records: list[dict[str, Any]], path: Path) -> bool:
    """Test accuracy (%) against epoch, one line per stage."""
    evals = _stages_in_order(records, "eval")
    figure = new_figure(6.4, 4.2)
    axis = figure.subplots()
    plotted = False
    for stage, stage_records in evals.items():
        points = [
            (r["epoch"], 100.0 * r["accuracy"])
            for r in stage_records
            if is_number(r.get("epoch")) and is_number(r.get("accuracy"))
        ]
        if points:
            epochs, accuracies = zip(*points, strict=True)
            axis.plot(epochs, accuracies, "o-", label=stage)
            plotted = True
    if not plotted:
        return False
    from matplotlib.ticker import MaxNLocator

    axis.xaxis.set_major_locator(MaxNLocator(integer=True))
    axis.set_xlabel("epoch")
    axis.set_ylabel("test accuracy (%)")
    axis.set_title("Test accuracy per epoch")
    axis.grid(True, alpha=0.3)
    axis.legend()
    with writing(path):
        figure.savefig(path)
    return True


def _compact_number(value: float, _position: object = None) -> str:
    """Tick label such as 50k, 1.2M, 0.5, 2.23 or 20: readable where 3x10^5 labels would collide."""
    for threshold, suffix in ((1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(value) >= threshold:
            return f"{value / threshold:.3g}{suffix}"
    return f"{value:.3g}"


MARKERS = "osD^vPX*"  # a shape per model as well as a colour: coinciding points stay visible


def log_axis_labels(axis: Any, which: str, decades: float) -> None:
    """A log scale on ``which`` axis ("x" or "y") with plain labels (0.05, 2.3, 20k, not 2.3x10^0): at 1-2-5
    steps within two decades, at powers of ten beyond, where 1-2-5 labels run into each other ("0.0050.01")."""
    from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

    getattr(axis, f"set_{which}scale")("log")
    subs = (1.0, 2.0, 5.0) if decades <= 2 else (1.0,)
    target = getattr(axis, f"{which}axis")
    target.set_major_locator(LogLocator(base=10, subs=subs, numticks=12))
    target.set_major_formatter(FuncFormatter(_compact_number))
    target.set_minor_formatter(NullFormatter())


def scatter(axis: Any, points: list[tuple[str, float, float]], xlabel: str, colors: dict[str, str]) -> None:
    """Scatter of (name, x, accuracy %) on a log x axis, one colour and marker per model name; the names go
    to a legend (see :func:`model_legend`), never next to the points, where close points' labels collide."""
    names = list(colors)
    for name, x, accuracy in points:
        marker = MARKERS[names.index(name) % len(MARKERS)]
        axis.scatter([x], [accuracy], s=60, color=colors[name], marker=marker, alpha=0.8, label=name)
    xs = [x for _, x, _ in points]
    log_axis_labels(axis, "x", math.log10(max(xs) / min(xs)) if xs else 0.0)
    axis.set_xlabel(xlabel)
    axis.set_ylabel("test accuracy (%)")
    axis.grid(True, which="both", alpha=0.3)
    axis.margins(x=0.15, y=0.15)


def model_legend(figure: Any, axes: Any) -> None:
    """One legend of the models under the figure's plots (each model once, whichever plot shows it)."""
    handles: dict[str, Any] = {}
    for axis in axes:
        for handle, label in zip(*axis.get_legend_handles_labels(), strict=True):
            handles.setdefault(label, handle)
    if handles:
        figure.legend(
            handles.values(),
            handles.keys(),
            loc="outside lower center",
            ncols=min(len(handles), 7),
            fontsize="small",
        )


def model_colors(models: list[tuple[str, dict[str, Any]]]) -> dict[str, str]:
    """Matplotlib cycle colour per model, by position, so a model has one colour in every plot."""
    return {name: f"C{index % 10}" for index, (name, _) in enumerate(models)}


def model_points(models: list[tuple[str, dict[str, Any]]], getter: Any) -> list[tuple[str, float, float]]:
    """(name, x, accuracy %) for models whose accuracy and ``getter(model)`` are positive numbers."""
    points = []
    for name, model in models:
        x = getter(model)
        if is_number(x) and x > 0 and is_number(model.get("accuracy")):
            points.append((name, float(x), 100.0 * model["accuracy"]))
    return points


def plot_accuracy_vs_size(models: list[tuple[str, dict[str, Any]]], path: Path) -> bool:
    """Two scatters: accuracy against parameters, and against size on disk."""
    by_parameters = model_points(models, lambda model: model.get("parameters"))
    by_size = model_points(models, lambda model: _scaled(model.get("size_bytes"), 1e-6))
    if not by_parameters and not by_size:
        return False
    figure = new_figure(10.0, 4.2)
    left, right = figure.subplots(1, 2)
    scatter(left, by_parameters, "parameters", model_colors(models))
    scatter(right, by_size, "size on disk (MB)", model_colors(models))
    model_legend(figure, (left, right))
    figure.suptitle("Accuracy against model size")
    with writing(path):
        figure.savefig(path)
    return True


def plot_accuracy_vs_latency(models: list[tuple[str, dict[str, Any]]], path: Path) -> bool:
    """Scatter of accuracy against latency at batch size 1."""
    points = model_points(models, lambda model: (model.get("latency_ms") or {}).get("1"))
    if not points:
        return False
    figure = new_figure(6.4, 4.2)
    axis = figure.subplots()
    scatter(axis, points, "latency at batch size 1 (ms)", model_colors(models))
    model_legend(figure, (axis,))
    axis.set_title("Accuracy against latency (batch 1)")
    with writing(path):
        figure.savefig(path)
    return True


def _scaled(value: Any, scale: float) -> float | None:
    """``value * scale`` for a number, else None."""
    return value * scale if is_number(value) else None


def make_plot(plot: Any, data: list[Any], path: Path) -> bool:
    """Draw one plot; when there is nothing to draw, remove a stale PNG from an earlier report."""
    if data and plot(data, path):
        return True
    path.unlink(missing_ok=True)
    return False
