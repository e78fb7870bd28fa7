"""The floor for the slider benchmark: one slider, one plotly bar chart, nothing else."""
import plotly.graph_objects as go
import streamlit as st

value = st.slider("Sparsity (fraction of units removed)", 0.0, 1.0, 0.5, 0.01)
st.plotly_chart(go.Figure(go.Bar(x=["a", "b", "c"], y=[value, value / 2, 1 - value])))
