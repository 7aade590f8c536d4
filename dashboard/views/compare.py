"""Compare: two (model, weights, gates) choices side by side on the same prompt and budget."""

from __future__ import annotations

import streamlit as st

from analysis.traces import figures
from dashboard import service
from dashboard.views.common import explored_trace, figure_download, gated_view, model_names
from gateskip_core import GateSkipError
from gateskip_core.backbone.quantisation import WEIGHTS


def compare_view(cfg: service.Settings) -> None:
    """Two (model, weights, gates) choices side by side on the same prompt and budget: two gate sets of
    one model, two models (e.g. SmolLM2 vs Gemma-3, each with its shipped gates), or the same gates on a
    float32 and an int4 backbone (how weight quantisation moves the gates and the skips)."""
    shown = explored_trace()
    if shown is None:
        return
    names = model_names()
    left, right = st.columns(2)
    sides = []
    for col, side, default_gates in ((left, "left", 0), (right, "right", 1)):
        name = col.selectbox(f"{side.title()} model", names, index=names.index(cfg.model_name), key=f"cmp_{side}_model")
        choices = [c for c in service.gate_choices(name) if c != "upload"]
        index = min(default_gates, len(choices) - 1) if name == cfg.model_name else 0
        spec = col.selectbox(f"{side.title()} gates", choices, index=index, key=f"cmp_{side}_gates_{name}")
        weights = col.selectbox(
            f"{side.title()} weights", WEIGHTS, key=f"cmp_{side}_weights", help="fp32, or quantised by optimum-quanto"
        )
        sides.append((name, spec, weights))
    branch = st.radio("Branch", ["mlp", "attn"], horizontal=True, key="cmp_module")
    text = shown.sequences[0].text
    if st.button("Compare on the current prompt and budget", key="run_compare"):
        results = {}
        for name, spec, weights in sides:
            try:
                with st.spinner(f"Loading {name} ({weights} weights; the first load converts it once)…"):
                    view = gated_view(name, spec, None, None, weights)
                settings = service.settings_for(cfg, name, view)
                results[(name, spec, weights)] = service.exact(view, text, False, settings)
            except GateSkipError as err:
                results[(name, spec, weights)] = str(err)
        st.session_state["compare"] = (sides, results)
    stored = st.session_state.get("compare")
    if stored is None:
        return
    for col, (name, spec, weights) in zip((left, right), stored[0]):
        col.markdown(f"**{name} · {weights} weights · {spec}**")
        result = stored[1][(name, spec, weights)]
        if isinstance(result, str):
            col.error(result)
            continue
        trace, quality, _ = result
        for notice in trace.notices:  # returned with this call's result (a text cut to the context, ...)
            col.warning(notice)
        seq = trace.sequences[0]
        m1, m2, m3 = col.columns(3)
        m1.metric("Skipped fraction", f"{trace.skipped_fraction():.1%}")
        m2.metric(
            "Net FLOPs saved", f"{seq.compute.net_saved_fraction:+.1%}", help="gates, adapter and stand-ins included"
        )
        m3.metric("Top-1 agreement", f"{quality.top1_agreement:.1%}")
        heat = figures.gate_heatmap(trace, branches=(branch,))
        side = "left" if col is left else "right"
        col.plotly_chart(heat, key=f"cmp_heat_{side}")
        col.caption(f"Adapter scope {trace.adapter_scope}: {figures.gate_legend(trace, 0, (branch,))}")
        figure_download(col, f"{spec} heatmap (HTML)", heat, f"compare_{side}_{branch}.html")
