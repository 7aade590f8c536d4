"""Gate training on tiny models: loss terms, resume after kill -9, NaN stop, Accelerate, checkpoints."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
from safetensors import safe_open

from gateskip_core import GateSkipError, load_gates, load_model
from gateskip_core.gating.gates import INIT_BIAS
from gateskip_core.training.loop import TrainConfig, train

from .conftest import accelerate_launch

FAST = dict(
    model="tiny-llama", seq_len=32, batch=4, checkpoint_every=2, val_every=2, skip_ramp_steps=4, skip_end=0.3, lr=1e-2
)


def gates_of(path):
    return load_gates(path).gates.state_dict()


def test_training_moves_gates_and_writes_a_complete_checkpoint(tmp_path):
    out = tmp_path / "g.safetensors"
    result = train(TrainConfig(**FAST, steps=6, out=str(out)), progress=lambda m: None, show_bar=False)
    assert [h["step"] for h in result.history] == list(range(1, 7))
    assert result.history[-1]["budget"] == pytest.approx(0.3) and result.history[-1]["skip_rate"] > 0.2
    ckpt = load_gates(out, load_model("tiny-llama").spec.fingerprint())
    np.testing.assert_allclose(ckpt.calibration_budgets, np.round(np.arange(0.05, 0.601, 0.05), 2))
    assert ckpt.calibration_thresholds.shape == (12, 4, 2)
    assert np.all(np.diff(ckpt.calibration_thresholds[:, 0, 0]) >= 0)  # layer 0 sees only embeddings: monotone
    assert ckpt.training["steps"] == 6 and ckpt.training["gate"] == "vector" and "val_loss" in ckpt.metrics
    for gates in (*ckpt.gates.attn, *ckpt.gates.mlp):  # every bias started at exactly INIT_BIAS
        assert (gates.net.bias - INIT_BIAS).abs().max() > 1e-4
    # the stored thresholds reproduce their budget on the calibration sequences they were fitted on
    from gateskip_core.skipping.calibration import calibration_sequences
    from gateskip_core.training.calibration_texts import calibration_texts

    model = load_model("tiny-llama", gates=str(out))
    ids, mask = calibration_sequences(model, calibration_texts(model), 96, 128)
    result = model.forward(ids, mask, model.make_plan(0.3, "calibrated"))
    rate = result.skipped.sum().item() / (result.eligible.sum().item() * model.spec.n_layers * 2)
    assert rate == pytest.approx(0.3, abs=0.01)


def test_variants_shared_l1_full_and_distill(tmp_path):
    for i, extra in enumerate(
        [
            dict(gate="scalar", shared=True),
            dict(gate="mlp", sparsity_loss="l1"),
            dict(adapter="full"),
            dict(distill=True),
            dict(gate="lowrank:3", adapter="lora:2"),
        ]
    ):
        out = tmp_path / f"g{i}.safetensors"
        train(
            TrainConfig(**FAST, steps=2, out=str(out), calibrate=False, **extra),
            progress=lambda m: None,
            show_bar=False,
        )
        ckpt = load_gates(out)
        assert ckpt.gates.variant_label == extra.get("gate", "vector")
        assert ckpt.gates.shared == extra.get("shared", False) and ckpt.adapter.label == extra.get("adapter", "none")


def test_user_data_files_and_config_errors(tmp_path):
    data = tmp_path / "d.txt"
    data.write_text("\n\n".join(f"Paragraph number {i} says something about gates and layers." * 3 for i in range(30)))
    train(
        TrainConfig(**FAST, steps=2, out=str(tmp_path / "u.safetensors"), data=[str(data)], calibrate=False),
        progress=lambda m: None,
        show_bar=False,
    )
    for bad, msg in [
        (dict(gate="huge"), "gate variant must be .* got .huge."),
        (dict(out="x.pt"), ".safetensors"),
        (dict(steps=0), "--steps"),
        (dict(data=[str(tmp_path / "missing.txt")]), "file not found: .*missing.txt"),
    ]:
        with pytest.raises(GateSkipError, match=msg):
            train(
                TrainConfig(**{**FAST, "steps": 2, "out": str(tmp_path / "e.safetensors"), **bad}),
                progress=lambda m: None,
                show_bar=False,
            )


def test_nonfinite_loss_stops_and_keeps_the_last_good_checkpoint(tmp_path):
    out = tmp_path / "n.safetensors"
    train(TrainConfig(**FAST, steps=4, out=str(out), calibrate=False), progress=lambda m: None, show_bar=False)
    state = tmp_path / "n.state.safetensors"
    before = state.read_bytes()
    with pytest.raises(GateSkipError, match="loss became inf at step 4; stopped. The last good checkpoint"):
        train(
            TrainConfig(**{**FAST, "steps": 8, "out": str(out), "resume": True, "sparsity_weight": float("inf")}),
            progress=lambda m: None,
            show_bar=False,
        )
    assert state.read_bytes() == before


def test_existing_state_needs_resume(tmp_path):
    out = tmp_path / "r.safetensors"
    train(TrainConfig(**FAST, steps=2, out=str(out), calibrate=False), progress=lambda m: None, show_bar=False)
    with pytest.raises(GateSkipError, match="pass --resume"):
        train(TrainConfig(**FAST, steps=2, out=str(out)), progress=lambda m: None, show_bar=False)


def _cli_train(out, steps, *extra):
    return [
        sys.executable,
        "-m",
        "gateskip",
        "train",
        "--model",
        "tiny-llama",
        "--steps",
        str(steps),
        "--seq-len",
        "32",
        "--batch",
        "4",
        "--lr",
        "1e-2",
        "--skip-end",
        "0.3",
        "--skip-ramp-steps",
        "50",
        "--checkpoint-every",
        "10",
        "--val-every",
        "1000",
        "--out",
        str(out),
        *extra,
    ]


def test_resume_after_kill_9_reaches_the_same_gates(tmp_path):
    steps = 150
    straight = tmp_path / "straight.safetensors"
    assert subprocess.run(_cli_train(straight, steps), capture_output=True).returncode == 0

    killed = tmp_path / "killed.safetensors"
    state = tmp_path / "killed.state.safetensors"
    proc = subprocess.Popen(_cli_train(killed, steps), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    step = 0
    while time.time() < deadline and proc.poll() is None:
        if state.exists():
            try:
                with safe_open(str(state), "pt") as f:
                    step = int(f.metadata()["step"])
            except Exception:
                step = 0
            if step >= 30:
                os.kill(proc.pid, signal.SIGKILL)
                break
        time.sleep(0.01)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, "training finished before it could be killed"
    assert not killed.exists() and 30 <= step < steps
    res = subprocess.run(_cli_train(killed, steps, "--resume"), capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
    a, b = gates_of(straight), gates_of(killed)
    for key in a:
        torch.testing.assert_close(a[key], b[key], atol=1e-6, rtol=0)


def test_accelerate_two_process_data_parallel_matches_single_process(tmp_path):
    single = tmp_path / "single.safetensors"
    assert subprocess.run(_cli_train(single, 6), capture_output=True).returncode == 0
    ddp = tmp_path / "ddp.safetensors"
    cmd = [*accelerate_launch(2), *_cli_train(ddp, 6)[3:]]
    res = subprocess.run(cmd, capture_output=True, text=True, env=dict(os.environ, CUDA_VISIBLE_DEVICES=""))
    assert res.returncode == 0, res.stderr[-2000:]
    ckpt = load_gates(ddp)
    assert ckpt.training["processes"] == 2
    a, b = gates_of(single), ckpt.gates.state_dict()
    for key in a:  # each process takes half of every batch; DDP averages the gradients
        torch.testing.assert_close(a[key], b[key], atol=1e-5, rtol=0)


@pytest.mark.parametrize("distill", [False, True])
@pytest.mark.parametrize("sparsity_loss", ["l1", "l2"])
def test_the_training_loss_is_the_task_loss_plus_the_weighted_sparsity(distill, sparsity_loss):
    """Each term against a direct computation: cross-entropy on the next tokens, or KL(original ||
    gated) with --distill; mean(g^2) (l2) or mean(|g|) (l1) averaged over branches; weighted sum."""
    import torch.nn.functional as F

    from gateskip_core import Capture, SkipBudget, SkipPlan, gated_forward
    from gateskip_core.backbone.architecture import arch_spec
    from gateskip_core.gating.adapter import AdapterSpec, make_trainable_copy
    from gateskip_core.skipping.policies import QuantilePolicy
    from gateskip_core.training.objective import GateObjective

    from .conftest import spread_gates

    model = spread_gates(load_model("tiny-llama"), "lowrank:4")
    student = make_trainable_copy(model.original, AdapterSpec.parse("lora:2"))
    with torch.no_grad():  # an adapter away from zero: the student is not the teacher
        for name, p in student.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.3)
    config = TrainConfig(model="tiny-llama", distill=distill, sparsity_loss=sparsity_loss, sparsity_weight=0.3)
    objective = GateObjective(student, model.original, model.gates, None, config)
    ids = torch.tensor([[1, 5, 9, 33, 7, 2, 11, 40, 3, 17], [1, 12, 4, 4, 30, 6, 21, 2, 9, 14]])
    budget = np.full((model.spec.n_layers, 2), 0.3)
    loss, task, sparsity, skip_rate = objective(ids, budget)

    plan = SkipPlan(SkipBudget.make(budget, model.spec.n_layers), QuantilePolicy(), "masked")
    with torch.no_grad():
        out = gated_forward(
            arch_spec(student), model.gates, ids, torch.ones_like(ids), plan, capture=Capture(gate_values=True)
        )
        log_probs = F.log_softmax(out.logits[:, :-1].float(), -1)
        if distill:
            teacher = F.log_softmax(model.original(input_ids=ids).logits[:, :-1].float(), -1)
            expected_task = float((teacher.exp() * (teacher - log_probs)).sum(-1).mean())
        else:
            expected_task = float(-log_probs.gather(-1, ids[:, 1:, None]).mean())
    terms = [(g.pow(2) if sparsity_loss == "l2" else g.abs()).mean() for g in out.gate_values]
    expected_sparsity = float(torch.stack(terms).mean())
    assert float(task) == pytest.approx(expected_task, rel=1e-5)
    assert float(sparsity) == pytest.approx(expected_sparsity, rel=1e-5)
    assert float(loss) == pytest.approx(expected_task + 0.3 * expected_sparsity, rel=1e-5)
    assert float(skip_rate) == pytest.approx(float(out.skipped.sum()) / (out.eligible.sum() * model.spec.n_layers * 2))


@pytest.mark.parametrize("scope", ["all", "skipped"])
def test_straight_through_gives_a_skipped_tokens_gate_the_first_order_cost_of_its_skip(scope):
    """The forward is bit for bit the paper's; without the estimator a skipped token's gate gets no
    task gradient; with it, exactly d loss / d residual * (branch output - stand-in), which is
    checked against the MLP run directly on the branch's input."""
    from gateskip_core import Capture, SkipBudget, SkipPlan, gated_forward
    from gateskip_core.skipping.policies import QuantilePolicy

    from .conftest import spread_gates

    model = spread_gates(load_model("tiny-llama"), "lowrank:4")
    model.gates.requires_grad_(True)
    ids = torch.tensor([[1, 5, 9, 33, 7, 2, 11, 40, 3, 17, 8, 6], [1, 12, 4, 4, 30, 6, 21, 2, 9, 14, 22, 5]])
    runs = {}
    for gradient in ("none", "straight-through"):
        plan = SkipPlan(
            SkipBudget.make(0.4, model.spec.n_layers),
            QuantilePolicy(),
            "masked",
            adapter_scope=scope,
            skip_gradient=gradient,
        )
        out = gated_forward(
            model.spec,
            model.gates,
            ids,
            torch.ones_like(ids),
            plan,
            capture=Capture(gate_values=True, branch_deltas=True, branch_io=True),
        )
        for g in out.gate_values:
            g.retain_grad()
        out.logits.float().log_softmax(-1)[:, :-1].gather(-1, ids[:, 1:, None]).mean().backward()
        runs[gradient] = out
    paper, straight = runs["none"], runs["straight-through"]
    assert torch.equal(paper.logits, straight.logits)
    layer = 1
    index = 2 * layer + 1  # the MLP branch of layer 1
    skipped = paper.skipped[:, :, layer, 1]
    assert skipped.sum() >= 2
    assert torch.equal(paper.gate_values[index].grad[skipped], torch.zeros_like(paper.gate_values[index].grad[skipped]))
    x, _ = straight.branch_io[index]
    with torch.no_grad():
        branch = model.spec.layers[layer].mlp(x)
    expected = straight.branch_deltas[index].grad * branch  # zero stand-in
    torch.testing.assert_close(straight.gate_values[index].grad[skipped], expected[skipped], rtol=1e-4, atol=1e-9)
    assert expected[skipped].abs().sum() > 0


def test_the_ranking_loss_is_the_mean_pairwise_logistic_loss_over_eligible_pairs():
    from gateskip_core.training.objective import ranking_loss

    torch.manual_seed(0)
    gates = [torch.rand(2, 5, 3) * 0.9 + 0.05 for _ in range(4)]
    targets = [torch.randn(2, 5) for _ in range(4)]
    eligible = torch.tensor([[False, True, True, True, True], [True, True, False, True, True]])
    total, count = 0.0, 0
    for g, t in zip(gates, targets):
        score = torch.logit(g.mean(-1))
        for b in range(2):
            for i in range(5):
                for j in range(5):
                    if eligible[b, i] and eligible[b, j] and t[b, i] > t[b, j]:
                        total += float(torch.nn.functional.softplus(-(score[b, i] - score[b, j])))
                        count += 1
    assert float(ranking_loss(gates, targets, eligible)) == pytest.approx(total / count, rel=1e-5)
    ordered = float(ranking_loss([torch.sigmoid(t)[..., None] for t in targets], targets, eligible))
    reversed_ = float(ranking_loss([torch.sigmoid(-t)[..., None] for t in targets], targets, eligible))
    assert ordered < 0.5 < np.log(2) < reversed_
    equal = [torch.full((2, 5, 1), 0.5) for _ in targets]
    assert float(ranking_loss(equal, targets, eligible)) == pytest.approx(float(np.log(2)), rel=1e-6)


def test_first_order_costs_are_the_gradient_at_the_residual_times_what_a_skip_changes():
    from gateskip_core import Capture, SkipBudget, SkipPlan, gated_forward
    from gateskip_core.skipping.policies import QuantilePolicy
    from gateskip_core.training.objective import first_order_costs

    from .conftest import spread_gates

    model = spread_gates(load_model("tiny-llama"), "lowrank:4")
    ids = torch.tensor([[1, 5, 9, 33, 7, 2, 11, 40, 3, 17, 8, 6], [1, 12, 4, 4, 30, 6, 21, 2, 9, 14, 22, 5]])
    plan = SkipPlan(SkipBudget.make(0.4, model.spec.n_layers), QuantilePolicy(), "masked")
    capture = Capture(gate_values=True, branch_deltas=True, branch_io=True, skip_direction=True)
    out = gated_forward(model.spec, model.gates, ids, torch.ones_like(ids), plan, capture=capture)
    task = -out.logits.float().log_softmax(-1)[:, :-1].gather(-1, ids[:, 1:, None]).mean()
    costs = first_order_costs(task, out.branch_deltas, out.skip_direction)
    model.gates.requires_grad_(True)
    assert all(p.grad is None for p in model.gates.parameters())  # the costs leave no parameter gradient
    for d in out.branch_deltas:
        d.grad = None
    task.backward()  # the same gradient, the usual way
    layer, index = 1, 3  # the MLP branch of layer 1
    x, _ = out.branch_io[index]
    with torch.no_grad():
        branch = model.spec.layers[layer].mlp(x)  # zero stand-in: a skip removes the whole branch output
    torch.testing.assert_close(out.skip_direction[index], branch)
    expected = (out.branch_deltas[index].grad * branch).sum(-1).abs()
    torch.testing.assert_close(costs[index], expected, rtol=1e-4, atol=1e-10)
    skipped = out.skipped[:, :-1, layer, 1]  # (the last position predicts nothing the loss counts)
    assert skipped.any() and (~skipped).any() and (costs[index][:, :-1][skipped] > 0).all()  # skipped ones too


def test_the_first_order_rank_target_trains_and_needs_the_ranking_loss(tmp_path):
    extra = dict(FAST, gate="lowrank:3", calibrate=False, rank_weight=5.0, rank_target="first-order")
    out = tmp_path / "fo.safetensors"
    gates = {}
    for target in ("first-order", "residual"):
        path = tmp_path / f"{target}.safetensors"
        train(
            TrainConfig(**dict(extra, rank_target=target), steps=2, out=str(path)),
            progress=lambda m: None,
            show_bar=False,
        )
        gates[target] = load_gates(path).gates.attn[1].net[1].bias.detach()
    assert not torch.allclose(gates["first-order"], gates["residual"])  # the target changes what the gates learn
    with pytest.raises(GateSkipError, match="--rank-target needs --rank-weight"):
        TrainConfig(**dict(extra, rank_weight=0.0), out=str(out)).validate()
    with pytest.raises(GateSkipError, match="--rank-target must be one of residual, first-order"):
        TrainConfig(**dict(extra, rank_target="exact"), out=str(out)).validate()


def test_router_first_trains_gates_and_stand_ins_alone_before_the_adapter_joins(tmp_path):
    extra = dict(
        FAST, gate="lowrank:3", adapter="lora:2", adapter_scope="skipped", skip_fill="lowrank:2", calibrate=False
    )
    for router_first, steps in ((2, 2), (2, 3)):
        out = tmp_path / f"r{router_first}-{steps}.safetensors"
        train(
            TrainConfig(**extra, steps=steps, router_first=router_first, out=str(out)),
            progress=lambda m: None,
            show_bar=False,
        )
        ckpt = load_gates(out)
        lora_b = [v for k, v in ckpt.adapter_tensors.items() if "lora_B" in k]
        moved_b = max(float(v.abs().max()) for v in lora_b)  # LoRA's B starts at zero
        assert (moved_b == 0) == (steps <= router_first)
        assert (ckpt.gates.attn[0].net[1].bias - INIT_BIAS).abs().max() > 1e-4
        assert ckpt.fill is not None


def test_chat_share_repeats_the_models_answers_to_the_requested_share():
    from gateskip_core.training.chat_data import builtin_texts

    model = load_model("tiny-llama")

    def share(texts):
        return sum(len(t) for t in texts if "<|user|>" in t) / sum(map(len, texts))

    plain = builtin_texts(model, "train", lambda m: None)
    assert 0 < share(plain) < 0.2
    assert share(builtin_texts(model, "train", lambda m: None, chat_share=0.34)) >= 0.34
    with pytest.raises(GateSkipError, match="--chat-share needs --data builtin"):
        TrainConfig(chat_share=0.3, data=["x.txt"]).validate()
    with pytest.raises(GateSkipError, match="--chat-share must lie in"):
        TrainConfig(chat_share=1.0).validate()
