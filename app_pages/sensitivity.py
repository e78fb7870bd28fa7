"""Sensitivity: prune each layer (or coupled group) alone over a grid, see which ones the model can spare."""
from __future__ import annotations

import dataclasses
import math

import pandas as pd
import streamlit as st
import yaml

from explorer import figures, jobs, pipeline, sensitivity, suggest
from explorer.criteria import CRITERIA
from explorer.errors import ExplorerError
from explorer.specs import STRUCTURES
from app_pages import common

SCAN_JOB = "sensitivity_job"          # the running (or last) scan's background job
SCANS = "sensitivity_scans"           # {(model key, ScoringSpec): {"scan": Scan, "prepared": Prepared}}
SUGGESTED = "sensitivity_suggested"   # (which scan and goal, Suggestion): the last suggestion
CHECKED = "sensitivity_checked"       # {"key": which scan and suggestion, "suggestion": Suggestion with actual}
GRID = (0.05, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95, 0.99, 1.0)

st.title("Sensitivity")
common.explain("""
Not every layer matters equally. A **sensitivity scan** asks each one separately: prune *only this
layer* to 10 %, 20 %, ... 95 %, keep everything else dense, and measure the task metric on a
validation subset. The heatmap shows how much the metric drops in every such cell; the curves show
the same rows as lines. A layer whose curve stays flat is **robust** (it can lose a lot); one whose
curve jumps early is **fragile** (protect it or prune it lightly). The table orders the layers by
the area under their drop curve, robust first.

With *channel* or *head* structure the unit is a **coupled group**, scanned whole: removing filter k
of a conv also removes input k of its consumers, and across a residual add every layer added together
must lose the same channel. Pruning one member alone would leave a channel the network still uses,
which removes nothing, so the group is the smallest unit that can really go. For these structures the
scan also says how many FLOPs and parameters each cell saves, and, if asked, measures its latency.

From the scan the page can **suggest a recipe**: given the largest drop you accept, or an overall
sparsity to reach, it picks one sparsity per layer, more for robust layers, less for fragile ones,
and predicts the result by adding up the single-layer drops. **Check actual** prunes all layers at
once and measures. The two differ because layers interact: a scan cell saw every other layer dense,
the real model loses several at once, and the errors of one layer feed the next, so drops usually add
up to more (sometimes less) than their sum. The suggestion loads onto the Prune page as per-layer
overrides, and downloads as a recipe that `python -m explorer run --recipe FILE` replays headless.
""")

model = common.require_model()
recipe = common.session_recipe(model)
job: jobs.Job | None = st.session_state.get(SCAN_JOB)
if job is not None and job.meta.get("model_key") != model["key"]:
    job = None
running = job is not None and not job.done

structures = [name for name in STRUCTURES if name in sensitivity.SCANNED]
with st.form("sensitivity_form", border=True):
    top = st.columns([1, 2, 1, 1])
    structure = top[0].selectbox("Structure", structures, key="sens_structure", index=structures.index(
        recipe.scoring.structure) if recipe.scoring.structure in structures else 0,
        help="\n\n".join(f"**{k}**: {STRUCTURES[k]}" for k in structures))
    criterion = top[1].selectbox("Criterion", list(CRITERIA), key="sens_criterion",
                                 index=list(CRITERIA).index(recipe.scoring.criterion),
                                 format_func=lambda name: f"{name} - {CRITERIA[name].description}")
    split = top[2].radio("Split", ["val", "test"], horizontal=True, key="sens_split",
                         help="Scan on validation data; keep the test split for the final number.")
    samples = top[3].number_input("Samples (first N of the split)", min_value=0, value=sensitivity.DEFAULT_SAMPLES,
                                  step=64, key="sens_samples", help="More samples: steadier numbers, slower scan.")
    bottom = st.columns([3, 1, 1])
    grid = bottom[0].multiselect("Sparsities to scan", GRID, default=list(sensitivity.DEFAULT_SPARSITIES),
                                 key="sens_grid", format_func=lambda s: f"{s:.0%}")
    whole = bottom[1].checkbox("Whole split", key="sens_whole", help="Ignore the sample count, use every example.")
    latency = bottom[2].checkbox("Measure latency", key="sens_latency",
                                 help="Also time every cell's pruned model (much slower).")
    start = st.form_submit_button("Run the scan", type="primary", disabled=running, key="sens_start")

scoring = dataclasses.replace(recipe.scoring, structure=structure, criterion=criterion)
scan_key = (model["key"], scoring)

if start and not running:
    st.session_state.pop(SCAN_JOB, None)  # a new attempt: the last job's message no longer applies (its scan is kept)
    job = None
    try:
        count = None if whole else int(samples)
        sensitivity.check_samples(count)
        chosen = sensitivity.check_sparsities(grid)
        scoring.validate()
        prepared = st.session_state.get(common.PREPARED, {}).get(scan_key)
        module, dataset, seed = model["module"], model["dataset"], recipe.seed

        def work(context: jobs.JobContext) -> dict:
            scores = prepared
            if scores is None:  # the first tenth of the bar: score and sort once, as the Prune page does
                scores = pipeline.prepare(module, scoring, dataset=dataset, seed=seed,
                                          progress=lambda f, text: context.report(0.1 * f, text))
            scan = sensitivity.scan(module, dataset, scoring, sparsities=chosen, split=split, samples=count,
                                    seed=seed, latency=latency, cancel=context.cancel, prepared=scores,
                                    progress=lambda f, text: context.report(0.1 + 0.9 * f, text))
            return {"scan": scan, "prepared": scores}

        job = jobs.start(work, name="The sensitivity scan", meta={"model_key": model["key"], "key": scan_key})
        st.session_state[SCAN_JOB] = job
        running = True
    except ExplorerError as exc:
        st.error(str(exc))


@st.fragment(run_every=0.5 if running else None)
def live() -> None:
    """Redrawn while the scan runs; hands over to a full rerun when it ends."""
    job: jobs.Job | None = st.session_state.get(SCAN_JOB)
    if job is None or job.meta.get("model_key") != model["key"]:
        return
    if not job.done:
        st.progress(job.fraction, text=job.status)
        st.button("Cancel (keep the cells done)", key="sens_cancel", on_click=job.cancel.set, disabled=job.cancelled)
    elif running:
        st.rerun(scope="app")


live()

if job is not None and job.done:
    if job.error is not None:
        st.error(job.error)
    elif job.result is not None and not job.meta.get("kept"):
        job.meta["kept"] = True  # once: later reruns read the stored scan
        st.session_state.setdefault(SCANS, {})[job.meta["key"]] = job.result
        st.session_state.setdefault(common.PREPARED, {})[job.meta["key"]] = job.result["prepared"]

stored = st.session_state.get(SCANS, {}).get(scan_key)
if stored is None:
    if not running:
        st.info(f"No scan yet for {structure} / {criterion} on **{model['label']}**: choose the settings and press "
                "**Run the scan**.", icon=":material/info:")
    st.stop()

scan = stored["scan"]
result = scan.to_dict()
label = figures.METRIC_LABELS.get(scan.measure, scan.metric)
percent = scan.measure in figures.PERCENT_MEASURES
done, total = len(scan.cells), len(scan.units) * len(scan.sparsities)
st.subheader(f"{scan.structure} / {scan.criterion}: {len(scan.units)} units x {len(scan.sparsities)} sparsities")
st.caption(f"{label.capitalize()} on the first {scan.samples} examples of {scan.split}: dense "
           f"**{common.fmt_task({'measure': scan.measure}, scan.base)}**"
           f"{'' if scan.higher_is_better else ' (lower is better)'}; {done} cells in {scan.seconds:.1f} s."
           + (f" Evaluated by physical removal (their channels cannot be emulated): {', '.join(scan.physical)}."
              if scan.physical else ""))
if scan.cancelled:
    st.warning(f"Cancelled after {done} of {total} cells: the chart holds the cells finished, the order ranks only "
               "the units whose row is complete.", icon=":material/warning:")

st.plotly_chart(figures.sensitivity_heatmap(result), key="sens_heatmap")

rows = list(scan.order) + [unit for unit in scan.units if unit not in scan.order]
default_units = rows if len(rows) <= 8 else rows[:4] + rows[-4:]
shown = st.session_state.get("sens_curve_units")
if shown is None or any(unit not in rows for unit in shown):  # first visit, or another scan's units
    st.session_state["sens_curve_units"] = [unit for unit in shown or () if unit in rows] or default_units
curve_units = st.multiselect("Curves for", rows, key="sens_curve_units",
                             help="Default: the most robust and the most fragile units.")
st.plotly_chart(figures.sensitivity_curves(result, curve_units), key="sens_curves")

areas = scan.areas()
last = scan.sparsities[-1]
size = "weights" if scan.structure == "unstructured" else "channels" if scan.structure == "channel" else "heads / neurons"
scale, number, suffix = figures.drop_format(scan.measure)  # every drop on this page written one way
drop_column = st.column_config.NumberColumn(format=f"%{number}{suffix}")
mean_drop = f"mean drop, 0-{last:.0%}"
ordering = pd.DataFrame([{
    "rank": rank, "unit": unit, size: scan.row(unit)[0].total if scan.row(unit) else None,
    mean_drop: scale * areas[unit] / last,
    f"drop at {last:.0%}": scale * scan.row(unit)[-1].drop
    if len(scan.row(unit)) == len(scan.sparsities) and scan.row(unit)[-1].drop is not None else None,
} for rank, unit in enumerate(scan.order, start=1)])
st.markdown("**Robust → fragile** (a smaller mean drop over the grid: the metric suffers less when this unit alone "
            "is pruned)")
st.dataframe(ordering, hide_index=True, column_config={
    mean_drop: st.column_config.NumberColumn(
        format=f"%{number}{suffix}", help="The area under the unit's drop curve from 0 to the last sparsity, divided "
                                          "by that sparsity: the key of the order."),
    f"drop at {last:.0%}": drop_column})

if scan.cells and (scan.structure != "unstructured" or scan.base_latency_ms is not None):
    with st.expander("What each cell saves: FLOPs, parameters" + (", latency" if scan.base_latency_ms else "")):
        cells = pd.DataFrame(result["cells"])
        for column, title in (("flops_saved", "FLOPs saved per input"), ("params_saved", "parameters saved"),
                              ("latency_ms", "latency (ms)")):
            if column == "latency_ms" and scan.base_latency_ms is None:
                continue
            st.markdown(f"**{title}**" + (f" (dense: {scan.base_latency_ms:.3g} ms)" if column == "latency_ms" else ""))
            table = cells.pivot(index="unit", columns="sparsity", values=column).reindex(
                [u for u in rows if u in set(cells["unit"])])
            table.columns = [f"{s:.0%}" for s in table.columns]
            st.dataframe(table)
        noisy = sum(1 for cell in scan.cells if cell.latency_noisy)
        if noisy:
            st.caption(f"{noisy} of {sum(1 for cell in scan.cells if cell.latency_ms is not None)} cell latencies "
                       "were noisy (their 95 % interval stayed wider than +-5 %: the machine was busy); differences "
                       "of a few percent between cells mean nothing.")

# ---------------------------------------------------------------- the suggested recipe
st.divider()
st.subheader("Suggested recipe")
goal_col, value_col = st.columns([1, 2])
goal = goal_col.radio("Goal", ["Largest acceptable drop", "Target overall sparsity", "Target FLOPs reduction"],
                      key="sens_goal",
                      help="A drop budget: remove as much as the scan says fits in it. A sparsity or a FLOPs "
                           "reduction: reach it with the smallest predicted drop (FLOPs weigh each unit by the "
                           "compute it saves, so conv layers early in the network count more than their weights).")
if goal == "Target overall sparsity":
    target = value_col.slider("Overall sparsity (fraction of the prunable weights removed)", 0.0, 0.95, 0.5, 0.01,
                              key="sens_target")
    goal_args, max_drop = {"target_sparsity": float(target)}, None
elif goal == "Target FLOPs reduction":
    target = value_col.slider("FLOPs reduction (fraction of the dense model's FLOPs per input removed)", 0.0, 0.95,
                              0.5, 0.01, key="sens_target_flops",
                              help="Theoretical: for unstructured masks dense kernels still do this work.")
    goal_args, max_drop = {"target_flops": float(target)}, None
elif percent:
    points = value_col.number_input(f"Largest acceptable drop in {label} (points)", 0.0, 100.0, 1.0, 0.5,
                                    key="sens_max_drop_points")
    goal_args = {"max_drop": float(points) / 100}
else:
    raw = value_col.number_input(f"Largest acceptable {'rise' if not scan.higher_is_better else 'drop'} in {label}",
                                 min_value=0.0, value=float(round(0.05 * abs(scan.base), 4) or 0.05),
                                 format=f"%{number}", key=f"sens_max_drop_{scan.measure}")
    goal_args = {"max_drop": float(raw)}
try:
    memo_key = (scan_key, scan.seconds, tuple(goal_args.items()))  # a rerun with the same goal reuses it
    memo = st.session_state.get(SUGGESTED)
    if memo is None or memo[0] != memo_key:
        memo = (memo_key, suggest.suggest(scan, prepared=stored["prepared"], **goal_args))
        st.session_state[SUGGESTED] = memo
    suggestion = memo[1]
    base_recipe = recipe.replace(scoring=scoring)
    suggested_recipe = suggestion.recipe(base_recipe)
except ExplorerError as exc:
    st.error(str(exc))
    st.stop()

checked = st.session_state.get(CHECKED)
if checked is not None and checked["key"] != (scan_key, scan.seconds, tuple(suggestion.sparsities.items())):
    checked = None
task_of_scan = {"measure": scan.measure}
predicted = suggestion.predicted
metrics = st.columns(4)
metrics[0].metric(f"Predicted {label}", common.fmt_task(task_of_scan, predicted["value"]),
                  common.fmt_task_delta(task_of_scan, scan.base, predicted["value"]),
                  delta_color="normal" if scan.higher_is_better else "inverse",
                  help="The dense value minus the sum of the chosen cells' drops: each measured with the rest dense.")
metrics[1].metric("Predicted overall sparsity", common.fmt_pct(predicted["sparsity"]))
metrics[2].metric("Predicted FLOPs saved (per input)", common.fmt_int(predicted["flops_saved"]),
                  f"-{common.fmt_pct(predicted['flops_reduction'])}" if predicted.get("flops_reduction") else None,
                  delta_color="off")
if checked is None:
    metrics[3].metric(f"Actual {label}", "-", "press Check actual", delta_color="off", delta_arrow="off")
else:
    actual = checked["suggestion"].actual
    metrics[3].metric(f"Actual {label}", common.fmt_task(task_of_scan, actual["value"]),
                      common.fmt_task_delta(task_of_scan, actual["base"], actual["value"]),
                      delta_color="normal" if scan.higher_is_better else "inverse",
                      help=f"All units pruned together, measured on {actual['samples']} examples of {actual['split']}; "
                           f"overall sparsity {common.fmt_pct(actual['sparsity'])}.")
    note = checked["suggestion"].note  # the core's line: the gap and why, or that they agree
    agree = math.isclose(actual["drop"], predicted["drop"], abs_tol=1e-9)
    title = "Predicted and actual agree here (they usually do not)." if agree else "Why predicted and actual differ."
    st.info(f"**{title}** {note[:1].upper()}{note[1:]}.", icon=":material/info:")
if suggestion.note and checked is None:
    st.caption(suggestion.note.capitalize() + ".")

drops = {(cell.unit, cell.sparsity): cell.drop for cell in scan.cells}
st.dataframe(pd.DataFrame([{"unit": unit, "sparsity": value,
                            "drop alone (scan)": None if drops.get((unit, value), 0.0) is None
                            else scale * drops.get((unit, value), 0.0)}
                           for unit, value in suggestion.sparsities.items()]),
             hide_index=True, column_config={
                 "sparsity": st.column_config.ProgressColumn("sparsity", format="percent", min_value=0.0,
                                                             max_value=1.0),
                 "drop alone (scan)": drop_column})

check_col, load_col, download_col = st.columns(3)
if check_col.button("Check actual: prune all at once and measure", key="sens_check"):
    try:
        with st.spinner("Pruning every unit as suggested and evaluating ..."):
            evaluated = suggest.evaluate(model["module"], model["dataset"], stored["prepared"], suggestion,
                                         split=scan.split, samples=scan.samples)
    except ExplorerError as exc:
        st.error(str(exc))
    else:
        st.session_state[CHECKED] = {"key": (scan_key, scan.seconds, tuple(suggestion.sparsities.items())),
                                     "suggestion": evaluated}
        st.rerun()
if load_col.button("Load on the Prune page", key="sens_load", type="primary",
                   help="Local scope with every unit's sparsity as a per-layer override."):
    st.session_state[common.RECIPE] = suggested_recipe
    for key in [k for k in st.session_state if str(k).startswith("prune_")]:  # the Prune page rebuilds its widgets
        st.session_state.pop(key)
    st.switch_page("app_pages/prune.py")
recipe_yaml = yaml.safe_dump(suggested_recipe.to_dict(), sort_keys=False)
download_col.download_button("Download the recipe (YAML)", recipe_yaml, file_name=f"suggested_{model['label']}.yaml",
                             mime="application/x-yaml", key="sens_download", on_click="ignore")
with st.expander("The recipe: `python -m explorer run --recipe FILE` replays it"):
    st.code(recipe_yaml, language="yaml")
