"""Layers: per-layer gate distributions, thresholds, skip rates, BOS and token types."""

from __future__ import annotations

import streamlit as st

from analysis.traces import figures
from analysis.traces.flow import layer_skip_summary
from analysis.traces.tracedb import TraceDB
from dashboard import service
from dashboard.views.causal import causal_panel
from dashboard.views.common import download, explored_trace, figure_download


def layers_view(cfg: service.Settings) -> None:
    shown = explored_trace()
    if shown is None:
        return
    table, bos_table, type_table = layer_tables(shown)
    fig = figures.layer_profile_figure(table)
    st.plotly_chart(fig, key="layer_profile")
    st.dataframe(layer_skip_summary(table), hide_index=True)
    bos = figures.bos_figure(bos_table)
    st.plotly_chart(bos, key="bos")
    branch = st.radio("Token types for", ["mlp", "attn"], horizontal=True, key="type_module")
    types = figures.token_type_figure(type_table, branch=branch)
    st.plotly_chart(types, key="types")
    st.dataframe(table, hide_index=True)
    c1, c2, c3, c4 = st.columns(4)
    download(c1, "Layer statistics (CSV)", lambda: table.to_csv(index=False), "layer_stats.csv", "text/csv")
    figure_download(c2, "Layer profile (HTML)", fig, "layer_profile.html")
    figure_download(c3, "BOS profile (HTML)", bos, "bos_profile.html")
    figure_download(c4, "Token types (HTML)", types, "token_types.html")
    causal_panel(cfg, shown)  # on demand: the gate beside what the branch adds and what skipping costs


def layer_tables(shown):
    """The layer, BOS and token-type tables of the shown trace, computed once per trace: a rerun that
    leaves the trace as it was (another tab's widget, the types radio) reuses them."""
    held = st.session_state.get("layer_tables")
    if held is None or held[0] is not shown:
        stats = TraceDB(shown)
        held = (shown, (stats.layer_table(), stats.bos_table(), stats.token_type_table()))
        st.session_state["layer_tables"] = held
    return held[1]
