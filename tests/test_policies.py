"""Skip budgets and policies: exact counts, batch independence, padding, BOS, causality."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from gateskip_core import GateSkipError, RandomPolicy, SkipBudget, load_model
from gateskip_core.data import pydoc_texts

from .conftest import PROMPTS


@pytest.mark.parametrize("skip", [0.1, 0.25, 0.5, 0.9])
def test_quantile_skips_exactly_floor_b_times_eligible(tiny, skip):
    trace = tiny.trace(PROMPTS, skip=skip, policy="quantile")
    for seq in trace.sequences:
        n_eligible = int(seq.eligible.sum())
        assert n_eligible == seq.n_tokens - 1  # BOS protected
        expected = math.floor(skip * n_eligible + 1e-9)
        assert (seq.skipped.sum(axis=0) == expected).all()
        assert not seq.skipped[0].any()


def test_quantile_skips_the_least_important_tokens(tiny):
    seq = tiny.trace(PROMPTS[0], skip=0.3).sequences[0]
    for layer in range(tiny.spec.n_layers):
        for b in range(2):
            skipped = seq.gate[seq.skipped[:, layer, b], layer, b]
            kept = seq.gate[~seq.skipped[:, layer, b] & seq.eligible, layer, b]
            assert skipped.max() <= kept.min()
            assert seq.threshold[0, layer, b] == pytest.approx(skipped.max())


def test_decisions_do_not_depend_on_batch_mates(tiny):
    alone = tiny.trace(PROMPTS[2], skip=0.4)
    batched = tiny.trace(PROMPTS, skip=0.4)
    a, b = alone.sequences[0], batched.sequences[2]
    assert np.array_equal(a.skipped, b.skipped)
    np.testing.assert_allclose(a.gate, b.gate, atol=1e-5)


def test_padding_is_never_skipped_and_bos_can_be_unprotected(tiny):
    batch = tiny.encode(PROMPTS)
    out = tiny.forward(batch.input_ids, batch.attention_mask, tiny.make_plan(0.9))
    pad = ~batch.attention_mask.bool()
    assert pad.any() and not out.skipped[pad].any()
    assert not out.skipped[:, :, :, :][out.positions == 0].any()
    free = tiny.trace(PROMPTS, skip=0.9, protect_bos=False)
    assert all(s.eligible[0] for s in free.sequences)
    assert any(s.skipped[0].any() for s in free.sequences)


def test_per_layer_budget_and_branch_choice(tiny):
    L = tiny.spec.n_layers
    per_layer = [0.0] + [0.5] * (L - 1)
    seq = tiny.trace(PROMPTS[0], skip=per_layer).sequences[0]
    assert not seq.skipped[:, 0].any() and seq.skipped[:, 1:].any()
    attn_only = tiny.trace(PROMPTS[0], skip=0.5, branches="attn").sequences[0]
    assert attn_only.skipped[:, :, 0].any() and not attn_only.skipped[:, :, 1].any()
    table = np.zeros((L, 2))
    table[1, 1] = 0.5
    seq = tiny.trace(PROMPTS[0], skip=table).sequences[0]
    assert seq.skipped.sum() == seq.skipped[:, 1, 1].sum() > 0


@pytest.mark.parametrize("bad", [-0.1, 1.5, float("nan"), "x", [0.1, 0.2]])
def test_bad_budgets_are_rejected(tiny, bad):
    with pytest.raises(GateSkipError, match="skip budget"):
        tiny.trace(PROMPTS[0], skip=bad)


def test_random_policy_is_seeded_gate_free_and_hits_the_rate():
    model = load_model("tiny-llama")  # no gates at all
    texts = pydoc_texts("validation")[:4]
    a = model.trace(texts, skip=0.3, policy="random", seed=1, max_tokens=200)
    b = model.trace(texts, skip=0.3, policy="random", seed=1, max_tokens=200)
    c = model.trace(texts, skip=0.3, policy="random", seed=2, max_tokens=200)
    assert all(np.array_equal(x.skipped, y.skipped) for x, y in zip(a.sequences, b.sequences))
    assert not all(np.array_equal(x.skipped, y.skipped) for x, y in zip(a.sequences, c.sequences))
    assert a.skipped_fraction() == pytest.approx(0.3, abs=0.03)
    with pytest.raises(GateSkipError, match="gates"):
        model.trace(texts[0], skip=0.3, policy="quantile")


def test_calibrated_policy_matches_budget_on_calibration_text_and_is_causal(tiny):
    budget = SkipBudget.make(0.3, tiny.spec.n_layers)
    texts = pydoc_texts("calibration")[:6]
    policy = tiny.calibrate(budget, texts=texts)  # fitted on these texts, each its own sequence
    calib = tiny.trace(texts, skip=0.3, policy=policy, max_tokens=128)
    assert calib.skipped_fraction() == pytest.approx(0.3, abs=0.005)  # on its own texts: the budget, up to ties
    full = tiny.trace(PROMPTS[0], skip=0.3, policy="calibrated").sequences[0]
    prefix_text = tiny.tokenizer.decode(full.token_ids[1:20])
    prefix = tiny.trace(prefix_text, skip=0.3, policy="calibrated").sequences[0]
    n = min(prefix.n_tokens, 20)
    assert np.array_equal(prefix.token_ids[:n], full.token_ids[:n])
    assert np.array_equal(prefix.skipped[:n], full.skipped[:n])


def test_policy_needs_gates_error_is_one_line():
    model = load_model("tiny-gemma3")
    with pytest.raises(GateSkipError) as err:
        model.trace("hello", skip=0.2, policy="calibrated")
    assert "\n" not in str(err.value)


def test_random_policy_decision_independent_of_batching():
    policy = RandomPolicy(seed=3)
    model = load_model("tiny-llama")
    one = model.trace(PROMPTS[1], skip=0.5, policy=policy).sequences[0]
    many = model.trace(PROMPTS, skip=0.5, policy=policy).sequences[1]
    assert np.array_equal(one.skipped, many.skipped)
    eligible = one.skipped[1:]  # BOS is protected
    assert 0.3 < eligible.mean() < 0.7  # Bernoulli(0.5) draws, not all or nothing
    other = model.trace(PROMPTS[1], skip=0.5, policy=RandomPolicy(seed=4)).sequences[0]
    assert not np.array_equal(one.skipped, other.skipped)


def test_stored_thresholds_are_interpolated_between_grid_budgets_and_rates_follow_the_budget(tmp_path):
    """A budget between the checkpoint's grid budgets takes thresholds between the neighbouring
    fitted rows (no fit on other texts), a grid budget its own row, and the skip rate on held-out
    text never falls as the budget rises in small steps."""
    from gateskip_core import load_model
    from gateskip_core.skipping.calibration import interpolate_thresholds
    from gateskip_core.training.loop import TrainConfig, train

    out = tmp_path / "g.safetensors"
    config = dict(model="tiny-llama", seq_len=32, batch=4, steps=2, gate="lowrank:4", calibrate=True)
    train(TrainConfig(**config, val_every=100, checkpoint_every=100, out=str(out)), lambda m: None, show_bar=False)
    model = load_model("tiny-llama", gates=str(out))
    ckpt = model.checkpoint
    grid, table = ckpt.calibration_budgets, ckpt.calibration_thresholds
    assert len(grid) > 2 and np.isfinite(table).all()
    np.testing.assert_array_equal(model.calibrate(model.budget(float(grid[3]))).thresholds, table[3])
    middle = model.calibrate(model.budget(float(grid[3] + grid[4]) / 2)).thresholds
    np.testing.assert_allclose(middle, (table[3] + table[4]) / 2)
    assert interpolate_thresholds(grid, table, float(grid[-1]) + 0.05) is None  # above the grid: fitted
    texts = [p for t in pydoc_texts("validation")[:3] for p in t.split("\n\n") if p.strip()][:8]
    rates = [
        model.trace(texts, skip=float(b), policy="calibrated", max_tokens=64).skipped_fraction()
        for b in np.arange(0.2, 0.3501, 0.01)
    ]
    assert all(b >= a for a, b in zip(rates, rates[1:])), rates


@pytest.mark.parametrize(
    "values,k,skipped",
    [
        ([1.0] * 100, 1, 0),  # every gate tied (saturated): a budget of 1% skips none, not all
        ([0.2, 0.5, 0.5, 0.5, 0.5, 0.9], 2, 1),  # the block would overshoot by 3, leaving it out by 1
        ([0.2, 0.5, 0.5, 0.9], 2, 3),  # a draw (1 either way): the block is skipped
        ([0.1, 0.2, 0.3, 0.4], 2, 2),  # no ties: exactly k
        ([0.5, 0.5, 0.5, 0.9], 3, 3),
    ],
)
def test_a_threshold_skips_a_tied_block_whole_whichever_way_is_nearer_the_budget(values, k, skipped):
    from gateskip_core.skipping.calibration import threshold_between

    sorted_values = torch.tensor(sorted(values), dtype=torch.float64)
    threshold = threshold_between(sorted_values, k)
    assert int((sorted_values <= threshold).sum()) == skipped
    assert not (sorted_values == threshold).any()  # never on an observed value
