"""Inspect: what the weights, their gradients and the channels' attributions look like, layer by layer."""
from __future__ import annotations

import re

import pandas as pd
import streamlit as st

from explorer import figures, pipeline, stats
from explorer.blocks import is_causal_lm
from explorer.errors import ExplorerError
from explorer.specs import PlanSpec, ScoringSpec
from app_pages import common

st.title("Inspect")
common.explain("""
Before cutting, look. Each **histogram** shows the values of one layer's weights. Trained
weights pile up around zero with long tails; magnitude pruning bets that the ones near zero
matter least. The red dashed lines mark the current cut: at the sparsity and scope chosen on the
Prune page, unstructured magnitude pruning removes every weight between them. With a **global**
scope the cut is the same |w| in every layer, so a layer whose weights are all small overall (here
or after a different initialisation) is hit hardest, and can be emptied (layer collapse).
A **shared axis** makes that comparison visible; a **log count** shows the tails.

**Gradients** are the derivative of the loss with respect to each weight, averaged over a few
calibration batches of training data. A large gradient means the loss is sensitive to that weight
right now; gradient, Taylor (|w·g|) and SNIP criteria build on this.

**Attribution** (captum layer conductance) asks, for one layer, how much each output channel or
neuron contributes to the score of the correct class, averaged over the calibration batches. Units
with almost no conductance are candidates for removal whatever their weight norm says.

A transformer has dozens of Linear layers, repeated block after block. Pick a **block** to see
only its layers, and read the **per-block table**: mean |w| of each role (query, key, value,
attention output, FFN in / out) in every block, so a block or a role that stands out is found at a
glance.
""")

GROUP_ABOVE = 12  # more layers than this: group them by block
OUTSIDE = "(outside blocks)"
ALL_BLOCKS = "all blocks"


def block_of(name: str) -> tuple[str, str]:
    """('hf.encoder.layer.3', 'attention.self.query'): the repeated block a layer sits in, and its role there.

    A block is the name up to its first numbered part; layers outside any block (embeddings' projections,
    pooler, classifier) share one group.
    """
    match = re.match(r"^(.*?\.\d+)\.(.+)$", name)
    return (match.group(1), match.group(2)) if match else (OUTSIDE, name)

model = common.require_model()
pruned = st.session_state.get(common.PRUNED)
target_module, target_label = model["module"], "base model"
if pruned is not None and pruned["model_key"] == model["key"]:
    which = st.radio("Inspect", ["base model", "pruned copy"], horizontal=True, key="inspect_which",
                     help="The pruned copy shows the spike of zeros (unstructured) or its smaller layers (channel).")
    if which == "pruned copy":
        target_module, target_label = pruned["module"], f"pruned copy ({pruned['run_name']})"

c = st.columns(4)
shared = c[0].toggle("Shared x axis", key="inspect_shared")
log_count = c[1].toggle("Log count", key="inspect_log")
bins = c[2].slider("Bins", 10, 100, 40, 5, key="inspect_bins")
calib_batches = c[3].slider("Calibration batches", 1, 16, 4, key="inspect_calib",
                            help="Batches of 64 training samples for gradients and attributions.")

try:
    weights = stats.weight_stats(target_module, bins=bins, shared_range=shared)
except ExplorerError as exc:
    st.error(str(exc))
    st.stop()
layers = list(weights)
grouped = len(layers) > GROUP_ABOVE
block, in_block = ALL_BLOCKS, layers
if grouped:
    blocks = list(dict.fromkeys(block_of(n)[0] for n in layers))
    block = st.selectbox(f"Block ({len(layers)} layers in {len(blocks)} groups)", [ALL_BLOCKS, *blocks],
                         index=1 if len(blocks) > 1 else 0, key="inspect_block",
                         help="The histograms, the summary chart and its table show this block's layers.")
    in_block = layers if block == ALL_BLOCKS else [n for n in layers if block_of(n)[0] == block]
chosen = st.multiselect("Layers", in_block, default=in_block[:9],
                        key="inspect_layers" if block == ALL_BLOCKS else f"inspect_layers_{block}")

# The |w| cut of unstructured magnitude pruning at the Prune page's sparsity and scope.
session_recipe = st.session_state.get(common.RECIPE)
chosen_plan = session_recipe.plan if session_recipe is not None and session_recipe.model == model["spec"] \
    else PlanSpec(sparsity=0.5, scope="local" if is_causal_lm(model["module"]) else "global")  # Prune's default
sparsity, scope = chosen_plan.sparsity, chosen_plan.scope
cuts: dict[str, float | None] = {}
if target_label == "base model":
    try:
        by_magnitude = ScoringSpec("unstructured", "magnitude")
        # a causal LM: no scores kept, each shown layer's cut is its k-th smallest |w| (the same numbers)
        lean = common.lean_for(model, by_magnitude, PlanSpec(sparsity, scope, min_keep=chosen_plan.min_keep))
        magnitude = common.prepared_for(model, by_magnitude, cancel_key="inspect_cut_cancel", lean=lean)
        if magnitude is None:  # the user cancelled the scoring: the histograms come without the cut
            raise ExplorerError("the scoring was cancelled")
        cut_plan = pipeline.preview(magnitude, PlanSpec(
            sparsity, scope, protect=tuple(n for n in chosen_plan.protect if n in magnitude.names),
            overrides={n: v for n, v in chosen_plan.overrides.items() if n in magnitude.names},
            min_keep=chosen_plan.min_keep))
        cuts = pipeline.thresholds(magnitude, cut_plan, names=set(chosen))
        st.caption(f"Red dashed lines: the |w| cut of unstructured magnitude pruning at {sparsity:.0%} sparsity, "
                   f"{scope} scope (set on the Prune page); weights between them would be removed."
                   + (" Computed for the layers shown only (no scores kept for a language model)." if lean else ""))
    except ExplorerError as exc:
        st.warning(f"No pruning threshold to draw: {exc}")


if chosen:
    st.plotly_chart(figures.histograms(weights, chosen, f"Weight distributions - {target_label}", thresholds=cuts,
                                       log_count=log_count), key="inspect_weights")

task = common.model_task(model)
labelled = task["name"] == "accuracy"
st.subheader("Gradients")
# The gradients themselves are kept: bins, the shared axis and log counts only redraw their histograms.
grad_key = ("inspect_gradients", model["key"], target_label, calib_batches)
if not labelled:
    st.caption(f"{model['label']} on {model['dataset'].name} is judged by {common.task_label(task)}, so the gradients "
               "follow " + ("the next-token loss on the text (as LLM-Pruner calibrates)." if task["name"] == "perplexity"
                            else "the sampled-label Fisher loss: targets drawn from the model's own outputs, since "
                                 "there are no labels and a loss against the dense model itself has no gradient."))
if st.button(f"Collect gradients over {calib_batches} calibration batches", key="inspect_collect"):
    try:
        with st.spinner("Running forward and backward passes ..."):
            calib = model["dataset"].calibration(calib_batches, 64)
            st.session_state["inspect_gradients"] = (grad_key, stats.mean_gradients(target_module, calib))
    except ExplorerError as exc:
        st.error(str(exc))
stored = st.session_state.get("inspect_gradients")
gradients = stats.summaries(stored[1], bins=bins, shared_range=shared) \
    if stored is not None and stored[0] == grad_key else None
if gradients is None:
    st.caption("Press the button to average the loss gradient of every layer over the calibration batches.")
elif gradients is not None and chosen:
    st.plotly_chart(figures.histograms(gradients, [n for n in chosen if n in gradients],
                                       f"Gradient distributions (mean over {calib_batches} batches)",
                                       log_count=log_count), key="inspect_grads")

summary = pd.DataFrame([{"layer": n, "mean |w|": weights[n]["mean_abs"], "std of w": weights[n]["std"],
                         "zeros": weights[n]["zeros_fraction"],
                         "mean |g|": gradients[n]["mean_abs"] if gradients and n in gradients else None}
                        for n in in_block])
st.plotly_chart(figures.layer_summary({n: weights[n] for n in in_block}, gradients), key="inspect_summary")
st.dataframe(summary, hide_index=True, column_config={"zeros": st.column_config.NumberColumn(format="percent")})

if grouped:
    st.subheader("Per block")
    value = st.radio("Value", ["mean |w|", "std of w", "zeros"], horizontal=True, key="inspect_block_value")
    field = {"mean |w|": "mean_abs", "std of w": "std", "zeros": "zeros_fraction"}[value]
    cells = pd.DataFrame([{"block": b, "role": r, value: weights[n][field]}
                          for n in layers for b, r in [block_of(n)] if b != OUTSIDE])
    if not cells.empty:
        table = cells.pivot(index="block", columns="role", values=value).reindex(
            index=list(dict.fromkeys(cells["block"])), columns=list(dict.fromkeys(cells["role"])))
        st.dataframe(table, column_config={role: st.column_config.NumberColumn(
            role, format="percent" if value == "zeros" else "%.4f") for role in table.columns},
            key="inspect_block_table")
        st.caption(f"{value} of every layer role (columns) in every block (rows); layers outside the blocks are "
                   "in the table above.")

st.subheader("Attribution per channel")
if not labelled:
    st.caption(f"Conductance attributes the score of the correct class, and {model['label']} on "
               f"{model['dataset'].name} has no classes to attribute: load a classifier with a labelled text file "
               "(.jsonl / .csv) to see it.")
    st.stop()
attributable = set(stats.attribution_layers(target_module))
attr_layer = st.selectbox("Layer", [n for n in in_block if n in attributable], key="inspect_attr_layer")
attr_key = ("inspect_attribution", model["key"], target_label, attr_layer, calib_batches)
if st.button("Compute conductance", key="inspect_attr"):
    try:
        with st.spinner(f"captum layer conductance for {attr_layer} ..."):
            calib = model["dataset"].calibration(calib_batches, 64)
            st.session_state["inspect_attribution"] = (attr_key, stats.attribution(target_module, attr_layer, calib))
    except ExplorerError as exc:
        st.error(str(exc))
stored = st.session_state.get("inspect_attribution")
if stored is not None and stored[0] == attr_key:
    values = stored[1].tolist()
    st.plotly_chart(figures.attribution(values, attr_layer), key="inspect_attr_chart")
    low = sorted(range(len(values)), key=values.__getitem__)[:5]
    st.caption(f"Lowest-attribution units: {', '.join(map(str, low))}. "
               f"{sum(v == 0 for v in values)} of {len(values)} units have exactly zero conductance.")
else:
    st.caption("Choose a layer and press the button (a few seconds on a small model).")
