"""Layers: per-layer gate distributions, thresholds, skip rates, BOS and token types."""

from __future__ import annotations

import streamlit as st

from analysis.traces import figures
from analysis.traces.flow import layer_skip_summary
from analysis.traces.tracedb import TraceDB
from dashboard import service
from dashboard.views.causal import causal_panel
from dashboard.views.common import download, explored_trace, figure_download

CELL_CHOICES = {
    "applied": "applied only: cells whose gate scaled the branch",
    "all": "all cells: every token's gate (its ranking score), acting or not",
}


def gate_cells_choice(key: str) -> str:
    """Which cells the view's gate statistics pool ('applied' by default: the gate as what the model did)."""
    return st.radio(
        "Gate statistics over",
        list(CELL_CHOICES),
        format_func=CELL_CHOICES.get,
        horizontal=True,
        key=key,
        help="In adapter scope 'skipped' a token's gates scale nothing until its first skip: over all cells, "
        "a gate statistic mixes such ranking scores with the gates that acted. Skip rates always pool the "
        "eligible tokens.",
    )


def layers_view(cfg: service.Settings) -> None:
    shown = explored_trace()
    if shown is None:
        return
    st.caption(f"Adapter scope {shown.adapter_scope}: {figures.gate_legend(shown)}.")
    cells = gate_cells_choice("layer_cells")
    table, bos_table, type_table = layer_tables(shown, cells)
    fig = figures.layer_profile_figure(table)
    st.plotly_chart(fig, key="layer_profile")
    never = table[table["gate_n"] == 0]
    if len(never):
        st.caption(
            "No gate acted at: "
            + ", ".join(f"layer {r.layer} {r.branch}" for r in never.itertuples())
            + " (nothing to pool there over applied cells; their gates only ranked the tokens)."
        )
    st.dataframe(layer_skip_summary(table), hide_index=True)
    bos = figures.bos_figure(bos_table)
    st.plotly_chart(bos, key="bos")
    if cells == "applied" and bos_table["ratio"].isna().all():
        st.info(
            "The first token's gate never acted in this trace (it never skipped, so it ran unscaled); "
            "choose all cells to see its ranking score."
        )
    branch = st.radio("Token types for", ["mlp", "attn"], horizontal=True, key="type_module")
    types = figures.token_type_figure(type_table, branch=branch)
    st.plotly_chart(types, key="types")
    st.markdown(f"**Per layer and branch, gate statistics over {figures.pooled_cells(table)}**")
    st.dataframe(table, hide_index=True)
    c1, c2, c3, c4 = st.columns(4)
    download(c1, "Layer statistics (CSV)", lambda: table.to_csv(index=False), f"layer_stats_{cells}.csv", "text/csv")
    figure_download(c2, "Layer profile (HTML)", fig, "layer_profile.html")
    figure_download(c3, "BOS profile (HTML)", bos, "bos_profile.html")
    figure_download(c4, "Token types (HTML)", types, "token_types.html")
    causal_panel(cfg, shown)  # on demand: the gate beside what the branch adds and what skipping costs


def layer_tables(shown, cells: str = "applied"):
    """The layer, BOS and token-type tables of the shown trace over `cells`, computed once per (trace,
    cells): a rerun that leaves both as they were (another tab's widget, the types radio) reuses them."""
    held = st.session_state.get("layer_tables")
    if held is None or held[0] is not shown or held[1] != cells:
        stats = TraceDB(shown, cells=cells)
        held = (shown, cells, (stats.layer_table(), stats.bos_table(), stats.token_type_table()))
        st.session_state["layer_tables"] = held
    return held[2]
