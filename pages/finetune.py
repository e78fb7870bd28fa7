"""Fine-tune: a short training of the pruned copy, live, cancellable, then measured and saved."""
from __future__ import annotations

import streamlit as st

from explorer import figures
from explorer.errors import ExplorerError
from explorer.layers import available_devices
from explorer.jobs import Job
from explorer.train import OPTIMIZERS, TrainConfig, start_training
from pages import common

st.title("Fine-tune")
common.explain("""
Pruning removes weights the network was relying on, a little or a lot: accuracy right after the
cut is usually below the baseline. **Fine-tuning** trains the pruned copy for a few more epochs
so the remaining weights take over the work. Masks stay in force while training, so an
unstructured model keeps its zeros and a channel-pruned model keeps its smaller shape.

A few epochs at a small learning rate are usually enough to win back most of the loss at
moderate sparsity; at very high sparsity no amount of fine-tuning brings it back, which is the
sign the cut went too deep. The curve shows the training loss after every step and the
validation accuracy after every epoch. **Cancel** stops at the next step and keeps what was
learned so far. The result is evaluated on the test split, measured like every other run, and
saved as a new run next to the un-tuned one, so Compare shows what fine-tuning bought.
Training uses the GPU when there is one (`auto`), otherwise the CPU.
""")

model = common.require_model()
task = common.model_task(model)
if task["name"] != "accuracy":
    st.info(f"Fine-tuning covers labelled classifiers today; **{model['label']}** on {model['dataset'].name} is "
            f"judged by {common.task_label(task)}, which the training loop cannot optimise yet. Prune it at a few "
            "sparsities, criteria (wanda, sparsegpt) and structures instead, and compare the runs; or load a "
            "classifier with a labelled text file (.jsonl or .csv with a label) to fine-tune it.",
            icon=":material/info:")
    st.page_link("pages/compare.py", label="Compare the runs", icon=":material/arrow_forward:")
    st.stop()
pruned = st.session_state.get(common.PRUNED)
if pruned is None or pruned["model_key"] != model["key"]:
    st.info("Nothing to fine-tune yet: apply a plan on the Prune page first.")
    st.page_link("pages/prune.py", label="Go to the Prune page", icon=":material/arrow_forward:")
    st.stop()

before = pruned["metrics"]
st.markdown(f"Pruned copy: **{pruned['run_name']}** - accuracy before fine-tuning "
            f"**{common.fmt_pct(before['accuracy'])}** (baseline {common.fmt_pct(model['base_accuracy'])}).")

job: Job | None = st.session_state.get(common.FINETUNE_JOB)
running = job is not None and not job.done
with st.form("finetune_form", border=True):
    c = st.columns(5)
    epochs = c[0].number_input("Epochs", 1, 100, 3, key="ft_epochs")
    lr = c[1].number_input("Learning rate", 1e-6, 1.0, 1e-3, format="%.5f", key="ft_lr")
    optimizer = c[2].selectbox("Optimizer", OPTIMIZERS, key="ft_optimizer")
    batch_size = c[3].selectbox("Batch size", [32, 64, 128, 256], index=1, key="ft_batch")
    device = c[4].selectbox("Device", ["auto", *available_devices()], key="ft_device")
    start = st.form_submit_button("Start fine-tuning", type="primary", disabled=running, key="ft_start")

if start and not running:
    config = TrainConfig(epochs=int(epochs), lr=float(lr), optimizer=optimizer, batch_size=int(batch_size),
                         device=device)
    try:
        config.validate()
    except ExplorerError as exc:
        st.error(str(exc))
    else:
        job = start_training(pruned["module"], model["dataset"], config, name="Fine-tuning",
                             meta={"config": config, "saved_run": None})
        st.session_state[common.FINETUNE_JOB] = job
        running = True


@st.fragment(run_every=0.5 if running else None)
def live() -> None:
    """Redrawn twice a second while training; hands over to a full rerun when it ends."""
    job: Job | None = st.session_state.get(common.FINETUNE_JOB)
    if job is None:
        return
    if not job.done:
        st.progress(job.fraction, text=f"Fine-tuning on {job.meta['config'].device}: {job.status}")
        st.button("Cancel (keep the partial result)", key="ft_cancel", on_click=job.cancel.set,
                  disabled=job.cancelled)
    points = job.payload()
    st.plotly_chart(figures.training_curve(points.get("step_loss", []), points.get("val_accuracy", [])),
                    key="ft_curve")
    if job.done and job.meta["saved_run"] is None and running:
        st.rerun(scope="app")


live()

if job is not None and job.done:
    if job.error is not None:
        st.error(job.error)
    elif job.meta["saved_run"] is None:
        result = job.result
        outcome = {"finetune": {"epochs_done": result.epochs_done, "cancelled": result.cancelled,
                                "seconds": result.seconds}}
        try:
            recipe = pruned["recipe"].replace(finetune=job.meta["config"])
            job.meta["saved_run"] = common.measure_and_save(model, result.model, recipe, stage=1,
                                                            history=result.history, outcome=outcome)
        except ExplorerError as exc:
            st.error(str(exc))
    saved = job.meta["saved_run"]
    if saved is not None:
        result, after = job.result, saved.metrics
        if result.cancelled:
            st.warning(f"Cancelled after {result.steps} steps ({result.epochs_done} full epochs): "
                       "the partially trained copy was kept and measured.")
        st.success(f"Saved **{saved.name}** ({result.seconds:.1f} s on {result.device}).")
        cols = st.columns(4)
        cols[0].metric("Accuracy after fine-tune", common.fmt_pct(after["accuracy"]),
                       f"{100 * (after['accuracy'] - before['accuracy']):+.1f} pts vs. before")
        cols[1].metric("vs. baseline", f"{100 * after['delta_accuracy']:+.1f} pts", delta_color="off", delta_arrow="off")
        cols[2].metric("Non-zero params", common.fmt_int(after["params_nonzero"]))
        cols[3].metric("Speed-up measured / FLOPs",
                       f"{after['speedup_measured']:.2f}x / {after['speedup_flops']:.2f}x"
                       if after.get("speedup_measured") else f"- / {after['speedup_flops']:.2f}x")
        st.page_link("pages/compare.py", label="Next: compare the runs", icon=":material/arrow_forward:")
