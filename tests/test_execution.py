"""The explicit gated forward against Hugging Face, and masked vs physical execution."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pytest
import torch

from gateskip_core import Capture, GateSkipError, SkipBudget, SkipPlan, load_model
from gateskip_core.skipping.policies import BranchInput, Decision, SkipPolicy

from .conftest import ACCELERATORS, PROMPTS, TINY, spread_gates


@pytest.mark.parametrize("name", TINY)
def test_ungated_forward_matches_hugging_face(name):
    model = load_model(name)
    batch = model.encode(PROMPTS)
    ref = model.backbone(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
    out = model.forward(batch.input_ids, batch.attention_mask, model.make_plan(0.0)).logits
    real = batch.attention_mask.bool()
    torch.testing.assert_close(out[real], ref[real], atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("name", TINY)
def test_removing_gates_restores_the_model_bit_for_bit(name):
    model = load_model(name)
    batch = model.encode(PROMPTS)
    before_hf = model.backbone(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
    before = model.forward(batch.input_ids, batch.attention_mask, model.make_plan(0.0)).logits
    pointers = {k: v.data_ptr() for k, v in model.backbone.state_dict().items()}
    spread_gates(model)
    gated = model.forward(batch.input_ids, batch.attention_mask, model.make_plan(0.0)).logits
    assert not torch.equal(gated, before)  # the gates do change the output
    assert {k: v.data_ptr() for k, v in model.backbone.state_dict().items()} == pointers
    model.remove_gates()
    after = model.forward(batch.input_ids, batch.attention_mask, model.make_plan(0.0)).logits
    after_hf = model.backbone(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
    assert torch.equal(after, before)
    assert torch.equal(after_hf, before_hf)


@pytest.mark.parametrize("kv", ["compute", "copy"])
@pytest.mark.parametrize("skip", [0.3, 0.6])
def test_masked_and_physical_paths_agree(tiny, skip, kv):
    batch = tiny.encode(PROMPTS)
    real = batch.attention_mask.bool()
    outs = {}
    for path in ("masked", "physical"):
        plan = tiny.make_plan(skip, "quantile", path=path, kv=kv)
        outs[path] = tiny.forward(batch.input_ids, batch.attention_mask, plan)
    assert outs["masked"].skipped.any()
    assert torch.equal(outs["masked"].skipped, outs["physical"].skipped)
    torch.testing.assert_close(outs["masked"].logits[real], outs["physical"].logits[real], atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("skip", [0.0, 0.3])
@pytest.mark.parametrize("path", ["masked", "physical"])
def test_padding_runs_no_branch(tiny, path, skip):
    """Left padding adds nothing to its own residual on either path, with or without skips (the
    compute account charges real tokens only; budget 0 takes the no-mask fast path)."""
    batch = tiny.encode(PROMPTS)
    pad = ~batch.attention_mask.bool()
    assert pad.any()
    with torch.no_grad():  # a zero embedding would stay zero through any branch; make padding visible
        embedding = tiny.backbone.get_input_embeddings().weight
        embedding[tiny.tokenizer.pad_token_id] = torch.randn(embedding.shape[1])
    plan = tiny.make_plan(skip, "quantile", path=path)
    out = tiny.forward(batch.input_ids, batch.attention_mask, plan, capture=Capture(hidden_states=True))
    assert torch.equal(out.hidden_states[-1][pad], out.hidden_states[0][pad])
    assert not torch.equal(out.hidden_states[-1][~pad], out.hidden_states[0][~pad])


@dataclass(frozen=True)
class SkipPositions(SkipPolicy):
    """Test policy: the given positions skip every branch of every layer."""

    positions: tuple[int, ...] = ()
    name: str = "fixed"
    needs_gates: bool = False

    def decide(self, inp: BranchInput) -> Decision:
        skip = torch.zeros_like(inp.eligible)
        for p in self.positions:
            skip |= inp.positions == p
        return Decision(skip=skip & inp.eligible, threshold=torch.full(skip.shape, float("nan")))


@pytest.mark.parametrize("path", ["masked", "physical"])
def test_skipped_token_still_influences_later_tokens_through_attention(tiny, path):
    ids = tiny.encode(["abcdefghij"]).input_ids
    mask = torch.ones_like(ids)
    plan = SkipPlan(SkipBudget.make(1.0, tiny.spec.n_layers), SkipPositions((3,)), path)
    out = tiny.forward(ids, mask, plan)
    assert out.skipped[0, 3].all() and not out.skipped[0, 6].any()
    changed = ids.clone()
    changed[0, 3] = ids[0, 3] + 1
    out2 = tiny.forward(changed, mask, plan)
    # position 6 runs attention and sees position 3's keys/values, computed from its residual
    assert (out.logits[0, 6] - out2.logits[0, 6]).abs().max() > 1e-4
    torch.testing.assert_close(out.logits[0, :3], out2.logits[0, :3])  # causality


def test_skipped_token_residual_passes_unchanged(tiny):
    ids = tiny.encode(["abcdefghij"]).input_ids
    plan = SkipPlan(SkipBudget.make(1.0, tiny.spec.n_layers), SkipPositions((4,)), "physical")
    out = tiny.forward(ids, torch.ones_like(ids), plan, capture=Capture(hidden_states=True))
    first = out.hidden_states[0][0, 4]
    for h in out.hidden_states[1:]:
        assert torch.equal(h[0, 4], first)
    assert not torch.equal(out.hidden_states[-1][0, 5], out.hidden_states[0][0, 5])


def test_masked_skip_outputs_are_exact_zeros(tiny):
    ids = tiny.encode(["abcdefghij"]).input_ids
    plan = SkipPlan(SkipBudget.make(1.0, tiny.spec.n_layers), SkipPositions((2, 7)), "masked")
    out = tiny.forward(ids, torch.ones_like(ids), plan, capture=Capture(hidden_states=True))
    for h in out.hidden_states[1:]:
        assert torch.equal(h[0, 2], out.hidden_states[0][0, 2])
        assert torch.equal(h[0, 7], out.hidden_states[0][0, 7])


@pytest.mark.parametrize(
    "device",
    ACCELERATORS
    or [pytest.param("none", marks=pytest.mark.skip(reason="no accelerator here: CPU vs CPU proves nothing"))],
)
def test_every_path_runs_on_each_accelerator_present_and_matches_cpu(device):
    cpu = spread_gates(load_model("tiny-llama"))
    other = spread_gates(load_model("tiny-llama", device=device))
    assert other.device.type == device and next(other.gates.parameters()).device.type == device
    for path in ("masked", "physical"):
        a = cpu.trace(PROMPTS, skip=0.3, path=path)
        b = other.trace(PROMPTS, skip=0.3, path=path)
        for sa, sb in zip(a.sequences, b.sequences):
            np.testing.assert_array_equal(sa.skipped, sb.skipped)
            np.testing.assert_allclose(sa.gate, sb.gate, atol=1e-5)
    text, _ = other.generate(PROMPTS[0], max_new_tokens=4, skip=0.2, policy="quantile")
    assert text == cpu.generate(PROMPTS[0], max_new_tokens=4, skip=0.2, policy="quantile").text


def test_device_and_dtype_errors_and_bfloat16():
    with pytest.raises(GateSkipError, match="unknown device"):
        load_model("tiny-llama", device="warp-drive")
    if not torch.cuda.is_available():
        with pytest.raises(GateSkipError, match="not available on this machine"):
            load_model("tiny-llama", device="cuda")
    with pytest.raises(GateSkipError, match="dtype must be one of"):
        load_model("tiny-llama", dtype="float8")
    half = spread_gates(load_model("tiny-llama", dtype="bfloat16"))
    assert half.dtype == torch.bfloat16 and next(half.gates.parameters()).dtype == torch.bfloat16
    trace = half.trace(PROMPTS[0], skip=0.3, path="physical")
    assert trace.sequences[0].skipped.any()


@pytest.mark.parametrize("path", ["masked", "physical"])
def test_kv_copy_takes_a_skipped_tokens_keys_and_values_from_the_layer_below(tiny, path):
    """kv='copy': where a token skips attention, its keys/values are the layer below's (layer 0:
    computed); kv='compute' projects them from the token's own residual, which differs."""
    from gateskip_core import KVCache

    ids = tiny.encode(["abcdefghij"]).input_ids
    mask = torch.ones_like(ids)
    caches = {}
    for kv in ("copy", "compute"):
        plan = SkipPlan(SkipBudget.make(1.0, tiny.spec.n_layers), SkipPositions((3, 6)), path, kv)
        caches[kv] = KVCache()
        tiny.forward(ids, mask, plan, cache=caches[kv])
    copy, compute = caches["copy"], caches["compute"]
    for layer in range(tiny.spec.n_layers):
        for store in ("keys", "values"):
            c, k = getattr(copy, store)[layer][0], getattr(compute, store)[layer][0]  # [H_kv, S, hd]
            if layer == 0:
                torch.testing.assert_close(c, k)  # nothing below layer 0: computed
                continue
            below = getattr(copy, store)[layer - 1][0]
            for pos in (3, 6):
                assert torch.equal(c[:, pos], below[:, pos]), (layer, store, pos)
                assert (c[:, pos] - k[:, pos]).abs().max() > 1e-4  # 'compute' projects at this layer
            runs = [p for p in range(ids.shape[1]) if p not in (3, 6)]
            assert not torch.allclose(c[:, runs], below[:, runs])  # running tokens are not copied
