"""Gate training on tiny models: loss terms, resume after kill -9, NaN stop, Accelerate, checkpoints."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
from safetensors import safe_open

from gateskip_core import GateSkipError, load_gates, load_model
from gateskip_core.gates import INIT_BIAS
from gateskip_core.training import TrainConfig, train

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
    from gateskip_core.calibration import calibration_sequences
    from gateskip_core.training import calibration_texts

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
        (dict(gate="huge"), "unknown gate variant .huge."),
        (dict(out="x.pt"), ".safetensors"),
        (dict(steps=0), "--steps"),
        (dict(data=[str(tmp_path / "missing.txt")]), "cannot read data file"),
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
        "gateskip_core.cli",
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


@pytest.mark.skipif(shutil.which("accelerate") is None, reason="accelerate CLI not installed")
def test_accelerate_two_process_data_parallel_matches_single_process(tmp_path):
    single = tmp_path / "single.safetensors"
    assert subprocess.run(_cli_train(single, 6), capture_output=True).returncode == 0
    ddp = tmp_path / "ddp.safetensors"
    cmd = [
        "accelerate",
        "launch",
        "--multi_gpu",
        "--num_processes",
        "2",
        "--num_machines",
        "1",
        "--mixed_precision",
        "no",
        "--dynamo_backend",
        "no",
        "-m",
        "gateskip_core.cli",
        *_cli_train(ddp, 6)[3:],
    ]
    res = subprocess.run(cmd, capture_output=True, text=True, env=dict(os.environ, CUDA_VISIBLE_DEVICES=""))
    assert res.returncode == 0, res.stderr[-2000:]
    ckpt = load_gates(ddp)
    assert ckpt.training["processes"] == 2
    a, b = gates_of(single), ckpt.gates.state_dict()
    for key in a:  # each process takes half of every batch; DDP averages the gradients
        torch.testing.assert_close(a[key], b[key], atol=1e-5, rtol=0)
