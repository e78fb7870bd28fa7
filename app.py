"""Pruning Explorer: `streamlit run app.py`.

The entry point sets up navigation over the steps in ``app_pages/``, reopens what a link names
(model and Prune settings in the URL's query parameters, so a reload or a shared link shows the
same view) and draws the sidebar card of the session's current model; every page is a thin
layer over ``explorer/``.
"""
import streamlit as st

from explorer.layers import choose_device
from app_pages import common

st.set_page_config(page_title="Pruning Explorer", page_icon=":material/content_cut:", layout="wide")

navigation = st.navigation([
    st.Page("app_pages/tour.py", title="Tour", icon=":material/school:"),
    st.Page("app_pages/model.py", title="Model", icon=":material/model_training:", default=True),
    st.Page("app_pages/inspect.py", title="Inspect", icon=":material/query_stats:"),
    st.Page("app_pages/prune.py", title="Prune", icon=":material/content_cut:"),
    st.Page("app_pages/finetune.py", title="Fine-tune", icon=":material/tune:"),
    st.Page("app_pages/methods.py", title="Methods", icon=":material/timeline:"),
    st.Page("app_pages/sensitivity.py", title="Sensitivity", icon=":material/grid_on:"),
    st.Page("app_pages/compare.py", title="Compare", icon=":material/leaderboard:"),
    st.Page("app_pages/deploy.py", title="Deploy", icon=":material/rocket_launch:"),
])

common.restore_from_url()
if navigation.title != "Model":  # the Model page picks its own; every other page needs one, so the card shows it
    common.require_model()
# Before the page as well as after it: a sidebar link clears the query, and a page that stops early (st.stop)
# never reaches the end of this script, so a reload there would lose the model and the pruned copy.
common.sync_url()

with st.sidebar:
    st.markdown("### Current model")
    model = common.current_model()
    if model is None:
        st.caption("None loaded yet: pick one on the Model page.")
    else:
        st.markdown(f"**{model['label']}**  \non **{model['dataset'].name}**")
        task = common.model_task(model)
        st.caption(f"Baseline {common.task_label(task)}: **{common.fmt_task(task, task['base'])}** (test split)")
        pruned = st.session_state.get(common.PRUNED)
        if pruned is not None and pruned.get("model_key") == model["key"]:
            scoring, plan = pruned["recipe"].scoring, pruned["recipe"].plan
            st.caption(f"Pruned copy: {scoring.structure}, {scoring.criterion}, "
                       f"{plan.scope} {common.fmt_pct(plan.sparsity)}")
    st.caption(f"Device for training: **{choose_device()}**")

navigation.run()
common.sync_url()
