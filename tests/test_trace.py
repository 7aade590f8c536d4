"""Traces: DataFrame layout, CSV/Parquet round trips, bad files."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from gateskip_core import GateSkipError, read_trace
from gateskip_core.traces.trace import TRACE_COLUMNS

TRICKY = ['He said, "no",\nthen left;  NaN null None -inf', "  spaces  and\ttabs, émoji 🙂"]


def assert_traces_equal(a, b):
    assert (a.model, a.gates, a.policy, a.path, a.kv, a.protect_bos, a.branches, a.adapter_scope) == (
        b.model,
        b.gates,
        b.policy,
        b.path,
        b.kv,
        b.protect_bos,
        b.branches,
        b.adapter_scope,
    )
    np.testing.assert_array_equal(a.skip_budget, b.skip_budget)
    assert len(a.sequences) == len(b.sequences)
    for x, y in zip(a.sequences, b.sequences):
        assert x.tokens == y.tokens
        np.testing.assert_array_equal(x.token_ids, y.token_ids)
        np.testing.assert_array_equal(x.gate, y.gate)
        np.testing.assert_array_equal(x.threshold, y.threshold)
        np.testing.assert_array_equal(x.skipped, y.skipped)
        np.testing.assert_array_equal(x.gate_applied, y.gate_applied)
        np.testing.assert_array_equal(x.eligible, y.eligible)
        assert x.compute == y.compute and x.prompt_length == y.prompt_length


def test_dataframe_has_one_row_per_sequence_position_layer_branch(tiny):
    trace = tiny.trace(TRICKY, skip=0.3)
    df = trace.to_dataframe()
    assert list(df.columns) == TRACE_COLUMNS
    n_tokens = sum(s.n_tokens for s in trace.sequences)
    assert len(df) == n_tokens * tiny.spec.n_layers * 2
    assert set(df["branch"]) == {"attn", "mlp"} and set(df["skipped"]) == {0, 1}
    assert df.groupby("sequence_id")["position"].max().tolist() == [s.n_tokens - 1 for s in trace.sequences]


@pytest.mark.parametrize("suffix", [".csv", ".parquet"])
@pytest.mark.parametrize("policy", ["quantile", "random"])
def test_round_trip_is_lossless(tiny, tmp_path, suffix, policy):
    trace = tiny.trace(TRICKY, skip=[0.0, 0.2, 0.4, 0.6], policy=policy, branches="attn,mlp")
    path = trace.save(tmp_path / f"trace{suffix}")
    back = read_trace(path)
    assert_traces_equal(trace, back)
    pd.testing.assert_frame_equal(trace.to_dataframe(), back.to_dataframe(), check_dtype=False)


def test_generation_trace_round_trips(tiny, tmp_path):
    gen = tiny.generate("Once", max_new_tokens=5, skip=0.3, stop_at_eos=False)
    back = read_trace(gen.trace.to_csv(tmp_path / "g.csv"))
    assert_traces_equal(gen.trace, back)
    assert back.sequences[0].prompt_length == gen.trace.sequences[0].prompt_length < back.sequences[0].n_tokens


def test_bad_trace_files_fail_with_one_line(tmp_path):
    (tmp_path / "other.csv").write_text("a,b\n1,2\n")
    (tmp_path / "junk.parquet").write_bytes(b"not parquet at all")
    for path, match in [
        (tmp_path / "other.csv", "missing columns"),
        (tmp_path / "junk.parquet", "cannot read trace"),
        (tmp_path / "absent.csv", "not found"),
        (tmp_path / "other.txt", "not found"),
    ]:
        with pytest.raises(GateSkipError, match=match) as err:
            read_trace(path)
        assert "\n" not in str(err.value)


def test_notebook_rendering_and_summary(tiny):
    trace = tiny.trace(TRICKY[0], skip=0.5)
    html = trace._repr_html_()
    assert "skipped" in html and "&quot;" in html and "<script" not in html
    assert "net FLOPs saved" in trace.summary()


def test_full_gate_vectors_on_request(tiny):
    trace = tiny.trace("Gate vectors, please.", skip=0.2, gate_vectors=True)
    seq = trace.sequences[0]
    assert seq.gate_vectors.shape == (seq.n_tokens, tiny.spec.n_layers, 2, tiny.spec.d_model)
    np.testing.assert_allclose(seq.gate_vectors.mean(-1), seq.gate, rtol=1e-5, atol=1e-6)
    assert tiny.trace("Gate vectors, please.").sequences[0].gate_vectors is None
