"""Compare: every saved run side by side - accuracy against sparsity, measured against promised speed."""
from __future__ import annotations

import pandas as pd
import plotly.express as px
import plotly.graph_objects as go
import streamlit as st
from plotly.subplots import make_subplots

from explorer.errors import ExplorerError
from explorer.store import RunStore
from pages import common

st.title("Compare")
common.explain("""
Every **Apply** on the Prune page and every fine-tune is a *run*, stored on disk (a SQLite file
plus the pruned weights), so runs survive closing the browser or restarting the server.

* **Accuracy vs sparsity** - one line per method (structure, criterion, scope). The usual shape is
  flat, then a cliff: the cliff is where the method stops finding weights the network can spare.
  Fine-tuned runs are drawn as diamonds.
* **Measured vs theoretical speed-up** - the FLOPs speed-up is what counting multiply-adds promises;
  the measured one is the ratio of median latencies of base and pruned model, timed in the same
  call, same batch and threads. **Unstructured runs sit near 1x measured**: their zeros are still
  stored in dense tensors, and a dense matrix multiply does the same work whether a weight is 0 or
  not (they are timed with masks folded into plain weights, as they would be deployed). Their gain
  is the *compressed file size*. Channel pruning produces genuinely smaller dense tensors, so it does get faster, though usually less than FLOPs say (memory traffic, overheads and
  small layers do not shrink in proportion). Points on the dashed line y = x keep their promise.
* **Accuracy vs latency** - the Pareto front joins the runs no other run beats on both at once:
  the only ones worth choosing from.
""")

store = RunStore()
try:
    runs = store.list()
except ExplorerError as exc:
    st.error(str(exc))
    st.stop()
if not runs:
    st.info("No runs yet. Apply a plan on the Prune page: each applied plan and each fine-tune is saved here.")
    st.page_link("pages/prune.py", label="Go to the Prune page", icon=":material/arrow_forward:")
    st.stop()


def method(run) -> str:
    over_time = (run.recipe.get("method") or {}).get("name", "one_shot")
    return f"{run.structure} / {run.criterion} / {run.scope}" + ("" if over_time == "one_shot" else f" / {over_time}")


rows = []
for run in runs:
    m, finetune = run.metrics, run.settings.get("finetune") or {}
    rows.append({
        "id": run.id, "name": run.name, "model": f"{run.model_name} on {run.dataset}", "method": method(run),
        "structure": run.structure, "criterion": run.criterion, "scope": run.scope, "sparsity": run.sparsity,
        "fine-tune epochs": finetune.get("epochs_done", 0), "accuracy": m.get("accuracy"),
        "Δ accuracy (pts)": 100 * m["delta_accuracy"] if m.get("delta_accuracy") is not None else None,
        "params": m.get("params_total"), "non-zero params": m.get("params_nonzero"),
        "FLOPs": m.get("flops_effective"), "compressed size (B)": m.get("size_compressed_bytes"),
        "latency (ms)": m.get("latency_ms"), "base latency (ms)": m.get("baseline_latency_ms"),
        "speed-up measured": m.get("speedup_measured"), "speed-up FLOPs": m.get("speedup_flops"),
        "device": f"{m.get('device')} (batch {m.get('batch')}, {m.get('threads')} threads)",
    })
table = pd.DataFrame(rows)

models = sorted(table["model"].unique())
chosen = st.selectbox("Model", ["all models", *models], index=1 if len(models) == 1 else 0, key="cmp_model")
shown = table if chosen == "all models" else table[table["model"] == chosen]
st.dataframe(shown, hide_index=True, column_config={
    "sparsity": st.column_config.NumberColumn(format="percent"),
    "accuracy": st.column_config.NumberColumn(format="percent"),
    "Δ accuracy (pts)": st.column_config.NumberColumn(format="%+.1f"),
    "params": st.column_config.NumberColumn(format="localized"),
    "non-zero params": st.column_config.NumberColumn(format="localized"),
    "FLOPs": st.column_config.NumberColumn(format="localized"),
    "compressed size (B)": st.column_config.NumberColumn(format="localized"),
    "latency (ms)": st.column_config.NumberColumn(format="%.3f"),
    "base latency (ms)": st.column_config.NumberColumn(format="%.3f"),
    "speed-up measured": st.column_config.NumberColumn(format="%.2fx"),
    "speed-up FLOPs": st.column_config.NumberColumn(format="%.2fx"),
}, key="cmp_table")

plot_data = shown.assign(tuned=shown["fine-tune epochs"].gt(0).map({True: "fine-tuned", False: "pruned only"}))
left, right = st.columns(2)
with left:
    figure = px.line(plot_data.sort_values("sparsity"), x="sparsity", y="accuracy", color="method",
                     symbol="tuned", symbol_map={"fine-tuned": "diamond", "pruned only": "circle"},
                     markers=True, hover_name="name", title="Accuracy vs sparsity")
    figure.update_layout(xaxis_tickformat=".0%", yaxis_tickformat=".0%", height=460, legend_title_text="",
                         xaxis_range=[-0.02, 1.02], legend=dict(orientation="h", yanchor="top", y=-0.25, x=0))
    st.plotly_chart(figure, key="cmp_accuracy")
with right:
    timed = plot_data.dropna(subset=["speed-up measured"])
    figure = px.scatter(timed, x="speed-up FLOPs", y="speed-up measured", color="structure", hover_name="name",
                        symbol="tuned", title="Measured vs theoretical (FLOPs) speed-up")
    top = max([1.0, *timed["speed-up FLOPs"].tolist(), *timed["speed-up measured"].tolist()]) * 1.05
    figure.add_trace(go.Scatter(x=[0, top], y=[0, top], mode="lines", name="y = x (promise kept)",
                                line=dict(dash="dash", color="grey")))
    figure.update_layout(height=460, xaxis_range=[0, top], yaxis_range=[0, top], legend_title_text="", legend=dict(orientation="h", yanchor="top", y=-0.25, x=0))
    st.plotly_chart(figure, key="cmp_speedup")

timed = plot_data.dropna(subset=["latency (ms)", "accuracy"]).sort_values(["latency (ms)", "accuracy"],
                                                                         ascending=[True, False])
front, best = [], -1.0
for _, row in timed.iterrows():  # fastest first: a run is on the front if it beats every faster run's accuracy
    if row["accuracy"] > best:
        front.append(row)
        best = row["accuracy"]
figure = px.scatter(timed, x="latency (ms)", y="accuracy", color="method", hover_name="name",
                    title="Accuracy vs measured latency (batch of 64)")
if front:
    front_frame = pd.DataFrame(front)
    figure.add_trace(go.Scatter(x=front_frame["latency (ms)"], y=front_frame["accuracy"], mode="lines",
                                line=dict(shape="hv", color="black", dash="dot"), name="Pareto front"))
figure.update_layout(yaxis_tickformat=".0%", height=460, legend_title_text="", legend=dict(orientation="h", yanchor="top", y=-0.25, x=0))
st.plotly_chart(figure, key="cmp_pareto")

shown_ids = set(shown["id"])
with_trajectory = [run for run in runs if run.trajectory and run.id in shown_ids]
if with_trajectory:
    st.subheader("Trajectories of methods over time")
    labels = {run.id: run.name for run in with_trajectory}
    picked = st.multiselect("Runs", list(labels), default=list(labels)[-4:], format_func=labels.get, key="cmp_traj")
    figure = make_subplots(rows=1, cols=2, subplot_titles=("validation accuracy", "sparsity"))
    for run in (r for r in with_trajectory if r.id in picked):
        scored = [p for p in run.trajectory if p.get("val_accuracy") is not None]
        figure.add_trace(go.Scatter(x=[p["epoch"] for p in scored], y=[p["val_accuracy"] for p in scored],
                                    name=run.name, legendgroup=str(run.id), mode="lines+markers"), row=1, col=1)
        figure.add_trace(go.Scatter(x=[p["epoch"] for p in run.trajectory], y=[p["sparsity"] for p in run.trajectory],
                                    name=run.name, legendgroup=str(run.id), showlegend=False, mode="lines+markers",
                                    line=dict(shape="hv")), row=1, col=2)
    figure.update_yaxes(tickformat=".0%", range=[0, 1.02])
    figure.update_xaxes(title_text="epoch of the method's training")
    figure.update_layout(height=380, legend=dict(orientation="h", yanchor="top", y=-0.3, x=0))
    st.plotly_chart(figure, key="cmp_trajectories")

st.subheader("Manage runs")
names = {run.id: run.name for run in runs}
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
