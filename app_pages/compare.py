"""Compare: every saved run side by side - the task metric against sparsity, measured against promised speed."""
from __future__ import annotations

import streamlit as st

from explorer import figures, semistructured
from explorer.errors import ExplorerError
from explorer.methods.lab import chance_note
from explorer.store import RunStore
from app_pages import common

st.title("Compare")
common.explain("""
Every **Apply** on the Prune page and every fine-tune is a *run*, stored on disk (a SQLite file
plus the pruned weights), so runs survive closing the browser or restarting the server.

* **Accuracy vs sparsity** - one line per method (structure, criterion, scope). The usual shape is
  flat, then a cliff: the cliff is where the method stops finding weights the network can spare.
  Fine-tuned runs are drawn as diamonds, runs that a method over time trained within its budget
  (column *trained epochs*, under *All columns*) as squares. A transformer is judged by its own task metric instead:
  **perplexity** for a language model (lower is better), **fidelity** to the dense model otherwise
  (top-1 agreement of the predicted class, or cosine similarity of the sentence embeddings). Runs
  judged by different metrics share no axis: pick the metric to plot.
* **Speed-up: measured vs FLOPs** - the FLOPs speed-up is what counting multiply-adds promises;
  the measured one is the median ratio over pairs of forward passes of base and pruned model, timed
  alternately in the same call, same batch and threads, with its 95 % interval as an error bar (an
  open marker: *noisy*, the interval stayed wider than +-5 %, usually a busy machine; read the bar,
  not the point). **Unstructured runs should sit at 1x measured**: their zeros are still
  stored in dense tensors, and a dense matrix multiply does the same work whether a weight is 0 or
  not (they are timed with masks folded into plain weights, as they would be deployed). Their gain
  is the *compressed file size*. Channel pruning produces genuinely smaller dense tensors, so it does get faster, though usually less than FLOPs say (memory traffic, overheads and
  small layers do not shrink in proportion). Points on the dashed line y = x keep their promise.
  The one weight-level pattern with real kernels is **2:4**: on an NVIDIA GPU of compute capability
  8.0+, 2:4 runs are also timed with PyTorch's semi-structured sparse tensors (column *2:4 kernels x*,
  shown once a run has that timing); elsewhere a line under the table says why they run at about 1x.
* **The table** starts with what a comparison reads: the task metric, the measured and FLOPs speed-ups,
  the zipped size; counts, latencies, the measured interval, device and epochs are under *All columns*.
* **Accuracy vs latency** - the Pareto front joins the runs no other run beats on both at once:
  the only ones worth choosing from.
* **Sweeps** - `python -m explorer sweep --grid FILE` runs a grid of recipes (criteria x sparsities x
  methods x seeds ...) on a local process pool or a Ray cluster and stores every point as a run.
  Pick a sweep to see only its runs, and plot its metric along one grid field, one line per value
  of another. Points that failed are listed with their error.
""")

store = RunStore()
try:  # a damaged or unreadable store is one line naming the file and what to do; the app runs on
    runs = store.list()
    sweeps = store.sweeps()
except ExplorerError as exc:
    st.error(str(exc))
    st.stop()
if restored := st.session_state.pop("cmp_restored", None):
    st.success(restored)
if kept := store.kept_files():  # runs the store refused earlier (a read-only or damaged file then): nothing was lost
    st.warning(f"{len(kept)} file(s) in {store.root / 'unsaved'} keep runs the store refused earlier "
               f"({', '.join(path.name for path in kept[:3])}{', ...' if len(kept) > 3 else ''}). Now that the "
               "store takes runs again, put them back: they then show here with the others.")
    if st.button("Put the kept runs back in the store", key="cmp_restore",
                 help="Stores every kept run (and its weights) and moves its file to unsaved/restored/; "
                      "the same as `python -m explorer restore`."):
        ids = []
        try:
            for path in kept:
                ids += [run.id for run in store.restore(path)]
        except ExplorerError as exc:
            st.error(str(exc).splitlines()[0])
        else:
            st.session_state["cmp_restored"] = f"Restored {len(ids)} run(s): id {', '.join(map(str, ids))}."
            st.rerun()
if not runs:
    st.info("No runs yet. Apply a plan on the Prune page: each applied plan and each fine-tune is saved here.")
    st.page_link("app_pages/prune.py", label="Go to the Prune page", icon=":material/arrow_forward:")
    st.stop()

sweep = None
if sweeps:
    sweep = st.selectbox("Sweep", ["all runs", *sweeps[::-1]], key="cmp_sweep",
                         help="Runs of one `python -m explorer sweep`, newest sweep first.")
    sweep = None if sweep == "all runs" else sweep
every_run = runs  # "Manage runs" below lists failed sweep points too, to delete them
picked_runs = [run for run in runs if sweep is None or run.sweep == sweep]
failed = [run for run in picked_runs if run.settings.get("error")]
runs = [run for run in picked_runs if not run.settings.get("error")]
if sweep is not None and failed:
    st.warning(f"{len(failed)} point(s) of this sweep failed; the charts leave them out.\n\n" + "\n".join(
        "* " + ", ".join(f"{path}={value}" for path, value in run.settings["sweep"]["point"].items())
        + f": {run.settings['error']}" for run in failed))
table, sweep_fields = figures.sweep_frame(runs) if sweep is not None else (figures.runs_frame(runs), [])
if table.empty:
    st.info("No finished run to show: every point of this sweep failed.")
    st.stop()

models = sorted(table["model"].unique())
pick_model, pick_metric = st.columns(2)
chosen = pick_model.selectbox("Model", ["all models", *models], index=1 if len(models) == 1 else 0, key="cmp_model")
shown = table if chosen == "all models" else table[table["model"] == chosen]
metrics_shown = list(dict.fromkeys(shown["metric"]))
metric = metrics_shown[0] if metrics_shown else "accuracy"
if len(metrics_shown) > 1:
    metric = pick_metric.selectbox("Metric to plot (runs judged by it)", metrics_shown, key="cmp_metric",
                                   help="Accuracy, perplexity and fidelity are different scales, and perplexities "
                                        "scored on different tokens do not compare: each chart plots the runs of "
                                        "one metric.")
if "accuracy" not in metrics_shown:  # transformers judged by perplexity or fidelity have no accuracy
    shown = shown.drop(columns=["accuracy", "Δ accuracy (pts)"])
one_metric = metrics_shown[0] if len(metrics_shown) == 1 else None
value_format = ("percent" if one_metric in ("accuracy", figures.METRIC_LABELS["top1"])
                else "%.2f" if one_metric and figures.metric_kind(one_metric) == "perplexity" else "%.3f")
kernels = shown["speed-up 2:4 kernels"]
shown = shown.assign(**{"speed-up 2:4 kernels": [  # a number where the kernels ran, a dash (and a line below) elsewhere
    "—" if value is None or value != value else f"{value:.2f}x" for value in kernels]})
COLUMNS = {  # header, format and help of every column; the first table shows the ones a comparison reads
    "id": st.column_config.NumberColumn("run", format="%d"),
    "name": st.column_config.TextColumn(width="medium", pinned=True,  # in a narrow window the numbers stay in view
                                        help="The run's name (its settings); hover a cell for the whole name."),
    "sparsity": st.column_config.NumberColumn(format="percent"),
    "metric": st.column_config.TextColumn("task metric"),
    "metric value": st.column_config.NumberColumn(one_metric or "value", format=value_format),
    "base value": st.column_config.NumberColumn("dense value", format=value_format),
    "accuracy": st.column_config.NumberColumn(format="percent"),
    "Δ accuracy (pts)": st.column_config.NumberColumn("Δ acc. (pts)", format="%+.1f"),
    "params": st.column_config.NumberColumn(format="localized"),
    "non-zero params": st.column_config.NumberColumn(format="localized"),
    "FLOPs": st.column_config.NumberColumn(format="localized"),
    "compressed size (B)": st.column_config.NumberColumn("zipped (B)", format="localized",
                                                         help="The pruned weights deflated, as a zip would store them."),
    "latency (ms)": st.column_config.NumberColumn(format="%.3f"),
    "base latency (ms)": st.column_config.NumberColumn(format="%.3f"),
    "speed-up measured": st.column_config.NumberColumn(
        "measured x", format="%.2fx", help="Measured speed-up: median over pairs of forward passes timed alternately "
                                           "(dense, pruned); its 95 % interval is under 'All columns'."),
    "measured 95 % low": st.column_config.NumberColumn(format="%.2fx"),
    "measured 95 % high": st.column_config.NumberColumn(format="%.2fx"),
    "noisy": st.column_config.CheckboxColumn(
        help="The 95 % interval stayed wider than +-5 %: the machine was busy while timing. Read the interval, "
             "not the median."),
    "speed-up FLOPs": st.column_config.NumberColumn("FLOPs x", format="%.2fx",
                                                    help="The speed-up counting multiply-adds promises."),
    "speed-up 2:4 kernels": st.column_config.TextColumn(
        "2:4 kernels x", help="2:4 runs timed with PyTorch's semi-structured sparse kernels next to dense fp16, "
                              "on a GPU of compute capability 8.0+ only; '—' where they were not timed (the line "
                              "under the table says why)."),
}
first = ["name", "sparsity", *(["metric value"] if "accuracy" not in shown.columns else ["accuracy", "Δ accuracy (pts)"]),
         "speed-up measured", "noisy", "speed-up FLOPs",
         *(["speed-up 2:4 kernels"] if kernels.notna().any() else []),  # no run timed on the kernels: no column
         "compressed size (B)", "method", "tuned"]
st.dataframe(shown, hide_index=True, column_order=first, column_config=COLUMNS, key="cmp_table")
with st.expander("All columns: counts, latency and its interval, device, epochs"):
    st.dataframe(shown, hide_index=True, column_config=COLUMNS, key="cmp_table_all")
reasons = {semistructured.describe(run.metrics["semi_structured"]) for run in runs
           if run.id in set(shown["id"]) and (run.metrics.get("semi_structured") or {}).get("speedup") is None
           and run.metrics.get("semi_structured")}
for reason in sorted(filter(None, reasons)):
    st.caption(reason)
for run in runs:  # a stored run at chance is no verdict on its method
    losses = run.trajectory or [{"train_loss": point.get("loss")} for point in run.history or []]
    if run.id in set(shown["id"]) and (note := chance_note(run.name, run.metrics, losses,
                                                           int(run.settings.get("num_classes") or 0))):
        st.warning(note)

left, right = st.columns(2)
with left:
    st.plotly_chart(figures.accuracy_vs_sparsity(shown, metric), key="cmp_accuracy")
with right:
    st.plotly_chart(figures.speedup_promise(shown), key="cmp_speedup")
    if summary := figures.unstructured_speedup_summary(shown):
        st.caption(summary)
st.plotly_chart(figures.accuracy_vs_latency(shown, metric), key="cmp_pareto")

if sweep_fields:
    st.subheader("Along the grid")
    pick_x, pick_color = st.columns(2)
    default_x = sweep_fields.index("plan.sparsity") if "plan.sparsity" in sweep_fields else 0
    x_field = pick_x.selectbox("Along", sweep_fields, index=default_x, key="cmp_sweep_x")
    others = [path for path in sweep_fields if path != x_field]
    color_field = pick_color.selectbox("One line per", ["none", *others], index=1 if others else 0,
                                       key="cmp_sweep_color")
    st.plotly_chart(figures.sweep_chart(shown, x_field, None if color_field == "none" else color_field, metric),
                    key="cmp_sweep_chart")

shown_ids = set(shown["id"])
with_trajectory = [run for run in runs if run.trajectory and run.id in shown_ids]
if with_trajectory:
    st.subheader("Trajectories of methods over time")
    labels = {run.id: run.name for run in with_trajectory}
    picked = st.multiselect("Runs", list(labels), default=list(labels)[-4:], format_func=labels.get, key="cmp_traj")
    st.plotly_chart(figures.trajectories({labels[run.id]: run.trajectory for run in with_trajectory
                                          if run.id in picked}), key="cmp_trajectories")

st.subheader("Manage runs")
names = {run.id: run.name for run in every_run}
run_id = st.selectbox("Run", list(names), format_func=lambda i: names[i], key="cmp_run")
rename_col, actions_col = st.columns([2, 1])
with rename_col:
    new_name = st.text_input("New name", names[run_id], key=f"cmp_name_{run_id}")
    if st.button("Rename", key="cmp_rename"):
        try:
            store.rename(run_id, new_name)
            st.rerun()
        except ExplorerError as exc:
            st.error(str(exc))
with actions_col:
    try:
        st.download_button("Download model + settings (.zip)", store.export(run_id), file_name=f"run-{run_id}.zip",
                           mime="application/zip", key="cmp_download",
                           help="The pruned weights (readable by load_model) with run.json and run.yaml.")
        st.caption("Replay it headless: `python -m explorer run --recipe run.yaml` (the run keeps its whole "
                   "recipe; an uploaded model file must sit at the path the recipe names).")
    except ExplorerError as exc:
        st.error(str(exc))
    if st.button("Delete this run", key="cmp_delete"):
        try:
            store.delete(run_id)
            st.rerun()
        except ExplorerError as exc:
            st.error(str(exc))
