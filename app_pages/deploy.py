"""Deploy: the speed-up that survives export, on the runtime you ship, and when sparse kernels pay."""
from __future__ import annotations

from pathlib import Path

import pandas as pd
import streamlit as st

from explorer import figures, jobs, semistructured
from explorer.deploy import export, quantize, runtimes, source, sparse
from explorer.errors import ExplorerError
from explorer.store import RunStore, data_dir
from app_pages import common

st.title("Deploy")
common.explain("""
A pruned model is only as fast as the runtime that runs it. This page takes the current pruned copy
(or any stored run) and checks what survives deployment:

* **Runtimes side by side** - dense and pruned timed on eager PyTorch, `torch.compile` and ONNX
  Runtime with the same input, batch and threads, pair by pair (the speed-up is the median ratio with
  its 95 % interval; *noisy* when it stays wider than +-5 %). **measured / FLOPs** is how much of the
  FLOPs promise a runtime delivers: 1.0 all of it; a masked model's zeros usually give about 1/(FLOPs
  speed-up), since dense kernels multiply the zeros too. Compile and export time are shown apart.
* **Export** - ONNX, TorchScript and `.pt2` files of the pruned model (masks folded into the weights),
  each loaded back and run on the same inputs: the max abs difference says whether to trust it. Zeros
  do not shrink the file; they shrink its *compressed* size (deflate, as a zip would store it).
* **Sparse kernels** - each Linear layer timed dense against torch's CSR kernels on its real input; the
  model is rebuilt with CSR where it wins and timed end to end against the same weights on dense kernels.
  On CPUs CSR usually pays only from about 90 % sparsity.
* **int8** - ONNX Runtime's dynamic int8 quantization of the pruned model: file size, latency and the
  task metric next to the pruned fp32 and the dense fp32 files.
""")

RESULT = "deploy_result"  # {pair key: {"runtimes": ..., "exports": ..., "sparse": ..., "int8": ...}}


@st.cache_resource(show_spinner=False, max_entries=4)
def stored_pair(run_id: int, created: float) -> source.Pair:
    """A stored run's dense and pruned models, loaded once per run (``created`` tells a reused id apart)."""
    return source.load_pair(f"run:{run_id}")


def pick_pair() -> tuple[str, source.Pair] | None:
    model, pruned = common.current_model(), st.session_state.get(common.PRUNED)
    current = model is not None and pruned is not None and pruned.get("model_key") == model["key"]
    try:
        runs = [run for run in RunStore().list() if not run.settings.get("error")]
    except ExplorerError as exc:
        st.error(str(exc))
        runs = []
    choices = (["current pruned copy"] if current else []) + (["a stored run"] if runs else [])
    if not choices:
        st.info("Nothing to deploy yet: apply a plan on the Prune page (or store a run with the CLI).")
        st.page_link("app_pages/prune.py", label="Go to the Prune page", icon=":material/arrow_forward:")
        return None
    what = st.radio("Deploy", choices, horizontal=True, key="deploy_what")
    if what == "current pruned copy":
        pair = source.Pair(dense=model["module"], pruned=pruned["module"], dataset=model["dataset"],
                           label=f"{model['label']}, pruned copy", dense_trained=True)
        return f"copy:{pruned.get('run_id')}:{id(pruned['module'])}", pair
    labels = {run.id: run.name for run in reversed(runs)}
    run_id = st.selectbox("Run", list(labels), format_func=labels.get, key="deploy_run")
    run = next(r for r in runs if r.id == run_id)
    try:
        with st.spinner("Loading the run's dense and pruned models ..."):
            pair = stored_pair(run_id, run.created)
    except ExplorerError as exc:
        st.error(str(exc))
        return None
    return f"run:{run_id}:{run.created}", pair


picked = pick_pair()
if picked is None:
    st.stop()
key, pair = picked
results = st.session_state.setdefault(RESULT, {}).setdefault(key, {})
if pair.note:
    st.caption(f"Note: {pair.note}.")

st.subheader("Runtimes side by side")
left, middle, right = st.columns([2, 1, 1])  # the runtimes' chips need the room (a narrow window cut them)
names = left.multiselect("Runtimes", runtimes.available_runtimes(), default=["eager", "onnxruntime"],
                         key="deploy_runtimes", help="torch.compile compiles each model and batch first "
                                                     "(tens of seconds on a CPU; reported apart).")
batches_text = middle.text_input("Batch sizes", "1,64", key="deploy_batches", help="Comma-separated.")
max_s = right.number_input("Seconds of timing per row, at most", 0.2, 30.0, 1.0, 0.2, key="deploy_max_s")
JOB = "deploy_job"  # the step running in the background (timing, export, CSR or int8): progress, Cancel
STEPS = {"runtimes": "Timing the runtimes", "exports": "Exporting and checking", "sparse": "Timing the CSR kernels",
         "int8": "Quantizing to int8"}
job = st.session_state.get(JOB)
running = job is not None and not job.done
if job is not None and job.done and not job.meta.get("kept"):
    job.meta["kept"] = True  # once: later reruns read the stored results
    if job.error is None and job.result is not None:
        st.session_state[RESULT].setdefault(job.meta["key"], {})[job.meta["step"]] = job.result
        results = st.session_state[RESULT][key]


def start_step(step: str, work) -> None:
    """Run one of the page's steps as the background job (one at a time); its result lands in ``results[step]``."""
    global job, running
    job = st.session_state[JOB] = jobs.start(work, name=STEPS[step], meta={"key": key, "step": step})
    running = True


def step_progress(step: str) -> None:
    """Under the step's button: its bar and Cancel while it runs, or the one line of its failure."""
    if job is None or job.meta["step"] != step:
        return
    common.live_job(JOB, what=STEPS[step], cancel_key="deploy_cancel")
    if job.done and job.error is not None:
        st.error(job.error)


if st.button("Time the runtimes", type="primary", key="deploy_time", disabled=running):
    try:
        batches = tuple(int(part) for part in batches_text.split(",") if part.strip())
        if not batches or min(batches) < 1 or max(batches) > 4096:
            raise ValueError
    except ValueError:
        st.error(f"Batch sizes must be whole numbers from 1 to 4096, comma-separated; got '{batches_text}'.")
    else:
        example, chosen = pair.example_input(max(batches)), tuple(names) or ("eager",)
        start_step("runtimes", lambda context: runtimes.compare_runtimes(
            pair.dense, pair.pruned, example, runtimes=chosen, batches=batches, min_run_time=min(0.5, max_s),
            max_run_time=max_s, progress=context.report, cancel=context.cancel))
step_progress("runtimes")
if timed := results.get("runtimes"):
    if timed.get("cancelled"):
        st.warning(f"Timing cancelled: {len(timed['rows'])} row(s) done, kept below.")
    table = pd.DataFrame([{
        "runtime": row["runtime"], "batch": row["batch"], "dense ms": row.get("dense_ms"),
        "pruned ms": row.get("pruned_ms"),
        "speed-up (95 %)": row.get("error") or ("noisy: {:.2f}-{:.2f}x" if row["noisy"] else "{2:.2f}x ({0:.2f}-{1:.2f})")
        .format(*row["speedup_interval"], row["speedup"]),
        "measured / FLOPs": row.get("measured_over_flops"),
        "compile / export s": sum(row["setup_s"].values()) if row.get("setup_s") else None,
    } for row in timed["rows"]])
    st.dataframe(table, hide_index=True, key="deploy_runtime_table")
    if any(not row.get("error") for row in timed["rows"]):
        st.plotly_chart(figures.runtime_speedups(timed), key="deploy_runtime_chart")
    st.caption(f"FLOPs speed-up {timed['speedup_flops']:.2f}x ({timed['flops']['dense']:,} -> "
               f"{timed['flops']['pruned']:,} FLOPs per input); {timed['threads']} thread(s), CPU"
               + (f" (threads {timed['threads_note']})" if timed.get("threads_note") else "")
               + f"; machine load {timed['load']['load1']:.1f} on {timed['load']['cores']} cores.")

st.subheader("Export and check")
if st.button("Export to ONNX, TorchScript and .pt2", key="deploy_export", disabled=running):
    folder = data_dir() / "exports" / key.replace(":", "-")  # kept beside the run store, for the downloads
    example = pair.example_input(2)
    start_step("exports", lambda context: [e.to_dict() for e in export.export_all(
        pair.pruned, example, folder, stem="pruned", progress=context.report, cancel=context.cancel)])
step_progress("exports")
exported = results.get("exports")
if exported is not None and len(exported) < len(export.FORMATS):
    st.warning(f"Export cancelled: {len(exported)} of {len(export.FORMATS)} formats done"
               + (", kept below." if exported else "."))
if exported:
    st.dataframe(pd.DataFrame([{
        "format": e["format"], "size": common.fmt_bytes(e["size_bytes"]),
        "compressed": common.fmt_bytes(e["compressed_bytes"]),
        "max abs diff": None if e["max_abs_diff"] is None else f"{e['max_abs_diff']:.2e}",
        "any batch": e["dynamic_batch"], "exporter": e["exporter"], "problem": e["error"]} for e in exported]),
        hide_index=True, key="deploy_export_table")
    files = st.columns(len(exported))
    for column, e in zip(files, exported):
        if e["path"] and Path(e["path"]).exists():
            column.download_button(f"Download {Path(e['path']).name}", Path(e["path"]).read_bytes(),
                                   file_name=Path(e["path"]).name, key=f"deploy_download_{e['format']}")
    if exported[0]["masked"]:
        st.caption("Masked model: the masks are folded into the weights; the zeros shrink the compressed size only.")

st.subheader("Sparse kernels (CSR, CPU)")
sparse_batch = st.number_input("Batch", 1, 4096, 1, key="deploy_sparse_batch")
if st.button("Time Linear layers on CSR kernels", key="deploy_sparse", disabled=running):
    example = pair.example_input(int(sparse_batch))
    start_step("sparse", lambda context: sparse.end_to_end(pair.pruned, example, max_run_time=float(max_s),
                                                           progress=context.report, cancel=context.cancel))
step_progress("sparse")
if found := results.get("sparse"):
    if found.get("cancelled"):
        st.warning(f"CSR timing cancelled: {len(found['layers'])} layer(s) timed, kept below; the model was not "
                   "timed end to end.")
    if not found["layers"] and not found.get("cancelled"):
        st.info("This model has no Linear layer: the CSR kernels here are for Linear layers only.")
    elif found["layers"]:
        st.dataframe(pd.DataFrame([{"layer": r["name"], "shape": " x ".join(map(str, r["shape"])),
                                    "sparsity": common.fmt_pct(r["sparsity"]), "CSR speed-up": f"{r['speedup']:.2f}x",
                                    "runs on": "CSR" if r["sparse"] else "dense"} for r in found["layers"]]),
                     hide_index=True, key="deploy_sparse_table")
    if found.get("speedup") is not None:
        st.metric("End to end, CSR where it wins vs dense kernels",
                  "noisy" if found["noisy"] else f"{found['speedup']:.2f}x",
                  f"95 %: {found['speedup_interval'][0]:.2f}-{found['speedup_interval'][1]:.2f}x", delta_color="off")
        st.caption(f"Batch {found['batch']}, {found['threads']} thread(s); {found['dense_ms']:.3f} ms on dense kernels, "
                   f"{found['sparse_ms']:.3f} ms with CSR; outputs agree to {found['max_abs_diff']:.1e}.")
if line := semistructured.describe(semistructured.semi_structured_latency(pair.pruned, pair.example_input(2),
                                                                          time_it=False)
                                   if semistructured.has_2_4_layer(export.deployable(pair.pruned)) else None):
    st.caption(line)

st.subheader("Prune, then quantize (int8)")
if st.button("Quantize the pruned model to int8", key="deploy_int8", disabled=running):
    folder = data_dir() / "exports" / key.replace(":", "-") / "int8"
    start_step("int8", lambda context: quantize.compare(
        pair.dense, pair.pruned, pair.dataset, max_run_time=float(max_s), evaluate=pair.dense_trained, folder=folder,
        progress=context.report, cancel=context.cancel))
step_progress("int8")
if int8 := results.get("int8"):
    if int8.get("cancelled"):
        st.warning(f"int8 comparison cancelled: {len(int8['rows'])} of 3 files timed and evaluated"
                   + (", kept below." if int8["rows"] else "."))
    if int8["rows"]:
        st.dataframe(pd.DataFrame([{
            "model": r["model"], "file": common.fmt_bytes(r["size_bytes"]), "x dense size": round(r["size_vs_dense"], 3),
            "latency ms": r.get("latency_ms"), "speed-up vs dense": f"{r['speedup']:.2f}x",
            int8["task"]: r.get("metric")} for r in int8["rows"]]), hide_index=True, key="deploy_int8_table")
        st.caption(f"ONNX Runtime on the CPU, batch {int8['batch']}, {int8['threads']} thread(s); the metric is the "
                   "test split run through each file.")
