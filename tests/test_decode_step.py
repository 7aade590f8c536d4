"""A decoding step at batch 1: decisions without per-branch tensors, and gates that only record evaluated
together when the walk ends (`forward/one_token.py`)."""

from __future__ import annotations

import numpy as np
import pytest

from gateskip_core import load_model
from gateskip_core.forward.one_token import OneTokenDecisions

from .conftest import spread_gates
from .test_generation import uncached_greedy

PROMPT = "Once upon a time there"


def _generate(model, **skip_args):
    return model.generate(PROMPT, max_new_tokens=10, stop_at_eos=False, policy="calibrated", **skip_args)


@pytest.mark.parametrize("path", ["masked", "physical"])
def test_one_token_steps_decide_exactly_as_the_tensor_path(tiny_llama, path, monkeypatch):
    """The same generation with the one-token decisions and with the per-branch tensors: identical
    tokens, gates, thresholds and decisions, and the steps really took the one-token path."""
    calls = []
    decide = OneTokenDecisions.decide
    monkeypatch.setattr(OneTokenDecisions, "decide", lambda self, *a: calls.append(1) or decide(self, *a))
    fast = _generate(tiny_llama, skip=0.3, path=path)
    assert len(calls) == 9 * 2 * tiny_llama.spec.n_layers  # every step after the prefill, every branch
    monkeypatch.setattr(OneTokenDecisions, "applies", staticmethod(lambda *a: False))
    slow = _generate(tiny_llama, skip=0.3, path=path)
    assert fast.trace.extra["generated_token_ids"] == slow.trace.extra["generated_token_ids"]
    a, b = fast.trace.sequences[0], slow.trace.sequences[0]
    assert a.skipped[a.prompt_length :].any() and not a.skipped[a.prompt_length :].all()
    for field in ("gate", "threshold", "skipped", "eligible"):
        np.testing.assert_array_equal(getattr(a, field), getattr(b, field), err_msg=field)


@pytest.mark.parametrize("skip", [0.0, 0.3])
def test_gates_that_only_record_are_evaluated_together_at_the_end(skip, monkeypatch):
    """Scope skipped, low-rank gates: a branch that cannot skip (budget 0; or any branch before the
    token's first skip at a budget whose cells all decide: none) is evaluated in one batched call, and
    its recorded gate equals the one-by-one gate."""
    model = spread_gates(load_model("tiny-llama"), "lowrank:4")
    batched = []
    mean_gates = model.gates.mean_gates
    monkeypatch.setattr(model.gates, "mean_gates", lambda cells, x: batched.append(len(cells)) or mean_gates(cells, x))
    fast = _generate(model, skip=skip, adapter_scope="skipped")
    monkeypatch.setattr(OneTokenDecisions, "applies", staticmethod(lambda *a: False))
    slow = _generate(model, skip=skip, adapter_scope="skipped")
    assert batched == ([2 * model.spec.n_layers] * 9 if skip == 0 else [])
    a, b = fast.trace.sequences[0], slow.trace.sequences[0]
    assert fast.trace.extra["generated_token_ids"] == slow.trace.extra["generated_token_ids"]
    np.testing.assert_allclose(a.gate, b.gate, atol=1e-6, rtol=0)
    np.testing.assert_array_equal(a.skipped, b.skipped)
    np.testing.assert_array_equal(a.threshold, b.threshold)


def test_one_token_steps_match_an_uncached_rerun(tiny_llama):
    gen = _generate(tiny_llama, skip=0.3, path="physical")
    ids, mask, out = uncached_greedy(tiny_llama, [PROMPT], 10, skip=0.3, policy="calibrated", path="physical")
    seq = gen.trace.sequences[0]
    assert gen.trace.extra["generated_token_ids"][0] == ids[0, -10:].tolist()
    np.testing.assert_array_equal(seq.skipped, out.skipped[0].numpy())
    np.testing.assert_allclose(seq.gate, out.gate[0].numpy(), atol=1e-5)


def test_budget_zero_steps_are_the_original_model(tiny_llama):
    batch = tiny_llama.encode([PROMPT])
    gen = _generate(tiny_llama, skip=0.0)
    ref = tiny_llama.original.generate(
        batch.input_ids, attention_mask=batch.attention_mask, max_new_tokens=10, min_new_tokens=10, do_sample=False,
        pad_token_id=tiny_llama.tokenizer.pad_token_id,
    )  # fmt: skip
    assert gen.trace.extra["generated_token_ids"][0] == ref[0, batch.input_ids.shape[1] :].tolist()
    assert not gen.trace.sequences[0].skipped.any()
    assert np.isneginf(gen.trace.sequences[0].threshold).all()
