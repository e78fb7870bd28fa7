"""Every chart the app draws, as pure functions: data in, plotly figure out (no Streamlit).

The pages only place these figures and the tour notebook draws the very same ones, so a chart
means the same thing wherever it is seen. Inputs are the plain data the core already returns:
`stats` summaries, `planner.Plan`, training points, method trajectories, stored runs.

Example::

    from explorer import figures, stats
    figures.histograms(stats.weight_stats(model), ["fc1", "fc2"], "Weights").show()
"""
from __future__ import annotations

import functools
import json
import math
from typing import Iterable, Mapping, Sequence

import pandas as pd
import plotly.express as px
import plotly.graph_objects as go
from plotly.subplots import make_subplots

from explorer.planner import Plan

PALETTE = ("#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#8c564b", "#e377c2", "#17becf", "#7f7f7f",
           "#bcbd22")
COLLAPSED, PROTECTED, PRUNED = "#d62728", "#7f7f7f", "#1f77b4"
_LEGEND_BELOW = dict(orientation="h", yanchor="top", y=-0.25, x=0)
_LEGEND_ABOVE = dict(orientation="h", yanchor="bottom", y=1.02, x=1, xanchor="right")
# A run's task metric (`pipeline.measure_run`'s ``task``) by its measure, as charts and tables name it.
METRIC_LABELS = {"accuracy": "accuracy", "perplexity": "perplexity", "top1": "fidelity (top-1 agreement)",
                 "cosine": "fidelity (cosine similarity)", "kl": "fidelity (KL divergence)"}
PERCENT_MEASURES = ("accuracy", "top1")
LOWER_IS_BETTER = ("perplexity", "fidelity (KL divergence)")
SCORED_ON = " · "  # 'perplexity · first 1,020 of 8,607 tokens': a label's metric, then what it was scored on


TOOLBAR_PX = 48  # plotly's toolbar (modebar), a strip at the top right of every chart: titles go below it
TITLE_LINE_PX = 22  # one line of a chart title
LEGEND_ABOVE_PX = 26  # a legend between the title and the plot
SUBPLOT_TITLE_LINE_PX = 16
TITLE_WRAP = 56  # characters of a title line: a longer title breaks after its last '; ', ' - ' or ', ' before


def wrapped_title(text: str, width: int = TITLE_WRAP) -> str:
    """``text`` broken into lines of at most about ``width`` characters (``<br>``: plotly never wraps a title)."""
    lines, rest = [], text
    while len(rest) > width:
        cut = max(rest.rfind(sep, 0, width) for sep in ("; ", " - ", ", ", " ("))
        if cut <= 0:
            cut = rest.rfind(" ", 0, width)
        if cut <= 0:
            break
        keep = rest[cut:cut + 2] in ("; ", ", ")  # the separator stays on the first line
        lines.append(rest[:cut + 1] if keep else rest[:cut])
        rest = rest[cut + 2:] if keep else rest[cut:].lstrip(" -")
    return "<br>".join([*lines, rest])


def title_below_toolbar(text: str | None, height: int, *, extra_px: int = 0) -> tuple[dict | None, int]:
    """The title layout and the top margin that keep a chart's title clear of the toolbar.

    The title is left-aligned and placed below the toolbar's strip (``y`` in the chart's own height: plotly's
    title padding did not move it in the browser), wrapped into lines; the top margin holds the strip, the
    title's lines and ``extra_px`` (a legend or subplot titles above the plot).
    """
    if not text:
        return None, TOOLBAR_PX + extra_px + 6
    text = wrapped_title(text)
    lines = text.count("<br>") + 1
    return (dict(text=text, x=0, xref="container", xanchor="left", y=1 - TOOLBAR_PX / height, yref="container",
                 yanchor="top", pad=dict(l=8)),
            TOOLBAR_PX + lines * TITLE_LINE_PX + 12 + extra_px)


def _clear_of_toolbar(build):
    """Decorator: the figure ``build`` returns gets its title (and a legend above the plot) below the toolbar."""
    @functools.wraps(build)
    def wrapper(*args, **kwargs) -> go.Figure:
        figure = build(*args, **kwargs)
        layout = figure.layout
        extra = LEGEND_ABOVE_PX if (layout.showlegend is not False and layout.legend.y is not None
                                    and layout.legend.y > 1 and len(figure.data) > 1) else 0
        subplot_lines = [a.text.count("<br>") + 1 for a in layout.annotations
                         if a.yref == "paper" and a.yanchor == "bottom" and a.y is not None and a.y >= 0.99]
        extra += SUBPLOT_TITLE_LINE_PX * max(subplot_lines, default=0)
        title, top = title_below_toolbar(layout.title.text, layout.height or 450, extra_px=extra)
        figure.update_layout(margin_t=top)
        if title is not None:
            figure.update_layout(title=title)
        return figure
    return wrapper


def _outliers_note(summary: dict) -> str:
    """'3 beyond the axis (to 6.1)' when the histogram's range left values out (`stats.robust_range`)."""
    clipped = summary.get("clipped") or {}
    count = clipped.get("below", 0) + clipped.get("above", 0)
    if not count:
        return ""
    reach = [f"{summary['min']:.2g}"] if clipped.get("below") else []
    reach += [f"{summary['max']:.2g}"] if clipped.get("above") else []
    return f"<br>{count:,} off axis (to {' and '.join(reach)})"


@_clear_of_toolbar
def histograms(summaries: Mapping[str, dict], names: Sequence[str], title: str, *,
               thresholds: Mapping[str, float | None] | None = None, log_count: bool = False,
               columns: int = 3) -> go.Figure:
    """One histogram per layer from `stats` summaries; ``thresholds`` draws the ±|w| cut of a plan."""
    rows = max(1, math.ceil(len(names) / columns))
    shared = _common_prefix(names)  # 'hf.encoder.layer.0.' said once in the title, not cut in every subplot's
    titles = [f"{n[len(shared):]}<br>{summaries[n]['kind']} {'x'.join(map(str, summaries[n]['shape']))}"
              f"{_outliers_note(summaries[n])}" for n in names]  # short lines: three columns in a narrow window
    gap_px = 30 + SUBPLOT_TITLE_LINE_PX * max(title.count("<br>") + 1 for title in titles)  # ticks, then titles
    figure = make_subplots(rows=rows, cols=columns, horizontal_spacing=0.06,
                           vertical_spacing=min(0.3 / max(1, rows - 1), gap_px / (270 * rows)) if rows > 1 else 0.1,
                           subplot_titles=titles)
    figure.update_annotations(font_size=11)
    if shared:
        title = f"{title} - {shared.rstrip('.')}"
    for i, name in enumerate(names):
        edges, counts = summaries[name]["hist"]["edges"], summaries[name]["hist"]["counts"]
        centers = [(a + b) / 2 for a, b in zip(edges[:-1], edges[1:])]
        row, col = i // columns + 1, i % columns + 1
        figure.add_trace(go.Bar(x=centers, y=counts, width=[b - a for a, b in zip(edges[:-1], edges[1:])],
                                marker_color=PRUNED, showlegend=False, name=name,
                                hovertemplate="%{x:.4f}: %{y}<extra>" + name + "</extra>"), row=row, col=col)
        cut = (thresholds or {}).get(name)
        if cut is not None:
            for x in (-cut, cut):
                figure.add_vline(x=x, line_dash="dash", line_color=COLLAPSED, row=row, col=col)
        if log_count:  # ticks at 1, 10, 100 ... (plotly's default adds 2 and 5 between them)
            figure.update_yaxes(type="log", dtick=1, row=row, col=col)
    figure.update_layout(title=title, height=270 * rows + 90, margin=dict(b=30), bargap=0)
    return figure


@_clear_of_toolbar
def layer_summary(weights: Mapping[str, dict], gradients: Mapping[str, dict] | None = None) -> go.Figure:
    """Mean |w| and std of w per layer as bars, mean |g| on a second axis when gradients are given."""
    layers = list(weights)
    figure = make_subplots(specs=[[{"secondary_y": True}]])
    figure.add_trace(go.Bar(x=layers, y=[weights[n]["mean_abs"] for n in layers], name="mean |w|"))
    figure.add_trace(go.Bar(x=layers, y=[weights[n]["std"] for n in layers], name="std of w"))
    if gradients:
        figure.add_trace(go.Scatter(x=layers, y=[gradients[n]["mean_abs"] if n in gradients else None for n in layers],
                                    name="mean |g| (right axis)", mode="lines+markers"), secondary_y=True)
        figure.update_yaxes(secondary_y=True, tickmode="auto", exponentformat="power", showexponent="all",
                            tickformat=".1~e", showgrid=False, title_text="mean |g|")
    figure.update_layout(title="Per-layer summary", barmode="group", height=360 + (60 if len(layers) > 12 else 0),
                         margin=dict(t=50, b=30), legend=_LEGEND_ABOVE)
    figure.update_xaxes(**layer_ticks(layers))
    return figure


def layer_ticks(names: Sequence[str]) -> dict:
    """Category-axis settings that keep many long layer names readable: the prefix all share left out
    ('hf.encoder.layer.' -> '0.attention.self.query'), slanted when there are many, margins made to fit."""
    shared = _common_prefix(names)
    ticks = dict(tickmode="array", tickvals=list(names), ticktext=[n[len(shared):] or n for n in names],
                 automargin=True)
    if len(names) > 12:
        ticks["tickangle"] = -60
    return ticks


def _common_prefix(names: Sequence[str]) -> str:
    """The dotted prefix shared by every name (whole parts only), or '' for fewer than two names."""
    if len(names) < 2:
        return ""
    parts = [name.split(".") for name in names]
    shared = []
    for column in zip(*parts):
        if len(set(column)) != 1:
            break
        shared.append(column[0])
    shared = shared[:min(len(p) for p in parts) - 1]  # never a whole name
    return ".".join(shared) + "." if shared else ""


@_clear_of_toolbar
def attribution(values: Sequence[float], layer: str) -> go.Figure:
    """Mean |conductance| of every output channel / neuron of one layer."""
    figure = go.Figure(go.Bar(x=list(range(len(values))), y=list(values), marker_color=PALETTE[2]))
    figure.update_layout(title=f"Mean |conductance| per output unit of {layer}", xaxis_title="channel / neuron",
                         yaxis_title="mean |conductance|", height=320, margin=dict(t=50, b=40))
    return figure


MANY_LAYERS = 16  # above this many layers the plan chart lies on its side: one readable name a row, at any width


def plan_sparsity_spec(plan: Plan, *, title: str = "Per-layer sparsity") -> dict:
    """`plan_sparsity` as a plain plotly JSON spec (``{"data": [...], "layout": {...}}``), built without
    plotly's validation: the Prune page builds one per slider step (101 of them) whenever a setting changes.

    Up to `MANY_LAYERS` layers the bars stand (layers along x); a transformer's 37 lie on their side, one
    row a layer with its name level and whole (slanted names overlap in a narrow window)."""
    layers = plan.layers
    requested = plan.sparsity_requested
    names, fractions = [lp.name for lp in layers], [lp.sparsity for lp in layers]
    lying = len(layers) > MANY_LAYERS
    bar = dict(
        type="bar", x=fractions if lying else names, y=names if lying else fractions,
        marker=dict(color=[COLLAPSED if lp.collapsed else (PROTECTED if lp.source == "protected" else PRUNED)
                           for lp in layers]),
        customdata=[[lp.name, lp.kept, lp.total, lp.source] for lp in layers],
        text=[f"{lp.sparsity:.0%}" for lp in layers],
        hovertemplate="%{customdata[0]}<br>sparsity %{" + ("x" if lying else "y") + ":.1%}<br>kept %{customdata[1]} "
                      "of %{customdata[2]}<br>%{customdata[3]}<extra></extra>")
    value_axis = dict(range=[0, 1.05], tickformat=".0%", title=dict(text="fraction removed"))
    layer_axis = dict(title=dict(text="layer" if not lying else ""), **layer_ticks(names))
    if lying:
        bar["orientation"] = "h"
        layer_axis.pop("tickangle", None)
        layer_axis["autorange"] = "reversed"  # the first layer on top, as in the model
    extra = 18 if lying else 0  # lying: "requested" above the plot
    top = title_below_toolbar(title, 1000, extra_px=extra)[1]
    height = top + 60 + 17 * len(layers) if lying else 380 + (80 if len(layers) > 12 else 0)
    title_layout = title_below_toolbar(title, height, extra_px=extra)[0]
    layout = dict(
        title=title_layout, xaxis=value_axis if lying else layer_axis, yaxis=layer_axis if lying else value_axis,
        height=height, margin=dict(t=top, b=40),
        shapes=[dict(type="line", xref="x", x0=requested, x1=requested, yref="y domain", y0=0, y1=1,
                     line=dict(dash="dash")) if lying else
                dict(type="line", xref="x domain", x0=0, x1=1, yref="y", y0=requested, y1=requested,
                     line=dict(dash="dash"))],
        annotations=[dict(text=f"requested {requested:.0%}", xref="x", x=requested, yref="y domain", y=1,
                          xanchor="left", yanchor="bottom", showarrow=False) if lying else
                     dict(text=f"requested {requested:.0%}", xref="x domain", x=1, yref="y", y=requested,
                          xanchor="right", yanchor="bottom", showarrow=False)])
    return dict(data=[bar], layout=layout)


def plan_sparsity(plan: Plan, *, title: str = "Per-layer sparsity") -> go.Figure:
    """Fraction removed per layer of a plan: red = emptied (collapse), grey = protected; dashed = requested."""
    return go.Figure(plan_sparsity_spec(plan, title=title))


@_clear_of_toolbar
def training_curve(step_losses: Sequence[tuple[int, float]], val_metric: Sequence[tuple[int, float]], *,
                   metric: str = "accuracy", percent: bool = True) -> go.Figure:
    """Training loss per step and the validation ``metric`` per epoch, against the optimiser step.

    ``percent``: the metric is a fraction (accuracy, top-1 agreement), drawn in % on a 0-1 axis;
    otherwise (perplexity, cosine) on its own scale.
    """
    figure = make_subplots(specs=[[{"secondary_y": True}]])
    figure.add_trace(go.Scatter(x=[s for s, _ in step_losses], y=[v for _, v in step_losses],
                                name="training loss (step)", line=dict(width=1)), secondary_y=False)
    figure.add_trace(go.Scatter(x=[s for s, _ in val_metric], y=[v for _, v in val_metric],
                                name=f"validation {metric} (epoch)", mode="lines+markers"), secondary_y=True)
    figure.update_layout(height=340, margin=dict(t=30, b=40), legend=dict(orientation="h", y=1.12),
                         xaxis_title="step")
    figure.update_yaxes(title_text="loss", secondary_y=False)
    figure.update_yaxes(title_text=metric, tickformat=".0%" if percent else "", range=[0, 1.02] if percent else None,
                        showgrid=False, secondary_y=True,  # an overlaying axis syncs its ticks to the loss axis:
                        **(dict(tickmode="linear", tick0=0, dtick=0.2) if percent else dict(tickmode="auto")))
    return figure


@_clear_of_toolbar
def trajectories(points: Mapping[str, Sequence[dict]]) -> go.Figure:
    """Methods over time: the validation metric and sparsity against epoch, one colour per method or run.

    The metric is accuracy, or the task's own (perplexity, fidelity) for points that carry ``val_metric``
    without an accuracy (a transformer trained without labels); perplexity gets a log axis of its own.
    """
    metric = next((p.get("metric") for trajectory in points.values() for p in trajectory
                   if p.get("val_accuracy") is None and p.get("val_metric") is not None), None) or "accuracy"
    key = "val_accuracy" if metric == "accuracy" else "val_metric"
    figure = make_subplots(rows=1, cols=2, subplot_titles=(f"validation {METRIC_LABELS.get(metric, metric)}",
                                                            "sparsity"))
    for index, (name, trajectory) in enumerate(points.items()):
        color = PALETTE[index % len(PALETTE)]
        scored = [p for p in trajectory if p.get(key) is not None]
        figure.add_trace(go.Scatter(x=[p["epoch"] for p in scored], y=[p[key] for p in scored],
                                    name=name, legendgroup=name, mode="lines+markers", line=dict(color=color)),
                         row=1, col=1)
        figure.add_trace(go.Scatter(x=[p["epoch"] for p in trajectory], y=[p["sparsity"] for p in trajectory],
                                    name=name, legendgroup=name, showlegend=False, mode="lines+markers",
                                    line=dict(color=color, shape="hv")), row=1, col=2)
    figure.update_yaxes(tickformat=".0%", range=[0, 1.02], row=1, col=2)
    if metric in PERCENT_MEASURES:
        figure.update_yaxes(tickformat=".0%", range=[0, 1.02], row=1, col=1)
    elif metric == "perplexity":
        figure.update_yaxes(type="log", row=1, col=1)
    figure.update_xaxes(title_text="epoch of the method's training")
    figure.update_layout(height=380, margin=dict(t=40, b=40), legend=dict(orientation="h", yanchor="top", y=-0.3, x=0))
    return figure


def runs_frame(runs: Iterable) -> pd.DataFrame:
    """One row per stored run (`store.Run`): what was chosen and what came out, ready to tabulate and plot.

    ``metric`` names the run's task metric (accuracy for runs stored before tasks existed) and
    ``metric value`` / ``base value`` hold it for the pruned copy and its dense model.
    ``speed-up 2:4 kernels``: a 2:4 run timed with semi-structured sparse kernels next to dense fp16 (GPU
    of compute capability 8.0+ only; None elsewhere). ``measured 95 % low`` / ``high`` bound the measured
    speed-up and ``noisy`` marks an interval wider than +-5 % (None for runs stored before intervals).
    ``trained epochs`` counts a fine-tune's epochs or a method's own training (`_trained_epochs`), and
    ``tuned`` says which: "fine-tuned", "trained by its method" or "pruned only".
    """
    rows = []
    for run in runs:
        m, finetune = run.metrics, run.settings.get("finetune") or {}
        task = m.get("task") or {"measure": "accuracy", "base": m.get("base_accuracy"), "pruned": m.get("accuracy")}
        over_time = (run.recipe.get("method") or {}).get("name", "one_shot")
        trained = _trained_epochs(run, finetune)
        rows.append({
            "id": run.id, "name": run.name, "model": f"{run.model_name} on {run.dataset}",
            "method": f"{run.structure} / {run.criterion} / {run.scope}"
                      + ("" if over_time == "one_shot" else f" / {over_time}"),
            "structure": run.structure, "criterion": run.criterion, "scope": run.scope, "sparsity": run.sparsity,
            "fine-tune epochs": finetune.get("epochs_done", 0),
            "trained epochs": trained,
            "metric": _metric_label(run, task),
            "metric value": task.get("pruned"), "base value": task.get("base"), "accuracy": m.get("accuracy"),
            "Δ accuracy (pts)": 100 * m["delta_accuracy"] if m.get("delta_accuracy") is not None else None,
            "params": m.get("params_total"), "non-zero params": m.get("params_nonzero"),
            "FLOPs": m.get("flops_effective"), "compressed size (B)": m.get("size_compressed_bytes"),
            "latency (ms)": m.get("latency_ms"), "base latency (ms)": m.get("baseline_latency_ms"),
            "speed-up measured": m.get("speedup_measured"),
            "measured 95 % low": (m.get("speedup_interval") or [None, None])[0],
            "measured 95 % high": (m.get("speedup_interval") or [None, None])[1],
            "noisy": m.get("speedup_noisy"), "speed-up FLOPs": m.get("speedup_flops"),
            "speed-up 2:4 kernels": (m.get("semi_structured") or {}).get("speedup"),
            "device": f"{m.get('device')} (batch {m.get('batch')}, {m.get('threads')} threads)",
            "tuned": ("fine-tuned" if finetune.get("epochs_done") else "trained by its method" if trained
                      else "pruned only"),
        })
    return pd.DataFrame(rows)


def _metric_label(run, task: dict) -> str:
    """The task metric's name; a perplexity also says which tokens it read, so that runs scored on different
    tokens (a recipe's ``eval_tokens``, or runs stored before the 1,024-token default) never share an axis."""
    label = METRIC_LABELS.get(task.get("measure"), task.get("name", "accuracy"))
    if task.get("measure") != "perplexity":
        return label
    tokens = task.get("tokens")
    if tokens:
        scored, total = tokens["scored"], tokens["total"]
        return f"{label}{SCORED_ON}{'all' if scored >= total else f'first {scored:,} of'} {total:,} tokens"
    budget = ((run.recipe or {}).get("measure") or {}).get("eval_tokens")
    return f"{label}{SCORED_ON}" + (f"first <= {budget:,} tokens" if budget else "all tokens")


def metric_kind(label: str) -> str:
    """The metric a `runs_frame` label names, without the tokens it was scored on ('perplexity')."""
    return label.split(SCORED_ON)[0]


def _trained_epochs(run, finetune: dict) -> int:
    """Epochs of training the run's model had after pruning started: a fine-tune's, or a method's own.

    A run of the Methods lab or `run --recipe` trains inside its budget (one-shot's fine-tune included):
    its trajectory's last epoch. A Prune page run has no trajectory and no fine-tune: 0.
    """
    if finetune.get("epochs_done"):
        return int(finetune["epochs_done"])
    return int(max((point.get("epoch") or 0 for point in run.trajectory or []), default=0))


def sweep_frame(runs: Iterable) -> tuple[pd.DataFrame, list[str]]:
    """`runs_frame` of a sweep's runs plus one column per grid field (its coordinates), and those fields.

    A coordinate that is not a number or text (a whole ``model`` part, say) is shown as its JSON.
    """
    runs = list(runs)
    points = [(run.settings.get("sweep") or {}).get("point") or {} for run in runs]
    fields = list(dict.fromkeys(path for point in points for path in point))
    table = runs_frame(runs)
    for path in fields:
        table[path] = [value if isinstance(value, (int, float, str)) or value is None else json.dumps(value)
                       for value in (point.get(path) for point in points)]
    return table, fields


@_clear_of_toolbar
def sweep_chart(table: pd.DataFrame, x: str, color: str | None, metric: str = "accuracy") -> go.Figure:
    """A sweep's task metric along one grid field, one line per value of another (``color``, or None)."""
    column = "accuracy" if metric == "accuracy" else "metric value"
    shown = table[table["metric"] == metric].copy() if "metric" in table else table.copy()
    if color is not None:
        shown[color] = shown[color].astype(str)
    figure = px.line(shown.sort_values(x), x=x, y=column, color=color, markers=True, hover_name="name",
                     title=f"{metric.capitalize()} by {x}" + (f" and {color}" if color else ""))
    figure.update_layout(yaxis=_metric_axis(metric), height=460, legend=_LEGEND_BELOW)
    return figure


def _metric_axis(metric: str) -> dict:
    """The y axis of a task metric: percent for accuracy and agreement; lower-is-better said in the title."""
    title = metric + (" (lower is better)" if metric_kind(metric) in LOWER_IS_BETTER else "")
    percent = metric in (METRIC_LABELS[m] for m in PERCENT_MEASURES)
    # ".1~%": 99.5% stays apart from 99% on a narrow range (".0%" read "100% 99% 99% 99%"), 20% stays 20%
    return dict(title=dict(text=title), tickformat=".1~%" if percent else None)


@_clear_of_toolbar
def accuracy_vs_sparsity(table: pd.DataFrame, metric: str = "accuracy") -> go.Figure:
    """One line per method (structure / criterion / scope); fine-tuned runs as diamonds, runs a method
    trained within its budget as squares; x within 0-100 %.

    ``metric`` plots another task metric (a ``metric`` of `runs_frame`, e.g. "perplexity"): only the
    runs judged by it, since values of different metrics share no axis.
    """
    column = "accuracy" if metric == "accuracy" else "metric value"
    shown = table[table["metric"] == metric] if "metric" in table else table
    figure = px.line(shown.sort_values("sparsity"), x="sparsity", y=column, color="method", symbol="tuned",
                     symbol_map={"fine-tuned": "diamond", "pruned only": "circle", "trained by its method": "square"},
                     markers=True, hover_name="name",
                     title=f"{metric.capitalize()} vs sparsity")
    figure.update_layout(xaxis_tickformat=".0%", yaxis=_metric_axis(metric), height=460, legend_title_text="",
                         xaxis_range=[-0.02, 1.02], legend=_LEGEND_BELOW)
    return figure


@_clear_of_toolbar
def speedup_promise(table: pd.DataFrame) -> go.Figure:
    """Measured against FLOPs speed-up, each with its 95 % interval as an error bar, and the y = x line
    where the promise is kept. Noisy runs are drawn open, so a wide bar is not read as a finding."""
    timed = table.dropna(subset=["speed-up measured"]).copy()
    low = timed.get("measured 95 % low", pd.Series(index=timed.index, dtype=float)).astype(float)
    high = timed.get("measured 95 % high", pd.Series(index=timed.index, dtype=float)).astype(float)
    timed["error up"] = (high - timed["speed-up measured"]).clip(lower=0).fillna(0.0)
    timed["error down"] = (timed["speed-up measured"] - low).clip(lower=0).fillna(0.0)
    timed["timing"] = timed.get("noisy", pd.Series(index=timed.index, dtype=object)).map(
        {True: "noisy", False: "tight"}).fillna("no interval")
    figure = px.scatter(timed, x="speed-up FLOPs", y="speed-up measured", color="structure", hover_name="name",
                        symbol="timing", symbol_map={"tight": "circle", "noisy": "circle-open",
                                                     "no interval": "diamond"},
                        error_y="error up", error_y_minus="error down",
                        hover_data={"measured 95 % low": ":.2f", "measured 95 % high": ":.2f", "tuned": True},
                        title="Speed-up: measured vs FLOPs")  # short: a half-width chart in a narrow window
    top = max([1.0, *timed["speed-up FLOPs"].tolist(), *(timed["speed-up measured"] + timed["error up"]).tolist()]) * 1.05
    figure.add_trace(go.Scatter(x=[0, top], y=[0, top], mode="lines", name="y = x (promise kept)",
                                line=dict(dash="dash", color="grey")))
    figure.update_layout(height=460, xaxis_range=[0, top], yaxis_range=[0, top], legend_title_text="",
                         legend=_LEGEND_BELOW)
    return figure


def unstructured_speedup_summary(table: pd.DataFrame) -> str:
    """What the shown unstructured runs measured, in one sentence computed from the table.

    The page's claim is that zeros in dense tensors do not speed anything up; this says how many of
    the runs' 95 % intervals contain 1x, how many were noisy, and the range of their medians, so the
    words beside the chart are the chart's own.
    """
    if table.empty or "structure" not in table:
        return ""
    runs = table[(table["structure"] == "unstructured") & table["speed-up measured"].notna()]
    if runs.empty:
        return ""
    low = runs.get("measured 95 % low", pd.Series(index=runs.index, dtype=float)).astype(float)
    high = runs.get("measured 95 % high", pd.Series(index=runs.index, dtype=float)).astype(float)
    with_interval = low.notna() & high.notna()
    contains_one = int(((low <= 1.0) & (high >= 1.0) & with_interval).sum())
    noisy = int(runs.get("noisy", pd.Series(index=runs.index, dtype=object)).fillna(False).astype(bool).sum())
    medians = runs["speed-up measured"].astype(float)
    text = (f"Unstructured runs shown: medians {medians.min():.2f}-{medians.max():.2f}x measured; "
            f"{contains_one} of {int(with_interval.sum())} with an interval have 1x inside it")
    if noisy:
        text += f"; {noisy} noisy (timed on a busy machine: read their intervals, not the medians)"
    if int(with_interval.sum()) < len(runs):
        text += f"; {len(runs) - int(with_interval.sum())} stored before intervals were measured"
    return text + ". Zeros in a dense tensor leave a dense kernel's work unchanged."


def pareto_front(table: pd.DataFrame) -> pd.DataFrame:
    """The runs no other run beats on both latency (lower) and accuracy (higher), fastest first."""
    timed = table.dropna(subset=["latency (ms)", "accuracy"]).sort_values(["latency (ms)", "accuracy"],
                                                                         ascending=[True, False])
    front, best = [], -math.inf
    for _, row in timed.iterrows():  # fastest first: on the front if it beats every faster run's accuracy
        if row["accuracy"] > best:
            front.append(row)
            best = row["accuracy"]
    return pd.DataFrame(front)


@_clear_of_toolbar
def accuracy_vs_latency(table: pd.DataFrame, metric: str = "accuracy") -> go.Figure:
    """Accuracy (or another task ``metric``, its runs only) against measured latency, with the Pareto front."""
    column = "accuracy" if metric == "accuracy" else "metric value"
    shown = table[table["metric"] == metric] if "metric" in table else table
    timed = shown.dropna(subset=["latency (ms)", column])
    figure = px.scatter(timed, x="latency (ms)", y=column, color="method", hover_name="name",
                        title=f"{metric.capitalize()} vs measured latency")
    score = timed[column] if metric not in LOWER_IS_BETTER else -timed[column]  # the front wants higher = better
    front = timed.loc[pareto_front(timed.assign(accuracy=score)).index] if not timed.empty else timed
    if not front.empty:
        figure.add_trace(go.Scatter(x=front["latency (ms)"], y=front[column], mode="lines",
                                    line=dict(shape="hv", color="black", dash="dot"), name="Pareto front"))
    figure.update_layout(yaxis=_metric_axis(metric), height=460, legend_title_text="", legend=_LEGEND_BELOW)
    return figure


@_clear_of_toolbar
def cost_side_by_side(rows: Sequence[Mapping]) -> go.Figure:
    """What a pruning buys, per structure: FLOPs speed-up, measured speed-up and file-size ratio side by side.

    ``rows`` are ``{label, speedup_flops, speedup_measured, compression_ratio}`` (as in `measure.Metrics`),
    with ``speedup_interval`` / ``speedup_noisy`` where measured: the measured bar carries its 95 %
    interval as an error bar, and a noisy one is drawn hatched and labelled "noisy".
    The lesson: zeros shrink the compressed file, not the latency; removed channels shrink latency.
    """
    labels = [row["label"] for row in rows]
    figure = go.Figure()
    for key, name, color in (("speedup_flops", "FLOPs speed-up (theory)", PALETTE[0]),
                             ("speedup_measured", "measured speed-up (95 % interval)", PALETTE[1]),
                             ("compression_ratio", "compressed file, x smaller", PALETTE[2])):
        values = [row.get(key) for row in rows]
        text = [f"{v:.2f}x" if v is not None else "-" for v in values]
        extra = {}
        if key == "speedup_measured":
            error_up, error_down = _interval_errors(rows)
            noisy = [bool(row.get("speedup_noisy")) for row in rows]
            text = ["noisy" if flag and v is not None else t for v, t, flag in zip(values, text, noisy)]
            extra = dict(error_y=dict(type="data", symmetric=False, array=error_up, arrayminus=error_down,
                                      color="black", thickness=1.5, width=6),
                         marker_pattern_shape=["/" if flag else "" for flag in noisy])
        figure.add_trace(go.Bar(x=labels, y=values, name=name, marker_color=color, text=text, **extra))
    figure.add_hline(y=1.0, line_dash="dot", line_color="grey")
    figure.update_layout(barmode="group", title="What pruning buys: theory, measurement and file size",
                         yaxis_title="x better than dense", height=380, legend=_LEGEND_BELOW)
    return figure


def _interval_errors(rows: Sequence[Mapping]) -> tuple[list, list]:
    """Error-bar lengths above and below each row's measured speed-up, from its 95 % interval (0 if none)."""
    up, down = [], []
    for row in rows:
        value, interval = row.get("speedup_measured"), row.get("speedup_interval")
        if value is None or not interval:
            up.append(0.0)
            down.append(0.0)
        else:
            up.append(max(0.0, interval[1] - value))
            down.append(max(0.0, value - interval[0]))
    return up, down


@_clear_of_toolbar
def norm_distributions(before: Mapping[str, "torch.Tensor"], after: Mapping[str, "torch.Tensor"], what: str,
                       *, bins: int = 60) -> go.Figure:
    """Overlaid histograms of the penalised norms (all layers together) before and after training.

    A sparsity penalty shows as mass moving to zero: the units the data loss does not defend.
    """
    figure = go.Figure()
    for label, values, color in (("before", before, PALETTE[0]), ("after", after, PALETTE[1])):
        flat = [float(v) for tensor in values.values() for v in tensor.reshape(-1).tolist()]
        figure.add_trace(go.Histogram(x=flat, name=label, nbinsx=bins, opacity=0.6, marker_color=color))
    figure.update_layout(barmode="overlay", title=f"{what} before and after", xaxis_title=what,
                         yaxis_title="count", yaxis_type="log", height=340, legend=_LEGEND_BELOW)
    return figure


def _scan_rows(scan: Mapping) -> list[str]:
    """A scan's units as the charts list them: robust -> fragile (``order``), then units with an unfinished row."""
    ordered = list(scan.get("order") or [])
    return ordered + [unit for unit in scan["units"] if unit not in ordered]


def drop_format(measure: str | None) -> tuple[float, str, str]:
    """How a drop of ``measure`` is written on the Sensitivity page, charts and tables alike: ``(scale, d3
    format, suffix)``. Accuracy and top-1 in points (0.037 -> '3.7 pts', as the metric cards say), perplexity
    to two decimals, the other fidelities to three."""
    if measure in PERCENT_MEASURES:
        return 100.0, ".1f", " pts"
    return (1.0, ".2f", "") if measure == "perplexity" else (1.0, ".3f", "")


def _drop_label(scan: Mapping) -> str:
    label = METRIC_LABELS.get(scan.get("measure"), scan.get("metric", "metric"))
    return f"drop in {label}" + (" (points)" if scan.get("measure") in PERCENT_MEASURES else "")


@_clear_of_toolbar
def sensitivity_heatmap(scan: Mapping) -> go.Figure:
    """Units (rows, robust at the top) x sparsity (columns): the drop of the task metric when only that unit is pruned.

    ``scan`` is `sensitivity.Scan.to_dict()`. A larger drop is always worse (perplexity and KL count up);
    red is worse than dense, blue better. A cell the scan did not reach (cancelled) or could not evaluate
    (a collapsed unit under physical removal) is blank. The hover adds the parameters and FLOPs the cell saves.
    """
    rows, sparsities = _scan_rows(scan), list(scan["sparsities"])
    cells = {(cell["unit"], cell["sparsity"]): cell for cell in scan["cells"]}
    scale, number, suffix = drop_format(scan.get("measure"))
    z, hover = [], []
    for unit in rows:
        drops = [(cells.get((unit, s)) or {}).get("drop") for s in sparsities]
        z.append([None if drop is None else scale * drop for drop in drops])
        hover.append([_cell_hover(cells.get((unit, s))) for s in sparsities])
    figure = go.Figure(go.Heatmap(
        z=z, x=[f"{s:.0%}" for s in sparsities], y=rows, customdata=hover, colorscale="RdBu_r", zmid=0,
        colorbar=dict(title=dict(text="drop"), ticksuffix=suffix), xgap=1, ygap=1,
        hovertemplate="%{y} at %{x}: drop %{z:" + number + "}" + suffix + "<br>%{customdata}<extra></extra>"))
    figure.update_layout(title=f"{_drop_label(scan).capitalize()} when only one unit is pruned "
                               f"({scan['structure']}, {scan['criterion']}); robust at the top",
                         xaxis=dict(title="sparsity of that unit", type="category"),
                         yaxis=dict(autorange="reversed", type="category"),
                         height=max(300, 60 + 26 * len(rows)), margin=dict(t=60, b=40))
    return figure


def _cell_hover(cell: Mapping | None) -> str:
    if cell is None:
        return "not scanned"
    parts = [f"{cell['pruned']:,} of {cell['total']:,} pruned", f"saves {cell['params_saved']:,} params, "
             f"{cell['flops_saved']:,} FLOPs"]
    if cell.get("latency_ms") is not None:
        parts.append(f"latency {cell['latency_ms']:.3g} ms")
    if cell.get("collapsed"):
        parts.append("the unit is emptied" + ("" if cell.get("value") is not None else ": no value"))
    return "<br>".join(parts)


@_clear_of_toolbar
def sensitivity_curves(scan: Mapping, units: Sequence[str] | None = None, *, max_drop: float | None = None
                       ) -> go.Figure:
    """One drop-vs-sparsity curve per unit (all, or ``units``), from (0, 0): the dense model drops nothing.

    ``max_drop`` draws the largest acceptable drop as a dashed line: where a curve crosses it is how far that
    unit alone may go. Points without a value (see `sensitivity_heatmap`) are left out.
    """
    chosen = [unit for unit in _scan_rows(scan) if units is None or unit in units]
    scale, number, suffix = drop_format(scan.get("measure"))
    figure = go.Figure()
    for index, unit in enumerate(chosen):
        row = sorted((cell for cell in scan["cells"] if cell["unit"] == unit and cell["drop"] is not None),
                     key=lambda cell: cell["sparsity"])
        figure.add_trace(go.Scatter(x=[0.0] + [cell["sparsity"] for cell in row],
                                    y=[0.0] + [scale * cell["drop"] for cell in row], name=unit, mode="lines+markers",
                                    line=dict(color=PALETTE[index % len(PALETTE)]),
                                    hovertemplate="%{x:.0%}: drop %{y:" + number + "}" + suffix))
    if max_drop is not None:
        figure.add_hline(y=scale * max_drop, line_dash="dash", line_color="grey",
                         annotation_text="largest acceptable drop", annotation_position="top left")
    figure.update_layout(title=f"{_drop_label(scan).capitalize()} against the unit's own sparsity",
                         xaxis=dict(title="sparsity of that unit", tickformat=".0%", range=[-0.02, 1.02]),
                         yaxis=dict(title=_drop_label(scan), ticksuffix=suffix), height=420,
                         legend=_LEGEND_BELOW, margin=dict(t=60, b=40))
    return figure


@_clear_of_toolbar
def runtime_speedups(result: Mapping) -> go.Figure:
    """Measured speed-up of pruned over dense per runtime and batch (`deploy.runtimes.compare_runtimes`).

    Each bar carries its 95 % interval; a noisy one is hatched and labelled "noisy"; its text is
    measured / FLOPs. The dashed line is the FLOPs speed-up: what every runtime would reach if it
    delivered every FLOP removed. A runtime that failed has no bar.
    """
    rows = [row for row in result["rows"] if not row.get("error")]
    batches = sorted({row["batch"] for row in rows})
    figure = go.Figure()
    for index, batch in enumerate(batches):
        chosen = [row for row in rows if row["batch"] == batch]
        shaped = [{"speedup_measured": row["speedup"], "speedup_interval": row["speedup_interval"]} for row in chosen]
        error_up, error_down = _interval_errors(shaped)
        figure.add_trace(go.Bar(
            x=[row["runtime"] for row in chosen], y=[row["speedup"] for row in chosen], name=f"batch {batch}",
            marker_color=PALETTE[index % len(PALETTE)],
            marker_pattern_shape=["/" if row["noisy"] else "" for row in chosen],
            text=["noisy" if row["noisy"] else f"{row['speedup']:.2f}x ({row['measured_over_flops']:.2f} of FLOPs)"
                  for row in chosen],
            error_y=dict(type="data", symmetric=False, array=error_up, arrayminus=error_down, color="black",
                         thickness=1.5, width=6)))
    figure.add_hline(y=result["speedup_flops"], line_dash="dash", line_color="grey",
                     annotation_text=f"FLOPs speed-up {result['speedup_flops']:.2f}x")
    figure.add_hline(y=1.0, line_dash="dot", line_color="grey")
    figure.update_layout(barmode="group", title="Measured speed-up per runtime (95 % interval)",
                         yaxis_title="dense time / pruned time", height=380, legend=_LEGEND_BELOW)
    return figure
