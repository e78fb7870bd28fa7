"""A second floor for the slider benchmark: the floor's slider and chart inside a multipage shell like
app.py's (st.navigation over 8 pages, a sidebar card, wide layout), in a fragment as the Prune page had it.
It shows what the shell alone costs a Streamlit slider move."""
import plotly.graph_objects as go
import streamlit as st


@st.fragment
def slider_and_chart() -> None:
    value = st.slider("Sparsity (fraction of units removed)", 0.0, 1.0, 0.5, 0.01)
    st.plotly_chart(go.Figure(go.Bar(x=["a", "b", "c"], y=[value, value / 2, 1 - value])))


def prune() -> None:
    st.title("Prune")
    slider_and_chart()


def other() -> None:
    st.title("Another page")


st.set_page_config(layout="wide")
navigation = st.navigation([st.Page(prune, title="Prune", default=True)]
                           + [st.Page(other, title=f"Page {i}", url_path=f"page{i}") for i in range(7)])
with st.sidebar:
    st.markdown("### Current model")
    st.markdown("**mlp**  \non **digits**")
    st.caption("Baseline accuracy: **98.5 %** (test split)")
navigation.run()
