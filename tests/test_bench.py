"""`gateskip bench` runs every section on a tiny configuration (figures printed, never asserted on)."""

from __future__ import annotations

import json

import numpy as np
import pytest

from gateskip_core import GateSkipError, load_model
from gateskip_core.traces.compute import LayerCosts, decode_step_bytes

from .conftest import run_cli


def test_bench_runs_every_section_on_a_tiny_configuration(tmp_path):
    out = tmp_path / "bench.json"
    result = run_cli(
        "bench",
        "--model", "tiny-llama",
        "--gates", "untrained:lowrank:4",
        "--variants", "untrained:lowrank:4,untrained:scalar", "--decode-variants", "",
        "--memory-variants", "untrained:scalar",
        "--prefill-tokens", "16", "--prefill-skips", "0,0.5", "--prefill-batches", "1,2",
        "--decode-prompt", "16", "--new-tokens", "4", "--decode-skips", "0.5", "--decode-batches", "1,2",
        "--chat-new-tokens", "3",
        "--collect-tokens", "200,400", "--dashboard-tokens", "16", "--repeats", "1", "--decode-repeats", "1",
        "--corpus-collect-tokens", "300", "--corpus-query-tokens", "1500",
        "--out", str(out),
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    data = json.loads(out.read_text())
    for section in ["prefill", "decode", "memory", "capture", "collect", "dashboard", "rates", "corpus"]:
        assert data[section], section
        assert f"[{section}]" in result.stdout
    assert data["machine"]["torch_threads"] >= 1
    assert [r["gates"] for r in data["memory"]] == ["none", "untrained:scalar"] and data["memory"][1]["peak_rss_mb"] > 0
    prefill = data["prefill"]
    # batch 1: 2 variants x 2 skips x 2 paths; batch 2: the first variant only; each paired with dense
    assert len(prefill) == 8 + 4
    assert all(r["predicted_speedup"] > 0 and r["median_s"] > 0 and r["dense_tokens_per_s"] > 0 for r in prefill)
    decode = data["decode"]
    assert [r["method"] for r in decode if r["batch"] == 1][:2] == ["hf-generate", "dense-walk"]
    skipping = [r for r in decode if r["skip"] == 0.5]
    # prose at batch 1 and 2, then the chat setting (a chat answer at batch 1)
    assert [(r["setting"], r["batch"]) for r in skipping] == [("prose", 1), ("prose", 2), ("chat", 1)] and all(
        0 < r["reached_skip_rate"] <= 1 and r["predicted_speedup_bytes"] > 0 for r in skipping
    )
    assert skipping[0]["batch"] == 1 and skipping[0]["predicted_speedup_bytes"] > 1  # one token: every skip saves reads
    assert [r["tokens"] > 0 for r in data["collect"]] == [True, True]
    assert {r["domain"] for r in data["rates"]} == {"prose", "chat", "code"}
    assert {r["mode"] for r in data["dashboard"]} == {"estimate", "exact"}
    corpus = {r["measure"]: r for r in data["corpus"]}
    assert corpus["collect, 1 process(es)"]["tokens"] == corpus["collect, 2 process(es)"]["tokens"] > 0
    assert corpus["query contexts"]["tokens"] >= 1500 and corpus["query tokens"]["peak_rss_mb"] > 0

    # The README's tables render from the JSON; a second file's rows of a section are listed too.
    from gateskip.bench.report import main, markdown, merge

    table = markdown(merge([out]))
    assert table.count("| prose | 1 | gated untrained:lowrank:4 | 0.5 |") == 1
    assert table.count("| prose | 2 | gated untrained:lowrank:4 | 0.5 |") == 1
    assert table.count("| chat | 1 | gated untrained:lowrank:4 | 0.5 |") == 1
    assert table.count("`collect`") == 2 and "reached on prose / code / chat" in table
    assert "| contexts |" in table and "2 process(es)" in table
    extra = tmp_path / "collect.json"
    extra.write_text(json.dumps({"collect": data["collect"][:1]}))
    assert markdown(merge([out, extra])).count("`collect`") == 3
    broken = tmp_path / "broken.json"
    broken.write_text("{")
    assert main([str(broken)]) == 2


def test_bench_refuses_bad_options_before_loading():
    for args in (
        ["--sections", "prefill,nope"],
        ["--prefill-skips", "0,2"],
        ["--repeats", "0"],
        ["--decode-batches", "x"],
    ):
        result = run_cli("bench", "--model", "tiny-llama", *args)
        assert result.returncode == 2 and len(result.stderr.strip().splitlines()) == 1, (args, result.stderr)


def test_bytes_read_model_counts_the_weights_a_decoding_step_touches():
    spec = load_model("tiny-llama").spec
    costs = LayerCosts.of(spec)
    L = spec.n_layers
    dense = decode_step_bytes(spec, np.ones((L, 2), bool), context=10, batch=1)
    no_mlp = decode_step_bytes(spec, np.tile([True, False], (L, 1)), context=10, batch=1)
    assert dense - no_mlp == L * costs.mlp / 2 * 4  # float32 MLP weights of every layer
    nothing = decode_step_bytes(spec, np.zeros((L, 2), bool), context=10, batch=1)
    assert nothing == 4 * (L * costs.kv / 2 + costs.lm_head / 2 + spec.d_model)  # k/v projections, head, embedding
    with_gates = decode_step_bytes(spec, np.zeros((L, 2), bool), 10, 1, gate_params=(100, 100))
    assert with_gates - nothing == 4 * L * 200


def test_cpu_clock_leaves_out_time_the_process_does_not_run(monkeypatch):
    """`--clock cpu`: a timing that waits (another process holding the core) counts only this process's work."""
    import time

    from gateskip.bench import clock as clock_module
    from gateskip.bench.suite import BenchConfig, run

    monkeypatch.setattr(clock_module, "CPU_TIME", True)
    start = clock_module.clock()
    time.sleep(0.3)
    assert clock_module.clock() - start < 0.1
    monkeypatch.setattr(clock_module, "CPU_TIME", False)
    start = clock_module.clock()
    time.sleep(0.3)
    assert clock_module.clock() - start >= 0.3
    with pytest.raises(GateSkipError, match="--clock"):
        run(BenchConfig(model="tiny-llama", clock="cpu", device="cuda", sections=("decode",)))
