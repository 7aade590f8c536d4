"""Stand-ins for skipped branches (`skip_fill`) and the adapter scope ('all' | 'skipped')."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from gateskip_core import Capture, Forced, GateSkipError, load_gates, load_model, save_gates
from gateskip_core.gating.adapter import AdapterSpec
from gateskip_core.gating.fill import FillSpec, SkipFill, fill_flops
from gateskip_core.traces.compute import account_sequence
from gateskip_core.training.fill_fitting import fit_fill, ridge_fill
from gateskip_core.training.loop import TrainConfig, train
from gateskip_core.training.objective import GateObjective

from .conftest import PROMPTS, TINY, run_cli, spread_gates

IDS = torch.tensor([[1, 5, 9, 33, 7, 2, 11, 40, 3, 17, 25, 8], [1, 12, 4, 4, 30, 6, 21, 2, 9, 14, 5, 10]])


def _lora_checkpoint(tmp_path, name="tiny-llama", **extra):
    """A tiny gate checkpoint with a LoRA adapter that moved away from zero."""
    out = tmp_path / f"{name}-lora.safetensors"
    config = dict(model=name, seq_len=32, batch=4, steps=3, gate="lowrank:4", adapter="lora:2", adapter_lr=5e-2)
    config.update(calibrate=False, val_every=100, checkpoint_every=100, skip_end=0.3, out=str(out), **extra)
    train(TrainConfig(**config), progress=lambda m: None, show_bar=False)
    return out


def _random_fill(model, spec="lowrank:3", seed=0) -> SkipFill:
    torch.manual_seed(seed)
    fill = SkipFill(model.spec.n_layers, model.spec.d_model, FillSpec.parse(spec))
    with torch.no_grad():
        for p in fill.parameters():
            p.normal_(0, 0.2)
    return fill.eval()


def _with_fill(model, fill):
    from gateskip_core import GateCheckpoint

    ckpt = GateCheckpoint(gates=model.gates, model=model.name, fingerprint=model.spec.fingerprint(), fill=fill)
    model.attach_gates(model.gates, "test", ckpt)
    return model


@pytest.mark.parametrize("name", TINY)
def test_scope_skipped_is_the_original_model_at_budget_zero(tmp_path, name):
    model = load_model(name, gates=str(_lora_checkpoint(tmp_path, name)))
    mask = torch.ones_like(IDS)
    with torch.no_grad():
        original = model.original(input_ids=IDS).logits
    skipped_scope = model.forward(IDS, mask, model.make_plan(0.0, adapter_scope="skipped")).logits
    torch.testing.assert_close(skipped_scope, original, atol=1e-5, rtol=1e-5)
    everywhere = model.forward(IDS, mask, model.make_plan(0.0, adapter_scope="all")).logits
    assert (everywhere - original).abs().max() > 1e-3  # the adapter and soft gates change the model


@pytest.mark.parametrize("name", TINY)
def test_scope_skipped_adapts_only_tokens_that_skipped(tmp_path, name):
    """Forcing one skip changes nothing before that position, and from it on the adapted weights apply."""
    model = load_model(name, gates=str(_lora_checkpoint(tmp_path, name)))
    ids = IDS[:1]
    mask = torch.ones_like(ids)
    plan = model.make_plan(0.0, adapter_scope="skipped", forced=[Forced(1, "mlp", 6, skip=True)])
    out = model.forward(ids, mask, plan, capture=Capture(hidden_states=True))
    base = model.forward(ids, mask, model.make_plan(0.0, adapter_scope="skipped"), capture=Capture(hidden_states=True))
    after = out.hidden_states[2]  # entering layer 2, after the forced skip at layer 1
    torch.testing.assert_close(after[0, :6], base.hidden_states[2][0, :6], atol=1e-6, rtol=0)
    assert not torch.allclose(after[0, 6], base.hidden_states[2][0, 6])
    # The same walk with the adapter removed (original weights, the same gates): identical before
    # position 6, which never skipped; different at 6, which runs the adapted weights after its skip.
    plain = model.view(model.gates, "no adapter", dataclasses.replace(model.checkpoint, adapter=AdapterSpec()))
    no_adapter = plain.forward(ids, mask, plan).logits
    torch.testing.assert_close(no_adapter[0, :6], out.logits[0, :6], atol=1e-5, rtol=1e-5)
    assert (no_adapter[0, 6] - out.logits[0, 6]).abs().max() > 1e-3


@pytest.mark.parametrize("name", TINY)
@pytest.mark.parametrize("scope", ["all", "skipped"])
@pytest.mark.parametrize("fill", ["zero", "mean", "lowrank:3"])
def test_masked_equals_physical_with_fill_and_scope(tmp_path, name, scope, fill):
    model = load_model(name, gates=str(_lora_checkpoint(tmp_path, name)))
    if fill != "zero":
        ckpt = dataclasses.replace(model.checkpoint, fill=_random_fill(model, fill))
        model.attach_gates(model.gates, "test", ckpt)
    mask = torch.tensor([[0, 0, 0] + [1] * 9, [1] * 12])  # left padding in the first row
    real = mask.bool()
    for kv in ("compute", "copy"):
        masked, physical = (
            model.forward(IDS, mask, model.make_plan(0.4, path=path, adapter_scope=scope, kv=kv))
            for path in ("masked", "physical")
        )
        assert torch.equal(masked.skipped, physical.skipped) and int(masked.skipped.sum()) > 0
        torch.testing.assert_close(physical.logits[real], masked.logits[real], atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("scope", ["all", "skipped"])
def test_cached_generation_equals_uncached_with_fill_and_scope(tmp_path, scope):
    model = load_model("tiny-llama", gates=str(_lora_checkpoint(tmp_path)))
    model.attach_gates(model.gates, "test", dataclasses.replace(model.checkpoint, fill=_random_fill(model)))
    gen = model.generate("Gates decide", max_new_tokens=6, skip=0.4, policy="quantile", adapter_scope=scope)
    seq = gen.trace.sequences[0]
    ids = torch.tensor([seq.token_ids])
    # Uncached: the whole sequence at once, with the decisions the cached run made forced.
    forced = [
        Forced(layer, branch, int(pos), bool(seq.skipped[pos, layer, b]))
        for pos in range(1, seq.n_tokens)
        for layer in range(model.spec.n_layers)
        for b, branch in enumerate(("attn", "mlp"))
    ]
    plan = model.make_plan(0.0, adapter_scope=scope, forced=forced)
    logits = model.forward(ids, torch.ones_like(ids), plan).logits[0]
    greedy = logits[seq.prompt_length - 1 : -1].argmax(-1)
    assert greedy.tolist() == seq.token_ids[seq.prompt_length :].tolist()


def test_a_skipped_branch_adds_exactly_its_stand_in(tiny_llama):
    model = _with_fill(tiny_llama, _random_fill(tiny_llama))
    ids = IDS[:1]
    plan = model.make_plan(0.0, forced=[Forced(2, "attn", 4, skip=True)])
    out = model.forward(ids, torch.ones_like(ids), plan, capture=Capture(branch_io=True))
    x, added = out.branch_io[2 * 2]  # layer 2, attention
    expected = model.fill.fill(2, "attn")(x[0, 4])
    torch.testing.assert_close(added[0, 4], expected, atol=1e-6, rtol=0)
    assert out.skipped[0, 4, 2, 0] and int(out.skipped.sum()) == 1


def test_the_compute_account_charges_each_skipped_branch_its_stand_in(tiny_llama):
    model = _with_fill(tiny_llama, _random_fill(tiny_llama, "lowrank:3"))
    d = model.spec.d_model
    assert model.fill_flops() == (2 * 2 * 3 * d + d, 2 * 2 * 3 * d + d)
    trace = model.trace("The quick brown fox jumps over the lazy dog.", skip=0.5)
    seq = trace.sequences[0]
    without = account_sequence(model.spec, seq.skipped, model.gate_flops(), seq.n_tokens, "masked")
    n_attn, n_mlp = seq.skipped[..., 0].sum(), seq.skipped[..., 1].sum()
    assert n_attn > 0 and n_mlp > 0
    extra = seq.compute.skipping_flops - without.skipping_flops
    assert extra == n_attn * model.fill_flops()[0] + n_mlp * model.fill_flops()[1]
    assert fill_flops(None) == (0, 0)


def test_checkpoint_round_trip_keeps_fill_and_scope(tmp_path, tiny_llama):
    from gateskip_core import GateCheckpoint

    fill = _random_fill(tiny_llama, "mean")
    ckpt = GateCheckpoint(
        gates=tiny_llama.gates,
        model="tiny-llama",
        fingerprint=tiny_llama.spec.fingerprint(),
        fill=fill,
        adapter_scope="skipped",
    )
    path = save_gates(ckpt, tmp_path / "g.safetensors")
    back = load_gates(path, tiny_llama.spec.fingerprint())
    assert back.adapter_scope == "skipped" and back.fill_label == "mean"
    for (k, a), (_, b) in zip(fill.state_dict().items(), back.fill.state_dict().items()):
        torch.testing.assert_close(a, b, atol=1e-3, rtol=1e-3, msg=k)  # stored as float16
    model = load_model("tiny-llama", gates=str(path))
    assert model.make_plan(0.2).adapter_scope == "skipped" and "mean fill" in model.gates_label
    assert "adapter scope: skipped" in model.trace("Short one.", skip=0.2).gates


def test_damaged_fill_is_refused_with_one_line(tmp_path, tiny_llama):
    from safetensors import safe_open
    from safetensors.torch import save_file

    from gateskip_core import GateCheckpoint

    ckpt = GateCheckpoint(
        gates=tiny_llama.gates,
        model="tiny-llama",
        fingerprint=tiny_llama.spec.fingerprint(),
        fill=_random_fill(tiny_llama),
    )
    path = save_gates(ckpt, tmp_path / "g.safetensors")
    with safe_open(str(path), "pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys() if k != "fill.mlp.0.up"}
        meta = f.metadata()
    save_file(tensors, str(path), metadata=meta)
    with pytest.raises(GateSkipError, match="damaged gate checkpoint.*skip fill") as err:
        load_gates(path)
    assert "\n" not in str(err.value)


def test_ridge_fill_recovers_a_low_rank_linear_map():
    torch.manual_seed(0)
    x = torch.randn(2000, 24)
    true = torch.randn(24, 3) @ torch.randn(3, 24)
    y = x @ true + 0.5
    params = ridge_fill(x, y, FillSpec.parse("lowrank:3"), ridge=1e-8)
    fitted = x @ params["down"].T @ params["up"].T + params["bias"]
    torch.testing.assert_close(fitted, y, atol=1e-3, rtol=1e-3)
    mean = ridge_fill(x, y, FillSpec.parse("mean"))
    torch.testing.assert_close(mean["bias"], y.mean(0))


def test_fit_fill_stands_in_better_than_zero(tiny_llama):
    """Fitted stand-ins move the skipping model closer to the unskipped one than adding nothing."""
    fill = fit_fill(tiny_llama, FillSpec.parse("lowrank:4"), PROMPTS, lowest=1.0)
    batch = tiny_llama.encode(PROMPTS)
    ids, mask = batch.input_ids, batch.attention_mask
    ref = torch.log_softmax(tiny_llama.forward(ids, mask, tiny_llama.make_plan(0.0)).logits, -1)

    def kl(model):
        lp = torch.log_softmax(model.forward(ids, mask, model.make_plan(0.3)).logits, -1)
        return float((ref.exp() * (ref - lp)).sum(-1).mean())

    zero = kl(tiny_llama)
    fitted = kl(_with_fill(tiny_llama, fill))
    assert fitted < zero


def test_top_k_distillation_with_the_whole_vocabulary_is_the_exact_kl():
    model = spread_gates(load_model("tiny-llama"), "lowrank:4")
    vocab = model.spec.vocab_size
    ids = IDS
    budget = np.full((model.spec.n_layers, 2), 0.2)
    losses = []
    for k in (0, vocab):
        config = TrainConfig(model="tiny-llama", distill=True, teacher_top_k=k)
        objective = GateObjective(model.original, model.original, model.gates, None, config)
        losses.append(float(objective(ids, budget, torch.arange(len(ids)))[1]))
    assert losses[0] > 1e-3
    assert losses[1] == pytest.approx(losses[0], rel=1e-4)


def test_training_with_fill_and_scope_trains_the_stand_ins(tmp_path):
    out = _lora_checkpoint(
        tmp_path, skip_fill="lowrank:2", adapter_scope="skipped", distill=True, teacher_top_k=16, skip_start=0.3
    )
    ckpt = load_gates(out)
    assert ckpt.adapter_scope == "skipped" and ckpt.fill_label == "lowrank:2"
    assert any(float(m.up.abs().max()) > 0 for m in ckpt.fill.mlp)  # up starts at zero: it trained
    again = tmp_path / "again.safetensors"
    config = dict(model="tiny-llama", seq_len=32, batch=4, steps=1, gate="lowrank:4", adapter="lora:2")
    train(
        TrainConfig(
            **config, calibrate=False, init=str(out), skip_fill="lowrank:2", adapter_scope="skipped", out=str(again)
        ),
        progress=lambda m: None,
        show_bar=False,
    )
    with pytest.raises(GateSkipError, match="--init .* has adapter lora:2, not none"):
        train(TrainConfig(**{**config, "adapter": "none"}, init=str(out), out=str(tmp_path / "x.safetensors")))


def test_fit_fill_command_writes_gates_with_stand_ins(tmp_path):
    src = _lora_checkpoint(tmp_path)
    out = tmp_path / "filled.safetensors"
    done = run_cli(
        "fit-fill",
        "--model",
        "tiny-llama",
        "--gates",
        str(src),
        "--fill",
        "mean",
        "--adapter-scope",
        "skipped",
        "--no-calibrate",
        "--out",
        str(out),
    )
    assert done.returncode == 0, done.stderr
    ckpt = load_gates(out)
    assert ckpt.fill_label == "mean" and ckpt.adapter_scope == "skipped" and ckpt.adapter.label == "lora:2"
    bad = run_cli("fit-fill", "--model", "tiny-llama", "--gates", str(src), "--fill", "cubic", "--out", str(out))
    assert bad.returncode == 2 and bad.stderr.strip().count("\n") == 0 and "skip fill must be" in bad.stderr
