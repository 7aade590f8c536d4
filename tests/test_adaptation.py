"""Adapted backbones (LoRA, full), low-rank gates, budgets across layers and the training schedule."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from gateskip_core import GateSkipError, load_gates, load_model
from gateskip_core.forward.execution import gated_forward
from gateskip_core.gating.adapter import AdapterSpec, LoraAdapter, make_trainable_copy
from gateskip_core.gating.gates import GateSet, parse_gate_variant
from gateskip_core.skipping.allocation import allocate_budget
from gateskip_core.skipping.plan import SkipPlan
from gateskip_core.skipping.policies import SkipBudget
from gateskip_core.traces.compute import branch_saving_flops
from gateskip_core.training.loop import TrainConfig, train
from gateskip_core.training.objective import GateObjective

FAST = dict(
    model="tiny-llama",
    seq_len=32,
    batch=4,
    checkpoint_every=1,
    val_every=100,
    skip_end=0.3,
    lr=1e-2,
    adapter_lr=1e-2,
    calibrate=False,
)


def _train(tmp_path, name, **extra):
    out = tmp_path / f"{name}.safetensors"
    train(TrainConfig(**{**FAST, "steps": 3, "out": str(out), **extra}), progress=lambda m: None, show_bar=False)
    state = {}
    with safe_open(str(out.with_name(f"{name}.state.safetensors")), "pt") as f:
        state = {k: f.get_tensor(k) for k in f.keys()}
    return out, state


def _logits(model, ids):
    return model.forward(ids, torch.ones_like(ids), model.make_plan(0.0)).logits


def test_full_fine_tuning_keeps_what_it_trained_and_leaves_the_original(tmp_path):
    out, state = _train(tmp_path, "full", adapter="full")
    model = load_model("tiny-llama", gates=str(out))
    fresh = load_model("tiny-llama")
    assert model.adapter == "full" and "full adapter" in model.gates_label
    trained = {k.removeprefix("param.backbone."): v for k, v in state.items() if k.startswith("param.backbone.")}
    assert trained, "the training state holds the trained backbone"
    adapted = dict(model.backbone.named_parameters())
    changed = 0
    for name, value in trained.items():  # the checkpoint rebuilds exactly the trained weights
        torch.testing.assert_close(adapted[name], value, atol=1e-6, rtol=0)
        changed += not torch.equal(value, dict(fresh.original.named_parameters())[name])
    assert changed > 0
    for name, p in model.original.named_parameters():  # the user's model is untouched
        assert torch.equal(p, dict(fresh.original.named_parameters())[name]), name
    ids = torch.tensor([[1, 5, 9, 33, 7, 2, 11]])
    assert not torch.allclose(_logits(model.view(), ids), _logits(model, ids))
    torch.testing.assert_close(_logits(model.view(), ids), _logits(fresh, ids), atol=0, rtol=0)
    model.remove_gates()  # back to the original, bit for bit
    torch.testing.assert_close(_logits(model, ids), _logits(fresh, ids), atol=0, rtol=0)


def test_the_adapters_inference_delta_equals_the_trained_form_and_follows_every_change_to_b():
    """Without gradients a delta is one addmm on a cached s * B^T: equal to s * B(A x) + y, and
    recomputed after B changes in place (an optimiser step, a loaded checkpoint)."""
    model = load_model("tiny-llama")
    torch.manual_seed(0)
    lora = LoraAdapter(model.spec.layers, rank=4)
    for b in lora.B.values():
        torch.nn.init.normal_(b)
    x, y = torch.randn(5, model.spec.d_model), torch.randn(5, model.spec.d_model)
    expected = y + lora.delta(0, "q_proj", x)
    with torch.no_grad():
        torch.testing.assert_close(lora.add_delta(0, "q_proj", x, y), expected)
        lora.B["0_q_proj"].mul_(3.0)
        torch.testing.assert_close(lora.add_delta(0, "q_proj", x, y), y + 3 * (expected - y))
    # With gradients (training) the delta is the trained form, and B gets its gradient.
    lora.add_delta(0, "q_proj", x, y).sum().backward()
    assert lora.B["0_q_proj"].grad is not None and lora.B["0_q_proj"].grad.abs().sum() > 0


def test_lora_checkpoint_round_trips_and_is_refused_for_another_model(tmp_path):
    out, state = _train(tmp_path, "lora", adapter="lora:4", gate="lowrank:3", distill=True)
    ckpt = load_gates(out)
    assert ckpt.adapter == AdapterSpec("lora", 4) and ckpt.gates.variant_label == "lowrank:3"
    model = load_model("tiny-llama", gates=str(out))
    assert model.backbone is model.original and model.lora is not None  # one set of base weights
    # Rebuild the trained adapter as peft runs it (LoRA layers on a copy) from the state file: an
    # implementation of LoRA independent of the walk's per-row deltas.
    student = make_trainable_copy(model.original, AdapterSpec("lora", 4))
    params = dict(student.named_parameters())
    trained = {k.removeprefix("param.lora."): v for k, v in state.items() if k.startswith("param.lora.")}
    assert trained and any(k.startswith("B.") and v.abs().max() > 0 for k, v in trained.items())  # B starts at 0
    with torch.no_grad():
        for key, value in trained.items():
            matrix, _, rest = key.partition(".")
            layer, _, name = rest.partition("_")
            params[LoraAdapter.checkpoint_name(int(layer), name, matrix).removeprefix("adapter.")].copy_(value)
    ids = torch.tensor([[1, 5, 9, 33, 7, 2, 11, 40]])
    plan = SkipPlan(SkipBudget.make(0.0, model.spec.n_layers), None, adapter_scope="all")
    with torch.no_grad():
        expected = student(input_ids=ids).logits
        got = gated_forward(model.spec, None, ids, torch.ones_like(ids), plan, lora=model.lora).logits
    torch.testing.assert_close(got, expected, atol=2e-3, rtol=0)  # float16 storage of A and B
    with pytest.raises(GateSkipError, match="was trained for tiny-llama"):
        load_model("tiny-gemma3", gates=str(out))
    # A file whose adapter tensors were stripped is refused, not silently used without them.
    with safe_open(str(out), "pt") as f:
        meta, tensors = f.metadata(), {k: f.get_tensor(k) for k in f.keys() if not k.startswith("adapter.")}
    stripped = tmp_path / "stripped.safetensors"
    save_file(tensors, str(stripped), metadata=meta)
    with pytest.raises(GateSkipError, match="damaged gate checkpoint .*no adapter tensors"):
        load_gates(stripped)


def test_distillation_teacher_is_the_frozen_original(tmp_path):
    model = load_model("tiny-llama")
    before = {k: v.clone() for k, v in model.original.state_dict().items()}
    student = make_trainable_copy(model.original, AdapterSpec("full"))
    gates = GateSet(model.spec.n_layers, model.spec.d_model, "scalar")
    objective = GateObjective(student, model.original, gates, None, TrainConfig(**FAST, distill=True))
    assert objective._teacher[0] is model.original and objective.backbone is student
    assert not any(p is q for p in student.parameters() for q in model.original.parameters())
    optim = torch.optim.SGD([p for p in objective.parameters() if p.requires_grad], lr=1.0)
    loss, *_ = objective(torch.randint(3, 200, (2, 16)), np.full((model.spec.n_layers, 2), 0.2))
    loss.backward()
    optim.step()
    for k, v in model.original.state_dict().items():
        assert torch.equal(v, before[k]), k
    assert any(not torch.equal(v, before[k]) for k, v in student.state_dict().items())


def test_lowrank_gates_parse_and_are_charged_at_their_cost():
    assert parse_gate_variant("lowrank:8") == ("lowrank", 8) and parse_gate_variant("scalar") == ("scalar", 0)
    for bad in ("lowrank:0", "lowrank:x", "vector:3", "huge"):
        with pytest.raises(GateSkipError):
            parse_gate_variant(bad)
    model = load_model("tiny-llama", gates="untrained:lowrank:4")
    d = model.spec.d_model
    assert model.gates.flops_per_token("attn") == 2 * d * 4 + 2 * 4 * d
    trace = model.trace("Some words for the gates to rank.", skip=0.0)
    acc = trace.sequences[0].compute
    assert acc.gate_flops == len(trace.sequences[0].tokens) * model.spec.n_layers * 2 * (4 * d * 4)


def test_global_allocation_spends_the_compute_budget_unevenly():
    rng = np.random.default_rng(0)
    sensitivity = rng.uniform(0.01, 2.0, size=(6, 2))
    cost = np.tile([1.0, 4.0], (6, 1))
    for total in (0.05, 0.2, 0.5):
        rates = allocate_budget(total, sensitivity, cost)
        assert (cost * rates).sum() == pytest.approx(total * cost.sum(), rel=1e-6)
        assert rates.min() >= 0 and rates.max() <= 0.95
        assert rates[np.argmin(sensitivity[:, 1]), 1] >= rates[np.argmax(sensitivity[:, 1]), 1]
    flat = allocate_budget(0.3, np.ones((6, 2)), np.ones((6, 2)))
    np.testing.assert_allclose(flat, 0.3, rtol=1e-6)  # equal sensitivity and cost: the uniform rule
    np.testing.assert_array_equal(allocate_budget(0.0, sensitivity, cost), 0.0)
    mlp_only = allocate_budget(0.2, sensitivity, cost, branches="mlp")
    assert mlp_only[:, 0].max() == 0 and (cost[:, 1] * mlp_only[:, 1]).sum() == pytest.approx(0.2 * cost[:, 1].sum())


def test_global_allocation_from_a_trained_checkpoint_and_uniform_override(tmp_path):
    out, _ = _train(tmp_path, "glob", allocation="global", budget_schedule="random", calibrate=True)
    model = load_model("tiny-llama", gates=str(out))
    ckpt = model.checkpoint
    assert ckpt.sensitivity.shape == (4, 2) and ckpt.global_thresholds.shape == (12, 4, 2)
    table = model.budget(0.3)  # auto: the gates carry a profile, so global
    saving = branch_saving_flops(model.spec)
    assert table.total == 0.3 and not table.is_uniform()
    assert (saving * table.fractions).sum() == pytest.approx(0.3 * saving.sum(), rel=1e-6)
    assert model.budget(0.3, allocation="uniform").is_uniform()
    per_layer = [0.1, 0.2, 0.3, 0.4]  # explicit per-layer budgets are used as given
    np.testing.assert_allclose(model.budget(per_layer).fractions[:, 0], per_layer)
    policy = model.make_plan(0.3, "calibrated").policy  # stored global thresholds, no fitting
    np.testing.assert_array_equal(policy.thresholds, ckpt.global_thresholds[5])
    trace = model.trace("A short text about layers and gates and tokens.", skip=0.3, policy="calibrated")
    np.testing.assert_allclose(trace.skip_budget, table.fractions)
    with pytest.raises(GateSkipError, match="allocation must be one of"):
        model.budget(0.3, allocation="sideways")
    with pytest.raises(GateSkipError, match="needs gates trained with a sensitivity profile"):
        load_model("tiny-llama", gates="untrained").budget(0.3, allocation="global")


def test_random_budget_schedule_is_a_pure_function_of_seed_and_step():
    cfg = TrainConfig(budget_schedule="random", skip_start=0.1, skip_end=0.5, seed=3)
    draws = [cfg.budget_at(s) for s in range(200)]
    assert draws == [cfg.budget_at(s) for s in range(200)]
    assert min(draws) >= 0.1 and max(draws) <= 0.5 and np.std(draws) > 0.08
    assert draws != [
        TrainConfig(budget_schedule="random", skip_start=0.1, skip_end=0.5).budget_at(s) for s in range(200)
    ]


def test_cli_training_flags_take_their_defaults_from_train_config():
    from dataclasses import fields

    from gateskip.cli import build_parser

    args = build_parser().parse_args(["train", "--out", "x.safetensors"])
    for f in fields(TrainConfig):
        if f.name != "out":
            assert getattr(args, f.name) == getattr(TrainConfig(), f.name), f.name


def test_resumed_global_run_reuses_the_stored_sensitivity(tmp_path, monkeypatch):
    import gateskip_core.training.loop as training

    out = tmp_path / "r.safetensors"
    cfg = dict(FAST, allocation="global", out=str(out))
    train(TrainConfig(**cfg, steps=2), progress=lambda m: None, show_bar=False)
    first = load_gates(out).sensitivity
    out.unlink()

    def measured_again(*args, **kwargs):
        raise AssertionError("the sensitivity was measured again on resume")

    monkeypatch.setattr(training, "measure_sensitivity", measured_again)
    train(TrainConfig(**cfg, steps=3, resume=True), progress=lambda m: None, show_bar=False)
    np.testing.assert_array_equal(load_gates(out).sensitivity, first)
