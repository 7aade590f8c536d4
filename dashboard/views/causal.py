"""Layers view, on demand: per layer, the gate beside what the branch adds and what skipping it costs.

The gate is a correlational reading; this panel runs the model to measure, on the current prompt,
`rel_norm` (what the branch adds relative to the residual) and the exact harm of single forced skips
(`analysis.experiments.causal`). It runs ablations, so it starts only on the button.
"""

from __future__ import annotations

import pandas as pd
import streamlit as st

from analysis.experiments.causal import layer_effects, text_effects
from analysis.traces.figures import causal_figure
from dashboard import service
from dashboard.views.common import download, figure_download
from gateskip_core import GateSkipError


def causal_panel(cfg: service.Settings, shown) -> None:
    """The button, its progress bar, and the per-layer figure and table of the last measurement."""
    st.subheader("Causal check: what each branch adds, what skipping it costs")
    st.caption(
        "Measured on the current prompt: what the branch adds relative to the residual it reads (every branch "
        "running), and the exact harm of forcing one token to skip one branch (KL of the next-token "
        "distributions, per affected position), on a sample of tokens per (layer, branch). In adapter scope "
        "'skipped' a forced skip also moves that token onto the adapter for the rest of the model."
    )
    per_branch = st.slider("Tokens per (layer, branch)", 1, 4, 1, key="causal_per_branch")
    with_bos = st.checkbox("Also skip BOS (lifts its protection for the measurement)", key="causal_bos")
    skip = _mean_budget(cfg.budget)
    key = ("causal", cfg.model_name, cfg.view.gates_label, id(cfg.view), id(shown), per_branch, with_bos, skip)
    if st.button("Measure on the current prompt", key="run_causal"):
        bar = st.progress(0.0, text="ablating…")
        try:
            st.session_state["causal"] = (key, _measure(cfg, shown, skip, per_branch, with_bos, bar))
        except GateSkipError as err:
            st.error(str(err))
        bar.empty()
    stored = st.session_state.get("causal")
    if stored is None:
        return
    shown_key, table = stored
    if shown_key != key:
        st.info("The prompt or settings changed since this ran; measure again to update.")
    fig = causal_figure(table)
    st.plotly_chart(fig, key="causal_fig")
    st.dataframe(table, hide_index=True)
    c1, c2 = st.columns(2)
    download(c1, "Causal layer table (CSV)", lambda: table.to_csv(index=False), "layer_causal.csv", "text/csv")
    figure_download(c2, "Causal figure (HTML)", fig, "layer_causal.html")


def _mean_budget(budget) -> float:
    values = budget if isinstance(budget, list) else [budget]
    return float(sum(values) / len(values))


def _measure(cfg: service.Settings, shown, skip: float, per_branch: int, with_bos: bool, bar) -> pd.DataFrame:
    view = cfg.view
    ids = view.encode([shown.sequences[0].text], max_tokens=service.MAX_PROMPT_TOKENS).input_ids
    cells = text_effects(
        view,
        ids,
        skip=skip,
        per_branch=per_branch,
        include_bos=with_bos,
        adapter_scope=cfg.adapter_scope,
        on_step=lambda done, total: bar.progress(done / total, text=f"ablating… {done}/{total}"),
    )
    return layer_effects(cells.assign(text=0))
