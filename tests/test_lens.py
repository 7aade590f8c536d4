"""Gated runs under TransformerLens, forced decisions, trace <-> cache, and the logit lens (tiny models)."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch

from analysis.experiments.lens import GatedLens, cache_to_arrays, gate_hook, hook_name, skip_hook, trace_to_cache
from analysis.experiments.logit_lens import grid_counts, logit_lens, settled_corpus, settled_summary, settled_table
from gateskip_core import Forced, GateSkipError, load_model
from gateskip_core.gating.adapter import AdapterSpec

from .conftest import TINY, assert_lens_matches_the_walk, run_cli, spread_gates

TEXT = "Gates decide which tokens skip which layers, and the lens shows it."


@pytest.fixture(scope="module", params=[(name, variant) for name in TINY for variant in ("lowrank:8", "scalar")])
def lens(request):
    name, variant = request.param
    model = spread_gates(load_model(name), variant)
    return GatedLens(model)


@pytest.mark.parametrize("skip_args", [dict(skip=0.3), dict(skip=0.5, policy="random", seed=3, branches="mlp")])
def test_hook_values_equal_the_trace_and_logits_equal_ours(lens, skip_args):
    model = lens.model
    logits, cache = lens.run_with_cache(TEXT, **skip_args)
    trace = model.trace(TEXT, gate_vectors=True, **skip_args)
    seq = trace.sequences[0]
    assert set(lens.hook_names()) <= set(cache.keys())
    got = cache_to_arrays(cache, model.spec.n_layers)
    assert np.array_equal(got["skipped"], seq.skipped) and seq.skipped.any()
    np.testing.assert_allclose(got["gate"], seq.gate, atol=1e-5)
    if "gate_vectors" in got:
        np.testing.assert_allclose(got["gate_vectors"], seq.gate_vectors, atol=1e-5)
    else:
        assert model.gates.variant == "scalar" and cache[gate_hook(0, "mlp")].shape[-1] == 1
    batch = model.encode([TEXT])
    ours = model.forward(batch.input_ids, batch.attention_mask, model.make_plan(**skip_args)).logits
    torch.testing.assert_close(logits, ours, atol=1e-4, rtol=1e-4)
    # What enters the residual at a skipped cell is an exact zero, and g * branch elsewhere.
    layer = int(np.argwhere(seq.skipped[:, :, 1].any(0))[0][0])
    out = cache[hook_name(layer, "mlp")][0]
    assert torch.all(out[torch.from_numpy(seq.skipped[:, layer, 1])] == 0)


def test_run_with_hooks_overrides_decisions_like_forced_through_our_api(lens):
    model = lens.model
    args = dict(skip=0.3)
    _, cache = lens.run_with_cache(TEXT, **args)
    kept = np.argwhere(~cache[skip_hook(1, "mlp")][0].numpy())[1:, 0]  # positions that ran mlp at layer 1
    skipped = np.argwhere(cache[skip_hook(2, "attn")][0].numpy())[:, 0]
    force_skip, force_run = int(kept[0]), int(skipped[0])

    def skip_one(mask, hook):
        mask = mask.clone()
        mask[:, force_skip] = True
        return mask

    def run_one(mask, hook):
        mask = mask.clone()
        mask[:, force_run] = False
        return mask

    hooks = [(skip_hook(1, "mlp"), skip_one), (skip_hook(2, "attn"), run_one)]
    forced_logits = lens.run_with_hooks(TEXT, fwd_hooks=hooks, **args)
    plain_logits = lens.run_with_hooks(TEXT, **args)
    assert (forced_logits - plain_logits).abs().max() > 1e-2  # took effect, far above the tolerance below
    forced = [Forced(1, "mlp", force_skip, skip=True), Forced(2, "attn", force_run, skip=False)]
    batch = model.encode([TEXT])
    ours = model.forward(batch.input_ids, batch.attention_mask, model.make_plan(forced=forced, **args))
    torch.testing.assert_close(forced_logits, ours.logits, atol=1e-4, rtol=1e-4)
    assert ours.skipped[0, force_skip, 1, 1] and not ours.skipped[0, force_run, 2, 0]
    assert torch.isnan(ours.threshold[0, force_skip, 1, 1])


def test_forced_decisions_work_at_zero_budget_and_are_validated():
    model = spread_gates(load_model("tiny-llama"))
    trace = model.trace(TEXT, skip=0.0, forced=[Forced(0, "attn", 3)])
    skipped = trace.sequences[0].skipped
    assert skipped.sum() == 1 and skipped[3, 0, 0]
    for bad, message in [
        (Forced(0, "attn", 0), "BOS"),
        (Forced(9, "mlp", 2), "layer 9"),
        (Forced(0, "ffn", 2), "branch"),
        (Forced(0, "mlp", -1), "position"),
        ((0, "mlp", 2), r"Forced\("),
    ]:
        with pytest.raises(GateSkipError, match=message):
            model.trace(TEXT, skip=0.2, forced=[bad])
    assert model.trace(TEXT, protect_bos=False, forced=[Forced(0, "attn", 0)]).sequences[0].skipped[0, 0, 0]
    with pytest.raises(GateSkipError, match="estimate"):
        model.estimate(trace, skip=0.2, forced=[Forced(0, "attn", 3)])


def test_trace_round_trips_through_a_transformer_lens_cache(lens):
    trace = lens.model.trace([TEXT, "Another, shorter one."], gate_vectors=True, skip=0.4)
    for sid, seq in enumerate(trace.sequences):
        cache = trace_to_cache(trace, sid)
        back = cache_to_arrays(cache, trace.n_layers)
        assert np.array_equal(back["skipped"], seq.skipped)
        np.testing.assert_allclose(back["gate"], seq.gate, atol=1e-6)
        if "gate_vectors" in back:
            assert np.array_equal(back["gate_vectors"], seq.gate_vectors)
    without_vectors = lens.model.trace(TEXT, skip=0.4)
    cache = trace_to_cache(without_vectors)
    assert cache[gate_hook(0, "attn")].shape == (1, without_vectors.sequences[0].n_tokens, 1)
    assert np.array_equal(cache_to_arrays(cache, trace.n_layers)["gate"], without_vectors.sequences[0].gate)
    with pytest.raises(GateSkipError, match="no sequence 5"):
        trace_to_cache(trace, 5)
    with pytest.raises(GateSkipError, match="gate hook points"):
        cache_to_arrays({}, trace.n_layers)


def test_lens_refuses_what_it_cannot_run(lens):
    with pytest.raises(GateSkipError, match="equal token length"):
        lens.run_with_cache([TEXT, "short"])
    with pytest.raises(GateSkipError, match="kv='copy'"):
        lens.run_with_cache(TEXT, skip=0.2, kv="copy")
    with pytest.raises(GateSkipError, match="skip budget"):
        lens.run_with_cache(TEXT, skip=2.0)


def test_logit_lens_grid_and_settled_counts():
    model = spread_gates(load_model("tiny-gemma3"), "lowrank:8")
    grid = logit_lens(model, TEXT, skip=0.4)
    T, L = len(grid.tokens), model.spec.n_layers
    batch = model.encode([TEXT])
    final = model.forward(batch.input_ids, batch.attention_mask, model.make_plan(0.4)).logits[0].argmax(-1)
    assert np.array_equal(grid.top_token[:, L], final.numpy()) and np.all(grid.final_rank[:, L] == 0)
    assert grid.top_prob.min() > 0 and grid.top_prob.max() <= 1
    table = settled_table(grid_counts(grid))
    per_branch = table.groupby("branch")[["skipped_n", "ran_n"]].sum().sum(1)
    assert (per_branch == grid.eligible.sum() * L).all()
    assert int(table["skipped_n"].sum()) == int(grid.skipped.sum()) > 0
    settled = grid.settled()
    for _, row in table.iterrows():  # each cell recounted by hand
        b = ["attn", "mlp"].index(row["branch"])
        skipped = grid.skipped[:, row["layer"], b] & grid.eligible
        assert row["skipped_settled"] == int((skipped & settled[:, row["layer"]]).sum())
    frame = grid.to_dataframe()
    assert len(frame) == T * L and frame["settled"].sum() == settled[:, :L].sum()
    summary = settled_summary(table)
    assert list(summary["branch"]) == ["attn", "mlp", "both"] and summary["layers"][0] == f"{L // 2}-{L - 1}"


def test_settled_corpus_streams_blocks_and_equals_the_per_text_counts():
    model = spread_gates(load_model("tiny-llama"), "lowrank:8")
    texts = ["word " * 40, "other text " * 30]
    corpus = settled_corpus(model, texts, n_blocks=3, seq_len=24, batch_size=2, show_progress=False, skip=0.3)
    from gateskip_core.data import token_blocks

    counts = None
    for block in list(token_blocks(model.tokenizer, texts, 24))[:3]:
        text = model.tokenizer.decode(block[1:])
        grid_table = settled_table(grid_counts(logit_lens(model, text, skip=0.3)))
        counts = grid_table if counts is None else counts.add(grid_table, fill_value=0)
    for column in ["skipped_n", "skipped_settled", "ran_n", "ran_settled"]:
        assert list(corpus[column]) == list(counts[column].astype(int))
    with pytest.raises(GateSkipError, match="shorter than one block"):
        settled_corpus(model, ["tiny"], n_blocks=2, seq_len=64, show_progress=False)


def test_settled_command_writes_table_and_figure(tmp_path):
    out, fig = tmp_path / "settled.csv", tmp_path / "settled.html"
    args = ["--model", "tiny-llama", "--gates", "untrained:lowrank:4", "--blocks", "2", "--seq-len", "32"]
    summary = tmp_path / "summary.csv"
    result = run_cli("settled", *args, "--out", str(out), "--figure", str(fig), "--summary-out", str(summary))
    assert result.returncode == 0, result.stderr
    assert "settled_rate_skipped" in result.stdout and out.is_file() and "plotly" in fig.read_text()
    assert "within each layer (Mantel-Haenszel)" in result.stdout
    written = pd.read_csv(summary)
    assert list(written["branch"]) == ["attn", "mlp", "both"]
    assert {"ratio", "ratio_low", "ratio_high", "pooled_ratio"} <= set(written.columns)
    bad = run_cli("settled", *args, "--out", str(tmp_path / "missing" / "s.csv"))
    assert bad.returncode == 2 and len(bad.stderr.strip().splitlines()) == 1


@pytest.mark.parametrize("name", TINY)
def test_the_bridge_adds_stand_ins_for_skipped_branches(name):
    from gateskip_core import GateCheckpoint
    from gateskip_core.gating.fill import FillSpec, SkipFill

    model = spread_gates(load_model(name), "lowrank:8")
    torch.manual_seed(0)
    fill = SkipFill(model.spec.n_layers, model.spec.d_model, FillSpec.parse("lowrank:3"))
    with torch.no_grad():
        for p in fill.parameters():
            p.normal_(0, 0.2)
    ckpt = GateCheckpoint(gates=model.gates, model=model.name, fingerprint=model.spec.fingerprint(), fill=fill.eval())
    model.attach_gates(model.gates, "with stand-ins", ckpt)
    lens = GatedLens(model)
    logits, _ = lens.run_with_cache(TEXT, skip=0.3)
    batch = model.encode([TEXT])
    ours = model.forward(batch.input_ids, batch.attention_mask, model.make_plan(0.3)).logits
    torch.testing.assert_close(logits, ours, atol=1e-4, rtol=1e-4)
    zero = GatedLens(spread_gates(load_model(name), "lowrank:8")).run_with_cache(TEXT, skip=0.3)[0]
    assert (zero - logits).abs().max() > 1e-2  # the stand-ins made a difference


@pytest.mark.parametrize("name", TINY)
@pytest.mark.parametrize("scope", ["all", "skipped"])
def test_the_bridge_runs_a_lora_adapter_in_either_scope_like_the_walk(tmp_path, name, scope):
    """Gates + LoRA adapter + stand-ins: hook values (gates, decisions, residual stream) equal the
    walk's, logits equal the gated model's; the adapter and the scope both change the result."""
    import dataclasses

    from analysis.experiments.lens import residual_stream_gap

    from .test_fill_and_scope import _lora_checkpoint, _random_fill

    model = load_model(name, gates=str(_lora_checkpoint(tmp_path, name)))
    model.attach_gates(model.gates, "lora + stand-ins", dataclasses.replace(model.checkpoint, fill=_random_fill(model)))
    with torch.no_grad():  # an adapter far from zero, so that adapted rows differ visibly
        for p in model.lora.B.values():
            p.add_(torch.randn_like(p) * 0.2)
    lens = GatedLens(model)
    args = dict(skip=0.3, adapter_scope=scope)
    cache, ours = assert_lens_matches_the_walk(lens, TEXT, **args)
    logits = ours.logits
    for layer in range(model.spec.n_layers):
        torch.testing.assert_close(
            cache[f"blocks.{layer}.hook_resid_pre"], ours.hidden_states[layer], atol=1e-4, rtol=1e-4
        )
    other = "all" if scope == "skipped" else "skipped"
    assert (lens.run_with_cache(TEXT, skip=0.3, adapter_scope=other)[0] - logits).abs().max() > 1e-2
    no_adapter = dataclasses.replace(model.checkpoint, adapter=AdapterSpec(), adapter_tensors={})
    plain = load_model(name)
    plain.attach_gates(model.gates, "no adapter", no_adapter)
    assert (GatedLens(plain).run_with_cache(TEXT, **args)[0] - logits).abs().max() > 1e-2
    assert residual_stream_gap(model, TEXT) < 1e-4  # a plain bridge: the lens's runs gated only


# ---- TransformerLens' own calls on the lens, gated
@pytest.fixture(scope="module")
def llama_lens():
    return GatedLens(spread_gates(load_model("tiny-llama"), "lowrank:8"))


def test_the_bridge_runs_gated_inside_hooks_and_refuses_to_run_outside(llama_lens):
    lens = llama_lens
    ids = lens.tokens(TEXT)
    with pytest.raises(GateSkipError, match="runs gated only"):
        lens.bridge.run_with_cache(ids)
    logits, cache = lens.run_with_cache(ids, skip=0.3)
    with lens.hooks(skip=0.3) as same:
        assert same is lens
        bridge_logits, bridge_cache = lens.bridge.run_with_cache(ids)
        nested_logits, _ = lens.run_with_cache(ids)  # no settings of its own: the block's
        called = lens(ids)
    torch.testing.assert_close(bridge_logits, logits)
    torch.testing.assert_close(nested_logits, logits)
    torch.testing.assert_close(called, logits)
    for name in lens.hook_names():
        torch.testing.assert_close(bridge_cache[name], cache[name])
    assert bool(cache[skip_hook(1, "mlp")].any())
    with pytest.raises(GateSkipError, match="runs gated only"):
        lens.bridge(ids)


def test_hooks_context_takes_fwd_hooks_like_run_with_hooks(llama_lens):
    lens = llama_lens
    ids = lens.tokens(TEXT)

    def skip_all(mask, hook):
        return torch.ones_like(mask)

    hooks = [(skip_hook(2, "attn"), skip_all)]
    expected = lens.run_with_hooks(ids, fwd_hooks=hooks, skip=0.2)
    with lens.hooks(fwd_hooks=hooks, skip=0.2):
        got, cache = lens.bridge.run_with_cache(ids)
    torch.testing.assert_close(got, expected)
    assert bool(cache[skip_hook(2, "attn")].all())
    assert (lens.run_with_hooks(ids, skip=0.2) - expected).abs().max() > 1e-4  # the hook was removed on exit


def test_add_hook_stays_until_reset_hooks_which_keeps_the_gating(llama_lens):
    lens = llama_lens
    ids = lens.tokens(TEXT)
    assert set(lens.hook_names()) <= set(lens.hook_dict)
    before = lens.run_with_hooks(ids, skip=0.3)
    seen = []
    lens.add_hook(gate_hook(0, "mlp"), lambda g, hook: seen.append(g.shape))
    lens.run_with_hooks(ids, skip=0.3)
    lens.run_with_cache(ids, skip=0.3)
    assert len(seen) == 2
    lens.reset_hooks()
    torch.testing.assert_close(lens.run_with_hooks(ids, skip=0.3), before)
    assert len(seen) == 2


def test_a_bridge_whose_permanent_hooks_were_reset_is_refused_until_the_lens_reinstalls_them(llama_lens):
    lens = llama_lens
    ids = lens.tokens(TEXT)
    before = lens.run_with_hooks(ids, skip=0.3)
    lens.bridge.reset_hooks(including_permanent=True)
    with pytest.raises(GateSkipError, match="ran without the lens's gating"):
        lens.run_with_cache(ids, skip=0.3)
    lens.reset_hooks(including_permanent=True)
    torch.testing.assert_close(lens.run_with_hooks(ids, skip=0.3), before)
