"""A figure and its headline numbers that update in place when a fragment reruns.

``st.plotly_chart`` folds the figure into the chart's identity, so every new figure unmounts the
chart and draws a new one (``Plotly.newPlot``), and four ``st.metric`` cards are four more elements
to send and re-render. On the Prune page a slider move changes both, so the page answered a move in
about 1.6x the time of a trivial one-slider Streamlit app (bench/RESULTS_slider.md). This component
keeps one mounted element: a row of cards whose text is replaced and a chart redrawn with
``Plotly.react`` on the same div. plotly.js is the Python plotly package's own bundle (the same
version that built the figure), written once into the app's ``static/`` folder, which Streamlit
serves when ``server.enableStaticServing`` is on (``.streamlit/config.toml``). Without static
serving the page falls back to ``st.metric`` and ``st.plotly_chart``.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import plotly
import plotly.graph_objects as go
import plotly.io
import plotly.offline
import streamlit as st

STATIC = Path(__file__).resolve().parents[1] / "static"  # next to app.py: Streamlit serves it at app/static/
BUNDLE = f"plotly-{plotly.__version__}.min.js"
_CSS = """
.pe-cards { display: flex; gap: 1rem; flex-wrap: wrap; margin-bottom: 0.5rem; }
.pe-card { flex: 1 1 0; min-width: 9rem; }
.pe-label { font-size: 0.875rem; opacity: 0.8; }
.pe-value { font-size: 2.25rem; line-height: 1.3; white-space: nowrap; }
.pe-note { font-size: 0.875rem; opacity: 0.6; min-height: 1.2em; }
.pe-chart { width: 100%; }
"""
_COMPONENT = st.components.v2.component(
    "pruning_explorer_live_chart", isolate_styles=False, css=_CSS,
    html='<div class="pe-live"><div class="pe-cards"></div><div class="pe-chart"></div></div>',
    js=(Path(__file__).with_suffix(".js")).read_text())


@dataclass(frozen=True)
class Card:
    """One headline number: what it is, its value as shown, and a short note under it."""
    label: str
    value: str
    note: str = ""


def bundle_served() -> bool:
    """True when the browser can fetch plotly.js from the app's static folder (written here when missing)."""
    if not st.get_option("server.enableStaticServing"):
        return False
    target = STATIC / BUNDLE
    if target.exists():
        return True
    try:
        STATIC.mkdir(exist_ok=True)
        partial = target.with_name(target.name + ".partial")
        partial.write_text(plotly.offline.get_plotlyjs(), encoding="utf-8")
        partial.replace(target)
    except OSError:
        return False
    return True


def live_view(figure: go.Figure, cards: list[Card], *, key: str) -> None:
    """Draw ``cards`` above ``figure``; on a rerun with the same ``key`` both update in place."""
    if not bundle_served():
        columns = st.columns(len(cards)) if cards else []
        for column, card in zip(columns, cards):
            column.metric(card.label, card.value, card.note or None, delta_color="off", delta_arrow="off")
        st.plotly_chart(figure, key=key)
        return
    spec = json.loads(plotly.io.to_json(figure, validate=False))  # plotly's encoder: numpy arrays included
    spec["layout"].pop("template", None)  # the component draws in the page's own colours, as st.plotly_chart does
    _COMPONENT(key=key, data={"figure": spec, "src": f"app/static/{BUNDLE}", "cards": [card.__dict__ for card in cards]})
