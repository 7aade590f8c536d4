"""Gate attribution: the terms of a gate's pre-activation sum to it exactly."""

from __future__ import annotations

import numpy as np
import pytest

from analysis.experiments.attribution import component_names, gate_attribution, gate_attributions
from gateskip_core import Forced, GateSkipError, load_model

from .conftest import TINY, spread_gates

TEXT = "The quick brown fox jumps over the lazy dog, and the gates decide."


@pytest.mark.parametrize("name", TINY)
@pytest.mark.parametrize("variant", ["vector", "lowrank:4", "scalar"])
def test_terms_sum_to_the_gate_preactivation_in_every_cell(name, variant):
    model = spread_gates(load_model(name), variant)
    for layer in range(model.spec.n_layers):
        for branch in ("attn", "mlp"):
            result = gate_attributions(model, TEXT, layer, branch, skip=0.3)
            assert result.terms.shape == (len(result.tokens), len(component_names(layer, branch)))
            assert result.residual_error < 1e-4, (layer, branch, result.residual_error)
            assert np.abs(result.terms).max() > 1e-3  # the components do move the gate
    if variant == "scalar":  # one output: the run's gate is exactly the sigmoid of the pre-activation
        np.testing.assert_allclose(1 / (1 + np.exp(-result.preactivation)), result.gate, atol=1e-5)


def test_a_skipped_earlier_branch_contributes_nothing(tiny_llama):
    plan = dict(skip=0.0, forced=[Forced(0, "mlp", 4, skip=True)])
    result = gate_attributions(tiny_llama, TEXT, 2, "attn", **plan)
    at = result.components.index("L0.mlp")
    assert result.terms[4, at] == 0 and result.terms[5, at] != 0
    assert result.residual_error < 1e-4


def test_one_cell_is_sorted_by_size_and_bad_requests_are_one_line(tiny_llama):
    cell = gate_attribution(tiny_llama, TEXT, 1, "mlp", 6)
    assert list(cell["term"].abs()) == sorted(cell["term"].abs(), reverse=True)
    assert cell["term"].sum() + cell.attrs["bias"] == pytest.approx(cell.attrs["preactivation"], abs=1e-4)
    assert set(cell["component"]) == {"embedding", "L0.attn", "L0.mlp", "L1.attn"}
    long = gate_attributions(tiny_llama, TEXT, 1, "mlp").to_dataframe()
    assert set(long["component"]) >= {"bias", "embedding"} and len(long) == len(long["position"].unique()) * 5
    for kwargs, message in [
        (dict(layer=9, branch="mlp", position=1), "layer must be"),
        (dict(layer=1, branch="ffn", position=1), "branch must be"),
        (dict(layer=1, branch="mlp", position=999), "position must be"),
    ]:
        with pytest.raises(GateSkipError, match=message) as err:
            gate_attribution(tiny_llama, TEXT, **kwargs)
        assert "\n" not in str(err.value)
    with pytest.raises(GateSkipError, match="linear gate"):
        gate_attributions(spread_gates(load_model("tiny-llama"), "mlp"), TEXT, 1, "mlp")


def _attention_terms_by_removal(model, layer: int, args) -> np.ndarray:
    """[T, layer] the term of each earlier attention component in layer `layer`'s attention gate,
    computed without the attribution code: the gate is affine, so a component's term is the mean
    pre-activation at the norm's input minus that at the input without the component (scale held)."""
    import torch

    from gateskip_core import Capture

    batch = model.encode([TEXT])
    plan = model.make_plan(**args)
    out = model.forward(
        batch.input_ids, batch.attention_mask, plan, capture=Capture(hidden_states=True, branch_io=True)
    )
    h = out.hidden_states[layer][0]
    norm = model.spec.layers[layer].attn_norm
    scale = norm.scale(h)
    gate = model.gates.gate(layer, "attn")
    with torch.no_grad():
        full = gate.preactivation((scale * h.float()).to(model.dtype)).float().mean(-1)
        terms = []
        for source in range(layer):
            added = out.branch_io[2 * source][1][0].float()  # what L{source}.attn added
            without = gate.preactivation((scale * (h.float() - added)).to(model.dtype)).float().mean(-1)
            terms.append((full - without).numpy())
    return np.stack(terms, 1)


@pytest.mark.parametrize("name", TINY)
@pytest.mark.parametrize("scope", ["all", "skipped"])
def test_an_attention_term_splits_exactly_by_source_position(name, scope, tmp_path):
    """With the LoRA adapter, stand-ins and either adapter scope: the sources of an attention
    component sum to its term, tokens later than the gated one contribute nothing, and a token that
    skipped that attention has its stand-in as the single source."""
    import dataclasses

    import torch

    from analysis.experiments.attribution import attention_sources

    from .test_fill_and_scope import _lora_checkpoint, _random_fill

    model = load_model(name, gates=str(_lora_checkpoint(tmp_path, name)))
    ckpt = dataclasses.replace(model.checkpoint, fill=_random_fill(model))  # the adapter and stand-ins
    model.attach_gates(model.gates, "adapter + stand-ins", ckpt)
    assert model.lora is not None and model.fill is not None  # the adapter runs as per-row deltas
    with torch.no_grad():  # an adapter far from the original, so that adapted rows differ
        for p in model.lora.B.values():
            p.add_(torch.randn_like(p) * 0.1)
    args = dict(skip=0.35, adapter_scope=scope)
    whole = gate_attributions(model, TEXT, 3, "attn", **args)
    independent = _attention_terms_by_removal(model, 3, args)
    trace = model.trace(TEXT, **args).sequences[0]
    checked = 0
    for position in (5, 9, len(whole.tokens) - 1):
        for source_layer in range(3):
            table = attention_sources(model, TEXT, 3, "attn", position, source_layer, **args)
            term = whole.terms[position, whole.components.index(f"L{source_layer}.attn")]
            assert table["term"].sum() == pytest.approx(term, abs=1e-4)
            assert table.attrs["component_term"] == pytest.approx(independent[position, source_layer], abs=1e-4)
            if trace.skipped[position, source_layer, 0]:
                assert list(table["source_position"]) == ["stand-in"]
            else:
                assert sorted(table["source_position"]) == list(range(position + 1))  # causal: no later source
                checked += 1
    assert checked >= 3
    with pytest.raises(GateSkipError, match="not an earlier component"):
        attention_sources(model, TEXT, 1, "attn", 3, 1, **args)
