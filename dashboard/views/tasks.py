"""Tasks: accuracy against net compute from a `gateskip eval` table (shipped, uploaded, or a small eval run here)."""

from __future__ import annotations

import io
from pathlib import Path

import pandas as pd
import streamlit as st

from analysis.evaluation import SHIPPED_TASKS_DIR
from analysis.evaluation.figures import accuracy_figure, check_eval_table
from analysis.evaluation.report import matched_table
from dashboard import service
from dashboard.views.common import download, figure_download
from gateskip_core import GateSkipError

RESULTS_DIR = Path(__file__).resolve().parents[2] / "docs" / "results"  # absent in a non-editable install
SOURCES = ("shipped table", "uploaded CSV", "small eval here")
EVAL_METHODS = ("gateskip", "random", "shortgpt", "shortgpt-calibration")
MAX_ITEMS = 20  # a small eval in the app: each item is a forward per (method, budget)


def shipped_tables() -> dict[str, Path]:
    """The eval tables under docs/results (every `eval_*.csv` with `gateskip eval`'s columns)."""
    tables = {}
    for path in sorted(RESULTS_DIR.glob("eval_*.csv")):
        try:
            check_eval_table(pd.read_csv(path))
        except (GateSkipError, ValueError):
            continue  # another kind of table (e.g. eval_vs_hf.csv)
        tables[path.name] = path
    return tables


def shipped_tasks() -> list[str]:
    return sorted(path.stem for path in SHIPPED_TASKS_DIR.glob("gateskip_*.yaml"))


def tasks_view(cfg: service.Settings) -> None:
    source = st.radio("Results", SOURCES, horizontal=True, key="eval_source")
    if source == "shipped table":
        tables = shipped_tables()
        if not tables:
            st.info("No eval tables under docs/results (a source checkout has them): upload one or run an eval.")
            return
        name = st.selectbox("Table", list(tables), key="eval_shipped")
        _show(pd.read_csv(tables[name]), name)
    elif source == "uploaded CSV":
        file = st.file_uploader("A gateskip eval CSV", type=["csv"], key="eval_upload")
        if file is not None:
            try:
                table = check_eval_table(pd.read_csv(io.BytesIO(file.getvalue())))
            except (GateSkipError, ValueError, UnicodeDecodeError) as err:
                st.error(f"cannot read {file.name}: {err}")
                return
            _show(table, file.name)
    else:
        _small_eval(cfg)


def _small_eval(cfg: service.Settings) -> None:
    view = cfg.view
    if view.gates is None:
        st.warning("An eval compares gates with baselines: choose gates in the sidebar.")
        return
    try:
        from analysis.evaluation.run import evaluate_tasks
        from analysis.evaluation.task_loading import load_tasks
    except ImportError:
        st.info("Evaluation needs lm-eval: pip install -e '.[eval]'.")
        return
    task = st.selectbox("Shipped task", shipped_tasks(), key="eval_task")
    budgets = st.multiselect("Budgets", [0.0, 0.1, 0.2, 0.3, 0.4, 0.5], default=[0.0, 0.3], key="eval_budgets")
    methods = st.multiselect("Methods", list(EVAL_METHODS), default=["gateskip", "random"], key="eval_methods")
    limit = st.number_input("Items", 1, MAX_ITEMS, 4, key="eval_limit")
    if st.button("Run eval", key="run_eval"):
        if not budgets or not methods:
            st.error("choose at least one budget and one method")
            return
        total, done = len(budgets) * len(methods), []
        bar = st.progress(0.0, text="evaluating…")

        def step(name: str) -> None:
            done.append(name)
            bar.progress(len(done) / total, text=f"{name} ({len(done)}/{total})")

        try:
            run = evaluate_tasks(
                view,
                load_tasks([task]),
                sorted(budgets),
                methods,
                limit=int(limit),
                policy=cfg.policy if cfg.policy in ("quantile", "calibrated") else "quantile",
                on_step=step,
                allocation=cfg.allocation,
                adapter_scope=cfg.adapter_scope,
            )
        except GateSkipError as err:
            bar.empty()
            st.error(str(err))
            return
        bar.empty()
        st.session_state["eval_table"] = run.table
    table = st.session_state.get("eval_table")
    if table is not None:
        _show(table, "eval.csv")


def _show(table: pd.DataFrame, name: str) -> None:
    fig = accuracy_figure(table, title=f"{name}: accuracy against net compute (open markers: matched net savings)")
    st.plotly_chart(fig, key=f"eval_fig_{name}")
    st.caption("Each task's headline metric; error bars: lm-eval's standard error; matched rows interpolated.")
    matched = matched_table(table)
    if len(matched):
        st.dataframe(matched, hide_index=True)
    measured = table[table["kind"] == "measured"]
    st.dataframe(measured, hide_index=True)
    c1, c2 = st.columns(2)
    download(c1, "Eval table (CSV)", lambda: table.to_csv(index=False), name, "text/csv", key=f"download_{name}")
    figure_download(c2, "Eval figure (HTML)", fig, Path(name).stem + ".html")
