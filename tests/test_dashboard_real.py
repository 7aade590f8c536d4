"""Every dashboard view on the real default model with the shipped gates."""

from __future__ import annotations

import pytest
from streamlit.testing.v1 import AppTest

from analysis.experiments.sweep import METHODS
from gateskip_core import BRANCHES

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


def test_estimate_mode_shows_the_net_flops_saved_of_its_decisions_on_every_path():
    """The Explore view's estimate-mode "Net FLOPs saved" is the compute account of its decisions:
    the same number as an exact run forced to those decisions on the masked and the physical path
    (SmolLM2's shipped default has a LoRA adapter in scope 'skipped', charged once, where it runs)."""
    from dashboard import service
    from gateskip_core import Forced, load_model

    view = load_model("smollm2-135m-instruct", gates="default")
    settings = service.Settings(
        "smollm2-135m-instruct", view, "estimate", 0.25, "both", "quantile", True, 0, "auto", "auto"
    )
    text = service.EXAMPLE_PROMPTS["Python prose"]
    captured, _ = service.capture(view, text, False, settings.adapter_scope)
    shown = service.estimate(view, captured, settings).sequences[0]
    forced = [Forced(int(layer), BRANCHES[b], int(p)) for p, layer, b in zip(*shown.skipped.nonzero())]
    for path in ("masked", "physical"):
        run = view.trace(text, skip=0.0, forced=forced, path=path).sequences[0]
        assert (run.skipped == shown.skipped).all()
        assert run.compute.net_saved_fraction == pytest.approx(shown.compute.net_saved_fraction, rel=1e-9), path
