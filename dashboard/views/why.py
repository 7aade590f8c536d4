"""Why: exact harm of single skips on the prompt against every signal (gate faithfulness)."""

from __future__ import annotations

import numpy as np
import streamlit as st

from analysis.traces import figures
from dashboard import service
from dashboard.views.common import download, explored_trace, figure_download
from gateskip_core import GateSkipError


def why_view(cfg: service.Settings) -> None:
    """Do the gates rank what matters? Exact single-skip harm on the current prompt against each signal."""
    shown = explored_trace()
    if shown is None:
        return
    if cfg.view.gates is None:
        st.info("No gates: load gates to compare them with the exact harm of skipping.")
        return
    st.caption(
        "Each sampled (token, layer, branch) is skipped alone and its harm measured exactly: the KL between the "
        "model's next-token distributions without and with the skip, summed from that token on. Then each signal "
        "is compared with it: Spearman within each (layer, branch), and the harm of the entries it ranks lowest "
        "at the budget's skip fraction, against random choice (1.0) and the oracle. The gate is read here as a "
        f"ranking score (which tokens a policy skips first), whether or not it scaled its branch: {shown.gate_role()}."
    )
    text = shown.sequences[0].text
    n = st.slider("Entries to ablate", 60, 600, 120, 60, key="why_entries")
    fraction = float(np.mean(cfg.budget)) if np.mean(cfg.budget) > 0 else 0.25
    key = ("why", cfg.model_name, cfg.view.gates_label, id(cfg.view), text, n, fraction)
    if st.button("Measure on the current prompt", key="run_why"):
        bar = st.progress(0.0, text="ablating…")
        try:
            st.session_state["why"] = (
                key,
                *service.why(cfg.view, text, n, fraction, lambda done, total: bar.progress(done / total)),
            )
        except GateSkipError as err:
            st.error(str(err))
        bar.empty()
    stored = st.session_state.get("why")
    if stored is None:
        return
    shown_key, entries, signals = stored
    if shown_key != key:
        st.info("The prompt or settings changed since this ran; measure again to update.")
    st.dataframe(signals, hide_index=True)
    fig = figures.faithfulness_figure(entries, signals)
    st.plotly_chart(fig, key="why_fig")
    c1, c2, c3 = st.columns(3)
    download(c1, "Signals (CSV)", lambda: signals.to_csv(index=False), "faithfulness.csv", "text/csv")
    download(c2, "Entries (CSV)", lambda: entries.to_csv(index=False), "faithfulness_entries.csv", "text/csv")
    figure_download(c3, "Figure (HTML)", fig, "faithfulness.html")
