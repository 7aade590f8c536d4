"""Every dashboard view on the real default model with the shipped gates."""

from __future__ import annotations

import pytest
from streamlit.testing.v1 import AppTest

from analysis.experiments.sweep import METHODS

from .conftest import APP, metrics

pytestmark = pytest.mark.real


def test_all_views_on_smollm2_with_shipped_gates(monkeypatch):
    monkeypatch.setenv("GATESKIP_DASHBOARD_MODEL", "smollm2-135m-instruct")
    at = AppTest.from_file(APP, default_timeout=300)
    at.run()
    assert not at.exception, at.exception
    assert at.sidebar.selectbox(key="gates").value == "default"  # the shipped gates are the default choice
    assert int(metrics(at)["Skipped branch evaluations"]) > 0
    at.sidebar.radio(key="mode").set_value("exact").run()
    assert float(metrics(at)["KL to ungated"]) > 0
    at.button(key="generate").click().run()
    at.button(key="run_sweep").click().run()
    at.button(key="run_compare").click().run()
    assert not at.exception, at.exception
    assert not at.error, [e.value for e in at.error]
    sweep_tables = [d.value for d in at.dataframe if "method" in d.value.columns]
    assert sweep_tables and len(sweep_tables[0]) == 4 * len(METHODS)
    assert [m.label for m in at.metric].count("Top-1 agreement") == 3  # explore + both compare sides
