"""Methods: how pruning unfolds over training time, several methods side by side under one budget."""
from __future__ import annotations

import pandas as pd
import streamlit as st

from explorer import baselines, figures, jobs, timing
from explorer.criteria import CRITERIA
from explorer.errors import ExplorerError
from explorer.methods import METHODS
from explorer.methods.lab import CLAIMS, CONTROLS, TASK_CHOSEN, budget_text, defaults_for, chance_note, claims, method_of, run_lab
from explorer.methods.regularised import DEFAULT_KIND, penalty_norms
from explorer.planner import SCOPES
from explorer.specs import BUDGET_VIEWS, STRUCTURES, BudgetSpec, MeasureSpec, PlanSpec, ScoringSpec
from explorer.store import RunStore
from explorer.train import TrainConfig
from app_pages import common

LAB_JOB = "methods_job"
DEFAULT_CHOSEN = list(dict.fromkeys(name for claim in CLAIMS for name in claim.order))
ENTRIES = [*METHODS, *CONTROLS]


def entry_summary(name: str) -> str:
    return f"{name} - {CONTROLS[name].summary} (control)" if name in CONTROLS else f"{name} - {METHODS[name].summary}"


st.title("Methods")
common.explain("""
The third question of pruning is **how to prune over time**. Pruning once and fine-tuning is only
one answer. Others cut in several rounds, raise the sparsity gradually while the network trains,
rewind the learning rate or the weights after a cut, prune before training starts, or train a
sparse network from the beginning and let its connections move.

Every method here gets the **same budget**, counted one of two ways (the page says which it shows).
*Count the training that made the start model* (RigL's accounting): a method that prunes the trained
model stands on its training, so a method that starts from fresh weights gets those epochs on top of
the budget. *Same budget from fresh weights*: every method starts from fresh weights, and one that
prunes a trained model first trains a fresh dense copy for half the budget. Structure, criterion,
scope, target sparsity and training settings are the same for all, so differences in the curves and
final numbers come from the method. Beside the methods you can run the **controls** the literature
compares them with (the lottery ticket with fresh random weights, a static random mask, fine-tuning
at a small constant learning rate, single-shot SynFlow); with both in the run the page checks each
published claim on the numbers it got. The runs go one after the other
in the background. **Cancel** stops the method that is running (its curve so far is kept and
measured) and skips the rest. Every finished method is saved as a run, so it appears on Compare.

Curves: validation accuracy (a transformer's own metric, perplexity or fidelity, where it has no labels) and
sparsity against the epoch of the method's own training
(epoch 0 is the first cut). A method that starts from fresh weights (pruning at initialisation,
lottery tickets, sparse training) starts near chance accuracy and climbs.
""")

model = common.require_model()
task = common.model_task(model)
by_accuracy = task["name"] == "accuracy"
defaults = defaults_for(task["name"])
if not by_accuracy:
    st.info(f"**{model['label']}** is judged by {common.task_label(task)}: curves and results are in that metric "
            "(training distils towards the dense model where the data has no labels). The defaults are a short, "
            "cheap look: one epoch at 50 %, the methods that prune the trained model.", icon=":material/info:")
recipe = common.session_recipe(model)
job: jobs.Job | None = st.session_state.get(LAB_JOB)
if job is not None and job.meta.get("model_key") != model["key"]:
    job = None
running = job is not None and not job.done

with st.form("methods_form", border=True):
    top = st.columns(4)
    structure = top[0].selectbox("Structure", list(STRUCTURES), index=list(STRUCTURES).index(recipe.scoring.structure),
                                 key="methods_structure")
    criterion = top[1].selectbox("Criterion", list(CRITERIA), index=list(CRITERIA).index(recipe.scoring.criterion),
                                 key="methods_criterion")
    scope = top[2].selectbox("Scope", list(SCOPES), index=list(SCOPES).index(recipe.plan.scope), key="methods_scope")
    target = top[3].slider("Target sparsity", 0.05, 0.99, defaults.sparsity, 0.01, key="methods_sparsity")
    bottom = st.columns([3, 1, 1, 1])
    chosen = bottom[0].multiselect("Methods and controls", ENTRIES, key="methods_chosen", format_func=entry_summary,
                                   default=DEFAULT_CHOSEN if by_accuracy else list(TASK_CHOSEN))
    epochs = bottom[1].number_input("Budget (epochs)", 1, 100, defaults.epochs, key="methods_epochs")
    lr = bottom[2].number_input("Learning rate", 1e-6, 1.0, defaults.lr, format="%.5f", key="methods_lr")
    batch_size = bottom[3].selectbox("Batch size", [32, 64, 128, 256],
                                     index=[32, 64, 128, 256].index(defaults.batch_size), key="methods_batch")
    counting = st.columns([3, 1])
    view = counting[0].radio("How the budget is counted", list(BUDGET_VIEWS), horizontal=True, key="methods_view",
                             index=list(BUDGET_VIEWS).index(defaults.view),
                             format_func=lambda v: {"counted": "count the training that made the start model",
                                                    "fresh": "same budget from fresh weights"}[v],
                             help="; ".join(f"{k}: {v}" for k, v in BUDGET_VIEWS.items()))
    labels = getattr(model["dataset"], "y_train", None)
    known = baselines.start_epochs(model["spec"], None if labels is None else len(labels))
    start_epochs = counting[1].number_input("Start model's training (epochs)", 0, 1000, known, key="methods_start_epochs",
                                            help="The epochs that trained the start model (the zoo baseline's own "
                                                 "training when known); counted for methods from fresh weights.")
    start = st.form_submit_button("Run the methods", type="primary", disabled=running, key="methods_start")

if start and not running:
    try:
        lab_recipe = recipe.replace(
            scoring=ScoringSpec(structure=structure, criterion=criterion,
                                calib_batches=recipe.scoring.calib_batches),
            plan=PlanSpec(sparsity=float(target), scope=scope),
            budget=BudgetSpec(epochs=int(epochs), view=view, start_epochs=int(start_epochs)),
            finetune=TrainConfig(lr=float(lr), batch_size=int(batch_size)), measure=MeasureSpec(min_run_time=0.3))
        unfit = [name for name in chosen if structure not in METHODS[method_of(name)].structures]
        if unfit:
            raise ExplorerError(f"{', '.join(unfit)} cannot prune with {structure} structure; "
                                f"pick unstructured or leave {'it' if len(unfit) == 1 else 'them'} out.")
        data = model["dataset"]
        settings = {"arch": model["arch"], "input_shape": list(data.input_shape), "num_classes": data.num_classes,
                    "model_source": model["source"]}
        job = jobs.start(lambda context: run_lab(lab_recipe, list(chosen), model["module"], data, context=context,
                                                 store=RunStore(), model_name=model["label"], settings=settings,
                                                 base_accuracy=model["base_accuracy"]),
                         name="The methods lab", meta={"model_key": model["key"], "methods": list(chosen),
                                                       "recipe": lab_recipe})
        st.session_state[LAB_JOB] = job
        running = True
    except ExplorerError as exc:
        st.error(str(exc))


@st.fragment(run_every=0.7 if running else None)
def live() -> None:
    """Redrawn while the methods run; hands over to a full rerun when the job ends."""
    job: jobs.Job | None = st.session_state.get(LAB_JOB)
    if job is None or job.meta.get("model_key") != model["key"]:
        return
    if not job.done:
        st.progress(job.fraction, text=job.status)
        st.button("Cancel (keep what ran)", key="methods_cancel", on_click=job.cancel.set, disabled=job.cancelled)
    payload = job.payload()
    points = {name: payload.get(name, []) for name in job.meta["methods"] if payload.get(name)}
    if points:
        st.plotly_chart(figures.trajectories(points), key="methods_curves")
    if job.done and running:
        st.rerun(scope="app")


live()

if job is not None and job.done:
    if job.error is not None:
        st.error(job.error)
    results = job.result or []
    for result in results:
        if result.error:
            st.error(result.error)
    finished = [r for r in results if r.metrics is not None]
    if job.cancelled:
        st.warning("Cancelled: the method that was running was measured as it stood; the rest did not run.")
    if finished:
        lab_recipe = job.meta["recipe"]
        measure = common.task_label(task)
        table = pd.DataFrame([{
            "method": r.method + (" (cancelled)" if r.cancelled else ""),
            **({"accuracy": r.metrics["accuracy"], "Δ accuracy (pts)": 100 * r.metrics["delta_accuracy"]}
               if by_accuracy else {measure: r.metrics["task"]["pruned"], f"dense {measure}": r.metrics["task"]["base"]}),
            "sparsity reached": r.metrics["sparsity_actual"], "epochs trained": max((p["epoch"] for p in r.trajectory),
                                                                                   default=0),
            "speed-up FLOPs": r.metrics["speedup_flops"], "speed-up measured": timing.speedup_text(r.metrics),
            "run": r.run_id} for r in finished])
        st.subheader(f"{lab_recipe.scoring.structure} / {lab_recipe.scoring.criterion} / {lab_recipe.plan.scope}, "
                     f"target {lab_recipe.plan.sparsity:.0%}, budget {lab_recipe.budget.epochs} epochs")
        st.caption(budget_text(lab_recipe.budget, [r.method for r in finished]))
        st.dataframe(table, hide_index=True, column_config={
            "accuracy": st.column_config.NumberColumn(format="percent"),
            "sparsity reached": st.column_config.NumberColumn(format="percent"),
            "Δ accuracy (pts)": st.column_config.NumberColumn(format="%+.1f"),
            measure: st.column_config.NumberColumn(format="%.3f"),
            f"dense {measure}": st.column_config.NumberColumn(format="%.3f"),
            "speed-up FLOPs": st.column_config.NumberColumn(format="%.2fx"),
            "speed-up measured": st.column_config.TextColumn(
                "speed-up measured (95 % interval)",
                help="Median over pairs of forward passes timed alternately (dense, pruned); 'noisy' when the "
                     "interval stayed wider than +-5 %.")})
        for r in finished:
            if note := chance_note(r.method, r.metrics, r.trajectory, model["dataset"].num_classes):
                st.warning(note)
            if note := timing.timing_note(r.metrics):
                st.caption(f"{r.method}: {note}")
        if by_accuracy and (checked := claims({r.method: r.metrics["accuracy"] for r in finished},
                             {r.method: r.error for r in results if r.metrics is None and r.error},
                             chance=1 / max(2, model["dataset"].num_classes))):
            st.markdown("**The literature's claims, on these runs** (one seed: a gap of a point or two can be "
                        "noise; bench/RESULTS_methods.md has three)")
            for row in checked:
                st.markdown(f"- {'✅' if row['holds'] else '❌'} {row['claim']} ({row['source']}): {row['verdict']}.")
        for r in finished:
            if method_of(r.method) == "penalty" and r.model is not None:
                kind = DEFAULT_KIND[lab_recipe.scoring.structure]  # the lab runs each method with its defaults
                what = {"l1": "|w|", "group_lasso": "filter L2 norm", "bn_l1": "BatchNorm |γ|"}[kind]
                st.plotly_chart(figures.norm_distributions(penalty_norms(model["module"], kind),
                                                           penalty_norms(r.model, kind), f"penalty: {what}"),
                                key="methods_norms")
            with st.expander(f"{r.method}: the idea"):
                st.markdown(METHODS[method_of(r.method)].__doc__ or METHODS[method_of(r.method)].summary)
        st.page_link("app_pages/compare.py", label="Compare every run", icon=":material/arrow_forward:")
