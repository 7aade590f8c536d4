"""Shared fixtures: tiny random models (fast) and the real SmolLM2 (marked `real`)."""

from __future__ import annotations

import os

if os.environ.get("PYTEST_XDIST_WORKER_COUNT"):  # before torch loads: workers share the cores, and so
    # do the subprocesses their tests start (each inherits this); two torch pools per core fight
    _workers = int(os.environ["PYTEST_XDIST_WORKER_COUNT"])
    os.environ["OMP_NUM_THREADS"] = str(max(1, (os.cpu_count() or 1) // _workers))

import socket  # noqa: E402
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from gateskip_core import GatedModel, GateSet, load_model

TINY = ["tiny-llama", "tiny-gemma3"]
PROMPTS = [
    "The quick brown fox jumps over the lazy dog, again and again.",
    "Gates decide which tokens skip which layers.",
    "Short one.",
]


# The heavy tier: the slowest end-to-end tests (a minute or more each on 2 cores, or a server, a browser or
# dozens of subprocesses), marked `heavy` and left out
# of `pytest -q` (pyproject's addopts); `.ci/run` runs them after it with `pytest -q -m heavy`.
# By file, the test functions (every parametrisation), or "*" for the whole file.
HEAVY = {
    "test_dashboard_load.py": {"test_four_sessions_at_once_stay_apart_and_memory_stays_bounded"},
    "test_bad_inputs.py": {"test_a_real_subprocess_per_command_and_kind_of_error_prints_exactly_one_line"},
    "test_notebooks.py": {"test_notebook_outputs_are_what_the_code_produces_now"},
    "test_bench.py": {"test_bench_runs_every_section_on_a_tiny_configuration"},
    "test_browser.py": {"*"},
    "test_docs.py": {"test_every_command_shown_runs_as_written"},
    "test_analysis.py": {"test_analysis_cli_round_trip"},
    "test_generated_calibration.py": {
        "test_smollm2_calibrated_skip_rate_never_falls_as_the_budget_rises",
        "test_smollm2_generated_tokens_keep_the_budget_and_prompt_tokens_their_rate",
        "test_smollm2_stored_threshold_sets_are_what_a_fit_on_the_recorded_texts_gives",
    },
    "test_eval_extras.py": {"test_lm_evals_own_command_line_runs_the_gateskip_model"},
    "test_dataset.py": {
        "test_other_settings_foreign_and_damaged_shards_are_refused_with_one_line",
        "test_query_cli_writes_sql_and_ready_made_results",
        "test_a_collect_killed_mid_run_resumes_to_the_uninterrupted_dataset",
        "test_two_gloo_processes_under_accelerate_launch_collect_the_one_process_dataset",
    },
}


def pytest_collection_modifyitems(config, items):
    for item in items:
        names = HEAVY.get(item.path.name, ())
        if "*" in names or item.originalname in names:
            item.add_marker(pytest.mark.heavy)


def spread_gates(model: GatedModel, variant: str = "vector", seed: int = 0) -> GatedModel:
    """Attach gates with widely spread values, so rankings are not all ties."""
    from gateskip_core.gating.gates import parse_gate_variant

    torch.manual_seed(seed)
    kind, rank = parse_gate_variant(variant)
    gates = GateSet(model.spec.n_layers, model.spec.d_model, kind, rank=rank)
    with torch.no_grad():
        for p in gates.parameters():
            p.normal_(0, 0.3)
    for p in gates.parameters():
        p.requires_grad_(False)
    model.attach_gates(gates, "test")
    return model


def accelerate_launch(n_processes: int) -> list[str]:
    """`accelerate launch` of `python -m gateskip` with N CPU processes (gloo; run it with CUDA_VISIBLE_DEVICES=""),
    through this interpreter (`python -m accelerate.commands.launch`), so a virtual environment that is
    not activated runs its own accelerate, not whichever is first on PATH."""
    return [
        sys.executable,
        "-m",
        "accelerate.commands.launch",
        "--multi_gpu",
        "--num_processes",
        str(n_processes),
        "--num_machines",
        "1",
        "--mixed_precision",
        "no",
        "--dynamo_backend",
        "no",
        "-m",
        "gateskip",
    ]


def run_cli(*args, cwd=None) -> subprocess.CompletedProcess:
    """`gateskip ARGS...` in a subprocess, as a user runs it."""
    return subprocess.run([sys.executable, "-m", "gateskip", *args], capture_output=True, text=True, cwd=cwd)


def flop_counter_dense(model: GatedModel, ids: torch.Tensor) -> int:
    """FLOPs torch's FlopCounterMode counts for the original model (eager attention: sdpa is not counted on CPU)."""
    model.backbone.config._attn_implementation = "eager"
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        model.backbone(input_ids=ids)
    return counter.get_total_flops()


ROOT_DIR = Path(__file__).resolve().parent.parent
APP = str(ROOT_DIR / "dashboard" / "app.py")


@pytest.fixture
def app(monkeypatch):
    """The dashboard opened on the tiny random Llama, first run done without an exception."""
    from streamlit.testing.v1 import AppTest

    monkeypatch.setenv("GATESKIP_DASHBOARD_MODEL", "tiny-llama")
    at = AppTest.from_file(APP, default_timeout=120)
    at.run()
    assert not at.exception, at.exception
    return at


def metrics(at) -> dict[str, str]:
    """The dashboard's metric tiles (label -> shown value) in a Streamlit AppTest."""
    return {m.label: m.value for m in at.metric}


ACCELERATORS = ["cuda"] if torch.cuda.is_available() else []  # compared with the CPU


@pytest.fixture(params=TINY)
def tiny(request) -> GatedModel:
    return spread_gates(load_model(request.param))


@pytest.fixture
def tiny_llama() -> GatedModel:
    return spread_gates(load_model("tiny-llama"))


@pytest.fixture(scope="session")
def smollm2() -> GatedModel:
    return load_model("smollm2-135m-instruct", gates="untrained")


@pytest.fixture(autouse=True)
def _single_thread_determinism():
    torch.set_num_threads(max(1, min(int(os.environ.get("OMP_NUM_THREADS", 2)), os.cpu_count() or 1)))
    yield


@dataclass(frozen=True)
class Server:
    url: str
    pid: int
    log: Path  # the server's stdout and stderr (a file, not a pipe nobody reads: a full pipe blocks the server)

    def log_tail(self, chars: int = 3000) -> str:
        return self.log.read_text(errors="replace")[-chars:]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def server(tmp_path):
    port = free_port()
    env = dict(os.environ, GATESKIP_DASHBOARD_MODEL="tiny-llama", GATESKIP_DASHBOARD_DATA=str(tmp_path / "data"))
    log = tmp_path / "server.log"
    log_file = log.open("wb")
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "streamlit",
            "run",
            str(ROOT_DIR / "dashboard" / "app.py"),
            "--server.port",
            str(port),
            "--server.address",
            "127.0.0.1",
            "--server.headless",
            "true",
            "--browser.gatherUsageStats",
            "false",
        ],
        env=env,
        stdout=log_file,
        stderr=subprocess.STDOUT,
    )
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + 90
    while time.time() < deadline:
        try:
            urllib.request.urlopen(url + "/_stcore/health", timeout=2)
            break
        except OSError:
            time.sleep(0.5)
    else:
        proc.kill()
        log_file.close()
        pytest.fail("streamlit server did not start: " + log.read_text(errors="replace")[-2000:])
    server = Server(url, proc.pid, log)
    yield server
    print("server log (tail):\n" + server.log_tail())  # pytest shows it when the test failed
    proc.terminate()
    proc.wait(timeout=20)
    log_file.close()


def assert_lens_matches_the_walk(lens, text: str, logits_atol: float = 1e-4, **skip_args):
    """`GatedLens` against the gated walk on one text: every decision, the gate vectors (1e-4) and
    the logits (`logits_atol`). Returns (cache, the walk's forward result with hidden states)."""
    from analysis.experiments.lens import cache_to_arrays
    from gateskip_core import Capture

    model = lens.model
    logits, cache = lens.run_with_cache(text, **skip_args)
    seq = model.trace(text, gate_vectors=True, **skip_args).sequences[0]
    got = cache_to_arrays(cache, model.spec.n_layers)
    assert np.array_equal(got["skipped"], seq.skipped) and seq.skipped.any()
    np.testing.assert_allclose(got["gate_vectors"], seq.gate_vectors, atol=1e-4)
    batch = model.encode([text])
    ours = model.forward(
        batch.input_ids, batch.attention_mask, model.make_plan(**skip_args), capture=Capture(hidden_states=True)
    )
    torch.testing.assert_close(logits, ours.logits, atol=logits_atol, rtol=1e-4)
    return cache, ours


def load_script(name: str):
    """scripts/NAME.py as a module (scripts/ is not a package)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location(
        name, Path(__file__).resolve().parent.parent / "scripts" / f"{name}.py"
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
