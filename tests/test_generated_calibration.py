"""Budgets that generated tokens keep: thresholds fitted on decode steps, the rates a generation
reports, and a calibrated skip rate that never falls as the budget rises."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from analysis.experiments.quality import HELDOUT_CHAT_PROMPTS
from gateskip_core import KVCache, load_model
from gateskip_core.data import paragraphs, pydoc_texts
from gateskip_core.skipping.calibration import fit_generated_thresholds, own_answers

from .conftest import spread_gates
from .test_fill_and_scope import _lora_checkpoint

FIT_PROMPTS = ["Explain what a hash table is.", "Why is the sky blue?", "Write a short poem about rain."]
BUDGET = 0.3


def cached_walk(model, plan, tokens: list[int], prompt_length: int):
    """Prefill the prompt, then feed the answer one token per step with a KV cache, as generation does:
    the skip decisions and gates of the answer's tokens, [N, L, 2]."""
    cache = KVCache()
    ids = torch.tensor([tokens])
    model.forward(ids[:, :prompt_length], torch.ones_like(ids[:, :prompt_length]), plan, cache=cache)
    skipped, gates = [], []
    for pos in range(prompt_length, len(tokens)):
        step = model.forward(ids[:, pos : pos + 1], torch.ones_like(ids[:, :1]), plan, cache=cache)
        skipped.append(step.skipped[0, 0])
        gates.append(step.gate[0, 0])
    return torch.stack(skipped).numpy(), torch.stack(gates).double().numpy()


@pytest.fixture(scope="module")
def lora_model(tmp_path_factory):
    """tiny-llama with a LoRA adapter (both scopes run) and widely spread gates (no ties)."""
    model = load_model("tiny-llama", gates=str(_lora_checkpoint(tmp_path_factory.mktemp("lora"))))
    torch.manual_seed(0)
    with torch.no_grad():
        for p in model.gates.parameters():
            p.normal_(0, 0.3)
    return model


@pytest.mark.parametrize("scope", ["all", "skipped"])
def test_decode_step_thresholds_skip_the_budget_on_cached_decode_steps(lora_model, scope):
    """The thresholds fitted in one teacher-forced pass are, at every branch, the budget's quantile of
    the gates a cached decode walk over the same answers sees (in scope `skipped` a token's gates
    depend on its earlier skips: the pass decides with each layer's fitted threshold as it goes)."""
    model = lora_model
    assert own_answers(model, FIT_PROMPTS[:1], max_new_tokens=3)[0][1] > 0
    # A random tiny model answers with one token repeated (all gates tied): real text stands for its answers.
    texts = [p for t in pydoc_texts("calibration") for p in paragraphs(t)][:4]
    answers = [(model.encode([text], max_tokens=28).input_ids[0].tolist(), 10) for text in texts]
    budget = model.budget(BUDGET, allocation="uniform")
    policy = fit_generated_thresholds(model, budget, FIT_PROMPTS, answers=answers, adapter_scope=scope)
    plan = model.make_plan(BUDGET, policy, path="physical", adapter_scope=scope)
    walks = [cached_walk(model, plan, tokens, n_prompt) for tokens, n_prompt in answers]
    skipped = np.concatenate([s for s, _ in walks])
    gates = np.concatenate([g for _, g in walks])
    n = len(skipped)
    k = int(np.floor(BUDGET * n + 1e-9))
    for layer in range(model.spec.n_layers):
        for b in range(2):
            values, threshold = np.sort(gates[:, layer, b]), policy.thresholds[layer, b]
            above = values[values > values[k - 1] + 1e-6]
            assert values[k - 1] <= threshold < (above[0] if above.size else np.inf), (layer, b)
            assert skipped[:, layer, b].sum() == (gates[:, layer, b] <= threshold).sum()
    assert abs(skipped.mean() - BUDGET) < 0.1


def test_generation_reports_the_budget_and_the_rates_of_prompt_and_generated_tokens(tiny):
    spread_gates(tiny)
    gen = tiny.generate(["Once upon a time", "The gates decide"], max_new_tokens=8, skip=0.3, stop_at_eos=False)
    rates = gen.skip_rates()
    assert rates.budget == pytest.approx(0.3)
    for part, span in (
        ("prompt", lambda s: slice(0, s.prompt_length)),
        ("generated", lambda s: slice(s.prompt_length, None)),
    ):
        skipped = sum(int(s.skipped[span(s)].sum()) for s in gen.trace.sequences)
        eligible = sum(int(s.eligible[span(s)].sum()) for s in gen.trace.sequences)
        assert getattr(rates, part) == pytest.approx(skipped / (2 * tiny.spec.n_layers * eligible))
    assert rates.generated > 0 and rates.prompt > 0


MONOTONE_BUDGETS = np.round(np.arange(0.20, 0.3501, 0.01), 2)  # grid budgets 0.2, 0.25, 0.3, 0.35 and between


def calibrated_rates(model, texts: list[str]) -> list[float]:
    batch = model.encode(texts, max_tokens=32)
    rates = []
    for budget in MONOTONE_BUDGETS:
        plan = model.make_plan(float(budget), "calibrated", path="physical")
        out = model.forward(batch.input_ids, batch.attention_mask, plan)
        rates.append(float(out.skipped.sum()) / (2 * model.spec.n_layers * float(out.eligible.sum())))
    return rates


def test_the_dashboards_continuation_caption_shows_the_rates_next_to_the_budget(tiny_llama):
    from dashboard import service

    result = service.continuations(tiny_llama, "Once upon a time", False, 6, skip=0.3, policy="calibrated")
    rates = result.skip_rates
    assert rates.budget == pytest.approx(0.3)
    assert f"prompt {rates.prompt:.1%}, generated {rates.generated:.1%}" in result.caption()
    assert result.caption().endswith("at budget 30.0%")


@pytest.mark.real
def test_smollm2_calibrated_skip_rate_never_falls_as_the_budget_rises():
    """The shipped default's stored thresholds, interpolated between its grid budgets, on held-out
    prose and chat prompts (tests/test_policies.py checks a tiny trained checkpoint on prose)."""
    smollm2 = load_model("smollm2-135m-instruct", gates="default")
    assert smollm2.checkpoint is not None and len(smollm2.checkpoint.calibration_budgets)
    chat = [
        smollm2.tokenizer.apply_chat_template(
            [{"role": "user", "content": p}], tokenize=False, add_generation_prompt=True
        )
        for p in HELDOUT_CHAT_PROMPTS[:4]
    ]
    prose = [p for t in pydoc_texts("validation") for p in paragraphs(t)][:4]
    for texts in (prose, chat):
        rates = calibrated_rates(smollm2, texts)
        assert all(b >= a for a, b in zip(rates, rates[1:])), list(zip(MONOTONE_BUDGETS, np.round(rates, 4)))
