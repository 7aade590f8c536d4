"""Gate checkpoints: safetensors round trips, int8, and clear errors."""

from __future__ import annotations

import json
import pickle

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from gateskip_core import GateCheckpoint, GateSkipError, load_gates, load_model, save_gates

from .conftest import spread_gates


def make_ckpt(model):
    return GateCheckpoint(
        gates=model.gates,
        model=model.name,
        fingerprint=model.spec.fingerprint(),
        calibration_budgets=np.array([0.1, 0.2]),
        calibration_thresholds=np.random.default_rng(0).random((2, model.spec.n_layers, 2)),
        training={"steps": 3},
        metrics={"val_loss": 1.5},
    )


def test_round_trip_float32(tiny, tmp_path):
    path = save_gates(make_ckpt(tiny), tmp_path / "g.safetensors")
    back = load_gates(path, tiny.spec.fingerprint())
    for a, b in zip(tiny.gates.state_dict().values(), back.gates.state_dict().values()):
        assert torch.equal(a, b)
    assert back.metrics == {"val_loss": 1.5} and back.training == {"steps": 3}
    np.testing.assert_array_equal(back.calibration_thresholds, make_ckpt(tiny).calibration_thresholds)
    raw = path.read_bytes()  # safetensors: 8-byte little-endian header length, then a JSON header
    header_len = int.from_bytes(raw[:8], "little")
    assert raw[8:9] == b"{" and "__metadata__" in json.loads(raw[8 : 8 + header_len])
    assert not raw.startswith(b"\x80")  # no pickle protocol marker


def test_int8_weights_change_gate_values_little(tiny, tmp_path):
    path = save_gates(make_ckpt(tiny), tmp_path / "g8.safetensors", int8=True)
    back = load_gates(path)
    assert back.weights == "int8-rowwise"
    before = tiny.trace("The quick brown fox.", skip=0.0).sequences[0].gate
    tiny.attach_gates(back.gates, "int8")
    after = tiny.trace("The quick brown fox.", skip=0.0).sequences[0].gate
    assert np.abs(before - after).max() < 0.02


def test_calibrated_policy_uses_stored_thresholds(tiny, tmp_path):
    path = save_gates(make_ckpt(tiny), tmp_path / "g.safetensors")
    tiny.load_gates(str(path))
    policy = tiny.make_plan(0.2, "calibrated").policy
    np.testing.assert_array_equal(policy.thresholds, make_ckpt(tiny).calibration_thresholds[1])


def test_wrong_model_corrupt_truncated_and_foreign_files(tmp_path):
    llama = spread_gates(load_model("tiny-llama"))
    gemma = load_model("tiny-gemma3")
    good = save_gates(make_ckpt(llama), tmp_path / "llama.safetensors")
    data = good.read_bytes()
    (tmp_path / "truncated.safetensors").write_bytes(data[: len(data) // 2])
    (tmp_path / "garbage.safetensors").write_bytes(b"\x00\x01garbage" * 10)
    (tmp_path / "pickle.safetensors").write_bytes(pickle.dumps({"a": 1}))
    save_file({"x": torch.zeros(2)}, str(tmp_path / "foreign.safetensors"))
    cases = {
        "llama.safetensors": "was trained for tiny-llama",
        "truncated.safetensors": "not a valid safetensors",
        "garbage.safetensors": "not a valid safetensors",
        "pickle.safetensors": "not a valid safetensors",
        "foreign.safetensors": "not a GateSkip gate checkpoint",
        "absent.safetensors": "not found",
    }
    for name, message in cases.items():
        with pytest.raises(GateSkipError, match=message) as err:
            gemma.load_gates(str(tmp_path / name))
        assert "\n" not in str(err.value)
        assert gemma.gates is None  # nothing half-loaded


def test_default_gates_error_when_none_ship():
    model = load_model("tiny-llama")
    with pytest.raises(GateSkipError, match="no trained gates 'default' ship for tiny-llama"):
        model.load_gates("default")
