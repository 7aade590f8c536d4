"""Dashboard views through Streamlit's AppTest, on a tiny model."""

from __future__ import annotations

import pytest
from streamlit.testing.v1 import AppTest

from analysis.sweep import METHODS
from gateskip_core import GateCheckpoint, GateSet, GateSkipError, load_model, save_gates
from gateskip_core.model import GatedModel

from .conftest import APP, metrics


@pytest.fixture
def app(monkeypatch):
    monkeypatch.setenv("GATESKIP_DASHBOARD_MODEL", "tiny-llama")
    at = AppTest.from_file(APP, default_timeout=120)
    at.run()
    assert not at.exception, at.exception
    return at


@pytest.fixture
def forward_calls(monkeypatch):
    calls = []
    original = GatedModel.forward

    def counting(self, *args, **kwargs):
        calls.append(1)
        return original(self, *args, **kwargs)

    monkeypatch.setattr(GatedModel, "forward", counting)
    return calls


def test_estimate_slider_updates_without_calling_the_model(app, forward_calls):
    before = metrics(app)["Skipped branch evaluations"]
    app.sidebar.slider(key="global_budget").set_value(0.6).run()
    after = metrics(app)
    assert not app.exception
    assert int(after["Skipped branch evaluations"]) > int(before)
    assert after["KL to ungated"] == "–"  # measured in exact mode only
    assert forward_calls == []  # estimate mode re-thresholds captured gates


def test_exact_mode_reruns_and_reports_quality_and_disagreement(app, forward_calls):
    app.sidebar.radio(key="mode").set_value("exact").run()
    m = metrics(app)
    assert not app.exception and forward_calls
    assert float(m["KL to ungated"]) >= 0 and m["Top-1 agreement"].endswith("%")
    assert any("decisions differ between the estimate" in md.value for md in app.markdown)


def test_adapter_scope_skipped_shows_the_original_model_at_budget_zero(app):
    """Scope 'skipped': a token keeps the original weights, kept branches unscaled, until it skips."""
    app.sidebar.radio(key="mode").set_value("exact").run()
    app.sidebar.slider(key="global_budget").set_value(0.0).run()
    assert not any("adapter scope: skipped" in c.value for c in app.caption)
    app.sidebar.radio(key="adapter_scope").set_value("skipped").run()
    assert not app.exception
    assert float(metrics(app)["KL to ungated"]) == 0 and metrics(app)["Top-1 agreement"] == "100.0%"
    assert any("adapter scope: skipped" in c.value for c in app.caption)


def test_policy_branches_and_per_layer_controls_change_results(app):
    base = metrics(app)["Skipped branch evaluations"]
    app.sidebar.radio(key="branches").set_value("attn").run()
    attn_only = metrics(app)["Skipped branch evaluations"]
    assert int(attn_only) < int(base)
    app.sidebar.radio(key="branches").set_value("both").run()
    app.sidebar.checkbox(key="per_layer_on").check().run()
    app.sidebar.slider(key="layer_budget_0").set_value(0.0).run()
    assert int(metrics(app)["Skipped branch evaluations"]) < int(base)
    app.sidebar.selectbox(key="policy").set_value("random").run()
    assert not app.exception


def test_empty_and_overlong_prompts(app):
    app.text_area[0].set_value("   ").run()
    assert any("Enter a prompt" in i.value for i in app.info) and not app.exception
    app.text_area[0].set_value("word " * 700).run()
    assert any("longer than" in w.value for w in app.warning) and not app.exception


def test_bad_uploads_show_one_error_and_keep_the_previous_gates(app, tmp_path):
    app.sidebar.selectbox(key="gates").set_value("upload").run()
    uploader = app.sidebar.get("file_uploader")[0]
    uploader.set_value(("g.safetensors", b"not a safetensors file", "application/octet-stream"))
    app.run()
    assert not app.exception
    assert any("not a valid safetensors" in e.value for e in app.sidebar.error)
    assert metrics(app)["Skipped branch evaluations"]  # the app still works

    other = GateCheckpoint(
        gates=GateSet(3, 16),
        model="other",
        fingerprint={"model_type": "llama", "n_layers": 3, "d_model": 16, "vocab_size": 9},
    )
    path = save_gates(other, tmp_path / "other.safetensors")
    app.sidebar.get("file_uploader")[0].set_value(("o.safetensors", path.read_bytes(), "application/octet-stream"))
    app.run()
    assert any("was trained for other" in e.value for e in app.sidebar.error)

    tiny = load_model("tiny-llama", gates="untrained:scalar")
    good = save_gates(
        GateCheckpoint(gates=tiny.gates, model=tiny.name, fingerprint=tiny.spec.fingerprint()),
        tmp_path / "good.safetensors",
    )
    app.sidebar.get("file_uploader")[0].set_value(("good.safetensors", good.read_bytes(), "application/octet-stream"))
    app.run()
    assert not app.sidebar.error and not app.exception


def test_continuations_side_by_side(app):
    app.button(key="generate").click().run()
    assert not app.exception
    assert len(app.code) >= 2
    assert any("identical" in c.value or "first divergent token" in c.value for c in app.caption)


def test_layers_view_and_exports(app):
    assert not app.exception
    labels = [b.label for b in app.get("download_button")]
    for label in ["Trace (CSV)", "Heatmap (HTML)", "Layer statistics (CSV)", "Layer profile (HTML)"]:
        assert label in labels
    assert len(app.dataframe) >= 2  # layer summary and layer table


def test_sweep_view_runs_with_progress_and_exports(app):
    app.button(key="run_sweep").click().run()
    assert not app.exception
    tables = [d.value for d in app.dataframe if "method" in d.value.columns]
    assert tables and set(tables[0]["method"]) == set(METHODS)
    assert "Sweep (CSV)" in [b.label for b in app.get("download_button")]


def test_compare_view_shows_two_gate_sets(app):
    app.button(key="run_compare").click().run()
    assert not app.exception
    labels = [m.label for m in app.metric]
    assert labels.count("Top-1 agreement") >= 3  # explore's, plus one per side


def test_compare_view_puts_two_models_side_by_side(app):
    """Llama vs Gemma-3 architecture on the same prompt and budget (per-layer budgets become their mean)."""
    app.sidebar.checkbox(key="per_layer_on").check().run()
    app.selectbox(key="cmp_right_model").set_value("tiny-gemma3").run()
    assert app.selectbox(key="cmp_right_gates_tiny-gemma3").value == "untrained"  # its first gate choice
    app.button(key="run_compare").click().run()
    assert not app.exception
    titles = [m.value for m in app.markdown if "·" in m.value]
    assert titles == ["**tiny-llama · untrained**", "**tiny-gemma3 · untrained**"]
    labels = [m.label for m in app.metric]
    assert labels.count("Skipped fraction") >= 3 and not app.error


def test_no_gates_falls_back_to_random_with_a_hint(app):
    app.sidebar.selectbox(key="gates").set_value("none").run()  # policy still "quantile"
    assert not app.exception and not app.error  # one rule for every view: no gates -> random skipping
    assert any("No gates" in i.value and "random" in i.value for i in app.info)
    skipped = int(metrics(app)["Skipped branch evaluations"])
    assert skipped > 0
    app.sidebar.selectbox(key="policy").set_value("random").run()
    assert not app.exception and not app.error
    assert int(metrics(app)["Skipped branch evaluations"]) == skipped  # the same random decisions


def test_latency_bench_runs_on_a_tiny_model():
    import subprocess
    import sys

    from .conftest import ROOT_DIR

    res = subprocess.run(
        [
            sys.executable,
            str(ROOT_DIR / "bench" / "dashboard_latency.py"),
            "--model",
            "tiny-llama",
            "--gates",
            "untrained",
            "--repeats",
            "1",
            "--tokens",
            "32",
        ],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert res.returncode == 0, res.stderr[-2000:]
    assert "estimate mode" in res.stdout and "whole app rerun" in res.stdout


def test_lens_view_runs_the_gated_logit_lens_on_demand(app, forward_calls):
    assert "lens" not in app.session_state  # not run until asked: sliders stay model-free
    app.button(key="run_lens").click().run()
    assert not app.exception and forward_calls
    grid, table = app.session_state["lens"][1:]
    assert grid.top_token.shape == (len(grid.tokens), grid.n_layers + 1)
    assert int(table["skipped_n"].sum()) == int(grid.skipped[grid.eligible].sum())
    assert {"Lens grid (CSV)", "Settled table (CSV)", "Lens grid (HTML)"} <= {
        b.label for b in app.get("download_button")
    }
    app.sidebar.slider(key="global_budget").set_value(0.6).run()
    assert any("run it again" in i.value for i in app.info)


def test_attribution_panel_explains_the_chosen_cell(app):
    app.toggle(key="attr_on").set_value(True).run()
    app.number_input(key="attr_layer").set_value(1).run()
    app.radio(key="attr_branch").set_value("mlp").run()
    app.number_input(key="attr_pos").set_value(3).run()
    assert not app.exception
    result = app.session_state["attribution"]
    assert (result.layer, result.branch) == (1, "mlp") and result.residual_error < 1e-4
    assert any("position 3" in c.value and "layer 1's mlp" in c.value for c in app.caption)


def test_why_view_measures_exact_harm_against_the_signals(app):
    app.button(key="run_why").click().run()
    assert not app.exception
    key, entries, signals = app.session_state["why"]
    assert len(entries) >= 60 and (entries["harm_kl"] >= 0).all()
    assert {"gate", "block_influence", "random", "oracle"} <= set(signals["signal"])
    assert signals.set_index("signal").loc["random", "skip_fraction"] == 0.25  # the sidebar's budget


def test_corpus_view_queries_a_dataset(app, tmp_path, monkeypatch):
    """The Corpus tab: heatmap, token leaderboard and example contexts of a dataset, from DuckDB."""
    from analysis.tracedb import TraceDB

    monkeypatch.setenv("GATESKIP_CACHE", str(tmp_path / "cache"))
    app.text_input(key="corpus_path").set_value(str(tmp_path / "nowhere")).run()
    assert not app.exception and any("dataset folder not found" in e.value for e in app.error)

    from analysis.dataset import collect_dataset

    folder = tmp_path / "ds"
    model = load_model("tiny-llama", gates="untrained")
    texts = ["The quick brown fox jumps over the lazy dog.", "Gates decide which tokens skip layers."] * 10
    collect_dataset(model, [("t", texts)], folder, shard_size=8, show_progress=False, skip=0.3)
    app.text_input(key="corpus_path").set_value(str(folder)).run()
    assert not app.exception, app.exception
    m = metrics(app)
    db = TraceDB(folder)
    assert m["Tokens"] == f"{db.counts()['tokens']:,}" and m["Sequences"] == "20"
    app.number_input(key="corpus_layer").set_value(1).run()
    app.number_input(key="corpus_min_count").set_value(2).run()

    def board_shown():
        return next(d.value for d in app.dataframe if "token" in d.value.columns and "ci_low" in d.value.columns)

    board = board_shown()
    expected = db.token_leaderboard(1, "mlp", 2, limit=25)
    assert list(board["token"]) == list(expected["token"]) and len(board) > 0
    app.multiselect(key="corpus_types").set_value(["stopword"]).run()
    assert set(board_shown()["token_type"]) == {"stopword"}
    app.radio(key="corpus_lowest").set_value(False).run()
    assert not app.exception


def test_the_dashboards_collection_of_an_uploaded_text_reports_progress_and_reopens(tmp_path, monkeypatch):
    """What the Corpus tab's Collect button runs (AppTest cannot upload files): a dataset in the cache,
    one folder per (model, gates, text, settings), with progress after every shard."""
    from dashboard import service

    monkeypatch.setenv("GATESKIP_CACHE", str(tmp_path))
    view = load_model("tiny-llama", gates="untrained")
    settings = service.Settings("tiny-llama", view, "estimate", 0.3, "both", "quantile", True, 0, "auto")
    folder = service.corpus_folder(settings, "abc")
    assert folder.parent == tmp_path / "datasets"
    assert service.corpus_folder(settings, "abd") != folder
    progress = []
    text = "\n\n".join(f"Paragraph {i} about gates and layers." for i in range(150))
    service.collect_corpus(
        view, text, "upload.txt", folder, on_progress=lambda d, t: progress.append((d, t)), **settings.skip_args()
    )
    assert progress == [(64, 150), (128, 150), (150, 150)]
    db = service.corpus_db(str(folder))
    assert db.counts()["sequences"] == 150
    with pytest.raises(GateSkipError, match="holds no text"):
        service.collect_corpus(view, "  \n\n ", "empty.txt", tmp_path / "e")


def test_every_heatmap_cell_is_a_clickable_marker_that_names_its_cell():
    from analysis import figures

    model = load_model("tiny-llama", gates="untrained")
    trace = model.trace("Gates decide which tokens skip.", skip=0.3)
    seq = trace.sequences[0]
    fig = figures.gate_heatmap(trace)
    cells = [t for t in fig.data if t.type == "scatter" and t.customdata is not None]
    assert [len(t.customdata) for t in cells] == [seq.n_tokens * trace.n_layers] * 2
    row = next(r for r in cells[1].customdata if r[1] == 3 and r[2] == 2)  # (position 3, layer 2) of the mlp
    assert row[5] == "mlp" and row[6] == seq.gate[3, 2, 1] and row[4] == ("skipped" if seq.skipped[3, 2, 1] else "kept")
    event = {"selection": {"points": [{"x": "3:x", "y": 2, "customdata": list(row)}]}}
    assert figures.clicked_cell(event) == (3, 2, "mlp")
    assert figures.clicked_cell({"selection": {"points": []}}) is None and figures.clicked_cell(None) is None


def test_attribution_panel_splits_an_attention_component_by_source_token(app):
    app.toggle(key="attr_on").set_value(True).run()
    app.number_input(key="attr_layer").set_value(2).run()
    app.number_input(key="attr_pos").set_value(6).run()
    app.selectbox(key="attr_split").set_value("L1.attn").run()
    assert not app.exception and not app.error
    assert any("weight times its value vector" in c.value for c in app.caption)
