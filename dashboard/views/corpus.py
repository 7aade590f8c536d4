"""Corpus: the data folder's datasets (list, sample, uploads) queried with DuckDB."""

from __future__ import annotations

import os
from pathlib import Path

import pandas as pd
import streamlit as st

from analysis.traces import figures
from analysis.traces.flow import TOKEN_TYPES
from dashboard import service
from dashboard.views.common import download, figure_download
from dashboard.views.layers import gate_cells_choice
from gateskip_core import GateSkipError


def corpus_view(cfg: service.Settings) -> None:
    """A whole trace dataset, queried with DuckDB: skip rates, token leaderboards, example contexts."""
    st.caption(
        "Which tokens skip which branches across a corpus: the datasets of the dashboard's data folder "
        "(collected here, or with `gateskip collect --out DATA_FOLDER/NAME/`); every table is a DuckDB query "
        "over its Parquet shards."
    )
    data = data_dir()
    collect_controls(cfg, data)
    path = dataset_choice(data)
    if path is None:
        return
    cells = gate_cells_choice("corpus_cells")
    try:
        db = corpus_connection(path)
        counts, rates, per_layer = corpus_overview(db, path, cells)
    except GateSkipError as err:
        st.error(str(err))
        return
    heat = overview_panel(counts, rates, per_layer)
    st.subheader("Which tokens skip one branch")
    try:
        board, contexts = token_tables(db, counts, cells)
    except GateSkipError as err:
        st.error(str(err))
        return
    positions, kinds = contexts_and_profiles(db, board, contexts, cells)
    d = st.columns(6)
    download(d[0], "Skip rates (CSV)", lambda: rates.to_csv(index=False), "corpus_skip_rates.csv", "text/csv")
    download(d[1], "Tokens (CSV)", lambda: board.to_csv(index=False), "corpus_tokens.csv", "text/csv")
    download(d[2], "Contexts (CSV)", lambda: contexts.to_csv(index=False), "corpus_contexts.csv", "text/csv")
    download(d[3], "Positions (CSV)", lambda: positions.to_csv(index=False), "corpus_positions.csv", "text/csv")
    download(d[4], "Token types (CSV)", lambda: kinds.to_csv(index=False), "corpus_types.csv", "text/csv")
    figure_download(d[5], "Heatmap (HTML)", heat, "corpus_heatmap.html")


def collect_controls(cfg: service.Settings, data: service.DataDir) -> None:
    """Collect a dataset from an uploaded text, or the sample, with the sidebar's settings."""
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


def dataset_choice(data: service.DataDir) -> str | None:
    """The data folder's datasets as a table and the chosen one's path (None: there is none)."""
    infos, problems = data.scan()  # every rerun (a slider move too) reads the manifests once
    for problem in problems:  # damaged or incomplete folders: named, not silently hidden
        st.warning(f"not a usable dataset: {problem}")
    if not infos:
        st.info(
            f"No dataset in the data folder yet: collect the sample, upload a text, or run "
            f"`gateskip collect --out {data.root}/NAME/`."
        )
        return None
    st.dataframe(pd.DataFrame([d.as_row() for d in infos]), hide_index=True, key="corpus_list")
    names = [d.name for d in infos]
    chosen = st.session_state.get("corpus_name")
    return st.selectbox("Dataset", names, index=names.index(chosen) if chosen in names else 0, key="corpus_choice")


def overview_panel(counts: dict, rates: pd.DataFrame, per_layer: pd.DataFrame):
    """The dataset's size and its skip-rate heatmap (returned, for the download)."""
    cols = st.columns(3)
    cols[0].metric("Sequences", f"{counts['sequences']:,}")
    cols[1].metric("Tokens", f"{counts['tokens']:,}")
    cols[2].metric("Trace rows", f"{counts['tokens'] * counts['layers'] * 2:,}")
    heat = figures.corpus_skip_heatmap(rates, per_layer)
    st.plotly_chart(heat, key="corpus_heat")
    acted = per_layer["applied_share"]
    st.caption(
        f"Gates acted at {acted.min():.0%}-{acted.max():.0%} of the tokens that ran a branch (per layer and "
        f"branch; lower row). Gate statistics below pool {figures.pooled_cells(per_layer)}."
    )
    return heat


def token_tables(db, counts: dict, cells: str) -> tuple[pd.DataFrame, pd.DataFrame]:
    """The chosen layer and branch's token leaderboard and example contexts, from the controls above them."""
    c1, c2, c3, c4 = st.columns(4)
    layer = int(c1.number_input("Layer", 0, counts["layers"] - 1, counts["layers"] - 1, key="corpus_layer"))
    branch = c2.radio("Branch", ["mlp", "attn"], horizontal=True, key="corpus_branch")
    min_count = int(c3.number_input("Minimum count", 1, 100_000, 20, key="corpus_min_count"))
    order = c4.radio("Order", ["most skipped", "least skipped"], horizontal=True, key="corpus_order")
    types = st.multiselect("Token types", list(TOKEN_TYPES), default=list(TOKEN_TYPES), key="corpus_types")
    board = db.token_leaderboard(
        layer, branch, min_count, types or list(TOKEN_TYPES), 25, most_skipped=order == "most skipped", cells=cells
    )
    lowest = st.session_state.get("corpus_lowest", True)
    contexts = db.example_contexts(layer, branch, n=8, lowest=lowest, cells=cells)
    st.markdown(f"**Tokens at layer {layer} {branch}; gate_mean over {figures.pooled_cells(board)}**")
    st.dataframe(board, hide_index=True)
    return board, contexts


def contexts_and_profiles(db, board: pd.DataFrame, contexts: pd.DataFrame, cells: str):
    """Example contexts, and skip rates by position and by token type (returned, for the downloads)."""
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
        "Each row: ±10 tokens around one occurrence (outlined), chosen among "
        f"{figures.pooled_cells(board)}; colour: each token's gate at this layer and branch."
    )
    positions, kinds = db.position_profile(cells=cells), db.type_profile(cells=cells)
    left, right = st.columns(2)
    left.markdown("**Skip rate by position**")
    left.dataframe(positions, hide_index=True)
    right.markdown("**Skip rate by token type**")
    right.dataframe(kinds, hide_index=True)
    return positions, kinds


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


def corpus_overview(db, path: str, cells: str):
    """(counts, skip rates, layer table) of the dataset, queried once per (dataset, cells): a collected
    dataset does not change, and every rerun of the app (a slider in another tab) passes through here."""
    held = st.session_state.get("corpus_overview")
    if held is None or held[0] != (path, cells):
        held = ((path, cells), (db.counts(), db.skip_rates(cells=cells), db.layer_table(cells=cells)))
        st.session_state["corpus_overview"] = held
    return held[1]


def corpus_connection(path: str):
    """This session's DuckDB connection to the dataset at `path` (reopened when the path changes)."""
    held = st.session_state.get("corpus_db")
    if held is None or held[0] != path:
        if held is not None:
            held[1].close()
        st.session_state["corpus_db"] = (path, data_dir().open(path))
    return st.session_state["corpus_db"][1]
