"""Lens: the logit lens of the exact gated run and the settled statistic."""

from __future__ import annotations

import streamlit as st

from analysis.experiments.logit_lens import settled_summary
from analysis.traces import figures
from dashboard import service
from dashboard.views.common import download, explored_trace, figure_download


def lens_view(cfg: service.Settings) -> None:
    shown = explored_trace()
    if shown is None:
        return
    st.caption(
        "Logit lens of the exact gated run: each cell is the top next-token prediction decoded from the "
        "residual stream entering that layer; x marks where the token skipped the branch. A token has "
        "*settled* when the final prediction is already on top."
    )
    branch = st.radio("Mark skips of", ["mlp", "attn", "both"], horizontal=True, key="lens_branch")
    text = shown.sequences[0].text
    key = ("lens", cfg.model_name, cfg.view.gates_label, id(cfg.view), text, repr(cfg.skip_args()))
    if st.button("Run the logit lens on the current prompt and settings", key="run_lens"):
        with st.spinner("running the logit lens…"):
            st.session_state["lens"] = (key, *service.lens(cfg.view, text, cfg))
    stored = st.session_state.get("lens")
    if stored is None:
        return
    shown_key, grid, table = stored
    if shown_key != key:
        st.info("The prompt or settings changed since this lens ran; run it again to update.")
    fig = figures.lens_grid_figure(grid, branch)
    st.plotly_chart(fig, key="lens_grid")
    summary = settled_summary(table)
    st.dataframe(summary, hide_index=True)
    st.plotly_chart(figures.settled_figure(table), key="lens_settled")
    c1, c2, c3 = st.columns(3)
    frame = grid.to_dataframe()
    download(c1, "Lens grid (CSV)", lambda: frame.to_csv(index=False), "logit_lens.csv", "text/csv")
    download(c2, "Settled table (CSV)", lambda: table.to_csv(index=False), "settled.csv", "text/csv")
    figure_download(c3, "Lens grid (HTML)", fig, "logit_lens.html")
