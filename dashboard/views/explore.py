"""Explore: a prompt, its gate heatmaps and token strip, metrics, continuations, and gate attribution of a clicked cell."""

from __future__ import annotations

import pandas as pd
import streamlit as st

from analysis.traces import figures
from dashboard import service
from dashboard.views.common import download, figure_download
from gateskip_core import BRANCHES, GateSkipError


def prompt_input(view) -> tuple[str, bool]:
    example = st.selectbox("Example prompts", ["(your own)"] + list(service.EXAMPLE_PROMPTS), key="example")
    default = service.EXAMPLE_PROMPTS.get(example, service.EXAMPLE_PROMPTS["Python prose"])
    text = st.text_area("Prompt", value=default, height=100, key=f"prompt_{example}")
    chat = False
    if view.tokenizer.chat_template:
        chat = st.checkbox(
            "Format as a chat message (the model's chat template)", value=example.startswith("Chat"), key="chat"
        )
    return text, chat


def current_traces(cfg: service.Settings, text: str, chat: bool):
    """(captured, estimate, exact or None, quality or None, seconds or None, truncated)."""
    view = cfg.view
    key = ("capture", cfg.model_name, view.gates_label, id(view), text, chat, cfg.adapter_scope)
    captured, truncated = _kept("capture", key, lambda: service.capture(view, text, chat, cfg.adapter_scope))
    settings = (key, str(cfg.skip_args()))
    est = _kept("estimate", settings, lambda: service.estimate(view, captured, cfg))
    ex = quality = seconds = None
    if cfg.mode == "exact":
        ex, quality, seconds = _kept("exact", settings, lambda: service.exact(view, text, chat, cfg))
    return captured, est, ex, quality, seconds, truncated


def _kept(name: str, key, compute):
    """`compute()` once per `key`, kept in the session across reruns (a rerun that changes nothing it
    depends on reuses it)."""
    if st.session_state.get(f"{name}_key") != key:
        st.session_state[name] = compute()
        st.session_state[f"{name}_key"] = key
    return st.session_state[name]


def explore_view(cfg: service.Settings) -> None:
    view = cfg.view
    text, chat = prompt_input(view)
    if not text.strip():
        st.info("Enter a prompt (or pick an example) to see which tokens skip which layers.")
        return
    try:
        captured, est, ex, quality, seconds, truncated = current_traces(cfg, text, chat)
    except GateSkipError as err:
        st.error(str(err))
        return
    if truncated:
        st.warning(
            f"The prompt is longer than {service.MAX_PROMPT_TOKENS} tokens; only the first "
            f"{service.MAX_PROMPT_TOKENS} are shown."
        )
    shown = ex if ex is not None else est
    st.session_state["shown_trace"] = shown
    seq = shown.sequences[0]
    metrics_row(shown, quality, seconds)
    if view.gates is None:
        st.info("No gates: every gate counts as 1.0, so skipping falls back to the random policy.")
    strip, heat = heatmap_panel(view, shown)
    attribution_panel(cfg, text, chat, seq)
    if ex is not None:
        estimate_vs_exact(est, ex)
    continuation_panel(view, cfg, text, chat)
    st.subheader("Export")
    c1, c2, c3 = st.columns(3)
    download(c1, "Trace (CSV)", lambda: shown.to_dataframe().to_csv(index=False), "trace.csv", "text/csv")
    figure_download(c2, "Heatmap (HTML)", heat, "heatmap.html")
    download(c3, "Token strip (HTML)", strip, "token_strip.html", "text/html")


def metrics_row(shown, quality, seconds: float | None) -> None:
    """Skips, reached vs asked fraction, net FLOPs saved, and (exact mode) KL and top-1 agreement."""
    seq = shown.sequences[0]
    cols = st.columns(5)
    cols[0].metric("Skipped branch evaluations", int(seq.skipped.sum()))
    reached, asked = shown.skipped_fraction(), shown.budget_fraction()
    cols[1].metric(
        "Skipped fraction",
        f"{reached:.1%}",
        delta=f"{reached - asked:+.1%} vs the budget's {asked:.1%}",
        delta_color="off",
        help="share of eligible branch evaluations skipped (reached), against what the budget table asks",
    )
    cols[2].metric(
        "Net FLOPs saved",
        f"{seq.compute.net_saved_fraction:+.1%}",
        help="net: gates, adapter and stand-ins included; a function of the skip decisions, the same "
        "number on every execution path (masked, physical, cached)",
    )
    if quality is not None:
        cols[3].metric("KL to ungated", f"{quality.kl_to_full:.4f}")
        cols[4].metric("Top-1 agreement", f"{quality.top1_agreement:.1%}")
        st.caption(f"exact mode: model re-run in {seconds:.2f} s")
    else:
        cols[3].metric("KL to ungated", "–", help="measured in exact mode (sidebar: Mode)")
        cols[4].metric("Top-1 agreement", "–", help="measured in exact mode (sidebar: Mode)")
        st.caption("estimate mode: gate values captured once, re-thresholded without a model call")
    st.caption(f"weights: {shown.weights} · gates: {shown.gates}")  # the backbone the trace ran on


def heatmap_panel(view, shown):
    """The token strip and the clickable gate heatmap; returns both (strip HTML, figure) for the export."""
    seq = shown.sequences[0]
    strip = figures.token_strip_html(shown)
    st.html(strip)
    layout = st.radio("Heatmap", ["side by side", "attn", "mlp"], horizontal=True, key="heat_layout")
    branches = ("attn", "mlp") if layout == "side by side" else (layout,)
    heat = figures.gate_heatmap(shown, branches=branches)
    event = st.plotly_chart(heat, key="heatmap", on_select="rerun", selection_mode="points")
    st.caption(gate_caption(shown, branches))
    st.caption("Click a cell to see why its gate is low (gate attribution, below).")
    select_cell(figures.clicked_cell(event), seq.n_tokens, view.spec.n_layers)
    return strip, heat


def estimate_vs_exact(est, ex) -> None:
    """How many decisions the estimate got different from the exact re-run, per layer."""
    differ = service.compare_decisions(est, ex)
    st.subheader("Estimate vs exact")
    st.write(
        f"{int(differ.sum())} of {differ.size} decisions differ between the estimate (captured gates "
        "re-thresholded) and the exact re-run (later layers see the changed residuals)."
    )
    per_layer = pd.DataFrame(
        {"layer": range(differ.shape[1]), "attn": differ[:, :, 0].sum(0), "mlp": differ[:, :, 1].sum(0)}
    )
    st.dataframe(per_layer[(per_layer["attn"] > 0) | (per_layer["mlp"] > 0)], hide_index=True)


def continuation_panel(view, cfg: service.Settings, text: str, chat: bool) -> None:
    """The ungated continuation beside the one with skipping; or, with drafting on, the original's
    continuation drafted by the gated model, each drafted token the original rejected marked."""
    st.subheader("Continuation: ungated vs with skipping")
    n_new = st.slider("New tokens", 4, 48, 16, 4, key="n_new")
    drafting = st.checkbox(
        "Draft with skipping (self-speculative decoding: the original checks every drafted token, so the "
        "output is the original's; marked: drafted tokens it rejected)",
        key="drafting",
    )
    draft_tokens = st.slider("Drafted tokens per round", 1, 8, 4, key="draft_tokens", disabled=not drafting)
    if st.button("Generate continuations", key="generate"):
        try:
            result = service.continuations(view, text, chat, n_new, **cfg.skip_args())
            drafted = None
            if drafting:
                drafted = service.drafted_continuation(view, text, chat, n_new, draft_tokens, **cfg.skip_args())
            st.session_state["continuations"] = (result, drafted)
        except GateSkipError as err:
            st.error(str(err))
    kept = st.session_state.get("continuations")
    if kept is None:
        return
    result, drafted = kept
    left, right = st.columns(2)
    left.markdown("**Ungated**")
    left.code("".join(result.ungated) or "(nothing)")
    if drafted is not None:
        right.markdown("**Drafted with skipping, checked by the original**")
        right.code(drafted.marked() or "(nothing)")
        st.caption(drafted.caption())
        return
    right.markdown("**With skipping**")
    marked = "".join(f"⟦{tok}⟧" if i == result.first_divergence else tok for i, tok in enumerate(result.skipping))
    right.code(marked or "(nothing)")
    st.caption(result.caption())


def gate_caption(shown, branches: tuple[str, ...]) -> str:
    """What the heatmap's gates are in the shown trace's adapter scope, and which of them acted."""
    text = f"Adapter scope {shown.adapter_scope}: {figures.gate_legend(shown, 0, branches)}."
    if figures.not_applied_cells(shown)[:, :, [BRANCHES.index(b) for b in branches]].any():
        text += (
            " Grey cells: the token ran the branch unscaled; its gate only ranked it (hover: "
            f"“{figures.CELL_ROLES['ranked' if shown.has_gates else 'ungated']}”). x: skipped."
        )
    return text


def select_cell(cell: tuple[int, int, str] | None, n_tokens: int, n_layers: int) -> None:
    """A clicked heatmap cell becomes the attribution panel's choice (set before its widgets exist)."""
    if cell is None or cell == st.session_state.get("attr_clicked"):
        return
    position, layer, branch = cell
    if 0 <= position < n_tokens and 0 <= layer < n_layers:
        st.session_state.update(
            attr_clicked=cell, attr_on=True, attr_pos=position, attr_layer=layer, attr_branch=branch
        )


def attribution_panel(cfg: service.Settings, text: str, chat: bool, seq) -> None:
    """Why a gate is low: click (or choose) a cell of the heatmap, see the terms of its pre-activation."""
    view = cfg.view
    clicked = st.session_state.get("attr_clicked") is not None
    with st.expander("Why is this gate low? Gate attribution for one cell", expanded=clicked):
        if view.gates is None:
            st.info("No gates to attribute: load gates first.")
            return
        # Off by default: attribution re-runs the model, and the slider path in estimate mode must not.
        if not st.toggle("Attribute a cell (re-runs the model with these settings)", key="attr_on"):
            return
        c1, c2, c3 = st.columns(3)
        position = int(c1.number_input("Token position", 0, seq.n_tokens - 1, min(5, seq.n_tokens - 1), key="attr_pos"))
        layer = int(c2.number_input("Layer", 0, view.spec.n_layers - 1, view.spec.n_layers // 2, key="attr_layer"))
        branch = c3.radio("Branch", ["attn", "mlp"], horizontal=True, key="attr_branch")
        key = (
            "attribution",
            cfg.model_name,
            view.gates_label,
            id(view),
            text,
            chat,
            str(cfg.skip_args()),
            layer,
            branch,
        )
        try:
            result = _kept("attribution", key, lambda: service.attribution(view, text, chat, cfg, layer, branch))
        except GateSkipError as err:
            st.error(str(err))
            return
        cell = result.cell(position)
        attribution_cell(result, cell, position, layer, branch)
        attention = [c for c in cell["component"] if c.endswith(".attn")]
        if attention:
            attention_split(cfg, text, chat, (*key, position), attention, layer, branch, position)


def attribution_cell(result, cell, position: int, layer: int, branch: str) -> None:
    """One cell's attribution: the terms of its gate's pre-activation, a caption and the CSV."""
    st.plotly_chart(figures.attribution_figure(cell), key="attribution_fig")
    state = "skipped" if result.skipped[position] else "ran"
    st.caption(
        f"token {cell.attrs['token']!r} (position {position}) {state} layer {layer}'s {branch} in the exact run with "
        f"these settings; gate {cell.attrs['gate']:.3f}. The residual it reads is the embedding plus what every "
        "earlier branch added; with the norm's scale held at this token's value the gate's pre-activation "
        "(mean over the gate vector) is exactly the sum of one term per part plus the bias."
    )
    download(
        st,
        "Attribution (CSV)",
        lambda: result.to_dataframe().to_csv(index=False),
        f"attribution_L{layer}_{branch}.csv",
        "text/csv",
        key="download_attribution",
    )


def attention_split(cfg, text: str, chat: bool, key: tuple, attention: list[str], layer, branch, position) -> None:
    """One attention component of the cell split by the earlier tokens whose values carried it."""
    split = st.selectbox(
        "Split an attention component by source token",
        ["(none)"] + attention,
        key="attr_split",
        help="which earlier tokens' value vectors carried that attention layer's push on this gate",
    )
    if split == "(none)":
        return
    source_layer = int(split[1:].split(".")[0])
    try:  # one model run per choice, not per rerun (slider moves)
        sources = _kept(
            "attribution_sources",
            (*key, split),
            lambda: service.attention_sources(cfg.view, text, chat, cfg, layer, branch, position, source_layer),
        )
    except GateSkipError as err:
        st.error(str(err))
        return
    st.plotly_chart(figures.attention_source_figure(sources), key="attribution_sources_fig")
    st.caption(
        "With that layer's attention weights, its output norm's scale and its gate held at their "
        "values in the run, what it added at this token is a sum over earlier tokens: each one's "
        "weight times its value vector; the bars are each source's share of the gate's pre-activation."
    )
