"""Causal measures beside the gates (`analysis.experiments.causal`), the paper's findings checked
(`findings`), `gateskip causal`, and the generated tables of docs/analysis.md."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch
import torch.nn.functional as F

from analysis.experiments.causal import (
    branch_norms,
    corpus_effects,
    layer_effects,
    skip_harm,
    text_bootstrap,
)
from analysis.experiments.findings import findings_table
from analysis.experiments.findings_docs import generated_section, page_section
from gateskip_core import BRANCHES, Forced, GateSkipError, load_model

from .conftest import PROMPTS, ROOT_DIR, run_cli


def _direct_harm(model, ids, layer: int, branch: int, position: int, scope: str) -> float:
    """KL(base || one forced skip), summed from the skipped position on: one plain run per cell."""
    mask = torch.ones_like(ids)
    base = model.forward(ids, mask, model.make_plan(0.0, adapter_scope=scope)).logits.float()
    forced = Forced(layer, BRANCHES[branch], position)
    plan = model.make_plan(0.0, adapter_scope=scope, protect_bos=False, forced=[forced])
    skipped = model.forward(ids, mask, plan).logits.float()
    base_lp, lp = F.log_softmax(base, -1)[0], F.log_softmax(skipped, -1)[0]
    return float((base_lp.exp() * (base_lp - lp)).sum(-1)[position:].sum())


@pytest.mark.parametrize("scope", ["all", "skipped"])
def test_batched_harm_equals_a_direct_forced_skip_run(tiny_llama, scope):
    ids = tiny_llama.encode([PROMPTS[0]]).input_ids
    cells = np.array([[0, 0, 0], [1, 1, 3], [0, 1, 5], [1, 0, 0]])  # BOS at two branches, two others
    table = skip_harm(tiny_llama, ids, cells, adapter_scope=scope, protect_bos=False, batch_size=3)
    for (layer, branch, position), harm, per_position in zip(cells, table["harm_kl"], table["harm_kl_mean"]):
        direct = _direct_harm(tiny_llama, ids, layer, branch, position, scope)
        assert direct > 1e-6  # the skip changed something
        assert harm == pytest.approx(direct, rel=1e-4, abs=1e-7)
        assert per_position == pytest.approx(direct / (ids.shape[1] - position), rel=1e-4, abs=1e-8)


def test_bos_harm_needs_protect_bos_false(tiny_llama):
    ids = tiny_llama.encode([PROMPTS[1]]).input_ids
    with pytest.raises(GateSkipError, match="protect_bos=False") as err:
        skip_harm(tiny_llama, ids, np.array([[0, 1, 0]]))
    assert "\n" not in str(err.value)
    with pytest.raises(GateSkipError, match="does not exist"):
        skip_harm(tiny_llama, ids, np.array([[99, 0, 2]]))


def test_rel_norm_is_the_original_modules_output_over_the_residual(tiny_llama):
    """Against Hugging Face's own modules: hooks on each layer's attention and MLP of the original."""
    original = tiny_llama.view()
    ids = original.encode([PROMPTS[0]]).input_ids
    outputs: dict[tuple[int, str], torch.Tensor] = {}
    hooks = []
    for i, layer in enumerate(original.original.model.layers):
        for name, module in (("attn", layer.self_attn), ("mlp", layer.mlp)):

            def keep(_module, _inputs, out, key=(i, name)):
                outputs[key] = out[0] if isinstance(out, tuple) else out

            hooks.append(module.register_forward_hook(keep))
    with torch.no_grad():
        hidden = original.original(input_ids=ids, output_hidden_states=True).hidden_states
    for hook in hooks:
        hook.remove()
    norms = branch_norms(original, ids)
    for i in range(original.spec.n_layers):
        attn, mlp = outputs[(i, "attn")][0], outputs[(i, "mlp")][0]
        expect_attn = attn.norm(dim=-1) / hidden[i][0].norm(dim=-1)
        expect_mlp = mlp.norm(dim=-1) / (hidden[i][0] + attn).norm(dim=-1)
        np.testing.assert_allclose(norms[:, i, 0], expect_attn.numpy(), rtol=1e-4)
        np.testing.assert_allclose(norms[:, i, 1], expect_mlp.numpy(), rtol=1e-4)


def test_intervals_resample_whole_texts():
    """Two texts with means 1 and 3 (one with many cells): the percentile interval's ends are the
    resamples that draw one text twice, 1 and 3; resampling cells would give a narrow interval."""
    sums, counts = np.array([[1.0 * 10], [3.0 * 2]]), np.array([[10], [2]])
    estimate, low, high = text_bootstrap(sums, counts, resamples=2000)[:, 0]
    assert estimate == pytest.approx(16 / 12)
    assert (low, high) == (pytest.approx(1.0), pytest.approx(3.0))
    one_text = text_bootstrap(sums[:1], counts[:1])
    assert one_text[0, 0] == 1.0 and np.isnan(one_text[1:]).all()


def test_layer_and_findings_tables_on_a_tiny_model(tiny_llama):
    texts = [PROMPTS[0], PROMPTS[1], PROMPTS[0] + " " + PROMPTS[1]]
    cells = {
        scope: corpus_effects(tiny_llama, texts, max_tokens=12, per_branch=1, include_bos=True, adapter_scope=scope)
        for scope in ("all", "skipped")
    }
    original = corpus_effects(tiny_llama.view(), texts, max_tokens=12, per_branch=1, include_bos=True)
    L = tiny_llama.spec.n_layers
    layers = layer_effects(cells["skipped"], resamples=200)
    assert len(layers) == 2 * L and (layers["harm_cells"] == len(texts)).all()
    # Scope 'skipped': layer 0's attention comes first in walk order, so its gate never scales anything.
    assert layers.loc[0, "applied_share"] == 0 and np.isnan(layers.loc[0, "gate_mean_applied"])
    measured = cells["skipped"]
    layer1_mlp = measured[(measured["layer"] == 1) & (measured["branch"] == "mlp") & (measured["position"] > 0)]
    assert layers.loc[3, "rel_norm"] == pytest.approx(layer1_mlp["rel_norm"].mean())
    table = findings_table(cells, original, "tiny-llama", resamples=200)
    assert len(table) == 10
    bos = table[(table["finding"] == "bos_anchor")].set_index("scope")
    # BOS is protected and never skips, so in scope 'skipped' its gate never acts: no applied cells.
    assert bos.loc["skipped", "gate_applied_verdict"] == "no data"
    assert np.isfinite(bos.loc["all", "gate_diff_applied"]) and np.isfinite(bos.loc["all", "harm_ratio_original"])


def test_causal_command_writes_the_layer_table(tmp_path):
    out, cells = tmp_path / "layer_causal.csv", tmp_path / "cells.csv"
    args = ["causal", "--model", "tiny-llama", "--gates", "untrained", "--text", PROMPTS[0], "--per-branch", "1"]
    result = run_cli(*args, "--bos", "--out", str(out), "--cells-out", str(cells))
    assert result.returncode == 0, result.stderr
    table = pd.read_csv(out)
    assert {"gate_mean", "gate_mean_applied", "rel_norm", "harm_kl_mean", "bos_harm_kl_mean"} <= set(table.columns)
    assert table["harm_kl_mean"].notna().all() and table["bos_harm_kl_mean"].notna().all()
    assert "one text: no interval" in result.stdout
    assert pd.read_csv(cells)["sampled"].sum() == 2 * len(table)  # BOS and one other token per branch


@pytest.mark.parametrize(
    "bad, message",
    [
        (["--text", "x", "--out", "table.txt"], "--out must end in .csv"),
        (["--file", "missing.txt", "--out", "t.csv"], "file not found"),
        (["--text", "   ", "--out", "t.csv"], "text is empty"),
        (["--text", "x", "--per-branch", "-1", "--out", "t.csv"], "--per-branch"),
    ],
)
def test_causal_command_rejects_bad_input_with_one_line(tmp_path, monkeypatch, capsys, bad, message):
    """In-process (the console script's code): exit 2, one line on stderr, before any model loads."""
    import gateskip_core.model as model_module
    from gateskip.cli import main

    def no_loading(*args, **kwargs):
        raise AssertionError("a model was loaded before the input was checked")

    monkeypatch.setattr(model_module, "load_backbone", no_loading)
    monkeypatch.chdir(tmp_path)
    try:
        code = main(["causal", "--model", "tiny-llama", "--gates", "untrained", *bad])
    except SystemExit as exit_:
        code = exit_.code
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert code == 2 and len(err) == 1 and message in err[0], err
    assert not (tmp_path / "t.csv").exists()


def test_the_analysis_page_shows_the_tables_of_the_csvs():
    results = ROOT_DIR / "docs" / "results"
    assert page_section(ROOT_DIR / "docs" / "analysis.md") == generated_section(results)
    assert (results / "smollm2-135m-instruct_findings.csv").is_file()


def test_layers_view_measures_the_causal_table_on_demand(monkeypatch):
    from streamlit.testing.v1 import AppTest

    from .conftest import APP

    monkeypatch.setenv("GATESKIP_DASHBOARD_MODEL", "tiny-llama")
    app = AppTest.from_file(APP, default_timeout=120)
    app.run()
    assert not app.exception and "causal" not in app.session_state  # it runs the model: only on the button
    app.button(key="run_causal").click().run()
    assert not app.exception
    _, table = app.session_state["causal"]
    assert len(table) == 2 * load_model("tiny-llama").spec.n_layers
    assert table["harm_kl_mean"].notna().all() and table["rel_norm"].notna().all()
