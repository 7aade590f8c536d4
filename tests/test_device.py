"""Device-correct by construction, checked on the CPU (no machine here has a GPU).

`DeviceWatch` (tests/device_watch.py) records every tensor factory that project code calls without
naming a device; trace, generate, collect, sweep and a training step (with its calibration) run
under it on a tiny model. A factory that names no device makes its tensor on the CPU, which on a
GPU machine meets the model's tensors and fails: here it fails this test instead. The training
step also checks that the loop's autocast and batches follow the device it was given. `gateskip
bench` and `gateskip dashboard`: a short bench (prefill, decode, capture, dashboard) and the
dashboard's library calls run under it too, the bench's clock waits for the device before every
read, and both commands take --device/--dtype, refused in one line when this machine lacks them."""

from __future__ import annotations

import os
import signal
import socket
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from analysis.experiments.collect import collect
from analysis.experiments.quality import evaluation_blocks
from analysis.experiments.sweep import sweep
from dashboard import service
from dashboard.views.common import start_device
from gateskip.bench import clock as bench_clock
from gateskip.bench.clock import clock
from gateskip.bench.suite import BenchConfig
from gateskip.bench.suite import run as bench_run
from gateskip.cli import main
from gateskip_core import load_model
from gateskip_core.training.loop import TrainConfig, train

from .conftest import spread_gates
from .device_watch import DeviceWatch

ROOT = Path(__file__).resolve().parent.parent
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


# ---- gateskip bench and gateskip dashboard


def test_every_clock_read_of_the_bench_goes_through_its_one_clock():
    """A timing read from `time.perf_counter` directly would not wait for a GPU's queued kernels."""
    bench = ROOT / "gateskip" / "bench"
    bare = [p.name for p in sorted(bench.glob("*.py")) if p.name != "clock.py" and "perf_counter" in p.read_text()]
    assert bare == [], "time a section with gateskip.bench.clock.clock()"


def test_the_clock_waits_for_every_cuda_device_before_it_reads(monkeypatch):
    waited = []
    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.cuda, "synchronize", lambda index=None: waited.append(index))
    clock()
    assert waited == [0, 1]  # a model on cuda:1 is waited for too


def test_a_short_bench_names_the_device_and_syncs_it_before_each_clock_read(monkeypatch):
    """prefill, decode, capture and dashboard on a tiny model: no project tensor without the model's
    device, and a CUDA synchronisation (faked: there is no GPU here) before every clock read."""
    events = []
    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(torch.cuda, "synchronize", lambda index=None: events.append("sync"))
    real_time = bench_clock.time
    monkeypatch.setattr(
        bench_clock, "time", SimpleNamespace(perf_counter=lambda: events.append("read") or real_time.perf_counter())
    )
    gates = "untrained:lowrank:4"
    cfg = BenchConfig(
        model="tiny-llama", device="cpu", gates=gates, variants=(gates,), decode_variants=(gates,),
        prefill_tokens=16, prefill_skips=(0.0, 0.5), prefill_batches=(1,), decode_prompt=16, new_tokens=3,
        decode_skips=(0.5,), decode_batches=(1,), dashboard_tokens=16, repeats=1, decode_repeats=1,
        sections=("prefill", "decode", "capture", "dashboard"),
    )  # fmt: skip
    with DeviceWatch("cpu") as watch:
        results = bench_run(cfg, log=lambda msg: None)
    assert not watch.problems, "\n".join(sorted(watch.problems))
    assert all(results[s] for s in cfg.sections)
    assert events.count("read") >= 2 * 20  # every timed call of the four sections, twice
    assert events == ["sync", "read"] * events.count("read")


@pytest.mark.parametrize("command", [["bench"], ["dashboard"]])
@pytest.mark.parametrize(
    "flag, said", [(["--device", "nonsense"], "unknown device 'nonsense'"), (["--dtype", "float8"], "dtype must be")]
)
def test_bench_and_dashboard_refuse_a_bad_device_or_dtype_in_one_line(command, flag, said, capsys, monkeypatch):
    import gateskip_core.model as model_module

    monkeypatch.setattr(model_module, "load_backbone", lambda *a, **k: pytest.fail("a model loaded"))
    monkeypatch.setattr(os, "execve", lambda *a: pytest.fail("the dashboard's server started"))
    previous = signal.getsignal(signal.SIGTERM)
    try:
        code = main([*command, "--model", "tiny-llama", *flag])
    finally:
        signal.signal(signal.SIGTERM, previous)
    lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert code == 2 and len(lines) == 1 and lines[0].startswith("gateskip: error: ") and said in lines[0], lines


def test_the_dashboard_loads_every_model_on_the_device_and_dtype_it_was_started_with(monkeypatch, tmp_path):
    started = {}
    monkeypatch.setattr(os, "execve", lambda path, cmd, env: started.update(env))
    argv = ["dashboard", "--model", "tiny-llama", "--dtype", "bfloat16", "--device", "cpu"]
    previous = signal.getsignal(signal.SIGTERM)
    try:
        assert main([*argv, "--port", str(_free_port()), "--data-dir", str(tmp_path)]) == 0
    finally:
        signal.signal(signal.SIGTERM, previous)
    for name in ("GATESKIP_DASHBOARD_DEVICE", "GATESKIP_DASHBOARD_DTYPE"):
        monkeypatch.setenv(name, started[name])
    hub = service.ModelHub(*start_device())  # what the app's `hub()` builds from them
    view = hub.view("tiny-llama", "untrained")
    assert view.dtype == torch.bfloat16 and view.device.type == "cpu"


def test_the_dashboards_calls_name_the_device_of_every_tensor_they_make(model):
    text = TEXTS[1]
    settings = service.Settings("tiny-llama", model, "exact", 0.3, "both", "quantile", True, 0, "auto")
    with DeviceWatch(model.device) as watch:
        captured, _ = service.capture(model, text, chat=False)
        service.estimate(model, captured, settings)
        service.exact(model, text, False, settings)
        service.attribution(model, text, False, settings, 1, "mlp")
        service.continuations(model, text, False, 3, **settings.skip_args())
    assert not watch.problems, "\n".join(sorted(watch.problems))


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]
