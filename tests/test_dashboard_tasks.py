"""The dashboard's Tasks view through Streamlit's AppTest: a shipped eval table, and a small eval on demand."""

from __future__ import annotations

import pandas as pd
import pytest

from dashboard.views.tasks import shipped_tables

pytest.importorskip("lm_eval")


def test_tasks_view_shows_every_shipped_eval_table_and_its_matched_comparison(app):
    tables = shipped_tables()
    assert "eval_smollm2.csv" in tables and "eval_vs_hf.csv" not in tables  # only gateskip eval tables
    for name in tables:
        app.selectbox(key="eval_shipped").set_value(name).run()
        assert not app.exception and not app.error
        shown = [d.value for d in app.dataframe if "kind" in d.value.columns]
        expected = pd.read_csv(tables[name])
        assert len(shown) == 1 and len(shown[0]) == (expected["kind"] == "measured").sum()
        assert any("ahead_by" in " ".join(d.value.columns) for d in app.dataframe)  # the matched comparison


def test_tasks_view_runs_a_small_eval_with_progress(app):
    app.radio(key="eval_source").set_value("small eval here").run()
    app.selectbox(key="eval_task").set_value("gateskip_legal_nextsent").run()
    app.number_input(key="eval_limit").set_value(2).run()
    app.button(key="run_eval").click().run()
    assert not app.exception and not app.error
    table = next(d.value for d in app.dataframe if "kind" in d.value.columns)
    assert set(table["method"]) == {"gateskip", "random"} and set(table["skip_budget"]) == {0.0, 0.3}
    assert (table["n"] == 2).all() and set(table["metric"]) == {"acc", "acc_norm"}
    assert "Eval table (CSV)" in [b.label for b in app.get("download_button")]
