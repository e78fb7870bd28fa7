"""A slider whose every step is drawn in advance, so a move never waits for the server.

With ``st.slider`` a move is a round trip: the browser sends the value, the server reruns the script
(or a fragment) and sends the new elements, the browser draws them. ``st.plotly_chart`` also folds
the figure into the chart's identity, so each new figure unmounts the chart and draws a new one.
Here the server sends, once per change of settings, one *view* (headline cards and a plotly figure)
for every value of the slider: the first view whole and the others as patches against it
(`json_patch`). The browser shows a step's view the moment the slider moves (``Plotly.react`` on
the same div) and reports the value back once the moves settle (250 ms, the end of a drag, or the
slider losing focus, as on the way to a button), which reruns the fragment around it for
everything else. bench/RESULTS_slider.md measures it against a trivial one-slider Streamlit app.

plotly.js is the Python plotly package's own bundle (the version that built the figures), written
once into the app's ``static/`` folder, which Streamlit serves when ``server.enableStaticServing`` is
on (``.streamlit/config.toml``). Without static serving it falls back to ``st.slider``,
``st.metric`` and ``st.plotly_chart``.
"""
from __future__ import annotations

import copy
import hashlib
import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Sequence

import plotly
import plotly.offline
import streamlit as st

STATIC = Path(__file__).resolve().parents[1] / "static"  # next to app.py: Streamlit serves it at app/static/
BUNDLE = f"plotly-{plotly.__version__}.min.js"
_CSS = """
.pe-live .pe-slider-label { font-size: 0.875rem; margin-bottom: 0.25rem; }
.pe-live .pe-row { display: flex; gap: 1rem; align-items: flex-start; margin-bottom: 1rem; min-height: 2.5rem; }
.pe-live .pe-slider { flex: 1 1 0; display: flex; align-items: center; gap: 0.75rem; }
.pe-live .pe-side { flex: 1 1 0; }
.pe-live .pe-warning { padding: 0.75rem 1rem; border-radius: 0.5rem; background: rgba(255, 189, 69, 0.2);
  color: inherit; }
.pe-live .pe-plan-note { font-size: 0.875rem; opacity: 0.6; }
.pe-live input[type=range] { flex: 1; accent-color: var(--st-primary-color, #ff4b4b); }
.pe-live input[type=range]:focus-visible { outline: 2px solid rgba(128, 128, 128, 0.4); outline-offset: 4px; }
.pe-live .pe-shown { min-width: 3.5rem; font-variant-numeric: tabular-nums; }
.pe-cards { display: flex; gap: 1rem; flex-wrap: wrap; margin-bottom: 0.5rem; }
.pe-card { flex: 1 1 0; min-width: 9rem; }
.pe-label { font-size: 0.875rem; opacity: 0.8; }
.pe-value { font-size: 2.25rem; line-height: 1.3; white-space: nowrap; }
.pe-note { font-size: 0.875rem; opacity: 0.6; min-height: 1.2em; }
.pe-chart { width: 100%; }
"""
_HTML = """<div class="pe-live">
<div class="pe-slider-label"></div>
<div class="pe-row"><div class="pe-slider"><input type="range" min="0" step="1"><span class="pe-shown"></span></div>
<div class="pe-side"><div class="pe-warning" role="alert" hidden></div><div class="pe-plan-note"></div></div></div>
<div class="pe-cards"></div><div class="pe-chart"></div>
</div>"""
_COMPONENT = st.components.v2.component("pruning_explorer_live_slider", isolate_styles=False, css=_CSS,
                                        html=_HTML, js=Path(__file__).with_suffix(".js").read_text())


@dataclass(frozen=True)
class Card:
    """One headline number: what it is, its value as shown, and a short note under it."""
    label: str
    value: str
    note: str = ""
    help: str = ""  # shown on hover: the exact figure when ``value`` is shortened


def json_patch(base: Any, other: Any, path: tuple = ()) -> list[list]:
    """``[path, value]`` pairs that turn ``base`` into ``other`` (`apply_patch` applies them). Dicts with the
    same keys, and lists of dicts of the same length, are walked; anything else that differs is replaced
    whole: one path for a chart's 37 bar heights or its 37 ``[kept, total, rule]`` rows, not 37 (MiniLM's
    101 steps under global scope: 0.40 MB walking every list, 0.25 MB so; the mlp's: 47 KB)."""
    def walkable(items: list) -> bool:
        return any(isinstance(item, dict) for item in items)

    if isinstance(base, dict) and isinstance(other, dict) and base.keys() == other.keys():
        return [change for key in base for change in json_patch(base[key], other[key], (*path, key))]
    if (isinstance(base, list) and isinstance(other, list) and len(base) == len(other)
            and walkable(base) and walkable(other)):
        return [change for i, (a, b) in enumerate(zip(base, other)) for change in json_patch(a, b, (*path, i))]
    if type(base) is type(other) and base == other:
        return []
    if not path:
        raise ValueError("a patch replaces parts of a view, not the whole view")
    return [[list(path), other]]


def apply_patch(base: Any, patch: list[list]) -> Any:
    """``base`` with each ``[path, value]`` of ``patch`` set (a copy; the browser does the same in JS)."""
    view = copy.deepcopy(base)
    for path, value in patch:
        target = view
        for key in path[:-1]:
            target = target[key]
        target[path[-1]] = value
    return view


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


def bundle_url() -> str:
    """Where the browser fetches plotly.js: absolute, under ``server.baseUrlPath`` (a page's own URL, such
    as ``/prune``, is not the app's root, so a relative address would depend on the page)."""
    base = str(st.get_option("server.baseUrlPath") or "").strip("/")
    return f"/{base}/app/static/{BUNDLE}" if base else f"/app/static/{BUNDLE}"


def live_slider(label: str, values: Sequence[float], views: list[dict], *, value_key: str,
                key: str, labels: Sequence[str] | None = None, disabled: bool = False, help: str | None = None) -> float:
    """A slider over ``values`` whose views, one per value, show at once on a move; returns the value chosen,
    which lives in ``st.session_state[value_key]``. A view is ``{"cards": [Card, ...], "figure": a plotly
    JSON spec, "warning": markdown or "", "note": text or ""}``; JSON only, as it travels to the browser.

    Pass the same ``views`` list again while nothing changed: its patches are then not rebuilt. Without
    static serving this is ``st.select_slider`` (key ``value_key``) above the chosen value's warning,
    ``st.metric`` cards and ``st.plotly_chart``.
    """
    values = [float(v) for v in values]
    labels = list(labels) if labels is not None else [f"{v:.2f}" for v in values]
    if not bundle_served():
        if len(values) > 1:
            st.session_state[value_key] = min(values, key=lambda v: abs(v - st.session_state.get(value_key, values[0])))
            chosen = st.select_slider(label, values, key=value_key, format_func=lambda v: labels[values.index(v)],
                                      disabled=disabled, help=help)
        else:  # one value (N:M fixes it): the label says it, a slider with nothing to choose would mislead
            chosen = values[0]
            st.caption(label, help=help)
        view = views[values.index(chosen)]
        if view.get("warning"):
            st.warning(view["warning"], icon=":material/warning:")
        if view.get("note"):
            st.caption(view["note"])
        columns = st.columns(len(view["cards"])) if view["cards"] else []
        for column, card in zip(columns, view["cards"]):
            column.metric(card.label, card.value, card.note or None, delta_color="off", delta_arrow="off",
                          help=card.help or None)
        st.plotly_chart(view["figure"], key=key)
        return chosen

    current = st.session_state.get(value_key, values[0])
    index = min(range(len(values)), key=lambda i: abs(values[i] - current))
    cached = st.session_state.get(f"_live_slider_{key}")
    if cached is None or cached[0] is not views:  # the list object itself: the caller keeps it while unchanged
        serialised = [{**view, "cards": [asdict(card) for card in view["cards"]]} for view in views]
        base = serialised[0]
        patches = [json_patch(base, view) for view in serialised]
        version = hashlib.sha1(json.dumps([label, values, base, patches], sort_keys=True).encode()).hexdigest()[:16]
        cached = views, {"base": base, "patches": patches, "version": version}
        st.session_state[f"_live_slider_{key}"] = cached

    def chosen_by_the_browser() -> None:
        reported = st.session_state[key]["value"]
        if reported is not None:
            st.session_state[value_key] = float(reported)

    _COMPONENT(key=key, on_value_change=chosen_by_the_browser,
               data={"label": label, "values": values, "labels": labels, "index": index, **cached[1],
                     "disabled": disabled or len(values) == 1,
                     "help": help or "", "src": bundle_url()})
    return values[index]
