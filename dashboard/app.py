"""GateSkip Lens dashboard: which tokens skip which layers, with live budget sliders.

Run with `gateskip dashboard` (or `streamlit run dashboard/app.py`). UI only: all
model, policy and statistics code lives in gateskip_core and analysis; the few
glue functions are in dashboard/service.py.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import numpy as np
import pandas as pd
import streamlit as st

from analysis import figures
from analysis.flow import TOKEN_TYPES, FlowStats, layer_skip_summary
from analysis.logit_lens import settled_summary
from analysis.sweep import METHODS, sweep
from dashboard import service
from gateskip_core import DEFAULT_MODEL, REGISTRY, GateSkipError
from gateskip_core.data import paragraphs

START_MODEL = os.environ.get("GATESKIP_DASHBOARD_MODEL", DEFAULT_MODEL)
# The registry's models, and a local checkpoint directory given on the command line (visitors
# cannot name other paths).
MODEL_NAMES = list(REGISTRY) + ([START_MODEL] if START_MODEL not in REGISTRY else [])


@st.cache_resource(show_spinner=False)
def hub() -> service.ModelHub:
    return service.ModelHub()


@st.cache_resource(show_spinner=False, max_entries=16)
def gated_view(model_name: str, gates: str, upload_digest: str | None, _upload: bytes | None):
    """One view per (model, gates) per process, shared by all sessions (views are read-only)."""
    return hub().view(model_name, gates, _upload)


def figure_download(container, label: str, fig, file_name: str) -> None:
    """A figure as a standalone HTML file; serialised only when clicked (keeps the slider path light)."""
    container.download_button(
        label, lambda: fig.to_html(include_plotlyjs="cdn"), file_name, "text/html", key=f"download_{file_name}"
    )


def sidebar() -> service.Settings:
    sb = st.sidebar
    sb.header("Model and gates")
    names = MODEL_NAMES
    index = names.index(START_MODEL) if START_MODEL in names else 0
    model_name = sb.selectbox("Model", names, index=index, key="model")
    with st.spinner(f"Loading {model_name} (the first load converts it once)…"):
        base = hub().base(model_name)
    choices = service.gate_choices(model_name)
    gates = sb.selectbox(
        "Gates", choices, key="gates", help="shipped trained gates, untrained gates, none, or upload a file"
    )
    upload = None
    if gates == "upload":
        file = sb.file_uploader("Gate checkpoint (.safetensors)", type=None, key="gate_upload")
        upload = file.getvalue() if file is not None else None
    view = load_view(model_name, gates, upload)

    sb.header("Skip budget")
    mode = sb.radio(
        "Mode",
        ["estimate", "exact"],
        horizontal=True,
        key="mode",
        help="estimate: re-threshold the captured gates (no model call). "
        "exact: re-run the model with the skips applied.",
    )
    budget = sb.slider("Global skip budget", 0.0, 0.9, 0.25, 0.05, key="global_budget")
    allocation = sb.radio(
        "Spread over layers",
        ["auto", "uniform", "global"],
        horizontal=True,
        key="allocation",
        help="uniform: the same fraction in every layer (the paper's rule); global: one compute budget spent "
        "where skipping costs least (needs gates trained with it); auto: global when the gates support it",
    )
    per_layer = None
    with sb.expander("Per-layer budgets"):
        if st.checkbox("Set per layer", key="per_layer_on"):
            per_layer = [
                st.slider(f"layer {i}", 0.0, 0.9, budget, 0.05, key=f"layer_budget_{i}")
                for i in range(base.spec.n_layers)
            ]
    branches = sb.radio("Branches that may skip", ["both", "attn", "mlp"], horizontal=True, key="branches")
    policy = sb.selectbox("Policy", ["quantile", "calibrated", "random"], key="policy")
    adapter_scope = sb.radio(
        "Adapter applies to",
        ["auto", "all", "skipped"],
        horizontal=True,
        key="adapter_scope",
        help="all: every token runs the gates' adapter and soft gates; skipped: only tokens from their first "
        "skipped branch on (with nothing skipped the model is the original); auto: what the gates were trained for",
    )
    protect_bos = sb.checkbox("Protect the first token (BOS)", value=True, key="protect_bos")
    seed = int(sb.number_input("Seed (random policy)", value=0, step=1, key="seed"))
    return service.Settings(
        model_name=model_name,
        view=view,
        mode=mode,
        budget=per_layer if per_layer is not None else budget,
        branches=branches,
        policy=policy,
        protect_bos=protect_bos,
        seed=seed,
        allocation=allocation,
        adapter_scope=adapter_scope,
    )


def load_view(model_name: str, gates: str, upload: bytes | None):
    """The chosen gates, or the previous working ones with an error when they cannot be loaded."""
    digest = hashlib.sha256(upload).hexdigest() if upload is not None else None
    try:
        view = gated_view(model_name, gates, digest, upload)
        st.session_state["last_good_gates"] = (model_name, gates, digest, upload)
        return view
    except GateSkipError as err:
        st.sidebar.error(str(err))
        last = st.session_state.get("last_good_gates")
        if last is not None and last[0] == model_name:
            st.sidebar.caption(f"still using the previous gates ({last[1]})")
            return gated_view(*last)
        fallback = service.gate_choices(model_name)[0]
        return gated_view(model_name, fallback, None, None)


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
    if st.session_state.get("capture_key") != key:
        st.session_state["capture"] = service.capture(view, text, chat, cfg.adapter_scope)
        st.session_state["capture_key"] = key
    captured, truncated = st.session_state["capture"]
    est = service.estimate(view, captured, cfg)
    ex = quality = seconds = None
    if cfg.mode == "exact":
        ex_key = ("exact", key, str(cfg.skip_args()))
        if st.session_state.get("exact_key") != ex_key:
            st.session_state["exact"] = service.exact(view, text, chat, cfg)
            st.session_state["exact_key"] = ex_key
        ex, quality, seconds = st.session_state["exact"]
    return captured, est, ex, quality, seconds, truncated


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
    cols[2].metric("Net FLOPs saved", f"{seq.compute.net_saved_fraction:+.1%}", help="gate cost included")
    if quality is not None:
        cols[3].metric("KL to ungated", f"{quality.kl_to_full:.4f}")
        cols[4].metric("Top-1 agreement", f"{quality.top1_agreement:.1%}")
        st.caption(f"exact mode: model re-run in {seconds:.2f} s")
    else:
        cols[3].metric("KL to ungated", "–", help="measured in exact mode (sidebar: Mode)")
        cols[4].metric("Top-1 agreement", "–", help="measured in exact mode (sidebar: Mode)")
        st.caption("estimate mode: gate values captured once, re-thresholded without a model call")
    st.caption(f"gates: {shown.gates}")
    if view.gates is None:
        st.info("No gates: every gate counts as 1.0, so skipping falls back to the random policy.")

    strip = figures.token_strip_html(shown)
    st.html(strip)
    layout = st.radio("Heatmap", ["side by side", "attn", "mlp"], horizontal=True, key="heat_layout")
    branches = ("attn", "mlp") if layout == "side by side" else (layout,)
    heat = figures.gate_heatmap(shown, branches=branches)
    event = st.plotly_chart(heat, key="heatmap", on_select="rerun", selection_mode="points")
    st.caption("Click a cell to see why its gate is low (gate attribution, below).")
    select_cell(figures.clicked_cell(event), seq.n_tokens, view.spec.n_layers)

    attribution_panel(cfg, text, chat, seq)

    if ex is not None:
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

    st.subheader("Continuation: ungated vs with skipping")
    n_new = st.slider("New tokens", 4, 48, 16, 4, key="n_new")
    if st.button("Generate continuations", key="generate"):
        try:
            result = service.continuations(view, text, chat, n_new, **cfg.skip_args())
            st.session_state["continuations"] = result
        except GateSkipError as err:
            st.error(str(err))
    result = st.session_state.get("continuations")
    if result is not None:
        left, right = st.columns(2)
        left.markdown("**Ungated**")
        left.code("".join(result.ungated) or "(nothing)")
        right.markdown("**With skipping**")
        marked = "".join(f"⟦{tok}⟧" if i == result.first_divergence else tok for i, tok in enumerate(result.skipping))
        right.code(marked or "(nothing)")
        st.caption(
            "identical"
            if result.first_divergence is None
            else f"first divergent token (marked ⟦ ⟧): #{result.first_divergence}"
        )

    st.subheader("Export")
    c1, c2, c3 = st.columns(3)
    c1.download_button("Trace (CSV)", lambda: shown.to_dataframe().to_csv(index=False), "trace.csv", "text/csv")
    figure_download(c2, "Heatmap (HTML)", heat, "heatmap.html")
    c3.download_button("Token strip (HTML)", strip, "token_strip.html", "text/html")


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
            if st.session_state.get("attribution_key") != key:
                st.session_state["attribution"] = service.attribution(view, text, chat, cfg, layer, branch)
                st.session_state["attribution_key"] = key
        except GateSkipError as err:
            st.error(str(err))
            return
        result = st.session_state["attribution"]
        cell = result.cell(position)
        st.plotly_chart(figures.attribution_figure(cell), key="attribution_fig")
        state = "skipped" if result.skipped[position] else "ran"
        st.caption(
            f"token {cell.attrs['token']!r} (position {position}) {state} layer {layer}'s {branch} in the exact run with "
            f"these settings; gate {cell.attrs['gate']:.3f}. The residual it reads is the embedding plus what every "
            "earlier branch added; with the norm's scale held at this token's value the gate's pre-activation "
            "(mean over the gate vector) is exactly the sum of one term per part plus the bias."
        )
        st.download_button(
            "Attribution (CSV)",
            lambda: result.to_dataframe().to_csv(index=False),
            f"attribution_L{layer}_{branch}.csv",
            "text/csv",
            key="download_attribution",
        )
        attention = [c for c in cell["component"] if c.endswith(".attn")]
        if attention:
            split = st.selectbox(
                "Split an attention component by source token",
                ["(none)"] + attention,
                key="attr_split",
                help="which earlier tokens' value vectors carried that attention layer's push on this gate",
            )
            if split != "(none)":
                split_key = (*key, position, split)  # one model run per choice, not per rerun (slider moves)
                try:
                    if st.session_state.get("attribution_sources_key") != split_key:
                        st.session_state["attribution_sources"] = service.attention_sources(
                            view, text, chat, cfg, layer, branch, position, int(split[1:].split(".")[0])
                        )
                        st.session_state["attribution_sources_key"] = split_key
                except GateSkipError as err:
                    st.error(str(err))
                    return
                sources = st.session_state["attribution_sources"]
                st.plotly_chart(figures.attention_source_figure(sources), key="attribution_sources_fig")
                st.caption(
                    "With that layer's attention weights, its output norm's scale and its gate held at their "
                    "values in the run, what it added at this token is a sum over earlier tokens: each one's "
                    "weight times its value vector; the bars are each source's share of the gate's pre-activation."
                )


def explored_trace():
    """The trace the Explore view shows, or None (with a hint) before it has run."""
    shown = st.session_state.get("shown_trace")
    if shown is None:
        st.info("Run a prompt in the Explore view first.")
    return shown


def layers_view(cfg: service.Settings) -> None:
    shown = explored_trace()
    if shown is None:
        return
    stats = FlowStats().add(shown)
    table = stats.layer_table()
    fig = figures.layer_profile_figure(table)
    st.plotly_chart(fig, key="layer_profile")
    st.dataframe(layer_skip_summary(table), hide_index=True)
    bos = figures.bos_figure(stats.bos_table())
    st.plotly_chart(bos, key="bos")
    branch = st.radio("Token types for", ["mlp", "attn"], horizontal=True, key="type_module")
    types = figures.token_type_figure(stats.token_type_table(), branch=branch)
    st.plotly_chart(types, key="types")
    st.dataframe(table, hide_index=True)
    c1, c2, c3, c4 = st.columns(4)
    c1.download_button("Layer statistics (CSV)", lambda: table.to_csv(index=False), "layer_stats.csv", "text/csv")
    figure_download(c2, "Layer profile (HTML)", fig, "layer_profile.html")
    figure_download(c3, "BOS profile (HTML)", bos, "bos_profile.html")
    figure_download(c4, "Token types (HTML)", types, "token_types.html")


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
        c1.download_button("Sweep (CSV)", lambda: table.to_csv(index=False), "sweep.csv", "text/csv")
        figure_download(c2, "Sweep figure (HTML)", fig, "sweep.html")


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
    c1.download_button("Lens grid (CSV)", lambda: frame.to_csv(index=False), "logit_lens.csv", "text/csv")
    c2.download_button("Settled table (CSV)", lambda: table.to_csv(index=False), "settled.csv", "text/csv")
    figure_download(c3, "Lens grid (HTML)", fig, "logit_lens.html")


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
        "at the budget's skip fraction, against random choice (1.0) and the oracle."
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
    c1.download_button("Signals (CSV)", lambda: signals.to_csv(index=False), "faithfulness.csv", "text/csv")
    c2.download_button("Entries (CSV)", lambda: entries.to_csv(index=False), "faithfulness_entries.csv", "text/csv")
    figure_download(c3, "Figure (HTML)", fig, "faithfulness.html")


def corpus_view(cfg: service.Settings) -> None:
    """A whole trace dataset, queried with DuckDB: skip rates, token leaderboards, example contexts."""
    st.caption(
        "Which tokens skip which branches across a corpus: the datasets of the dashboard's data folder "
        "(collected here, or with `gateskip collect --out DATA_FOLDER/NAME/`); every table is a DuckDB query "
        "over its Parquet shards."
    )
    data = data_dir()
    c1, c2 = st.columns([3, 1])
    with c1.expander("Collect a dataset from a text file", expanded=False):
        upload = st.file_uploader("Text (.txt; paragraphs separated by blank lines)", key="corpus_upload")
        st.caption(
            f"with the sidebar's model, gates and budget ({cfg.model_name}, {cfg.view.gates_label}); "
            f"at most {data.upload_limit / 1e6:.0f} MB"
        )
        if upload is not None and st.button("Collect", key="corpus_collect"):
            name = service.dataset_name(upload.name, cfg.view, upload.getvalue().hex(), cfg.skip_args())
            collect_into(
                lambda progress: data.collect(
                    cfg.view, name, upload.name, upload.getvalue(), progress, **cfg.skip_args()
                )
            )
    if c2.button("Collect a sample dataset", key="corpus_sample", help="24 paragraphs of held-out pydoc prose"):
        collect_into(lambda progress: data.collect_sample(cfg.view, progress, **cfg.skip_args()))
    infos = data.datasets()
    if not infos:
        st.info(
            f"No dataset in the data folder yet: collect the sample, upload a text, or run "
            f"`gateskip collect --out {data.root}/NAME/`."
        )
        return
    st.dataframe(pd.DataFrame([d.as_row() for d in infos]), hide_index=True, key="corpus_list")
    names = [d.name for d in infos]
    chosen = st.session_state.get("corpus_name")
    path = st.selectbox("Dataset", names, index=names.index(chosen) if chosen in names else 0, key="corpus_choice")
    try:
        db = corpus_connection(path)
        counts = db.counts()
        rates = db.skip_rates()
    except GateSkipError as err:
        st.error(str(err))
        return
    cols = st.columns(3)
    cols[0].metric("Sequences", f"{counts['sequences']:,}")
    cols[1].metric("Tokens", f"{counts['tokens']:,}")
    cols[2].metric("Trace rows", f"{counts['tokens'] * counts['layers'] * 2:,}")
    heat = figures.corpus_skip_heatmap(rates)
    st.plotly_chart(heat, key="corpus_heat")

    st.subheader("Which tokens skip one branch")
    c1, c2, c3, c4 = st.columns(4)
    layer = int(c1.number_input("Layer", 0, counts["layers"] - 1, counts["layers"] - 1, key="corpus_layer"))
    branch = c2.radio("Branch", ["mlp", "attn"], horizontal=True, key="corpus_branch")
    min_count = int(c3.number_input("Minimum count", 1, 100_000, 20, key="corpus_min_count"))
    order = c4.radio("Order", ["most skipped", "least skipped"], horizontal=True, key="corpus_order")
    types = st.multiselect("Token types", list(TOKEN_TYPES), default=list(TOKEN_TYPES), key="corpus_types")
    try:
        board = db.token_leaderboard(
            layer, branch, min_count, types or list(TOKEN_TYPES), 25, most_skipped=order == "most skipped"
        )
        contexts = db.example_contexts(layer, branch, n=8, lowest=st.session_state.get("corpus_lowest", True))
    except GateSkipError as err:
        st.error(str(err))
        return
    st.dataframe(board, hide_index=True)

    st.subheader("Example contexts")
    st.radio(
        "Examples with the",
        [True, False],
        format_func=lambda low: "lowest gates" if low else "highest gates",
        horizontal=True,
        key="corpus_lowest",
    )
    st.html(figures.context_html(contexts))
    st.caption(
        "Each row: ±10 tokens around one occurrence (outlined); colour: each token's gate at this layer and branch."
    )
    positions, kinds = db.position_profile(), db.type_profile()
    left, right = st.columns(2)
    left.markdown("**Skip rate by position**")
    left.dataframe(positions, hide_index=True)
    right.markdown("**Skip rate by token type**")
    right.dataframe(kinds, hide_index=True)
    d = st.columns(6)
    d[0].download_button("Skip rates (CSV)", lambda: rates.to_csv(index=False), "corpus_skip_rates.csv", "text/csv")
    d[1].download_button("Tokens (CSV)", lambda: board.to_csv(index=False), "corpus_tokens.csv", "text/csv")
    d[2].download_button("Contexts (CSV)", lambda: contexts.to_csv(index=False), "corpus_contexts.csv", "text/csv")
    d[3].download_button("Positions (CSV)", lambda: positions.to_csv(index=False), "corpus_positions.csv", "text/csv")
    d[4].download_button("Token types (CSV)", lambda: kinds.to_csv(index=False), "corpus_types.csv", "text/csv")
    figure_download(d[5], "Heatmap (HTML)", heat, "corpus_heatmap.html")


def data_dir() -> service.DataDir:
    """The dashboard's data folder (`gateskip dashboard --data-dir`; default under the cache)."""
    from dashboard.cli import default_data_dir

    return service.DataDir(Path(os.environ.get("GATESKIP_DASHBOARD_DATA") or default_data_dir()))


def collect_into(collect) -> None:
    """Run a collection with a progress bar; the new dataset becomes the chosen one."""
    bar = st.progress(0.0, text="collecting…")
    try:
        st.session_state["corpus_name"] = collect(
            lambda done, total: bar.progress(done / max(1, total), text="collecting…")
        )
    except GateSkipError as err:
        st.error(str(err))
    bar.empty()


def corpus_connection(path: str):
    """This session's DuckDB connection to the dataset at `path` (reopened when the path changes)."""
    held = st.session_state.get("corpus_db")
    if held is None or held[0] != path:
        if held is not None:
            held[1].close()
        st.session_state["corpus_db"] = (path, data_dir().open(path))
    return st.session_state["corpus_db"][1]


def compare_view(cfg: service.Settings) -> None:
    """Two (model, gates) choices side by side on the same prompt and budget: two gate sets of one
    model, or two models (e.g. SmolLM2 vs Gemma-3, each with its shipped gates)."""
    shown = explored_trace()
    if shown is None:
        return
    names = MODEL_NAMES
    left, right = st.columns(2)
    sides = []
    for col, side, default_gates in ((left, "left", 0), (right, "right", 1)):
        name = col.selectbox(f"{side.title()} model", names, index=names.index(cfg.model_name), key=f"cmp_{side}_model")
        choices = [c for c in service.gate_choices(name) if c != "upload"]
        index = min(default_gates, len(choices) - 1) if name == cfg.model_name else 0
        spec = col.selectbox(f"{side.title()} gates", choices, index=index, key=f"cmp_{side}_gates_{name}")
        sides.append((name, spec))
    branch = st.radio("Branch", ["mlp", "attn"], horizontal=True, key="cmp_module")
    text = shown.sequences[0].text
    if st.button("Compare on the current prompt and budget", key="run_compare"):
        results = {}
        for name, spec in sides:
            try:
                with st.spinner(f"Loading {name} (the first load converts it once)…"):
                    view = gated_view(name, spec, None, None)
                settings = service.settings_for(cfg, name, view)
                results[(name, spec)] = service.exact(view, text, False, settings)
            except GateSkipError as err:
                results[(name, spec)] = str(err)
        st.session_state["compare"] = (sides, results)
    stored = st.session_state.get("compare")
    if stored is None:
        return
    for col, (name, spec) in zip((left, right), stored[0]):
        col.markdown(f"**{name} · {spec}**")
        result = stored[1][(name, spec)]
        if isinstance(result, str):
            col.error(result)
            continue
        trace, quality, _ = result
        for notice in trace.notices:  # returned with this call's result (a text cut to the context, ...)
            col.warning(notice)
        seq = trace.sequences[0]
        m1, m2, m3 = col.columns(3)
        m1.metric("Skipped fraction", f"{trace.skipped_fraction():.1%}")
        m2.metric("Net FLOPs saved", f"{seq.compute.net_saved_fraction:+.1%}")
        m3.metric("Top-1 agreement", f"{quality.top1_agreement:.1%}")
        heat = figures.gate_heatmap(trace, branches=(branch,))
        side = "left" if col is left else "right"
        col.plotly_chart(heat, key=f"cmp_heat_{side}")
        figure_download(col, f"{spec} heatmap (HTML)", heat, f"compare_{side}_{branch}.html")


def main() -> None:
    st.set_page_config(page_title="GateSkip Lens", layout="wide")
    st.title("GateSkip Lens")
    st.caption("Which tokens skip which layers, and why: learned residual gates (arXiv 2510.13876).")
    try:
        cfg = sidebar()
    except GateSkipError as err:
        st.error(str(err))
        return
    explore, why, layers, lens_tab, sweep_tab, compare, corpus = st.tabs(
        ["Explore", "Why", "Layers", "Lens", "Sweep", "Compare", "Corpus"]
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
    with compare:
        compare_view(cfg)
    with corpus:
        corpus_view(cfg)


main()
