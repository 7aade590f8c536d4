"""Pruning plus gates (`shortgpt+gateskip:K`, analysis/experiments/pruning.py) on tiny random models:
removed layers are skipped by every token (BOS too), the kept layers skip exactly the gates'
quantile counts at the budget spread over them, the compute account charges both, K = 0 is
GateSkip alone (also in cached decoding, where BOS is found in the history), bad specs are one line."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from analysis.evaluation.run import check_methods
from analysis.experiments.pruning import (
    PrunedPolicy,
    check_method_names,
    kept_budget,
    lowest_influence,
    prune_count,
    pruned_plan,
)
from analysis.experiments.quality import evaluate, evaluation_blocks, reference
from analysis.experiments.sweep import METHODS, block_influence, sweep
from gateskip_core import GateSkipError, KVCache, account_sequence
from gateskip_core.traces.compute import branch_saving_flops

REMOVED = [1, 3]


def test_removed_layers_skip_every_token_and_kept_layers_skip_the_quantile_counts(tiny):
    blocks = evaluation_blocks(tiny, n_blocks=2, seq_len=40)
    for allocation in ("uniform", "global"):
        if allocation == "global":  # a sensitivity profile, as the shipped gates carry
            _with_sensitivity(tiny, blocks)
        plan = pruned_plan(tiny, REMOVED, 0.3, allocation=allocation)
        out = tiny.forward(blocks, torch.ones_like(blocks), plan)
        skipped = out.skipped.numpy()
        assert skipped[:, :, REMOVED, :].all()  # every token, BOS included
        rates = kept_budget(tiny, REMOVED, 0.3, allocation)
        kept = [layer for layer in range(tiny.spec.n_layers) if layer not in REMOVED]
        for layer in kept:
            for bi in range(2):
                counts = skipped[:, :, layer, bi].sum(1)
                assert (counts == math.floor(rates[layer, bi] * (blocks.shape[1] - 1) + 1e-9)).all()
                assert not skipped[:, 0, layer, bi].any()  # BOS protected where the gates decide
        # the budget goes to the kept layers only: their saved compute is b of theirs
        weights = branch_saving_flops(tiny.spec)[kept]
        assert (weights * rates[kept]).sum() == pytest.approx(0.3 * weights.sum())
        # the kept layers' skips are the lowest gates of their row (the quantile rule)
        gate = out.gate.numpy()
        for layer in kept:
            for bi in range(2):
                for row in range(len(blocks)):
                    values, skips = gate[row, 1:, layer, bi], skipped[row, 1:, layer, bi]
                    if skips.any() and not skips.all():
                        assert values[skips].max() <= values[~skips].min()


def _with_sensitivity(model, blocks) -> None:
    """Re-attach the model's gates with a measured sensitivity profile (what global allocation reads)."""
    from gateskip_core.gating.checkpoint import GateCheckpoint
    from gateskip_core.training.sensitivity import measure_sensitivity

    sensitivity = measure_sensitivity(model.spec, blocks[:1])
    model.attach_gates(model.gates, "test", GateCheckpoint(model.gates, model.name, {}, sensitivity=sensitivity))


def test_account_charges_removed_layers_and_the_gates_skips(tiny):
    blocks = evaluation_blocks(tiny, n_blocks=1, seq_len=32)
    ref = reference(tiny, blocks)
    plan = pruned_plan(tiny, REMOVED, 0.0)
    result = evaluate(tiny, ref, plan)
    mask = np.zeros((32, tiny.spec.n_layers, 2), bool)
    mask[:, REMOVED] = True
    acc = account_sequence(tiny.spec, mask, tiny.gate_flops(), 32, "physical", **tiny.overheads(plan))
    assert result["flops_saved"] == pytest.approx(1 - acc.skipping_flops / acc.dense_flops)
    assert result["skipped_fraction"] == pytest.approx(len(REMOVED) / tiny.spec.n_layers)
    gated = evaluate(tiny, ref, pruned_plan(tiny, REMOVED, 0.3))
    assert gated["flops_saved"] > result["flops_saved"] + 0.1  # the gates' skips come on top


def test_nothing_removed_is_gateskip_alone_in_prefill_and_cached_decoding(tiny_llama):
    model = tiny_llama
    ids = evaluation_blocks(model, n_blocks=2, seq_len=30)
    alone = model.make_plan(0.4)
    wrapped = pruned_plan(model, [1], 0.4)  # a PrunedPolicy plan (BOS not protected by the plan) ...
    empty = type(wrapped)(**{**wrapped.__dict__, "policy": PrunedPolicy(frozenset(), alone.policy)})
    empty = type(empty)(**{**empty.__dict__, "budget": alone.budget})  # ... with nothing removed
    assert not empty.protect_bos
    for plan_cache in (None, "cached"):
        runs = []
        for plan in (alone, empty):
            if plan_cache is None:
                runs.append(model.forward(ids, torch.ones_like(ids), plan))
                continue
            cache = KVCache()  # prefill 12 tokens, then 3 steps of 6: the running quantile sees BOS in history
            parts = [model.forward(ids[:, :12], torch.ones_like(ids[:, :12]), plan, cache=cache)]
            for start in range(12, 30, 6):
                chunk = ids[:, start : start + 6]
                parts.append(model.forward(chunk, torch.ones_like(chunk), plan, cache=cache))
            runs.append(parts[-1])
        assert torch.equal(runs[0].skipped, runs[1].skipped) and runs[0].skipped.any()
        assert torch.allclose(runs[0].logits, runs[1].logits)
    blocks = evaluation_blocks(model, n_blocks=1, seq_len=32)
    table = sweep(model, [0.0, 0.3], ["gateskip", "shortgpt+gateskip:0"], blocks).set_index(["method", "skip_budget"])
    for budget in (0.0, 0.3):
        a, b = table.loc[("gateskip", budget)], table.loc[("shortgpt+gateskip:0", budget)]
        assert a.drop("setting").equals(b.drop("setting"))


def test_sweep_removes_the_lowest_calibration_influence_layers(tiny_llama):
    from gateskip_core.data import pydoc_texts

    blocks = evaluation_blocks(tiny_llama, n_blocks=1, seq_len=32)
    table = sweep(tiny_llama, [0.0, 0.2], ["gateskip", "shortgpt-calibration", "shortgpt+gateskip:2"], blocks)
    calibration = evaluation_blocks(tiny_llama, pydoc_texts("calibration"), 8, 32)
    layers = lowest_influence(block_influence(tiny_llama, calibration), 2)
    pruned = table[table["method"] == "shortgpt+gateskip:2"]
    assert list(pruned["setting"]) == [f"removed layers {layers[0]},{layers[1]} + quantile b={b:g}" for b in (0, 0.2)]
    assert pruned["flops_saved"].is_monotonic_increasing


@pytest.mark.parametrize(
    "method, message",
    [
        ("shortgpt+gateskip", "give the number of layers to remove"),
        ("shortgpt+gateskip:two", "whole number"),
        ("shortgpt+gateskip:-1", "whole number"),
        ("shortgpt+gateskipper:1", "give the number of layers"),
        ("shortgpt+gateskip:4", "cannot remove 4 of the model's 4 layers"),
    ],
)
def test_bad_pruning_specs_are_one_line(method, message):
    with pytest.raises(GateSkipError, match=message):
        prune_count(method, 4)
        check_method_names([method], METHODS)


def test_method_lists_accept_pruning_specs():
    assert check_method_names(["gateskip", "shortgpt+gateskip:3"], METHODS) == ["gateskip", "shortgpt+gateskip:3"]
    assert check_methods(["shortgpt+gateskip:1", "random"]) == ["random", "shortgpt+gateskip:1"]  # no gateskip needed
    with pytest.raises(GateSkipError, match="shortgpt\\+gateskip:K"):
        check_method_names(["magic"], METHODS)


def test_commands_reject_a_bad_spec_in_one_line(tmp_path, capsys):
    from gateskip.cli import main

    out = tmp_path / "s.csv"
    common = ["--model", "tiny-llama", "--gates", "untrained", "--out", str(out)]
    assert main(["sweep", *common, "--methods", "gateskip,shortgpt+gateskip:9"]) == 2
    assert capsys.readouterr().err.splitlines() == [
        "gateskip: error: method 'shortgpt+gateskip:9': cannot remove 9 of the model's 4 layers"
    ]
    assert main(["eval", *common, "--tasks", "gateskip_legal_nextsent", "--methods", "shortgpt+gateskip"]) == 2
    assert capsys.readouterr().err.splitlines() == [
        "gateskip: error: method 'shortgpt+gateskip': give the number of layers to remove, e.g. shortgpt+gateskip:2"
    ]
    assert not out.exists()
