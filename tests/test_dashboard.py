"""Dashboard views through Streamlit's AppTest, on a tiny model."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from streamlit.testing.v1 import AppTest

from analysis.experiments.sweep import METHODS
from gateskip_core import GateCheckpoint, GateSet, GateSkipError, load_model, save_gates
from gateskip_core.model import GatedModel

from .conftest import APP, metrics


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


def test_no_download_reruns_the_app(app):
    """A click on a download must not rerun the app: the rerun's start drops the click's answer
    from Streamlit's outgoing queue and the browser's button then spins for minutes."""
    app.button(key="run_sweep").click().run()
    app.button(key="run_lens").click().run()
    buttons = app.get("download_button")
    assert len(buttons) >= 10 and not app.exception
    assert [b.label for b in buttons if not b.proto.ignore_rerun] == []


def test_layer_tables_follow_the_shown_trace_and_are_reused_while_it_stays(app, monkeypatch):
    """A rerun that leaves the trace as it was (the types radio) reuses the Layers view's tables; a
    budget change recomputes them from the new trace."""
    import dashboard.views.layers as layers
    from analysis.traces.tracedb import TraceDB

    built = []

    class CountingTraceDB(TraceDB):
        def __init__(self, *args, **kwargs):
            built.append(1)
            super().__init__(*args, **kwargs)

    monkeypatch.setattr(layers, "TraceDB", CountingTraceDB)
    app.radio(key="type_module").set_value("attn").run()
    assert not app.exception and built == []
    app.sidebar.slider(key="global_budget").set_value(0.6).run()
    assert not app.exception and len(built) == 1
    expected = TraceDB(app.session_state["shown_trace"]).layer_table()
    shown = [d.value for d in app.dataframe if list(d.value.columns) == list(expected.columns)]
    assert expected["skip_rate"].sum() > 0
    pd.testing.assert_frame_equal(shown[-1].reset_index(drop=True), expected.reset_index(drop=True))


def test_layers_view_pools_applied_or_all_cells_and_names_them(app):
    """The Layers view's gate statistics pool the cells whose gate acted by default, or all cells on
    request; every table and figure title names the choice, and in scope 'skipped' layer 0's attention
    (whose gate never acts) is named as such instead of showing a gate it never applied."""
    from analysis.traces.tracedb import TraceDB

    app.sidebar.radio(key="adapter_scope").set_value("skipped").run()
    shown = app.session_state["shown_trace"]
    for cells in ("applied", "all"):
        app.radio(key="layer_cells").set_value(cells).run()
        assert not app.exception
        expected = TraceDB(shown, cells=cells).layer_table()
        table = next(
            d.value for d in app.dataframe if "gate_cells" in d.value.columns and "gate_p50" in d.value.columns
        )
        pd.testing.assert_frame_equal(table.reset_index(drop=True), expected.reset_index(drop=True))
        assert set(table["gate_cells"]) == {cells}
        titles = [spec["layout"].get("title", {}).get("text") for spec in _chart_specs(app)]
        assert f"Gate statistics over {figures_pooled(cells)}" in titles
        never = any(c.value.startswith("No gate acted at: layer 0 attn") for c in app.caption)
        assert never == (cells == "applied"), [c.value[:50] for c in app.caption]
    assert expected.set_index(["layer", "branch"]).loc[(0, "attn"), "applied_share"] == 0


def test_gate_statistics_over_applied_cells_when_no_gate_acted():
    """Scope 'skipped' at budget 0 is the original model: not one gate acted. The applied-only tables
    are then empty pools (NaN gates, 0 cells, share 0), not a crash (it was: an untyped empty histogram)."""
    from analysis.traces.tracedb import TraceDB

    model = load_model("tiny-llama", gates="untrained")
    trace = model.trace("Nothing skips, so no gate acts.", skip=0.0, adapter_scope="skipped")
    assert not trace.sequences[0].gate_applied.any()
    table = TraceDB(trace, cells="applied").layer_table()
    assert table["gate_mean"].isna().all() and (table["gate_n"] == 0).all() and (table["applied_share"] == 0).all()
    assert table["gate_p50"].isna().all()


def figures_pooled(cells: str) -> str:
    from analysis.traces import figures

    return figures.POOLED_CELLS[cells]


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
    assert titles == ["**tiny-llama · fp32 weights · untrained**", "**tiny-gemma3 · fp32 weights · untrained**"]
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
            str(ROOT_DIR / "gateskip" / "bench" / "dashboard_latency.py"),
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
    assert any("read here as a ranking score" in c.value and "gate = " in c.value for c in app.caption)


def _leaderboard_by_pandas(folder, layer: int, branch: str, min_count: int) -> pd.DataFrame:
    """The token leaderboard computed from the shards' rows with pandas (independent of DuckDB)."""
    rows = pd.concat([pd.read_parquet(p) for p in sorted(folder.glob("shard-*.parquet"))])
    cell = rows[(rows.layer == layer) & (rows.branch == branch) & rows.eligible.astype(bool)]
    table = cell.groupby("token").agg(eligible=("skipped", "size"), skipped=("skipped", "sum")).reset_index()
    table = table[table.eligible >= min_count]
    applied = cell[cell.gate_applied == 1].groupby("token")["gate"].mean().rename("gate_applied")
    table = table.join(cell.groupby("token")["gate"].mean().rename("gate_all"), on="token").join(applied, on="token")
    return table.assign(skip_rate=table.skipped / table.eligible).set_index("token")


def test_corpus_view_lists_the_data_folder_collects_a_sample_and_queries_it(tmp_path, monkeypatch):
    """The Corpus tab opens empty with a sample button; the sample is collected into the data folder,
    listed, opened by name, and its tables agree with pandas on the same rows."""
    data = tmp_path / "data"
    monkeypatch.setenv("GATESKIP_DASHBOARD_DATA", str(data))
    monkeypatch.setenv("GATESKIP_DASHBOARD_MODEL", "tiny-llama")
    app = AppTest.from_file(APP, default_timeout=180)
    app.run()
    assert not app.exception and any("No dataset in the data folder yet" in i.value for i in app.info)
    app.button(key="corpus_sample").click().run()
    assert not app.exception, app.exception
    listed = next(d.value for d in app.dataframe if "origin" in d.value.columns)
    assert len(listed) == 1 and listed["model"][0] == "tiny-llama" and listed["origin"][0] == "collected"
    folder = data / listed["dataset"][0]
    assert (folder / "manifest.json").is_file() and not list(data.glob(".collecting-*"))  # no temp left
    rows = pd.concat([pd.read_parquet(p) for p in sorted(folder.glob("shard-*.parquet"))])
    m = metrics(app)
    first = rows[(rows.layer == 0) & (rows.branch == "attn")]
    assert m["Tokens"] == f"{len(first):,}" and m["Sequences"] == str(first.sequence_id.nunique())
    app.number_input(key="corpus_layer").set_value(1).run()
    app.number_input(key="corpus_min_count").set_value(2).run()
    expected = _leaderboard_by_pandas(folder, 1, "mlp", 2)
    for cells in ("all", "applied"):  # the gate statistics over the chosen cells, as pandas has them
        app.radio(key="corpus_cells").set_value(cells).run()
        board = next(d.value for d in app.dataframe if "token" in d.value.columns and "ci_low" in d.value.columns)
        assert len(board) > 0 and set(board["gate_cells"]) == {cells}
        for _, row in board.iterrows():  # every shown token: its counts, rate and gate as pandas has them
            assert row["eligible"] == expected.loc[row["token"], "eligible"]
            assert row["skip_rate"] == pytest.approx(expected.loc[row["token"], "skip_rate"])
            gate = expected.loc[row["token"], f"gate_{cells}"]
            assert row["gate_mean"] == pytest.approx(gate) or (np.isnan(gate) and np.isnan(row["gate_mean"]))
        assert board["skip_rate"].iloc[0] == pytest.approx(expected["skip_rate"].max())  # most skipped first
    assert any(c.value.startswith("Gates acted at") and "cells whose gate acted" in c.value for c in app.caption)
    app.radio(key="corpus_lowest").set_value(False).run()  # contexts of the highest gates
    assert not app.exception


def test_the_data_folder_collects_uploads_under_limits_and_opens_only_its_own_datasets(tmp_path):
    """What the Collect button runs (AppTest cannot upload files): size limit, one dataset per
    (model, gates, text, settings), concurrent collections of one upload, quota eviction of the
    oldest uploads only, and names outside the folder refused without saying whether they exist."""
    import threading

    from dashboard import service

    view = load_model("tiny-llama", gates="untrained")
    data = service.DataDir(tmp_path / "data", upload_limit=20_000)
    text = "\n\n".join(f"Paragraph {i} about gates and layers." for i in range(150)).encode()
    with pytest.raises(GateSkipError, match="uploads are limited to"):
        data.collect(view, "big", "big.txt", b"x" * 20_001, skip=0.3)
    with pytest.raises(GateSkipError, match="not UTF-8"):
        data.collect(view, "bin", "bin.txt", b"\xff\xfe", skip=0.3)
    progress = []
    name = service.dataset_name("upload.txt", view, text.hex(), {"skip": 0.3})
    results = []

    def collect():
        results.append(data.collect(view, name, "upload.txt", text, lambda d, t: progress.append((d, t)), skip=0.3))

    threads = [threading.Thread(target=collect) for _ in range(2)]  # two sessions, the same upload
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert results == [name, name] and (64, 150) in progress and (150, 150) in progress
    assert data.open(name).counts()["sequences"] == 150 and not list(data.root.glob(".collecting-*"))
    for outside in (str(tmp_path), "/etc", "../data/" + name, "/no/such/place", "no-such-dataset"):
        with pytest.raises(GateSkipError) as err:
            data.open(outside)
        assert (
            str(err.value) == f"{outside!r} is not a dataset in the dashboard's data folder; choose one from the list"
        )
    # A user's own dataset (collected there with `gateskip collect`) is listed and never evicted.
    from analysis.experiments.collect import collect_dataset

    collect_dataset(view, [("own", ["Own text about gates."] * 4)], data.root / "own", show_progress=False, skip=0.3)
    second = data.collect(view, "second", "second.txt", text.replace(b"Paragraph", b"Section"), skip=0.3)
    assert {d.name for d in data.datasets()} == {name, "own", second}
    data.quota_bytes = data.size_of("own") + data.size_of(second) + 1
    import os

    os.utime(data.root / name / "manifest.json", (1, 1))  # the oldest upload
    assert data.enforce_quota() == [name]
    assert {d.name for d in data.datasets()} == {"own", second}
    data.quota_bytes = 0
    assert data.enforce_quota(keep=second) == [] and (data.root / "own").is_dir()  # never a user's own
    with pytest.raises(GateSkipError, match="holds no text"):
        data.collect(view, "empty", "empty.txt", b"  \n\n ", skip=0.3)


def test_every_heatmap_cell_is_a_clickable_marker_that_names_its_cell():
    from analysis.traces import figures

    model = load_model("tiny-llama", gates="untrained")
    trace = model.trace("Gates decide which tokens skip.", skip=0.3)
    seq = trace.sequences[0]
    fig = figures.gate_heatmap(trace)
    cells = [t for t in fig.data if t.type == "scatter" and t.customdata is not None]
    assert [len(t.customdata) for t in cells] == [seq.n_tokens * trace.n_layers] * 2
    row = next(r for r in cells[1].customdata if r[1] == 3 and r[2] == 2)  # (position 3, layer 2) of the mlp
    assert row[5] == "mlp" and row[6] == seq.gate[3, 2, 1] and row[4] == figures.cell_roles(trace)[3, 2, 1]
    event = {"selection": {"points": [{"x": "3:x", "y": 2, "customdata": list(row)}]}}
    assert figures.clicked_cell(event) == (3, 2, "mlp")
    assert figures.clicked_cell({"selection": {"points": []}}) is None and figures.clicked_cell(None) is None


def _overlay_cells(fig, branches=("attn", "mlp")) -> np.ndarray:
    """[T, L, n branches] bool: the cells the heatmap greys out (its "gate not applied" overlays)."""
    overlays = [t for t in fig.data if t.type == "heatmap" and t.name == "gate not applied"]
    assert len(overlays) == len(branches)
    return np.stack([~np.isnan(np.asarray(t.z, dtype=float)).T for t in overlays], -1)


@pytest.mark.parametrize("scope", ["skipped", "all"])
def test_the_heatmap_greys_out_exactly_the_cells_that_ran_with_their_gate_not_applied(scope):
    """Grey cells are those with gate_applied == 0 and skipped == 0; their hover says "ranked only",
    the applied ones "applied", the skipped ones "skipped"; the title says how many gates acted."""
    from analysis.traces import figures

    model = load_model("tiny-llama", gates="untrained")
    trace = model.trace("Gates decide which tokens skip, and which branches run.", skip=0.3, adapter_scope=scope)
    seq = trace.sequences[0]
    expected = ~seq.gate_applied & ~seq.skipped
    assert seq.skipped.any() and seq.gate_applied.any()
    assert expected.any() == (scope == "skipped")  # scope all: every branch that ran was scaled
    fig = figures.gate_heatmap(trace)
    np.testing.assert_array_equal(_overlay_cells(fig), expected)
    roles = np.stack(
        [
            np.asarray(t.customdata)[:, 4].reshape(trace.n_layers, -1).T
            for t in fig.data
            if t.name and t.name.endswith(" cells")
        ],
        -1,
    )
    assert (roles[expected] == figures.CELL_ROLES["ranked"]).all()
    assert (roles[seq.skipped] == "skipped").all() and (roles[seq.gate_applied] == figures.CELL_ROLES["applied"]).all()
    acted = int(seq.gate_applied.sum()) / int((~seq.skipped).sum())
    assert f"{acted:.0%} of the shown gates acted" in fig.layout.title.text.replace("<br>", " ")
    legend = [t.name for t in fig.data if t.showlegend is not False and t.name]
    assert (figures.NOT_APPLIED_LEGEND in legend) == (scope == "skipped")
    mlp_only = figures.gate_heatmap(trace, branches=("mlp",))
    np.testing.assert_array_equal(_overlay_cells(mlp_only, ("mlp",))[:, :, 0], expected[:, :, 1])
    legend = [t.name for t in mlp_only.data if t.showlegend is not False and t.name]
    assert (figures.NOT_APPLIED_LEGEND in legend) == bool(expected[:, :, 1].any())


def test_the_token_strip_marks_tokens_none_of_whose_gates_acted():
    from analysis.traces import figures

    model = load_model("tiny-llama", gates="untrained")
    trace = model.trace("Gates decide which tokens skip, and which branches run.", skip=0.1, adapter_scope="skipped")
    seq = trace.sequences[0]
    idle = (~seq.skipped).any((1, 2)) & ~seq.gate_applied.any((1, 2))
    assert idle[0] and 0 < idle.sum() < seq.n_tokens  # BOS (protected) never skips, so never scales
    html = figures.token_strip_html(trace)
    assert html.count("gs-tok gs-idle") == int(idle.sum())
    assert "dotted underline: none of the token's gates acted" in html and "of the shown gates acted" in html
    applied = int(seq.gate_applied[3].sum())
    assert f"gate applied at {applied} of the {int((~seq.skipped[3]).sum())} it ran" in html


def test_a_trace_in_a_notebook_marks_tokens_none_of_whose_gates_acted():
    """`Trace._repr_html_` (what a notebook shows for a trace): the same tokens underlined as the strip."""
    model = load_model("tiny-llama", gates="untrained")
    for scope, budget in (("skipped", 0.1), ("all", 0.1)):
        trace = model.trace("Gates decide which tokens skip, and which run.", skip=budget, adapter_scope=scope)
        seq = trace.sequences[0]
        idle = (~seq.skipped).any((1, 2)) & ~seq.gate_applied.any((1, 2))
        html = trace._repr_html_()
        assert html.count("2px dotted") == int(idle.sum()) and (idle.any() == (scope == "skipped"))
        assert f"gate applied at {int(seq.gate_applied[2].sum())} of the {int((~seq.skipped[2]).sum())}" in html


def test_corpus_contexts_mark_the_tokens_whose_gate_did_not_act_at_the_chosen_branch():
    """`example_contexts` carries gate_applied at the chosen (layer, branch), as the trace has it; the
    Corpus view's lines underline (dotted) exactly the context tokens that ran it unscaled."""
    from analysis.traces import figures
    from analysis.traces.tracedb import TraceDB

    model = load_model("tiny-llama", gates="untrained")
    texts = ["Gates decide which tokens skip, and which run.", "A second text about layers and branches."]
    trace = model.trace(texts, skip=0.2, adapter_scope="skipped")
    contexts = TraceDB(trace).example_contexts(2, "mlp", n=3, window=4)
    truth = [trace.sequences[r.sequence_id].gate_applied[r.position, 2, 1] for r in contexts.itertuples()]
    assert list(contexts["gate_applied"].astype(bool)) == truth
    idle = (contexts["skipped"] == 0) & (contexts["gate_applied"] == 0)
    assert 0 < idle.sum() < len(contexts)
    html = figures.context_html(contexts)
    assert html.count('gs-idle"') == int(idle.sum()) and "ran unscaled, its gate here not applied" in html


def _chart_specs(app) -> list[dict]:
    import json

    return [json.loads(c.proto.spec) for c in app.get("plotly_chart")]


def _greyed_in_explore_heatmap(app) -> np.ndarray:
    """The Explore heatmap's grey cells as the browser receives them (Plotly's JSON: a typed array)."""
    import base64

    heat = next(s for s in _chart_specs(app) if any(t.get("name") == "gate not applied" for t in s["data"]))
    cells = []
    for t in (t for t in heat["data"] if t.get("name") == "gate not applied"):
        z = t["z"]
        if isinstance(z, dict):  # {"dtype", "bdata", "shape"}
            z = np.frombuffer(base64.b64decode(z["bdata"]), z["dtype"]).reshape([int(n) for n in z["shape"].split(",")])
        cells.append(~np.isnan(np.asarray(z, dtype=float)))
    return np.stack(cells)


def test_the_explore_view_marks_gates_that_did_not_act_and_its_legend_follows_the_scope(app):
    """Scope all: every branch that ran was scaled (no grey cell); scope skipped at budget 0: the
    model is the original, so not one gate acted and every cell is grey, the caption says 0%."""
    app.sidebar.radio(key="adapter_scope").set_value("all").run()
    caption = next(c.value for c in app.caption if c.value.startswith("Adapter scope"))
    assert caption.startswith("Adapter scope all: gate = ranking score and scale; 100% of the shown gates acted")
    assert "Grey cells" not in caption
    assert not _greyed_in_explore_heatmap(app).any()
    app.sidebar.slider(key="global_budget").set_value(0.0).run()
    app.sidebar.radio(key="adapter_scope").set_value("skipped").run()
    assert not app.exception
    caption = next(c.value for c in app.caption if c.value.startswith("Adapter scope"))
    assert "a scale only from the token's first skip on; 0% of the shown gates acted" in caption
    assert "Grey cells" in caption and "ranked only, not applied" in caption
    assert _greyed_in_explore_heatmap(app).all()


def test_attribution_panel_splits_an_attention_component_by_source_token(app):
    app.toggle(key="attr_on").set_value(True).run()
    app.number_input(key="attr_layer").set_value(2).run()
    app.number_input(key="attr_pos").set_value(6).run()
    app.selectbox(key="attr_split").set_value("L1.attn").run()
    assert not app.exception and not app.error
    assert any("weight times its value vector" in c.value for c in app.caption)


def _listening(port: int) -> set[str]:
    """Addresses on which some process of this machine listens at `port` (from /proc/net/tcp*)."""
    import ipaddress

    found = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with open(table) as f:
            for line in f.readlines()[1:]:
                local, state = line.split()[1], line.split()[3]
                address, hex_port = local.split(":")
                if state != "0A" or int(hex_port, 16) != port:  # 0A: LISTEN
                    continue
                raw = bytes.fromhex(address)
                raw = b"".join(raw[i : i + 4][::-1] for i in range(0, len(raw), 4))  # little-endian words
                found.add(str(ipaddress.ip_address(raw)))
    return found


@pytest.mark.parametrize("host", [None, "0.0.0.0"])
def test_the_dashboard_server_listens_on_loopback_unless_told_otherwise(tmp_path, host):
    """A real `gateskip dashboard`: by default only 127.0.0.1 listens and the printed URL is that
    address; `--host 0.0.0.0` listens everywhere and says so with a warning."""
    import os
    import subprocess
    import sys
    import time
    import urllib.request

    from .conftest import ROOT_DIR, free_port

    port = free_port()
    argv = ["dashboard", "--model", "tiny-llama", "--port", str(port), "--data-dir", str(tmp_path / "data")]
    argv += ["--host", host] if host else []
    env = dict(os.environ, PYTHONPATH=str(ROOT_DIR))
    proc = subprocess.Popen(
        [sys.executable, "-m", "gateskip.cli", *argv], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE
    )
    try:
        deadline = time.time() + 90
        while time.time() < deadline and not _listening(port):
            time.sleep(0.5)
        time.sleep(1)
        assert _listening(port) == ({"127.0.0.1"} if host is None else {"0.0.0.0"})
        urllib.request.urlopen(f"http://127.0.0.1:{port}/_stcore/health", timeout=5)
    finally:
        proc.terminate()
        _, err = proc.communicate(timeout=30)
    err = err.decode()
    if host is None:
        assert f"dashboard on http://127.0.0.1:{port}" in err and "warning" not in err
    else:
        assert (
            f"dashboard on http://0.0.0.0:{port}" in err and "warning: the dashboard listens on every interface" in err
        )
    assert (tmp_path / "data").is_dir()
