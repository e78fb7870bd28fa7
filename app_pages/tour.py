"""Tour: the three questions of pruning, each answered by a computation on the current model."""
from __future__ import annotations

import pandas as pd
import streamlit as st

from explorer import figures, timing, tour
from explorer.errors import ExplorerError
from explorer.methods.lab import chance_note, defaults_for
from explorer.specs import BudgetSpec, MeasureSpec, PlanSpec, ScoringSpec
from explorer.train import TrainConfig
from app_pages import common

st.title("Tour")
common.explain("""
Pruning answers three questions. **What** to remove: single weights (a mask of zeros) or whole
channels and neurons (the tensors really shrink). **How to decide** which ones: a score per unit
(magnitude, gradient, Taylor, ...), cut per layer (local) or with one threshold over the whole
network (global). **How over time**: once and then fine-tune, in rounds, gradually while training,
or with a sparse network from the start.

Each step below computes its evidence on the model loaded now (the sidebar shows which), so the
numbers are this model's, not a textbook's. Each step ends with a link to the page where you can
try it yourself.
""")

model = common.require_model()
task = common.model_task(model)
by_accuracy = task["name"] == "accuracy"
measure = common.task_label(task)  # a transformer's own metric: perplexity or fidelity
DEFAULTS = defaults_for(task["name"])  # the methods lab's: a transformer gets a short, cheap budget
data = model["dataset"]
if not by_accuracy:
    st.info(f"**{model['label']}** is judged by {measure}: the evidence below is in that metric.",
            icon=":material/info:")
evidence = st.session_state.setdefault("tour_evidence", {})


def computed(step: str, label: str, compute):
    """The evidence of ``step`` for this model, computed when the user asks (kept for the session)."""
    key = (step, model["key"])
    if st.button(label, key=f"tour_{step}", type="primary" if key not in evidence else "secondary"):
        try:
            with st.spinner("Computing on the current model ..."):
                evidence[key] = compute()
        except ExplorerError as exc:
            st.error(str(exc))
    return evidence.get(key)


st.header("1. What to prune")
st.markdown("Zeros in a dense tensor do not make a dense kernel faster: the multiply-adds happen anyway. "
            "Removing whole channels makes every tensor smaller, and that is what a CPU or GPU feels. "
            "Here the same model is pruned both ways and measured in the same call.")
what = computed("what", "Prune it both ways and measure", lambda: tour.what_to_prune(model["module"], data))
if what is not None:
    st.plotly_chart(figures.cost_side_by_side(what["rows"]), key="tour_cost")
    quality = ({"accuracy": st.column_config.NumberColumn("accuracy (no fine-tune)", format="percent"),
                "base_accuracy": st.column_config.NumberColumn("base accuracy", format="percent")} if by_accuracy else
               {measure: st.column_config.NumberColumn(f"{measure} (no fine-tune)", format="%.3f"),
                f"dense {measure}": st.column_config.NumberColumn(format="%.3f")})
    st.dataframe(pd.DataFrame([{
        "label": row["label"], "sparsity": row["sparsity"], "speedup_flops": row["speedup_flops"],
        "speedup_measured": timing.speedup_text(row), "compression_ratio": row["compression_ratio"],
        **({"accuracy": row["accuracy"], "base_accuracy": row["base_accuracy"]} if by_accuracy else
           {measure: row["task"]["pruned"], f"dense {measure}": row["task"]["base"]})} for row in what["rows"]]),
        hide_index=True, column_config={
            "sparsity": st.column_config.NumberColumn(format="percent"), **quality,
            "speedup_flops": st.column_config.NumberColumn("FLOPs speed-up", format="%.2fx"),
            "speedup_measured": st.column_config.TextColumn(
                "measured speed-up (95 % interval)",
                help="Median over pairs of forward passes timed alternately (dense, pruned)."),
            "compression_ratio": st.column_config.NumberColumn("file x smaller", format="%.2fx")})
    for row in what["rows"]:
        if note := timing.timing_note(row):
            st.caption(f"{row['label']}: {note}")
    group = what["group"]
    if group is not None:
        st.markdown(f"A channel is never removed alone. The group rooted at `{group['name']}` ({group['kind']}) "
                    f"couples {len(group['members'])} layers: one of its channels really takes "
                    f"**{group['real']:,.0f}** parameters with it, where counting only the root filter says "
                    f"**{group['naive']:,}**.")
st.page_link("app_pages/prune.py", label="Try it: the Prune page", icon=":material/content_cut:")

st.header("2. How to decide")
st.markdown("A criterion scores every unit; the lowest go. Random scores are the baseline every criterion "
            "must beat. Then the scope: *local* cuts every layer alike, *global* uses one threshold, so a "
            "layer whose scores are small overall can be emptied completely (layer collapse).")
decide = computed("decide", "Compare criteria and scopes", lambda: tour.how_to_decide(model["module"], data))
if decide is not None:
    if by_accuracy:
        rows = [{"criterion": name, "accuracy": value} for name, value in decide["accuracy"].items()]
        st.markdown(f"Test accuracy right after removing **{decide['sparsity']:.0%}** of the weights "
                    f"(global scope, no fine-tune; dense: {common.fmt_pct(decide['base_accuracy'])}):")
        st.dataframe(pd.DataFrame(rows), hide_index=True,
                     column_config={"accuracy": st.column_config.NumberColumn(format="percent")})
    else:
        rows = [{"criterion": name, measure: value} for name, value in decide["task"]["values"].items()]
        better = "higher" if decide["task"]["higher_is_better"] else "lower"
        st.markdown(f"Test {measure} right after removing **{decide['sparsity']:.0%}** of the weights "
                    f"(global scope, no fine-tune; dense: {common.fmt_task(task, decide['task']['base'])}; "
                    f"{better} is better):")
        st.dataframe(pd.DataFrame(rows), hide_index=True,
                     column_config={measure: st.column_config.NumberColumn(format="%.3f")})
    for name, reason in decide.get("refused", {}).items():
        st.caption(f"{name} left out: {reason}")
    st.markdown(tour.collapse_demo_text(decide))
    left, right = st.columns(2)
    for column, scope in ((left, "local"), (right, "global")):
        plan = decide["plans"][scope]
        with column:
            st.plotly_chart(figures.plan_sparsity(plan, title=f"{scope} scope, {decide['collapse_criterion']}, "
                                                              f"{plan.sparsity_requested:.1%}"),
                            key=f"tour_plan_{scope}")
            if plan.collapsed:
                st.warning(f"{scope}: empties {', '.join(plan.collapsed)} (collapse point "
                           f"{tour.collapse_percent(plan.collapse_point)}, `{plan.collapse_layer}`).")
            else:
                st.success(f"{scope}: no layer emptied"
                           + (f" (the first empties from {tour.collapse_percent(plan.collapse_point)} on)"
                              if plan.collapse_point else "") + ".")
st.page_link("app_pages/inspect.py", label="Try it: look at the weights on Inspect", icon=":material/query_stats:")

st.header("3. How over time")
st.markdown("Cutting everything at once and then fine-tuning is one answer. Cutting in rounds, with training "
            "in between, lets the network adapt to each cut. Here both get the same training budget, "
            + (f"at a high sparsity ({DEFAULTS.sparsity:.0%}), where the literature says the rounds pay." if by_accuracy else
               f"at {DEFAULTS.sparsity:.0%} sparsity and a short budget, the methods lab's for a pretrained "
               "transformer, in its own metric."))
# "iterative, 6 rounds" in the methods lab; every round trains at least one epoch, so a transformer, whose lab
# budget is one epoch, gets what the lab picks for it: gradual pruning (the sparsity raised while it trains)
ROUNDS, ITERATIVE = (6, "iterative, 6 rounds") if by_accuracy else (1, "gradual")
EPOCHS = max(DEFAULTS.epochs, ROUNDS)


def run_methods():
    recipe = common.session_recipe(model).replace(
        scoring=ScoringSpec("unstructured", "magnitude"), plan=PlanSpec(DEFAULTS.sparsity, "global"),
        budget=BudgetSpec(epochs=EPOCHS), finetune=TrainConfig(lr=DEFAULTS.lr, batch_size=DEFAULTS.batch_size),
        measure=MeasureSpec(latency=False))
    return tour.how_over_time(recipe, model["module"], data, ("one_shot", ITERATIVE))


over_time = computed("time", f"Run one-shot and iterative in {ROUNDS} rounds ({EPOCHS} epochs each)" if by_accuracy
                     else f"Run one-shot and gradual ({EPOCHS} epoch each)",
                     run_methods)
if over_time is not None:
    for name, result in over_time.items():
        if result["error"]:
            st.error(result["error"])
    finished = {name: result["trajectory"] for name, result in over_time.items() if result["metrics"]}
    if finished:
        st.plotly_chart(figures.trajectories(finished), key="tour_methods")
        st.markdown(" ".join(f"**{name}** ends at " + (common.fmt_pct(result['metrics']['accuracy']) if by_accuracy
                                                         else f"{measure} {common.fmt_task(task, result['metrics']['task']['pruned'])}")
                             + "." for name, result in over_time.items() if result["metrics"]))
        if reading := tour.over_time_text(over_time, EPOCHS, ROUNDS, DEFAULTS.sparsity,
                                          None if by_accuracy else task):
            st.markdown(reading)
        for name, result in over_time.items():
            if note := chance_note(name, result["metrics"], result["trajectory"], data.num_classes):
                st.warning(note)
st.page_link("app_pages/methods.py", label="Try it: the Methods page", icon=":material/timeline:")
