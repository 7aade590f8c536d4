"""Compute account against torch's FlopCounterMode, and gate costs."""

from __future__ import annotations

import numpy as np
import pytest

from gateskip_core import account_sequence, load_model

from .conftest import TINY, flop_counter_dense


@pytest.mark.parametrize("name", TINY)
def test_dense_account_agrees_with_flop_counter(name):
    model = load_model(name)
    ids = model.encode(["The quick brown fox jumps over the lazy dog. " * 3]).input_ids
    T, L = ids.shape[1], model.spec.n_layers
    account = account_sequence(model.spec, np.zeros((T, L, 2), bool), (0, 0), T, "masked", convention="full")
    counted = flop_counter_dense(model, ids)
    assert account.dense_flops == pytest.approx(counted, rel=0.02)


def test_gate_costs_and_paths(tiny):
    text = "The quick brown fox jumps over the lazy dog."
    d, L = tiny.spec.d_model, tiny.spec.n_layers
    zero = tiny.trace(text, skip=0.0).sequences[0].compute
    T = zero.tokens
    assert zero.gate_flops == T * L * 2 * (2 * d * d)
    assert zero.net_saved_fraction < 0  # vector gates cost compute, nothing skipped
    masked = tiny.trace(text, skip=0.5).sequences[0].compute
    physical = tiny.trace(text, skip=0.5, path="physical").sequences[0].compute
    assert masked.skipping_flops == physical.skipping_flops < masked.dense_flops + masked.gate_flops
    assert masked.executed_flops == masked.dense_flops + masked.gate_flops
    assert physical.executed_flops == physical.skipping_flops
    assert physical.net_saved_fraction > zero.net_saved_fraction


def test_scalar_gates_cost_almost_nothing():
    from .conftest import spread_gates

    model = spread_gates(load_model("tiny-llama"), variant="scalar")
    acc = model.trace("hello there", skip=0.0).sequences[0].compute
    assert acc.gate_flops == acc.tokens * model.spec.n_layers * 2 * 2 * model.spec.d_model
    assert -0.01 < acc.net_saved_fraction <= 0


def test_skipping_saves_what_the_analytic_model_says(tiny):
    """Account under skips: attention query side and MLP for skipped tokens only."""
    seq = tiny.trace("abcdefghijklmnop", skip=0.5, path="physical").sequences[0]
    spec = tiny.spec
    none = account_sequence(spec, np.zeros_like(seq.skipped), (0, 0), seq.n_tokens, "physical")
    mlp_cost = 3 * 2 * spec.d_model * spec.d_ff
    only_mlp = seq.skipped.copy()
    only_mlp[:, :, 0] = False
    acc = account_sequence(spec, only_mlp, (0, 0), seq.n_tokens, "physical")
    assert none.skipping_flops - acc.skipping_flops == only_mlp.sum() * mlp_cost
