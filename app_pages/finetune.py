"""Fine-tune: a short training of the pruned copy, live, cancellable, then measured and saved."""
from __future__ import annotations

import streamlit as st

from explorer import figures, tasks, timing
from explorer.errors import ExplorerError
from explorer.layers import available_devices
from explorer.jobs import Job
from explorer.train import OPTIMIZERS, TrainConfig, start_training
from app_pages import common

st.title("Fine-tune")
common.explain("""
Pruning removes weights the network was relying on, a little or a lot: accuracy right after the
cut is usually below the baseline. **Fine-tuning** trains the pruned copy for a few more epochs
so the remaining weights take over the work. Masks stay in force while training, so an
unstructured model keeps its zeros and a channel-pruned model keeps its smaller shape.

A few epochs at a small learning rate are usually enough to win back most of the loss at
moderate sparsity; at very high sparsity no amount of fine-tuning brings it back, which is the
sign the cut went too deep. The loss follows the task: cross-entropy on labels for a classifier,
the next-token loss on the text for a causal language model, and, without labels (unlabelled text,
embeddings), **distillation** to the dense model: the pruned copy learns to reproduce the dense
model's outputs (KL divergence of the softened logits, or 1 - cosine of the embeddings), so
fidelity climbs back towards 1. The curve shows the training loss after every step and the task
metric on the validation split after every epoch. **Cancel** stops at the next step and keeps what was
learned so far. The result is evaluated on the test split, measured like every other run, and
saved as a new run next to the un-tuned one, so Compare shows what fine-tuning bought.
Training uses the GPU when there is one (`auto`), otherwise the CPU.
""")

model = common.require_model()
task = common.model_task(model)
label = common.task_label(task)
pruned = st.session_state.get(common.PRUNED)
if pruned is None or pruned["model_key"] != model["key"]:
    st.info("Nothing to fine-tune yet: apply a plan on the Prune page first.")
    st.page_link("app_pages/prune.py", label="Go to the Prune page", icon=":material/arrow_forward:")
    st.stop()

before = pruned["metrics"]
before_value = (before.get("task") or {}).get("pruned", before.get("accuracy"))
st.markdown(f"Pruned copy: **{pruned['run_name']}** - {label} before fine-tuning "
            f"**{common.fmt_task(task, before_value)}** (dense model {common.fmt_task(task, task['base'])})"
            + (", not in the run store (see the Prune page)." if pruned.get("run_id") is None else "."))

job: Job | None = st.session_state.get(common.FINETUNE_JOB)
running = job is not None and not job.done
with st.form("finetune_form", border=True):
    c = st.columns(6)
    epochs = c[0].number_input("Epochs", 1, 100, 3, key="ft_epochs")
    # a transformer is pretrained (or distilled on a small residual): a smaller step than a zoo model's
    lr = c[1].number_input("Learning rate", 1e-6, 1.0, 1e-3 if task["name"] == "accuracy" else 1e-4,
                           format="%.5f", key="ft_lr")
    optimizer = c[2].selectbox("Optimizer", OPTIMIZERS, key="ft_optimizer")
    batch_size = c[3].selectbox("Batch size", [32, 64, 128, 256], index=1, key="ft_batch")
    device = c[4].selectbox("Device", ["auto", *available_devices()], key="ft_device")
    loss = c[5].selectbox("Loss", ["auto", "distill"], key="ft_loss",
                          help="auto: cross-entropy on labels, next-token loss for a language model, distillation "
                               "to the dense model without labels. distill: always learn the dense model's outputs.")
    start = st.form_submit_button("Start fine-tuning", type="primary", disabled=running, key="ft_start")
try:
    st.caption(f"Training loss: **{tasks.loss_for(pruned['module'], model['dataset'], loss).replace('_', '-')}**; "
               f"validation reports {label}.")
except ExplorerError as exc:
    st.error(str(exc))

if start and not running:
    config = TrainConfig(epochs=int(epochs), lr=float(lr), optimizer=optimizer, batch_size=int(batch_size),
                         device=device, loss=loss)
    try:
        config.validate()
    except ExplorerError as exc:
        st.error(str(exc))
    else:
        job = start_training(pruned["module"], model["dataset"], config, name="Fine-tuning", teacher=model["module"],
                             meta={"config": config, "saved_run": None, "save_error": None})
        st.session_state[common.FINETUNE_JOB] = job
        running = True


def curve(current: Job) -> None:
    """The training curve, live while the job runs."""
    points = current.payload()
    st.plotly_chart(figures.training_curve(points.get("step_loss", []), points.get("val_metric", []), metric=label,
                                           percent=task["measure"] in ("accuracy", "top1")), key="ft_curve")


common.live_job(common.FINETUNE_JOB, what=f"Fine-tuning on {job.meta['config'].device}" if job is not None else "",
                cancel_key="ft_cancel", cancel_label="Cancel (keep the partial result)", extra=curve)

if job is not None and job.done:
    if job.error is not None:
        st.error(job.error)
    elif job.meta["saved_run"] is None and job.meta.get("save_error") is None:  # measured once per job
        result = job.result
        outcome = {"finetune": {"epochs_done": result.epochs_done, "cancelled": result.cancelled,
                                "seconds": result.seconds}}
        try:
            recipe = pruned["recipe"].replace(finetune=job.meta["config"])
            job.meta["saved_run"], refused = common.measure_and_save(model, result.model, recipe, stage=1,
                                                                     history=result.history, outcome=outcome)
            job.meta["save_error"] = str(refused) if refused else None  # the run is measured, kept in a file
        except ExplorerError as exc:
            job.meta["save_error"] = str(exc)
    if job.meta.get("save_error"):
        st.error(job.meta["save_error"])
    saved = job.meta["saved_run"]
    if saved is not None:
        result, after = job.result, saved.metrics
        if result.cancelled:
            st.warning(f"Cancelled after {result.steps} steps ({result.epochs_done} full "
                       f"epoch{'' if result.epochs_done == 1 else 's'}): "
                       "the partially trained copy was kept and measured.")
        if not job.meta.get("save_error"):
            st.success(f"Saved **{saved.name}** ({result.seconds:.1f} s on {result.device}).")
        after_value = (after.get("task") or {}).get("pruned", after.get("accuracy"))
        delta = common.fmt_task_delta(task, before_value, after_value)
        cols = st.columns(4)
        cols[0].metric(f"{label[:1].upper()}{label[1:]} after fine-tune", common.fmt_task(task, after_value),
                       f"{delta} vs. before" if delta else None,
                       delta_color="normal" if task["higher_is_better"] else "inverse")
        cols[1].metric("vs. dense model", common.fmt_task_delta(task, task["base"], after_value) or "-",
                       delta_color="off", delta_arrow="off")
        cols[2].metric("Non-zero params", common.fmt_int(after["params_nonzero"]))
        measured, interval = timing.speedup_card(after)
        cols[3].metric("Speed-up measured / FLOPs", f"{measured} / {after['speedup_flops']:.2f}x", interval,
                       delta_color="off", delta_arrow="off",
                       help="Measured: median over pairs of forward passes timed alternately, with its 95 % interval.")
        if note := timing.timing_note(after):
            st.caption(note)
        st.page_link("app_pages/compare.py", label="Next: compare the runs", icon=":material/arrow_forward:")
