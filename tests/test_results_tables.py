"""scripts/results_tables.py (docs/results.md): what it prints from the CSVs it names."""

from __future__ import annotations

import pandas as pd
import pytest

from .conftest import load_script


@pytest.fixture
def tables(tmp_path, monkeypatch):
    module = load_script("results_tables")
    monkeypatch.setattr(module, "DOCS", tmp_path)
    return module


def _flow_files(folder, bos_gate: float, others_gate: float, cells: str = "applied") -> None:
    rows = [
        {
            "layer": layer,
            "branch": branch,
            "gate_cells": cells,
            "gate_n": 10,
            "gate_mean": 0.9,
            "gate_p5": 0.5,
            "gate_p95": 0.9,
        }
        for layer in range(3)
        for branch in ("attn", "mlp")
    ]
    pd.DataFrame(rows).to_csv(folder / "layer_stats.csv", index=False)
    bos = [{"layer": r["layer"], "branch": r["branch"], "bos_gate": bos_gate, "others_gate": others_gate} for r in rows]
    pd.DataFrame(bos).assign(ratio=bos_gate / others_gate).to_csv(folder / "bos.csv", index=False)
    types = [{"token_type": "content", "layer": r["layer"], "branch": r["branch"], "gate_mean": 0.9} for r in rows]
    pd.DataFrame(types).to_csv(folder / "token_types.csv", index=False)


def test_bos_of_two_saturated_gates_is_a_difference_not_a_ratio(tables, tmp_path):
    _flow_files(tmp_path, bos_gate=1.0, others_gate=1.2e-10)  # Gemma's layer 0 attention: ratio 8e9
    text = tables.flow()
    assert "BOS gate minus the other tokens' mean gate: +1.00 to +1.00 over 6 branches" in text
    assert "e+" not in text and "8333" not in text
    assert "cells where the gate scaled the branch" in text


def test_bos_that_never_acted_is_said_so(tables, tmp_path):
    _flow_files(tmp_path, bos_gate=float("nan"), others_gate=float("nan"))
    assert "BOS's gate never scaled a branch" in tables.flow()


def test_a_tie_broken_unsettled_row_is_not_printed(tables, tmp_path):
    columns = ["signal", "spearman_within", "spearman_pooled", "harm_of_skipped", "vs_random", "vs_oracle"]
    pd.DataFrame(
        [["gate", 0.1, 0.0, 42.0, 0.57, 3.6], ["unsettled", 0.3, 0.3, 83.2, 1.126, 7.0]], columns=columns
    ).to_csv(tmp_path / "old.csv", index=False)
    text = tables.faithfulness("old.csv")
    assert "1.126" not in text and "0.57" in text
    with_intervals = pd.read_csv(tmp_path / "old.csv")
    for column in ("spearman_within", "vs_random", "vs_oracle"):
        with_intervals[f"{column}_low"], with_intervals[f"{column}_high"] = (
            with_intervals[column] - 0.1,
            with_intervals[column] + 0.1,
        )
    with_intervals.to_csv(tmp_path / "new.csv", index=False)
    assert "1.13 [1.03, 1.23]" in tables.faithfulness("new.csv")  # tie-averaged files print every row
