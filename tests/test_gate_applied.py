"""`gate_applied`: a trace marks exactly the cells whose gate scaled the branch, checked causally
against the walk (perturbing one branch's gate moves a token's residual iff the trace says the
gate acted there), in both adapter scopes and on both paths; it round-trips through every format."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch

from analysis.traces.tracedb import TraceDB
from gateskip_core import Capture, Forced, load_model, read_trace
from gateskip_core.traces.trace import applied_gates

IDS = torch.tensor([[1, 5, 9, 33, 7, 2, 11, 40, 3, 17]])
# Forced skips (layer, branch, position): decisions fixed whatever the gate values, so a perturbed gate
# can change only what the gate scales, never which token skips.
FORCED = [(0, "mlp", 3), (1, "attn", 5), (1, "mlp", 2), (1, "mlp", 7), (2, "attn", 8)]


def _forward(model, scope, path):
    plan = model.make_plan(
        0.0, adapter_scope=scope, path=path, forced=[Forced(layer, branch, t, skip=True) for layer, branch, t in FORCED]
    )
    out = model.forward(IDS, torch.ones_like(IDS), plan, capture=Capture(hidden_states=True))
    return plan, out


@pytest.mark.parametrize("path", ["masked", "physical"])
@pytest.mark.parametrize("scope", ["skipped", "all"])
def test_gate_applied_marks_exactly_the_cells_whose_gate_moves_the_residual(tiny_llama, scope, path):
    model = tiny_llama
    plan, base = _forward(model, scope, path)
    skipped = base.skipped[0].numpy()
    expected = applied_gates(skipped, scope)
    trace = model.make_trace(model.sequence_traces(IDS, torch.ones_like(IDS), base, plan), plan)
    np.testing.assert_array_equal(trace.sequences[0].gate_applied, expected)
    assert trace.adapter_scope == scope
    for layer in range(model.spec.n_layers):
        for b, branch in enumerate(("attn", "mlp")):
            gate = model.gates.gate(layer, branch)
            bias = gate.net[-1].bias if isinstance(gate.net, torch.nn.Sequential) else gate.net.bias
            with torch.no_grad():
                bias.add_(1.5)
            try:
                _, moved = _forward(model, scope, path)
            finally:
                with torch.no_grad():
                    bias.sub_(1.5)
            # The residual leaving this layer changes for token t iff its gate scaled this branch.
            changed = (moved.hidden_states[layer + 1][0] - base.hidden_states[layer + 1][0]).abs().amax(-1) > 1e-6
            np.testing.assert_array_equal(changed.numpy(), expected[:, layer, b], err_msg=f"{layer} {branch}")
    if scope == "skipped":  # a token that never skipped is the original model: no gate of it acts
        never = ~skipped.any(axis=(1, 2))
        assert never.any() and not expected[never].any()
        assert expected.any()  # and tokens after their first skip do have scaling gates
    else:
        np.testing.assert_array_equal(expected, ~skipped)


def test_no_gates_means_no_gate_applied():
    trace = load_model("tiny-llama").trace("Short one, and another.", skip=0.3, policy="random")
    assert not trace.has_gates and not any(s.gate_applied.any() for s in trace.sequences)


@pytest.mark.parametrize("suffix", [".csv", ".parquet"])
def test_gate_applied_round_trips_and_old_files_derive_it(tiny_llama, tmp_path, suffix):
    model = tiny_llama
    trace = model.trace(["The cat sat on the mat.", "Gates decide."], skip=0.3, adapter_scope="skipped")
    assert trace.adapter_scope == "skipped" and 0 < trace.applied_fraction() < 1
    path = trace.save(tmp_path / f"t{suffix}")
    back = read_trace(path)
    assert back.adapter_scope == "skipped"
    for a, b in zip(trace.sequences, back.sequences):
        np.testing.assert_array_equal(a.gate_applied, b.gate_applied)
    # DuckDB reads the same column.
    db_applied = TraceDB(path).sql("SELECT sum(gate_applied) FROM traces").fetchall()[0][0]
    assert db_applied == sum(int(s.gate_applied.sum()) for s in trace.sequences)
    # A file written before the columns existed: both are derived, in pandas and in DuckDB alike.
    old = trace.to_dataframe().drop(columns=["gate_applied", "adapter_scope"])
    old_path = tmp_path / f"old{suffix}"
    old.to_csv(old_path, index=False) if suffix == ".csv" else old.to_parquet(old_path, index=False)
    derived = read_trace(old_path)
    assert derived.adapter_scope == "skipped"
    for a, b in zip(trace.sequences, derived.sequences):
        np.testing.assert_array_equal(a.gate_applied, b.gate_applied)
    rows = TraceDB(old_path).sql("SELECT sequence_id, position, layer, branch, gate_applied FROM traces").df()
    expected = trace.to_dataframe()[["sequence_id", "position", "layer", "branch", "gate_applied"]]
    merged = rows.merge(expected, on=["sequence_id", "position", "layer", "branch"], suffixes=("_db", ""))
    assert len(merged) == len(expected)
    assert (merged["gate_applied_db"].astype(int) == merged["gate_applied"].astype(int)).all()


def test_estimate_recomputes_gate_applied(tiny_llama):
    model = tiny_llama
    captured = model.trace("The cat sat on the mat and looked around.", skip=0.0, adapter_scope="skipped")
    assert not captured.sequences[0].gate_applied.any()  # budget 0, scope skipped: the original model
    estimate = model.estimate(captured, skip=0.4, adapter_scope="skipped")
    seq = estimate.sequences[0]
    np.testing.assert_array_equal(seq.gate_applied, applied_gates(seq.skipped, "skipped"))
    assert seq.gate_applied.any()
    frame = estimate.to_dataframe()
    assert isinstance(frame, pd.DataFrame) and frame["gate_applied"].sum() == seq.gate_applied.sum()
