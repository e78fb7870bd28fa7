"""Prune: structure, criterion, scope and sparsity -> a live plan; Apply makes a pruned copy."""
from __future__ import annotations

import dataclasses

import pandas as pd
import streamlit as st

from explorer import blocks, figures, gqa, hf, mha, pipeline, semistructured, timing
from explorer.criteria import CRITERIA
from explorer.errors import ExplorerError
from explorer.llm import parse_nm
from explorer.planner import Plan
from explorer.specs import PlanSpec, ScoringSpec
from explorer.structural import group_of
from app_pages import common, live_slider

DEFAULTS = {"prune_structure": "unstructured", "prune_criterion": "magnitude", "prune_scope": "global",
            "prune_sparsity": 0.5, "prune_protect": [], "prune_min_keep": 0.0, "prune_override_layers": [],
            "prune_calib": 4, "prune_nm": "2:4", "prune_include_head": False, "prune_calib_shape": False,
            "prune_sequential": False, "prune_round_to": 1,
            "prune_calib_samples": 32, "prune_calib_seqlen": 128, "prune_calib_mode": "windows"}
ROUND_TO = common.ROUND_TO  # kept-channel multiples offered (1: none)
PLAN = "prune_plan"  # the plan on screen, stored by the fragment for Apply below it
SCORING_CANCELLED = "prune_scoring_cancelled"  # set by a Cancel during scoring, read by the next run (before the widgets)
SCORING_PAUSED = "prune_scoring_paused"  # a cancelled ScoringSpec with nothing before it: waits for a click or a change
APPLY_STOPPED = "prune_apply_stopped"  # the line of an Apply cancelled while pruning, shown once by the next run
STEPS = "prune_steps"  # (settings, the plan at every slider step, their views)

st.title("Prune")
common.explain("""
**What goes (structure).** *Unstructured* pruning zeroes single weights through a mask: the
tensors keep their shape, so the file compresses well but dense kernels do just as much work.
*Channel* pruning removes whole neurons / filters. A channel is never alone: removing filter k of
a conv also removes input channel k of the next layer and its BatchNorm entries, and across a
residual add every layer added together must lose the same channel. Such a set is a **coupled
group**; pick a layer below to see its group and how many parameters really go per channel.
In a transformer, *head* removes whole attention heads (their query, key and value slices and the
output projection's inputs) and FFN neurons, and updates the head counts; *N:M* keeps N of every M
consecutive weights of a row (2:4 = 50 %), the one sparse pattern GPU tensor cores can run faster.

**How to decide (criterion).** Each unit gets a score and the lowest scores go. Magnitude uses
|w| (or a filter's L1/L2 norm); gradient, Taylor and SNIP look at how the loss reacts, using a few
calibration batches; BatchNorm scale reads the learned γ; conductance (captum) measures how much
a unit contributes to the right answer; SynFlow needs no data at all; random is the baseline every
criterion must beat. For large models, *Wanda* weighs |w| by the norm of its input activation and
compares weights within each output row (Sun et al. 2023); *SparseGPT* prunes layer by layer and
updates the kept weights to rebuild each layer's output (Frantar & Alistarh 2023; weights only, no
channel or head form).

**Where the cut falls (scope).** *Local*: every layer loses the same fraction. *Global*: one
threshold over all layers, so layers whose scores are small overall lose much more. Pushed far, a
global threshold can empty a layer completely: **layer collapse**, which cuts the network in two.
The collapse point is the sparsity at which that first happens. Guards: switch to local scope,
protect the layer, or keep a minimum fraction (`min_keep`) of every layer.

The chart is a *preview*: scores are computed once per structure and criterion, and moving a
slider only looks up a new cut, so nothing is pruned until you press **Apply**, which prunes a
copy (the loaded model is never changed), measures it and saves it as a run.

**Language models (GPT-2, LLaMA, OPT).** With magnitude, Wanda or SparseGPT, unstructured (local
scope, or global for magnitude) or N:M, the page works as the papers' code does and as the CLI's
`prune`: nothing is scored up front (the plan needs only each layer's size; a global magnitude cut
is a threshold found from histograms of the weights), and Apply prunes one copy of the model in
place, layer by layer (magnitude) or block by block (Wanda, SparseGPT: each block's calibration
statistics, then its weights), with plain zeros. Other settings score and rank every weight first,
about ten times the model's memory; the page says which path a plan takes.
""")


def scoring_widgets(scoring: ScoringSpec) -> dict:
    """The widget values that make up ``scoring`` (to show a Recipe's, or to go back to one after a cancel)."""
    return {"prune_structure": scoring.structure, "prune_criterion": scoring.criterion,
            "prune_calib": scoring.calib_batches, "prune_nm": scoring.nm, "prune_include_head": scoring.include_head,
            "prune_sequential": scoring.sequential, "prune_calib_shape": scoring.shaped_text,
            "prune_calib_mode": scoring.calib_mode,
            **({"prune_calib_samples": scoring.calib_samples} if scoring.calib_samples else {}),
            **({"prune_calib_seqlen": scoring.calib_seqlen} if scoring.calib_seqlen else {})}


model = common.require_model()
causal_lm = blocks.is_causal_lm(model["module"])
if causal_lm:  # the papers prune each layer to the same sparsity (and the lean path plans it without scores)
    DEFAULTS["prune_scope"] = "local"
session_recipe = st.session_state.get(common.RECIPE)
if session_recipe is not None and session_recipe.model == model["spec"]:  # the widgets show the session's Recipe
    DEFAULTS.update({**scoring_widgets(session_recipe.scoring), "prune_scope": session_recipe.plan.scope,
                     "prune_sparsity": session_recipe.plan.sparsity, "prune_protect": list(session_recipe.plan.protect),
                     "prune_min_keep": session_recipe.plan.min_keep, "prune_round_to": session_recipe.plan.round_to,
                     "prune_override_layers": list(session_recipe.plan.overrides),
                     **{f"prune_override_{n}": v for n, v in session_recipe.plan.overrides.items()}})
else:
    session_recipe = None
cancelled = st.session_state.pop(SCORING_CANCELLED, None)  # (the scoring cancelled, the one shown before or None)
if cancelled is not None and cancelled[1] is not None:  # back to the plan shown before: its scores are still here
    st.session_state.update(scoring_widgets(cancelled[1]))
    st.info(f"Scoring {cancelled[0].structure} units by {cancelled[0].criterion} cancelled: the "
            f"{cancelled[1].structure} / {cancelled[1].criterion} plan shown before is kept.", icon=":material/info:")
for key, default in DEFAULTS.items():  # defaults once; choices survive a visit to another page
    st.session_state[key] = st.session_state.get(key, default)

controls, details = st.columns([1, 1])
with controls:
    structure = st.radio("Structure", list(pipeline.STRUCTURES), horizontal=True, key="prune_structure",
                         help="\n\n".join(f"**{k}**: {v}" for k, v in pipeline.STRUCTURES.items()))
    criterion = st.selectbox("Criterion", list(CRITERIA), key="prune_criterion",
                             format_func=lambda name: f"{name} - {CRITERIA[name].description}")
with details:
    calib_batches = 4
    if CRITERIA[criterion].needs_data:
        calib_batches = st.slider("Calibration batches (64 samples each)", 1, 16, key="prune_calib")
    st.caption(f"{structure}: {pipeline.STRUCTURES[structure]}")
    nm = st.session_state["prune_nm"]
    if structure == "nm":
        nm = st.selectbox("N:M pattern (keep N of every M consecutive weights)", common.NM_PATTERNS, key="prune_nm")
        st.caption(f"The {nm} pattern fixes the sparsity at {pipeline.nm_sparsity(parse_nm(nm)):.0%} "
                   "in every layer it fits: the sparsity slider and scope do not apply. On a CPU dense kernels run "
                   "it at about 1x; GPUs with 2:4 sparse tensor cores are where it gets faster.")

llm_options = {}
if blocks.is_causal_lm(model["module"]) and structure in ("unstructured", "nm"):
    with st.expander("LLM pruning as the papers do it: LM head, calibration text"):
        llm_options["include_head"] = st.checkbox(
            "Also prune the LM head", key="prune_include_head",
            help="By default only the Linears inside the transformer blocks are pruned, as Wanda and SparseGPT do.")
        if criterion in ("wanda", "sparsegpt"):
            llm_options["sequential"] = st.checkbox(
                "Sequential calibration", key="prune_sequential",
                help="Each block is calibrated on the outputs of the already pruned blocks before it, as the papers' "
                     "code does (Apply re-runs the calibration block by block); off: one pass of the dense model.")
        if CRITERIA[criterion].needs_data and st.checkbox(
                "Shape the calibration text (instead of the batches above)", key="prune_calib_shape"):
            longest = hf.max_positions(model["module"].hf.config) or 4096
            st.session_state["prune_calib_seqlen"] = min(st.session_state["prune_calib_seqlen"], longest)
            samples_col, seqlen_col, mode_col = st.columns(3)
            llm_options["calib_samples"] = int(samples_col.number_input("Samples", 1, 4096, key="prune_calib_samples"))
            llm_options["calib_seqlen"] = int(seqlen_col.number_input("Tokens each", 2, longest,
                                                                      key="prune_calib_seqlen"))
            llm_options["calib_mode"] = mode_col.radio(
                "Cut as", ["windows", "lines"], key="prune_calib_mode",
                help="windows: from the concatenated token stream, as the papers; lines: one example each, "
                     "padding left out of the statistics.")
scoring = ScoringSpec(structure=structure, criterion=criterion, calib_batches=int(calib_batches), nm=nm,
                      **llm_options)
if st.session_state.get(SCORING_PAUSED) == scoring:  # cancelled, with no plan before it to go back to
    said = st.empty()
    if not st.button(f"Score {structure} units by {criterion}", key="prune_score_again"):
        said.info(f"Scoring {structure} units by {criterion} was cancelled. Pick other settings, or score these "
                  "again.", icon=":material/info:")
        st.stop()
st.session_state.pop(SCORING_PAUSED, None)
# the scope and guard chosen (drawn below, once the layers are known) decide whether a causal LM goes the lean way
settings = PlanSpec(sparsity=float(st.session_state["prune_sparsity"]), scope=st.session_state["prune_scope"],
                    min_keep=float(st.session_state["prune_min_keep"]))
lean = common.lean_for(model, scoring, settings)
general_reason = None if lean else common.lean_reason(model, scoring, settings)
model_bytes = sum(p.numel() * p.element_size() for p in model["module"].parameters())
if general_reason is not None and (free := common.memory_available()) is not None \
        and common.GENERAL_PATH_COPIES * model_bytes > free:  # the whole app would go down with it
    st.error(f"This plan takes the general path ({general_reason}): it scores and ranks every weight, about "
             f"{common.fmt_bytes(common.GENERAL_PATH_COPIES * model_bytes)} for this "
             f"{common.fmt_bytes(model_bytes)} model, more than the {common.fmt_bytes(free)} free. Use local scope "
             "(or N:M) with magnitude, Wanda or SparseGPT: that prunes one copy, block by block.")
    if settings.scope == "global":
        st.button("Switch to local scope", key="prune_lean_local", on_click=st.session_state.update,
                  args=({"prune_scope": "local"},))
    st.stop()
try:
    prepared = common.prepared_for(model, scoring, cancel_key="prune_scoring_cancel", lean=lean)
except ExplorerError as exc:
    st.error(str(exc))
    st.stop()
if prepared is None:  # Cancel: nothing of this scoring is kept; the next run shows the settings scored before
    before = session_recipe.scoring if session_recipe is not None else None
    st.session_state[SCORING_CANCELLED] = (scoring, before if before != scoring else None)
    if before is None or before == scoring:
        st.session_state[SCORING_PAUSED] = scoring
    st.rerun()

layer_names = list(prepared.names)
if lean:
    st.caption(f":material/memory: **Lean path** (a causal LM, as the papers prune it): no scores kept; Apply prunes "
               f"one copy of the model in place, {'layer by layer' if criterion == 'magnitude' else 'block by block'}"
               + (", the global cut a threshold over all blocks' weights"
                  if settings.scope == "global" and structure == "unstructured" else "") + ".")
elif general_reason is not None:
    st.caption(f":material/memory: **General path**: {general_reason}. Every weight is scored and ranked first, "
               f"about ten times the model's {common.fmt_bytes(model_bytes)} in memory. Local scope with magnitude, "
               "Wanda or SparseGPT (or global magnitude without min_keep) takes the lean path.")
for key in ("prune_protect", "prune_override_layers"):  # layer names differ between structures and models
    st.session_state[key] = [name for name in st.session_state[key] if name in layer_names]
scope_col, layers_col = st.columns([1, 1])  # settings a user changes rarely: a full rerun is fine
with scope_col:
    scope = st.radio("Scope", ["local", "global"], horizontal=True, key="prune_scope", disabled=structure == "nm",
                     help="N:M fixes the pattern in every row: scope does not apply." if structure == "nm" else None)
with layers_col, st.expander("Per-layer settings: protect, override, min_keep"):
    protect = st.multiselect("Protected layers (never pruned)", layer_names, key="prune_protect")
    min_keep = st.slider("min_keep: every layer keeps at least this fraction", 0.0, 0.5, step=0.01,
                         key="prune_min_keep")
    round_to = 1
    if structure == "channel":  # hardware prefers channel counts divisible by its vector width or tile
        round_to = st.selectbox(
            "Round each layer's kept channels to a multiple of", ROUND_TO, key="prune_round_to",
            format_func=lambda value: "no rounding" if value == 1 else str(value),
            help="61 kept channels can run slower than 64: oneDNN works in 8 or 16 floats, tensor cores in tiles "
                 "of 8 or 16. The chart, the table and Apply show the rounded counts; the Deploy page measures them.")
    override_layers = st.multiselect("Layers with their own sparsity", [n for n in layer_names if n not in protect],
                                     key="prune_override_layers")
    overrides = {name: st.slider(f"Sparsity of {name}", 0.0, 1.0, float(st.session_state["prune_sparsity"]), 0.01,
                                 key=f"prune_override_{name}") for name in override_layers}


SPARSITY_STEPS = [round(i / 100, 2) for i in range(101)]  # the slider's values (lean.MagnitudeOrder.GRID)


def step_view(plan: Plan) -> dict:
    """What a slider step shows at once: the collapse warning, the four estimates and the per-layer chart."""
    estimate = pipeline.estimate(prepared, plan)
    warning = (f"**Layer collapse:** this plan empties {', '.join(f'`{n}`' for n in plan.collapsed)}. "
               f"Nothing would flow through {'those layers' if len(plan.collapsed) > 1 else 'that layer'}: the network "
               "is cut in two." if plan.collapsed else "")
    return {"warning": warning, "note": plan.note, "figure": figures.plan_sparsity_spec(
        plan, title=f"Per-layer sparsity ({structure}, {criterion}, {scope}); red = emptied"), "cards": [
        live_slider.Card("Parameters after", common.fmt_count(estimate["params_after"]),
                         f"-{common.fmt_pct(1 - estimate['params_after'] / max(1, estimate['params_total']))}",
                         f"{estimate['params_after']:,} of {estimate['params_total']:,} parameters"),
        live_slider.Card("FLOPs after (per input)", common.fmt_count(estimate["flops_after"]),
                         f"{estimate['speedup_flops']:.2f}x fewer" if estimate["flops_after"] else "all removed",
                         f"{estimate['flops_after']:,} of {estimate['flops_dense']:,} FLOPs per input"),
        live_slider.Card("Size estimate (float32)", common.fmt_bytes(estimate["size_bytes_estimate"]),
                         f"dense {common.fmt_bytes(estimate['size_bytes_dense'])}"),
        live_slider.Card("Units pruned", f"{common.fmt_count(plan.pruned)} / {common.fmt_count(plan.total)}",
                         common.fmt_pct(plan.sparsity_actual), f"{plan.pruned:,} of {plan.total:,} units pruned")]}


def plan_steps(spec: PlanSpec) -> tuple[list[tuple[float, Plan]], list[dict]]:
    """The plan and its view at every slider step for these settings: 101 cuts of scores sorted once
    (about 2 ms for the mlp, 0.1 s for 25 M weights in 51 layers), kept in the session until a setting
    changes (the same views list then, so the live slider does not rebuild its patches)."""
    key = (model["key"], scoring, prepared.lean, dataclasses.replace(spec, sparsity=0.0))
    cached = st.session_state.get(STEPS)
    if cached is None or cached[0] != key:
        values = [pipeline.nm_sparsity(parse_nm(nm))] if structure == "nm" else SPARSITY_STEPS
        steps = [(value, pipeline.preview(prepared, dataclasses.replace(spec, sparsity=value))) for value in values]
        cached = key, steps, [step_view(plan) for _, plan in steps]
        st.session_state[STEPS] = cached
    return cached[1], cached[2]


plan_spec = PlanSpec(sparsity=float(st.session_state["prune_sparsity"]), scope=scope, protect=tuple(protect),
                     overrides=overrides, min_keep=float(min_keep), round_to=int(round_to))
try:
    steps, views = plan_steps(plan_spec)
except ExplorerError as exc:
    st.error(str(exc))
    st.stop()

# Depends on the settings, not on the sparsity: drawn once per full rerun, never by a slider move.
any_plan = steps[0][1]
info_col, guards_col = st.columns([1, 1])
with info_col:
    if structure == "nm":
        st.caption(f"{nm} keeps {nm.split(':')[0]} of every {nm.split(':')[1]} weights in each row: no layer can be "
                   "emptied, so there is no collapse point.")
    elif any_plan.collapse_point is not None and any_plan.collapse_point < 1.0:
        st.info(f"{scope.capitalize()} {criterion} pruning empties `{any_plan.collapse_layer}` from "
                f"**{100 * any_plan.collapse_point:.1f} %** sparsity on.", icon=":material/info:")
    elif scope == "global":
        st.success("No layer empties below 100 % sparsity with these guards.", icon=":material/check_circle:")
if scope == "global" and structure != "nm":
    with guards_col:
        st.caption("Guards against layer collapse:")
        fix_local = fix_guard = st.container(horizontal=True)  # the buttons wrap in a narrow window, never cut
        fix_local.button("Switch to local scope", on_click=st.session_state.update, args=({"prune_scope": "local"},),
                         key="fix_local")
        fix_guard.button("Keep at least 5 % per layer", on_click=st.session_state.update,
                         args=({"prune_min_keep": max(0.05, float(min_keep))},), key="fix_min_keep")


def unit_name(group, per_unit: int) -> str:
    """What one unit of a coupled group is: a key/value group (LLaMA-style), a head, a neuron (Linear) or a channel."""
    if group.kind == gqa.KIND:
        return "key/value group"
    if group.kind == mha.KIND or per_unit > 1:
        return "head"
    producers = [m for m in group.members if m.cut == "out"]
    return "neuron" if producers and all(m.type == "Linear" for m in producers) else "channel"


@st.fragment
def plan_view() -> None:
    """Everything a sparsity move changes. The live slider shows every step's estimates and chart at once
    (app_pages/live_slider.py); when the moves settle it reports the value, which reruns only this fragment
    (the table, the coupled group, the plan Apply uses and the URL), not the scoring or the settings."""
    values = [value for value, _ in steps]
    label, no_effect = "Sparsity (fraction of units removed)", None
    if structure == "nm":
        label = f"Sparsity: {values[0]:.0%}, fixed by the {nm} pattern (no slider)"
    elif layer_names and set(layer_names) <= set(override_layers) | set(protect):
        no_effect = "Every layer has its own sparsity or is protected: this slider has no effect."
        label = "Sparsity (no effect: every layer has its own sparsity or is protected)"
    sparsity = live_slider.live_slider(
        label, values, views, value_key="prune_sparsity", key="prune_live",
        disabled=structure == "nm" or no_effect is not None,
        help="N:M fixes the sparsity." if structure == "nm" else no_effect)
    plan = steps[values.index(sparsity)][1]
    try:
        recipe = common.session_recipe(model).replace(scoring=scoring,
                                                      plan=dataclasses.replace(plan_spec, sparsity=sparsity))
    except ExplorerError as exc:
        st.error(str(exc))
        st.stop()
    st.session_state[common.RECIPE], st.session_state[PLAN] = recipe, plan
    common.sync_url()  # a fragment rerun skips app.py, which syncs the URL on full reruns

    # Built only while open: a grid re-sent with every reported value costs the browser ~10-20 ms.
    with st.expander("Per-layer table", key="prune_table_open", on_change="rerun") as table:
        if table.open:
            layers = pd.DataFrame([{"layer": lp.name, "kind": prepared.layer_kinds.get(lp.name, ""), "units": lp.total,
                                    "kept": lp.kept, "pruned": lp.pruned, "sparsity": lp.sparsity, "rule": lp.source,
                                    "collapsed": lp.collapsed} for lp in plan.layers])
            st.dataframe(layers, hide_index=True, column_config={
                "sparsity": st.column_config.ProgressColumn("sparsity", format="percent", min_value=0.0,
                                                            max_value=1.0)})

    if structure in ("channel", "head"):
        st.subheader("Coupled groups")
        root = st.selectbox("Layer", [g.name for g in prepared.groups], key="prune_group_layer",
                            help="The group whose removal shrinks this layer's outputs.")
        # by name: a key/value group is named by its attention, which is none of its layers
        group = next((g for g in prepared.groups if g.name == root), None) or group_of(prepared.groups, root)
        if group is not None:
            unit_plan = plan.layer(group.name) if group.name in prepared.names else None
            removed = unit_plan.pruned if unit_plan is not None else 0
            # a head group's unit is a whole head: head_dim channels of the query, key and value together
            per_unit = group.channels // unit_plan.total if unit_plan is not None and unit_plan.total else 1
            unit = unit_name(group, per_unit)
            real, naive = per_unit * group.params_per_channel_real, per_unit * group.params_per_channel_naive
            g1, g2, g3 = st.columns(3)
            g1.metric(f"{unit.capitalize()}s in group", group.channels // per_unit, f"{removed} removed by this plan",
                      delta_color="off", delta_arrow="off")
            g2.metric(f"Params per {unit}, real", f"{real:,.0f}")
            g3.metric(f"Params per {unit}, naive", f"{naive:,}",
                      help="Only the root layer's own slice (weight rows and bias): what a per-layer view suggests.")
            st.caption(f"Group kind: {group.kind}" + (f", {per_unit} channels a head" if per_unit > 1 else "")
                       + f". Removing {removed} {unit}(s) frees {'' if group.uniform() else 'about '}"
                       f"{removed * real:,.0f} parameters; counting only "
                       f"the root layer would say {removed * naive:,}.")
            st.dataframe(pd.DataFrame([{"layer": m.layer, "type": m.type, "cut": m.cut, "channels": m.channels,
                                        "depthwise": m.depthwise} for m in group.members]), hide_index=True)

plan_view()
# Outside the fragment: nothing below changes with a sparsity move, and every element a fragment
# rerun re-sends costs the browser time (bench/RESULTS_slider.md). Apply is a full rerun, whose
# fragment run has just stored the plan on screen.
if not pipeline.estimate(prepared, st.session_state[PLAN])["exact"]:
    st.caption("Channel estimates leave out biases and BatchNorm; Apply replaces them with exact counts. "
               "Unstructured: non-zero parameters, and FLOPs a sparse kernel would do.")
st.divider()
applying = st.session_state.get(common.APPLY_JOB)
if (stopped := st.session_state.pop(APPLY_STOPPED, None)) is not None:
    st.info(stopped, icon=":material/info:")
if prepared.lean and applying is None:
    st.caption("Apply prunes one copy of the model (the loaded one stays as it is for the other pages); a pruned "
               "copy shown below is let go first, so memory holds at most two models (it stays saved as a run).")
if st.button("Apply: prune a copy, measure it, save the run", type="primary", key="prune_apply",
             disabled=applying is not None):
    plan, recipe = st.session_state[PLAN], st.session_state[common.RECIPE]
    if prepared.lean:  # its memory goes before the new copy is made
        st.session_state.pop(common.PRUNED, None)
    applying = st.session_state[common.APPLY_JOB] = common.start_apply(model, prepared, plan, recipe)
    applying.meta.update(plan=plan.to_dict(), recipe=recipe, model_key=model["key"])
if applying is not None and common.follow_job(applying, cancel_key="prune_apply_cancel", what="Apply"):
    del st.session_state[common.APPLY_JOB]
    if applying.error is not None:
        st.error(applying.error)
    elif applying.result is None:  # cancelled while pruning: the copy was dropped; said after a rerun that frees Apply
        st.session_state[APPLY_STOPPED] = f"{applying.meta['stopped'].get('at', 'Apply cancelled')}: nothing was " \
            "kept and the loaded model is unchanged. Apply again when you are ready."
        st.rerun()
    else:  # kept even when the store refused the run (or the measurement was cancelled): Fine-tune can go on
        pruned_module, run, refused = applying.result
        st.session_state[common.PRUNED] = {"module": pruned_module, "recipe": applying.meta["recipe"],
                                           "plan": applying.meta["plan"], "metrics": run.metrics, "run_id": run.id,
                                           "model_key": applying.meta["model_key"], "run_name": run.name,
                                           "unsaved": str(refused) if refused else None}
        st.rerun()  # the sidebar card (drawn before this page) then shows the new pruned copy

pruned = st.session_state.get(common.PRUNED)
if pruned is not None and pruned["model_key"] == model["key"]:
    m = pruned["metrics"]
    task = m.get("task") or {**common.model_task(model), "pruned": m["accuracy"]}
    if pruned.get("unsaved"):
        st.error(pruned["unsaved"])
    else:
        st.success(f"Saved **{pruned['run_name']}**.")
    if m.get("cancelled"):
        skipped = "latency" if m["cancelled"] == "latency" else f"{common.task_label(task)} and latency"
        st.warning(f"Measurement cancelled: the pruned copy is kept and saved with what was measured; {skipped} "
                   "not measured. Apply again for the full measurement.", icon=":material/warning:")
    r = st.columns(5)
    r[0].metric(common.task_label(task).capitalize(), common.fmt_task(task, task["pruned"]),
                common.fmt_task_delta(task, task["base"], task["pruned"]),
                delta_color="normal" if task["higher_is_better"] else "inverse",
                help=f"Dense model: {common.fmt_task(task, task['base'])}.{common.tokens_help(task)}")
    r[1].metric("Non-zero params", common.fmt_count(m["params_nonzero"]), f"of {common.fmt_count(m['params_total'])}",
                delta_color="off", delta_arrow="off",
                help=f"{common.fmt_int(m['params_nonzero'])} of {common.fmt_int(m['params_total'])} parameters.")
    r[2].metric("Compressed size", common.fmt_bytes(m["size_compressed_bytes"]),
                f"base {common.fmt_bytes(m['baseline_size_compressed_bytes'])}", delta_color="off", delta_arrow="off")
    r[3].metric("Speed-up, FLOPs", f"{m['speedup_flops']:.2f}x")
    measured, interval = timing.speedup_card(m)
    r[4].metric("Speed-up, measured", measured, interval, delta_color="off", delta_arrow="off",
                help="Median over pairs of forward passes timed alternately (dense, pruned), with its 95 % interval; "
                     "'noisy' when the interval stayed wider than +-5 %.")
    if m.get("latency_ms") is not None:
        st.caption(f"Timed on {m.get('device')}, batch {m.get('batch')}, {m.get('threads')} thread(s). "
                   + timing.timing_note(m))
    scoring_of_run = pruned["recipe"].scoring
    kernels = semistructured.describe(m.get("semi_structured"),
                                      scoring_of_run.nm if scoring_of_run.structure == "nm" else None)
    if kernels:
        st.caption(kernels)
    st.page_link("app_pages/finetune.py", label="Next: fine-tune the pruned copy", icon=":material/arrow_forward:")

