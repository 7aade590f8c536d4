"""Compute account against torch's FlopCounterMode, and gate costs."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from gateskip_core import account_sequence, load_model

from .conftest import TINY, flop_counter_dense, spread_gates


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


@pytest.mark.parametrize("name", TINY)
def test_skipping_attention_saves_exactly_its_query_side(name):
    """One token skipping attention saves its q and o projections and its scores and weighted sum
    over the keys it would see (capped by a sliding window), nothing else."""
    spec = load_model(name).spec
    d, heads, hd = spec.d_model, spec.n_heads, spec.head_dim
    T, L = 40, spec.n_layers
    none = np.zeros((T, L, 2), bool)
    base = account_sequence(spec, none, (0, 0), T, "physical")
    for layer in range(L):
        for pos in (5, T - 1):
            one = none.copy()
            one[pos, layer, 0] = True
            saved = base.skipping_flops - account_sequence(spec, one, (0, 0), T, "physical").skipping_flops
            window = spec.layers[layer].sliding_window
            keys = pos + 1 if window is None else min(pos + 1, window)
            assert saved == 2 * d * heads * hd + 2 * heads * hd * d + 2 * 2 * heads * hd * keys, (layer, pos)


@pytest.mark.parametrize("name", TINY)
def test_a_skipping_physical_run_executes_the_flops_the_account_charges(name):
    """FlopCounterMode over a real physical run with skips: every matmul it counts (projections,
    MLPs, gates, LM head) equals the account's skipping total less attention scores and weighted
    sums, which torch does not count for scaled_dot_product_attention on the CPU."""
    from torch.utils.flop_counter import FlopCounterMode

    from gateskip_core.traces.compute import LayerCosts, keys_per_query

    model = spread_gates(load_model(name))
    ids = model.encode(["The quick brown fox jumps over the lazy dog. " * 3]).input_ids
    plan = model.make_plan(0.5, path="physical")
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        out = model.forward(ids, torch.ones_like(ids), plan)
    skipped = out.skipped[0].numpy()
    T = ids.shape[1]
    assert 0 < skipped.mean() < 1
    account = account_sequence(model.spec, skipped, model.gate_flops(), T, "physical")
    costs = LayerCosts.of(model.spec)
    scores = sum(
        costs.attn_per_key * keys_per_query(model.spec, layer, np.arange(T), T, "causal")[~skipped[:, layer, 0]].sum()
        for layer in range(model.spec.n_layers)
    )
    assert counter.get_total_flops() == pytest.approx(account.skipping_flops - scores, rel=1e-6)
