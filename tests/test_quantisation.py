"""Weight-only quantisation of the backbone (`load_model(..., weights=...)`, `--weights`): it is really
applied, quanto's kernels and the dequantised weights agree, the gates load on it, bad values are one line."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from gateskip_core import GateSkipError, load_model
from gateskip_core.backbone.quantisation import parse_weights, quantise_backbone
from gateskip_core.backbone.registry import load_backbone
from gateskip_core.training.loop import TrainConfig, train

from .conftest import PROMPTS, run_cli, spread_gates

PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def logits_of(model, skip: float = 0.0, policy: str = "quantile") -> torch.Tensor:
    batch = model.encode(PROMPTS)
    return model.forward(batch.input_ids, batch.attention_mask, model.make_plan(skip, policy)).logits


def projections(model) -> dict[str, torch.Tensor]:
    return {
        name: module.weight for name, module in model.original.named_modules() if name.rsplit(".", 1)[-1] in PROJECTIONS
    }


def test_int8_and_int4_change_every_projection_and_nothing_else():
    fp32, int8, int4 = (load_model("tiny-llama", weights=w) for w in ("fp32", "int8", "int4"))
    assert (int8.weights, int4.weights) == ("int8", "int4")
    reference = projections(fp32)
    assert len(reference) == 7 * fp32.spec.n_layers
    for quantised in (int8, int4):
        for name, weight in projections(quantised).items():
            assert isinstance(quantised.original.get_submodule(name), nn.Linear)  # the dequantised form
            assert not torch.equal(weight, reference[name]), name
        for name, param in fp32.original.named_parameters():  # embedding, norms, LM head: untouched
            if name.rsplit(".", 2)[-2] not in PROJECTIONS:
                assert torch.equal(param, quantised.original.get_parameter(name)), name
    # int4: quanto's groups of 64 inputs hold at most 16 levels each (int8: up to 256 per output row)
    weight = projections(int4)["model.layers.0.mlp.down_proj"]
    groups = weight.reshape(-1, 64)
    assert max(len(torch.unique(g)) for g in groups) <= 16
    row_levels = max(len(torch.unique(r)) for r in projections(int8)["model.layers.0.mlp.down_proj"])
    assert 16 < row_levels <= 256
    a, b, c = (logits_of(spread_gates(m)) for m in (fp32, int8, int4))
    assert (a - c).abs().max() > (a - b).abs().max() > 0  # int4 moves the logits more than int8


@pytest.mark.parametrize("bits", ["int8", pytest.param("int4", marks=pytest.mark.heavy)])
def test_quanto_kernels_give_the_dequantised_weights_results(bits):
    """`int4` runs quanto's dequantised weights at float32 speed: the same logits as quanto's own
    modules (`int4:quanto`, whose first use compiles quanto's CPU extension: heavy tier)."""
    from optimum.quanto import QLinear
    from optimum.quanto.tensor import QTensor

    dequantised = spread_gates(load_model("tiny-llama", weights=bits))
    kernels = spread_gates(load_model("tiny-llama", weights=f"{bits}:quanto"))
    assert kernels.weights == f"{bits}:quanto"
    q_proj = kernels.original.model.layers[0].self_attn.q_proj
    assert isinstance(q_proj, QLinear) and isinstance(q_proj.weight, QTensor)
    for skip in (0.0, 0.3):
        torch.testing.assert_close(logits_of(kernels, skip), logits_of(dequantised, skip), atol=1e-5, rtol=1e-5)


def test_the_dequantised_weights_cache_round_trips(tmp_path, monkeypatch):
    monkeypatch.setenv("GATESKIP_CACHE", str(tmp_path))
    first, _, _ = load_backbone("tiny-llama")
    quantise_backbone(first, "int4", cache_key="tiny-llama")
    (cached,) = (tmp_path / "quantised").iterdir()
    second, _, _ = load_backbone("tiny-llama")
    quantise_backbone(second, "int4", cache_key="tiny-llama")  # read from the file: no quanto call
    for (name, a), (_, b) in zip(first.named_parameters(), second.named_parameters()):
        assert torch.equal(a, b), name
    assert "int4" in cached.name


@pytest.mark.parametrize("bad", ["int3", "fp16", "fp32:quanto", "INT4", ""])
def test_bad_weights_are_one_line_before_any_model_loads(bad):
    with pytest.raises(GateSkipError, match="weights must be one of") as err:
        load_model("no-such-model", weights=bad)  # the weights are checked first
    assert "\n" not in str(err.value)


def test_bad_weights_on_the_command_line_and_training_on_kernels(tmp_path):
    res = run_cli(
        "trace", "--model", "tiny-llama", "--weights", "int2", "--text", "Hi.", "--out", str(tmp_path / "t.csv")
    )
    assert res.returncode == 2 and res.stderr.strip().count("\n") == 0
    assert res.stderr.startswith("gateskip: error: weights must be one of"), res.stderr
    with pytest.raises(GateSkipError, match="train on the dequantised weights"):
        TrainConfig(model="tiny-llama", weights="int4:quanto").validate()


def test_gates_trained_on_the_int4_backbone_differ_from_those_trained_on_fp32(tmp_path):
    fast = dict(model="tiny-llama", seq_len=32, batch=4, steps=2, val_every=2, checkpoint_every=2, calibrate=False)
    states = {}
    for weights in ("fp32", "int4"):
        out = tmp_path / f"{weights}.safetensors"
        train(TrainConfig(**fast, weights=weights, out=str(out)), progress=lambda m: None, show_bar=False)
        model = load_model("tiny-llama", gates=str(out), weights=weights)
        states[weights] = model.gates.state_dict()
    assert any(not torch.equal(states["fp32"][k], states["int4"][k]) for k in states["fp32"])


@pytest.mark.real
def test_shipped_gates_on_int4_smollm2_at_budget_0_are_the_int4_original():
    """The float gates load on the quantised backbone; in adapter scope 'skipped' budget 0 is the
    quantised original itself, which differs from the float32 original."""
    int4 = load_model("smollm2-135m-instruct", gates="default", weights="int4")
    fp32 = load_model("smollm2-135m-instruct", weights="fp32")
    assert int4.adapter_scope == "skipped" and int4.gates is not None
    batch = int4.encode(PROMPTS[:1])
    gated = logits_of(int4)[:1]
    with torch.no_grad():
        original = int4.original(input_ids=batch.input_ids).logits
        float_original = fp32.original(input_ids=batch.input_ids).logits
    torch.testing.assert_close(gated, original, atol=2e-4, rtol=1e-4)
    assert (original - float_original).abs().max() > 1.0
    assert parse_weights("int4").quantised and not parse_weights("fp32").quantised


def test_dashboard_compares_the_same_gates_on_fp32_and_int4_weights(monkeypatch):
    from streamlit.testing.v1 import AppTest

    from .conftest import APP

    monkeypatch.setenv("GATESKIP_DASHBOARD_MODEL", "tiny-llama")
    monkeypatch.setenv("GATESKIP_DASHBOARD_WEIGHTS", "int4")  # `gateskip dashboard --weights int4`
    app = AppTest.from_file(APP, default_timeout=120)
    app.run()
    assert app.sidebar.selectbox(key="weights").value == "int4"
    app.selectbox(key="cmp_right_gates_tiny-llama").set_value(app.selectbox(key="cmp_left_gates_tiny-llama").value)
    app.selectbox(key="cmp_right_weights").set_value("int4").run()
    app.button(key="run_compare").click().run()
    assert not app.exception and not app.error
    titles = [m.value for m in app.markdown if "·" in m.value]
    assert titles == ["**tiny-llama · fp32 weights · untrained**", "**tiny-llama · int4 weights · untrained**"]
    sides, results = app.session_state["compare"]
    gates = [results[side][0].sequences[0].gate for side in sides]
    assert gates[0].shape == gates[1].shape and not (gates[0] == gates[1]).all()  # int4 moves the gates
