"""Budgets that generated tokens keep: thresholds fitted on decode steps, the rates a generation
reports, and a calibrated skip rate that never falls as the budget rises."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

import gateskip_core
from analysis.experiments.quality import HELDOUT_CHAT_PROMPTS
from gateskip_core import KVCache, load_gates, load_model
from gateskip_core.data import paragraphs, pydoc_texts
from gateskip_core.errors import GateSkipError
from gateskip_core.skipping.calibration import (
    RECORDED_TEXTS,
    PhasedCalibratedPolicy,
    ThresholdFitter,
    calibration_set,
    decode_calibration,
    fit_generated_thresholds,
    own_answers,
)
from gateskip_core.training.chat_data import chat_prompts

from .conftest import spread_gates
from .test_fill_and_scope import _lora_checkpoint

SHIPPED = Path(gateskip_core.__file__).parent / "shipped_gates"
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
    the gates a phased generation's cached decode walk over the same answers sees: prompt tokens
    decided with the prompt set, answer tokens with the fitted one (a token's gates depend on the
    earlier skips of its own and of the prompt's tokens: the pass decides as it goes)."""
    model = lora_model
    assert own_answers(model, FIT_PROMPTS[:1], max_new_tokens=3)[0][1] > 0
    # A random tiny model answers with one token repeated (all gates tied): real text stands for its answers.
    texts = [p for t in pydoc_texts("calibration") for p in paragraphs(t)][:4]
    answers = [(model.encode([text], max_tokens=28).input_ids[0].tolist(), 10) for text in texts]
    budget = model.budget(BUDGET, allocation="uniform")
    policy = fit_generated_thresholds(model, budget, FIT_PROMPTS, answers=answers, adapter_scope=scope)
    phased = PhasedCalibratedPolicy(prompt=model.calibrate(budget), generated=policy)
    plans = [model.make_plan(BUDGET, phased.for_prompts([n]), path="physical", adapter_scope=scope) for _, n in answers]
    walks = [cached_walk(model, plan, tokens, n_prompt) for plan, (tokens, n_prompt) in zip(plans, answers)]
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
    assert "at budget 30.0% (thresholds: one set for prompt and generated tokens)" in result.caption()


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
    answers = own_answers(smollm2, HELDOUT_CHAT_PROMPTS[4:8], max_new_tokens=24)
    for rates in (calibrated_rates(smollm2, prose), calibrated_rates(smollm2, chat), generated_rates(smollm2, answers)):
        assert all(b >= a for a, b in zip(rates, rates[1:])), list(zip(MONOTONE_BUDGETS, np.round(rates, 4)))


def generated_rates(model, answers) -> list[float]:
    """The skip rate of the answers' tokens under the phased thresholds (the decode set's), in one
    pass over prompt + answer: what a cached generation decides (tested on tiny models above)."""
    from gateskip_core.skipping.calibration import phased_answer_skips

    rates = []
    for value in MONOTONE_BUDGETS:
        skipped, evaluations = np.sum(phased_answer_skips(model, answers, model.budget(float(value))), axis=0)
        rates.append(skipped / evaluations)
    return rates


# ---- phased thresholds: prompt tokens decide with the prompt's set, generated tokens with the decode fit's

PROMPTS = ["Once upon a time there was", "The gates decide"]
GRID = np.array([0.1, 0.2, 0.3])  # a short grid keeps the tiny fits fast


@pytest.fixture(scope="module")
def phased_model():
    """tiny-llama with spread gates and a checkpoint storing prompt and decode-fitted thresholds
    (uniform grid `GRID`) and the prompts of its decode fit."""
    from gateskip_core import GateCheckpoint
    from gateskip_core.skipping.calibration import record_calibration_texts, record_decode_calibration

    model = spread_gates(load_model("tiny-llama"))
    prose = [p for t in pydoc_texts("calibration") for p in paragraphs(t)][:8]
    # Its calibration texts: chat prompts as users send them (the pydoc fallback is unlike them).
    texts = [
        model.tokenizer.apply_chat_template(
            [{"role": "user", "content": p}], tokenize=False, add_generation_prompt=True
        )
        for p in chat_prompts()[5::11][:12]
    ]
    # A random tiny model answers with one token repeated (all gates tied): real text stands for its answers.
    answers = [(model.encode([text], max_tokens=24).input_ids[0].tolist(), 8) for text in prose[:4]]
    prompt_rows, generated_rows = [], []
    for b in GRID:
        budget = model.budget(float(b), allocation="uniform")
        prompt_rows.append(model.fit_thresholds(budget, texts=texts).thresholds)
        generated_rows.append(fit_generated_thresholds(model, budget, FIT_PROMPTS, answers=answers).thresholds)
    ckpt = GateCheckpoint(gates=model.gates, model=model.name, fingerprint=model.spec.fingerprint())
    ckpt.calibration_budgets = GRID
    ckpt.calibration_thresholds = np.stack(prompt_rows)
    ckpt.generated_thresholds = np.stack(generated_rows)
    record_decode_calibration(ckpt, FIT_PROMPTS, max_new_tokens=4)
    record_calibration_texts(ckpt, texts)  # budgets off the grid are fitted on the same texts
    model.attach_gates(model.gates, "phased", ckpt)
    return model


def _thresholds(policy) -> np.ndarray:
    return policy.thresholds.astype(np.float32).astype(np.float64)  # as decided: float32 gates


def test_generation_decides_prompt_tokens_with_prompt_thresholds_and_generated_ones_with_the_decode_fit(phased_model):
    model = phased_model
    budget = model.budget(0.2)
    prompt, generated = model.calibrate(budget), model.calibrate_generated(budget)
    assert not np.allclose(prompt.thresholds, generated.thresholds)
    gen = model.generate(PROMPTS, max_new_tokens=6, skip=0.2, stop_at_eos=False)
    for seq in gen.trace.sequences:
        n = seq.prompt_length
        assert np.array_equal(seq.threshold[1:n], np.broadcast_to(_thresholds(prompt), seq.threshold[1:n].shape))
        assert np.array_equal(seq.threshold[n:], np.broadcast_to(_thresholds(generated), seq.threshold[n:].shape))
    assert "decode-fitted for generated tokens" in gen.skip_rates().thresholds
    # Prompt tokens keep their decisions and rate; 'prompt' decides every token as before.
    plain = model.generate(PROMPTS, max_new_tokens=6, skip=0.2, stop_at_eos=False, generated_thresholds="prompt")
    assert plain.skip_rates().thresholds == "one set for prompt and generated tokens"
    assert plain.skip_rates().prompt == gen.skip_rates().prompt
    for a, b in zip(plain.trace.sequences, gen.trace.sequences):
        assert np.array_equal(a.skipped[: a.prompt_length], b.skipped[: b.prompt_length])
        assert np.array_equal(a.threshold[1:], np.broadcast_to(_thresholds(prompt), a.threshold[1:].shape))


@pytest.mark.parametrize("path", ["masked", "physical"])
def test_phased_decisions_of_a_cached_generation_equal_one_pass_over_prompt_and_answer(phased_model, path):
    """masked == physical == cached: the phased policy bound to each row's prompt length decides,
    in one uncached pass over prompt + answer, exactly as the cached generation did."""
    model = phased_model
    gen = model.generate(PROMPTS, max_new_tokens=6, skip=0.3, stop_at_eos=False)
    phased = model.make_plan(0.3, "calibrated")  # the prompt set; phased below
    generated = model.calibrate_generated(phased.budget)
    from gateskip_core.skipping.calibration import PhasedCalibratedPolicy

    for seq in gen.trace.sequences:
        policy = PhasedCalibratedPolicy(phased.policy, generated).for_prompts([seq.prompt_length])
        ids = torch.as_tensor(seq.token_ids)[None]
        out = model.forward(ids, torch.ones_like(ids), model.make_plan(0.3, policy, path=path))
        assert np.array_equal(out.skipped[0].numpy(), seq.skipped)
        assert seq.skipped[seq.prompt_length :].any()


def test_a_fit_that_decides_other_positions_by_a_policy_needs_the_fitted_positions(tiny_llama):
    prompt_set = tiny_llama.calibrate(tiny_llama.budget(BUDGET))
    with pytest.raises(GateSkipError, match="needs fitted_positions"):
        ThresholdFitter(tiny_llama.spec.n_layers, others=prompt_set)


def test_a_budget_off_the_grid_fits_decode_thresholds_on_the_recorded_prompts(phased_model):
    model = phased_model
    budget = model.budget(0.45)  # above the grid: fitted on the fly
    fitted = model.calibrate_generated(budget)
    answers = own_answers(model, FIT_PROMPTS, max_new_tokens=4)
    expected = fit_generated_thresholds(model, budget, FIT_PROMPTS, answers=answers)
    assert np.array_equal(fitted.thresholds, expected.thresholds)
    assert model.calibrate_generated(budget) is fitted  # memoised


def test_gates_without_decode_thresholds_generate_as_before(tiny_llama):
    """Old checkpoints (no decode calibration): one threshold set for every token, as before."""
    assert tiny_llama.calibrate_generated(tiny_llama.budget(0.3)) is None
    gen = tiny_llama.generate(PROMPTS, max_new_tokens=5, skip=0.3, stop_at_eos=False)
    again = tiny_llama.generate(
        PROMPTS, max_new_tokens=5, skip=0.3, stop_at_eos=False, policy="calibrated", generated_thresholds="prompt"
    )
    thresholds = _thresholds(tiny_llama.calibrate(tiny_llama.budget(0.3)))
    for a, b in zip(gen.trace.sequences, again.trace.sequences):
        assert np.array_equal(a.skipped, b.skipped)
        assert np.array_equal(a.threshold[1:], np.broadcast_to(thresholds, a.threshold[1:].shape))
    assert gen.skip_rates().thresholds == "one set for prompt and generated tokens"


def _raw_tensors(path) -> dict:
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        return {key: f.get_tensor(key) for key in f.keys()}


def test_decode_thresholds_round_trip_and_amending_a_file_keeps_every_tensor(phased_model, tmp_path):
    from gateskip_core import load_gates, save_gates
    from gateskip_core.gating.checkpoint import amend_checkpoint_file

    path = save_gates(phased_model.checkpoint, tmp_path / "phased.safetensors", int8=True)
    back = load_gates(path)
    assert np.array_equal(back.generated_thresholds, phased_model.checkpoint.generated_thresholds)
    assert back.training["decode_calibration"] == {"prompts": FIT_PROMPTS, "max_new_tokens": 4}
    before = _raw_tensors(path)
    amend_checkpoint_file(path, training={"calibration_texts": ["one text"]})
    after = _raw_tensors(path)
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    amended = load_gates(path)
    assert amended.training["calibration_texts"] == ["one text"]
    assert amended.training["decode_calibration"] == back.training["decode_calibration"]


def test_a_format_1_checkpoint_loads_and_generates_with_one_threshold_set(phased_model, tmp_path):
    """Files written before the decode-fitted grids (format 1) load as gates without them."""
    from safetensors.torch import save_file

    from gateskip_core import GateCheckpoint, load_gates, save_gates

    old = GateCheckpoint(gates=phased_model.gates, model="tiny-llama", fingerprint=phased_model.spec.fingerprint())
    old.calibration_budgets, old.calibration_thresholds = GRID, phased_model.checkpoint.calibration_thresholds
    path = save_gates(old, tmp_path / "old.safetensors")
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        metadata = {**f.metadata(), "format": "gateskip-gates/1"}
    save_file(_raw_tensors(path), str(path), metadata=metadata)
    loaded = load_gates(path)
    assert not len(loaded.generated_thresholds) and "decode_calibration" not in loaded.training
    model = load_model("tiny-llama", gates=str(path))
    gen = model.generate(PROMPTS, max_new_tokens=4, skip=0.2, stop_at_eos=False)
    assert gen.skip_rates().thresholds == "one set for prompt and generated tokens"


def test_the_cli_says_which_thresholds_decided_and_can_turn_the_decode_set_off(phased_model, tmp_path, capsys):
    from gateskip.cli import main
    from gateskip_core import save_gates

    path = save_gates(phased_model.checkpoint, tmp_path / "phased.safetensors")
    common = ["generate", "Once upon a time", "--model", "tiny-llama", "--gates", str(path), "--skip", "0.2"]
    assert main([*common, "--max-new-tokens", "3"]) == 0
    assert "at budget 20.0% (thresholds: prompt-fitted for prompt tokens, decode-fitted for generated tokens)" in (
        capsys.readouterr().out
    )
    assert main([*common, "--max-new-tokens", "3", "--generated-thresholds", "prompt"]) == 0
    assert "(thresholds: one set for prompt and generated tokens)" in capsys.readouterr().out


@pytest.mark.real
def test_smollm2_generated_tokens_keep_the_budget_and_prompt_tokens_their_rate():
    """The shipped default's decode-fitted thresholds on held-out chat prompts (used by no fit): the
    generated tokens skip within 0.04 of the budget; the prompt's tokens skip as a plain pass with
    the stored thresholds skips them (the decode set does not touch them)."""
    smollm2 = load_model("smollm2-135m-instruct", gates="default")
    prompts = HELDOUT_CHAT_PROMPTS[:6]
    batch = smollm2.encode(prompts, chat=True)
    for budget in (0.25, 0.5):
        gen = smollm2.generate(prompts, max_new_tokens=32, chat=True, skip=budget)
        rates = gen.skip_rates()
        assert "decode-fitted" in rates.thresholds
        assert abs(rates.generated - budget) <= 0.04, (budget, rates)
        plain = smollm2.forward(batch.input_ids, batch.attention_mask, smollm2.make_plan(budget, "calibrated"))
        prompt_rate = float(plain.skipped.sum()) / (2 * smollm2.spec.n_layers * float(plain.eligible.sum()))
        assert rates.prompt == pytest.approx(prompt_rate, abs=1e-9)


@pytest.mark.parametrize("name, decode_set", [("smollm2-135m-instruct-default", True), ("gemma3-270m-default", False)])
def test_the_shipped_default_gates_record_what_their_threshold_sets_were_fitted_on(name, decode_set):
    """One calibration everywhere: a budget off the stored grid is fitted on the same texts (prompt
    set) and the answers to the same prompts (decode set) as the stored grid. Gemma-3 ships no decode
    set (on held-out prompts it kept the budget worse than the prompt set, docs/generation.md)."""
    ckpt = load_gates(SHIPPED / f"{name}.safetensors")
    assert len(ckpt.training.get(RECORDED_TEXTS) or []) >= 64
    grid = (len(ckpt.calibration_budgets), ckpt.calibration_thresholds.shape[1], 2)
    assert ckpt.calibration_thresholds.shape == grid
    if decode_set:
        assert len(decode_calibration(ckpt)["prompts"]) == 24 and ckpt.generated_thresholds.shape == grid
    else:
        assert decode_calibration(ckpt) is None and len(ckpt.generated_thresholds) == 0


@pytest.mark.real
def test_smollm2_stored_threshold_sets_are_what_a_fit_on_the_recorded_texts_gives():
    """The shipped default's stored rows at budget 0.25 (uniform) equal a fit now: the prompt set on
    its recorded calibration texts, the decode set on its answers to its recorded prompts."""
    smollm2 = load_model("smollm2-135m-instruct", gates="default")
    ckpt, budget = smollm2.checkpoint, smollm2.budget(0.25, allocation="uniform")
    row = int(np.flatnonzero(np.isclose(ckpt.calibration_budgets, 0.25))[0])
    prompt_set = smollm2.fit_thresholds(budget, texts=calibration_set(smollm2)).thresholds
    np.testing.assert_allclose(prompt_set, ckpt.calibration_thresholds[row], atol=1e-6)
    recorded = decode_calibration(ckpt)
    decode_set = fit_generated_thresholds(
        smollm2, budget, recorded["prompts"], max_new_tokens=recorded["max_new_tokens"], prompt_policy=None
    ).thresholds
    np.testing.assert_allclose(decode_set, ckpt.generated_thresholds[row], atol=1e-6)
