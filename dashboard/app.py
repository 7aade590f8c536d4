"""GateSkip Lens dashboard: which tokens skip which layers, with live budget sliders.

Run with `gateskip dashboard` (or `streamlit run dashboard/app.py`). UI only: this file composes
the views (`dashboard/views/`, one module each); all model, policy and statistics code lives in
gateskip_core and analysis, the glue in dashboard/service.py.
"""

from __future__ import annotations

import streamlit as st

from dashboard.views.compare import compare_view
from dashboard.views.corpus import corpus_view
from dashboard.views.explore import explore_view
from dashboard.views.layers import layers_view
from dashboard.views.lens import lens_view
from dashboard.views.sidebar import sidebar
from dashboard.views.sweep import sweep_view
from dashboard.views.tasks import tasks_view
from dashboard.views.why import why_view
from gateskip_core import GateSkipError


def main() -> None:
    st.set_page_config(page_title="GateSkip Lens", layout="wide")
    st.title("GateSkip Lens")
    st.caption("Which tokens skip which layers, and why: learned residual gates (arXiv 2510.13876).")
    try:
        cfg = sidebar()
    except GateSkipError as err:
        st.error(str(err))
        return
    explore, why, layers, lens_tab, sweep_tab, tasks_tab, compare, corpus = st.tabs(
        ["Explore", "Why", "Layers", "Lens", "Sweep", "Tasks", "Compare", "Corpus"]
    )
    with explore:
        explore_view(cfg)
    with why:
        why_view(cfg)
    with layers:
        layers_view(cfg)
    with lens_tab:
        lens_view(cfg)
    with sweep_tab:
        sweep_view(cfg)
    with tasks_tab:
        tasks_view(cfg)
    with compare:
        compare_view(cfg)
    with corpus:
        corpus_view(cfg)


main()
