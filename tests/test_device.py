"""Device-correct by construction, checked on the CPU (no machine here has a GPU).

`DeviceWatch` (tests/device_watch.py) records every tensor factory that project code calls without
naming a device; trace, generate, collect, sweep and a training step (with its calibration) run
under it on a tiny model. A factory that names no device makes its tensor on the CPU, which on a
GPU machine meets the model's tensors and fails: here it fails this test instead. The training
step also checks that the loop's autocast and batches follow the device it was given."""

from __future__ import annotations

import pytest
import torch

from analysis.experiments.collect import collect
from analysis.experiments.quality import evaluation_blocks
from analysis.experiments.sweep import sweep
from gateskip_core import load_model
from gateskip_core.training.loop import TrainConfig, train

from .conftest import spread_gates
from .device_watch import DeviceWatch

TEXTS = ["Gates decide which tokens skip which layers.", "A second, longer text about the residual stream."]


@pytest.fixture(scope="module")
def model():
    return spread_gates(load_model("tiny-llama", gates="untrained"))


def test_trace_generate_collect_and_sweep_name_the_device_of_every_tensor_they_make(model, tmp_path):
    with DeviceWatch(model.device) as watch:
        model.trace(TEXTS, skip=0.3)
        model.trace(TEXTS, skip=0.3, policy="random", path="physical")
        model.generate(TEXTS[0], max_new_tokens=3, skip=0.3, policy="quantile")
        collect(model, TEXTS, tmp_path / "c.parquet", show_progress=False, skip=0.2)
        blocks = evaluation_blocks(model, TEXTS * 4, n_blocks=1, seq_len=16)
        sweep(model, [0.0, 0.3], ["gateskip", "random", "shortgpt", "attn-only"], blocks)
    assert not watch.problems, "\n".join(sorted(watch.problems))


def test_a_training_step_and_its_calibration_name_the_device_of_every_tensor(tmp_path, monkeypatch):
    autocast_devices = []
    real_autocast = torch.autocast

    def recording_autocast(device_type, *args, **kwargs):
        autocast_devices.append(device_type)
        return real_autocast(device_type, *args, **kwargs)

    monkeypatch.setattr(torch, "autocast", recording_autocast)
    config = TrainConfig(
        model="tiny-llama",
        steps=1,
        seq_len=16,
        batch=1,
        val_batches=1,
        allocation="global",  # the sensitivity measurement runs too
        device="cpu",
        out=str(tmp_path / "g.safetensors"),
    )
    with DeviceWatch("cpu") as watch:
        train(config, progress=lambda m: None, show_bar=False)
    assert not watch.problems, "\n".join(sorted(watch.problems))
    assert autocast_devices and set(autocast_devices) == {"cpu"}
