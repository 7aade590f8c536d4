"""A focused set on the real SmolLM2-135M-Instruct (and one Gemma-3-270M load)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from gateskip_core import GateSkipError, load_model

from .conftest import assert_lens_matches_the_walk, flop_counter_dense

pytestmark = pytest.mark.real

TEXT = "The Python language reference describes the syntax and core semantics of the language. It is terse."


def test_smollm2_matches_hugging_face_and_paths_agree(smollm2):
    batch = smollm2.encode([TEXT, "Short prompt."])
    real = batch.attention_mask.bool()
    smollm2.remove_gates()
    ref = smollm2.backbone(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
    out = smollm2.forward(batch.input_ids, batch.attention_mask, smollm2.make_plan(0.0)).logits
    torch.testing.assert_close(out[real], ref[real], atol=2e-4, rtol=1e-4)
    smollm2.load_gates("untrained")
    outs = [
        smollm2.forward(batch.input_ids, batch.attention_mask, smollm2.make_plan(0.4, path=p))
        for p in ("masked", "physical")
    ]
    assert torch.equal(outs[0].skipped, outs[1].skipped) and outs[0].skipped.any()
    torch.testing.assert_close(outs[0].logits[real], outs[1].logits[real], atol=2e-3, rtol=1e-3)


def test_smollm2_dense_account_agrees_with_flop_counter(smollm2):
    from gateskip_core import account_sequence

    ids = smollm2.encode([TEXT * 3]).input_ids
    T = ids.shape[1]
    acc = account_sequence(
        smollm2.spec, np.zeros((T, smollm2.spec.n_layers, 2), bool), (0, 0), T, "masked", convention="full"
    )
    try:
        counted = flop_counter_dense(smollm2, ids)
    finally:
        smollm2.backbone.config._attn_implementation = "sdpa"
    assert acc.dense_flops == pytest.approx(counted, rel=0.02)
    # vector gates: 2 * d^2 multiply-adds per token per layer, ~19% of the linear work (reference doc)
    trace = smollm2.trace(TEXT, skip=0.0)
    c = trace.compute
    assert c.gate_flops / (
        c.dense_flops - 2 * smollm2.spec.d_model * smollm2.spec.vocab_size * c.tokens
    ) == pytest.approx(0.19, abs=0.03)


def test_smollm2_cached_generation_matches_rerun(smollm2):
    # Thresholds fitted on a few short texts: the test is about causality, not about the fit.
    texts = [TEXT, "Short prompt.", "Name the planets of the solar system.", "Gates decide which tokens skip."]
    policy = smollm2.calibrate(smollm2.make_plan(0.25).budget, texts=texts)
    gen = smollm2.generate(
        ["Name three colours.", "What is 2+2?"],
        max_new_tokens=6,
        skip=0.25,
        policy=policy,
        chat=True,
        stop_at_eos=False,
    )
    for b, seq in enumerate(gen.trace.sequences):
        ids = torch.as_tensor(seq.token_ids)[None]  # prompt + generated tokens that were fed back
        out = smollm2.forward(ids, torch.ones_like(ids), smollm2.make_plan(0.25, policy))
        np.testing.assert_array_equal(out.skipped[0].numpy(), seq.skipped)
        assert out.logits[0, -1].argmax().item() == gen.trace.extra["generated_token_ids"][b][-1]
        assert seq.skipped[seq.prompt_length :].any()


@pytest.mark.parametrize("model_name", ["smollm2-135m-instruct", "gemma3-270m"])
def test_shipped_gates_masked_physical_and_cached_decoding_agree(model_name):
    """One backbone with the shipped adapter (per-row deltas, scope 'skipped') and stand-ins: the
    masked and physical paths give the same decisions and logits, and cached decoding (physical)
    gives every token the decisions and next token of an uncached run over the whole text."""
    model = load_model(model_name, gates="default")
    assert model.adapter_scope == "skipped" and model.lora is not None and model.fill is not None
    batch = model.encode([TEXT])
    masked = model.forward(batch.input_ids, batch.attention_mask, model.make_plan(0.3, path="masked"))
    physical = model.forward(batch.input_ids, batch.attention_mask, model.make_plan(0.3, path="physical"))
    assert torch.equal(masked.skipped, physical.skipped) and masked.skipped.any()
    torch.testing.assert_close(physical.logits, masked.logits, atol=2e-3, rtol=1e-3)
    texts = [TEXT, "Short prompt.", "Name the planets of the solar system.", "Gates decide which tokens skip."]
    policy = model.calibrate(model.make_plan(0.3).budget, texts=texts)
    gen = model.generate(
        "Name three colours, then three animals.",
        max_new_tokens=6,
        skip=0.3,
        policy=policy,
        stop_at_eos=False,
        path="physical",
    )
    seq = gen.trace.sequences[0]
    ids = torch.as_tensor(seq.token_ids)[None]
    out = model.forward(ids, torch.ones_like(ids), model.make_plan(0.3, policy))
    np.testing.assert_array_equal(out.skipped[0].numpy(), seq.skipped)
    assert seq.skipped[seq.prompt_length :].any()
    assert out.logits[0, -1].argmax().item() == gen.trace.extra["generated_token_ids"][0][-1]


def test_gemma3_loads_and_runs():
    model = load_model("gemma3-270m", gates="untrained")
    assert model.spec.model_type == "gemma3_text" and model.spec.n_layers == 18
    batch = model.encode([TEXT])
    model_plain = model.view()  # the same loaded weights, no gates
    ref = model_plain.backbone(input_ids=batch.input_ids).logits
    out = model_plain.forward(batch.input_ids, batch.attention_mask, model_plain.make_plan(0.0)).logits
    torch.testing.assert_close(out, ref, atol=2e-3, rtol=1e-3)
    masked = model.forward(batch.input_ids, batch.attention_mask, model.make_plan(0.3))
    physical = model.forward(batch.input_ids, batch.attention_mask, model.make_plan(0.3, path="physical"))
    torch.testing.assert_close(masked.logits, physical.logits, atol=2e-3, rtol=1e-3)


def test_transformer_lens_bridge_sees_the_same_residual_stream(smollm2):
    from analysis.experiments.lens import hook_name, residual_stream_gap, to_transformer_lens

    ids = smollm2.encode([TEXT]).input_ids
    with torch.no_grad():
        before = smollm2.backbone(input_ids=ids).logits
        bridge = to_transformer_lens(smollm2)
        torch.testing.assert_close(bridge(ids), before, atol=1e-4, rtol=1e-4)
        assert torch.equal(smollm2.backbone(input_ids=ids).logits, before)  # our model is left as it was
        _, cache = bridge.run_with_cache(ids)
    assert hook_name(3, "mlp") in cache and hook_name(3, "attn") in cache
    assert residual_stream_gap(smollm2, TEXT, bridge) < 1e-3


def test_gated_lens_on_smollm2_with_the_shipped_gates_matches_traces_and_logits(smollm2):
    from analysis.experiments.lens import GatedLens, skip_hook
    from analysis.experiments.logit_lens import settled_corpus, settled_summary

    model = smollm2.view()
    model.load_gates("default")  # low-rank gates, their LoRA adapter and rank-16 stand-ins
    lens = GatedLens(model)
    batch = model.encode([TEXT])
    for scope in ("skipped", "all"):  # the shipped scope (adapter per token from its first skip) and all
        args = dict(skip=0.25, policy="quantile", adapter_scope=scope)
        cache, walked = assert_lens_matches_the_walk(lens, TEXT, **args)  # logits to 1e-4
        logits, seq = walked.logits, model.trace(TEXT, **args).sequences[0]

    position = int(np.flatnonzero(~seq.skipped[:, 20, 1])[1])  # a token that ran layer 20's MLP (not BOS)

    def skip_it(mask, hook):
        mask = mask.clone()
        mask[:, position] = True
        return mask

    forced = lens.run_with_hooks(TEXT, fwd_hooks=[(skip_hook(20, "mlp"), skip_it)], **args)
    assert (forced - logits).abs().max() > 0.1  # the forced skip changed the run, far above the tolerance
    from gateskip_core import Forced

    plan = model.make_plan(forced=[Forced(20, "mlp", position)], **args)
    torch.testing.assert_close(
        forced, model.forward(batch.input_ids, batch.attention_mask, plan).logits, atol=1e-4, rtol=1e-4
    )
    table = settled_corpus(model, n_blocks=2, seq_len=64, batch_size=2, show_progress=False, **args)
    summary = settled_summary(table)
    assert summary["skipped_n"].iloc[-1] > 0 and 0 <= summary["settled_rate_skipped"].iloc[-1] <= 1


def test_shipped_default_gates_carry_their_adapter_and_keep_the_original():
    from gateskip_core.model import SHIPPED_GATES_DIR, shipped_gate_path

    for model_name in ("smollm2-135m-instruct", "gemma3-270m"):  # <= 28 MB of shipped gates per model
        assert sum(p.stat().st_size for p in SHIPPED_GATES_DIR.glob(f"{model_name}-*.safetensors")) <= 28e6
    model = load_model("smollm2-135m-instruct", gates="default")
    ckpt = model.checkpoint
    assert shipped_gate_path(model.name).is_file() and model.adapter.startswith("lora:")
    assert ckpt.fingerprint == model.spec.fingerprint()
    assert ckpt.sensitivity is not None and ckpt.global_thresholds.shape == (12, model.spec.n_layers, 2)
    assert ckpt.adapter_scope == "skipped" and ckpt.fill_label.startswith("lowrank:")
    assert model.backbone is model.original and model.lora is not None  # one set of weights + per-row deltas
    batch = model.encode([TEXT])
    with torch.no_grad():
        reference = model.view().original(input_ids=batch.input_ids).logits
    ungated = model.view().forward(batch.input_ids, batch.attention_mask, model.make_plan(0.0)).logits
    torch.testing.assert_close(ungated, reference, atol=2e-3, rtol=1e-3)  # view() is the original model
    # Adapter scope 'skipped': with nothing skipped the gated model is the original ...
    gated = model.forward(batch.input_ids, batch.attention_mask, model.make_plan(0.0)).logits
    torch.testing.assert_close(gated, reference, atol=2e-3, rtol=1e-3)
    # ... and with every token on the adapter (scope 'all') it is not.
    everywhere = model.forward(batch.input_ids, batch.attention_mask, model.make_plan(0.0, adapter_scope="all"))
    assert not torch.allclose(everywhere.logits, reference, atol=1e-3)
    trace = model.trace(TEXT, skip=0.3, policy="calibrated")
    assert "lora:" in trace.gates and "fill" in trace.gates and trace.sequences[0].skipped.any()
    assert not np.allclose(trace.skip_budget, trace.skip_budget[0, 0])  # auto -> the global allocation
    previous = load_model("smollm2-135m-instruct", gates="default-v2")  # the previous default stays available
    assert previous.checkpoint.adapter_scope == "skipped" and previous.fill is not None
    assert previous.checkpoint.training["steps"] != ckpt.training["steps"]  # and is another file
    with pytest.raises(GateSkipError, match="'default-v1' no longer ship; bash scripts/train_shipped_gates.sh"):
        previous.load_gates("default-v1")


def test_gate_attribution_on_smollm2_with_the_shipped_gates_is_exact(smollm2):
    from analysis.experiments.attribution import gate_attributions

    model = smollm2.view()
    model.load_gates("default")
    for layer, branch in ((3, "attn"), (20, "mlp"), (29, "mlp")):
        result = gate_attributions(model, TEXT, layer, branch, skip=0.25)
        assert result.residual_error < 1e-4, (layer, branch, result.residual_error)
    from analysis.experiments.attribution import attention_sources

    position = len(result.tokens) - 2
    for source in (0, 14, 28):  # an attention term split by source token adds up to the term
        sources = attention_sources(model, TEXT, 29, "mlp", position, source, skip=0.25)
        assert sources["term"].sum() == pytest.approx(sources.attrs["component_term"], abs=1e-4)
    # With gates without stand-ins an earlier branch a token skipped adds exactly nothing.
    model.load_gates("default-scalar")
    result = gate_attributions(model, TEXT, 29, "mlp", skip=0.25)
    assert result.residual_error < 1e-4 and (result.terms == 0).any()


def test_shipped_gemma3_gates_load_with_their_fingerprint_and_keep_the_original():
    from dashboard.service import gate_choices
    from gateskip_core.model import shipped_gate_path

    path = shipped_gate_path("gemma3-270m")
    assert path.is_file() and path.stat().st_size <= 28e6
    assert gate_choices("gemma3-270m")[0] == "default"  # the dashboard opens Gemma-3 with them
    model = load_model("gemma3-270m", gates="default")
    ckpt = model.checkpoint
    assert ckpt.model == "gemma3-270m" and ckpt.fingerprint == model.spec.fingerprint()
    assert (
        ckpt.adapter_scope == "skipped" and ckpt.fill_label.startswith("lowrank:") and model.adapter.startswith("lora:")
    )
    assert ckpt.sensitivity is not None and ckpt.global_thresholds.shape == (12, model.spec.n_layers, 2)
    batch = model.encode([TEXT])
    with torch.no_grad():
        reference = model.view().original(input_ids=batch.input_ids).logits
    gated = model.forward(batch.input_ids, batch.attention_mask, model.make_plan(0.0)).logits
    torch.testing.assert_close(gated, reference, atol=2e-3, rtol=1e-3)  # budget 0 is the original
    trace = model.trace(TEXT, skip=0.3)
    assert trace.sequences[0].skipped.any() and not np.allclose(trace.skip_budget, trace.skip_budget[0, 0])
    # Scope 'all' (every token on the adapter) is not the original: the adapter was loaded and runs.
    everywhere = model.forward(batch.input_ids, batch.attention_mask, model.make_plan(0.0, adapter_scope="all"))
    assert (everywhere.logits - reference).abs().max() > 0.1
    # One backbone: masked == physical == cached decoding with the shipped adapter, stand-ins and scope.
    plan = model.make_plan(0.3, policy="quantile")
    masked = model.forward(batch.input_ids, batch.attention_mask, plan)
    physical = model.forward(batch.input_ids, batch.attention_mask, model.make_plan(0.3, path="physical"))
    assert torch.equal(masked.skipped, physical.skipped) and masked.skipped.any()
    torch.testing.assert_close(physical.logits, masked.logits, atol=2e-3, rtol=1e-3)
    # Trained gates beat untrained gates and random skipping at budget 0.2 on held-out text.
    from analysis.experiments.quality import evaluate, evaluation_blocks
    from analysis.experiments.quality import reference as quality_reference
    from gateskip_core.data import pydoc_texts

    blocks = evaluation_blocks(model, pydoc_texts("validation"), n_blocks=2, seq_len=96)
    ref = quality_reference(model, blocks)
    shipped = evaluate(model, ref, model.make_plan(0.2, "quantile"))["ppl"]
    randomly = evaluate(model, ref, model.make_plan(0.2, "random", seed=1))["ppl"]
    untrained = model.view()
    untrained.load_gates("untrained:lowrank:16")
    untrained_ppl = evaluate(untrained, ref, untrained.make_plan(0.2, "quantile"))["ppl"]
    assert shipped < 0.95 * randomly and shipped < 0.95 * untrained_ppl, (shipped, randomly, untrained_ppl)
