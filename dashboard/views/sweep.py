"""Sweep: quality vs net FLOPs for GateSkip and the baselines on the prompt or an uploaded text."""

from __future__ import annotations

import streamlit as st

from analysis.experiments.sweep import METHODS, sweep
from analysis.traces import figures
from dashboard import service
from dashboard.views.common import download, figure_download
from gateskip_core.data import paragraphs


def sweep_view(cfg: service.Settings) -> None:
    view = cfg.view
    if view.gates is None:
        st.warning("A sweep compares gates with baselines: choose gates in the sidebar.")
        return
    source = st.radio("Text", ["current prompt", "uploaded text file"], horizontal=True, key="sweep_source")
    text = ""
    shown = st.session_state.get("shown_trace")
    if source == "uploaded text file":
        file = st.file_uploader("Text file (UTF-8)", key="sweep_upload")
        text = ""
        if file is not None:
            try:
                text = "\n\n".join(paragraphs(file.getvalue().decode("utf-8")))
            except UnicodeDecodeError:
                st.error("the uploaded file is not UTF-8 text")
    elif shown is not None:
        text = shown.sequences[0].text  # the prompt as tokenised (chat formatting included)
    budgets = st.multiselect(
        "Budgets", [0.0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6], default=[0.0, 0.1, 0.3, 0.5], key="sweep_budgets"
    )
    methods = st.multiselect("Methods", list(METHODS), default=list(METHODS), key="sweep_methods")
    metric = st.selectbox("Quality metric", ["top1_agreement", "kl_to_full", "ppl"], key="sweep_metric")
    if st.button("Run sweep", key="run_sweep"):
        if not text.strip():
            st.error("no text to sweep: enter a prompt in Explore or upload a file")
        elif not budgets or not methods:
            st.error("choose at least one budget and one method")
        else:
            bar = st.progress(0.0, text="sweeping…")
            blocks = service.prompt_blocks(view, text)
            table = sweep(
                view,
                sorted(budgets),
                methods,
                blocks,
                on_step=lambda done, total, name: bar.progress(done / total, text=f"{name} ({done}/{total})"),
            )
            bar.empty()
            st.session_state["sweep"] = table
    table = st.session_state.get("sweep")
    if table is not None:
        fig = figures.sweep_figure(table, metric)
        st.plotly_chart(fig, key="sweep_fig")
        st.dataframe(table, hide_index=True)
        c1, c2 = st.columns(2)
        download(c1, "Sweep (CSV)", lambda: table.to_csv(index=False), "sweep.csv", "text/csv")
        figure_download(c2, "Sweep figure (HTML)", fig, "sweep.html")
