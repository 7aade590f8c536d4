"""A trace records the backbone's weights (`--weights fp32|int8|int4`): the `weights` column and
`Trace.weights` come from the model that ran, survive CSV and Parquet and DuckDB, and a file written
before the column reads as 'unrecorded' (not guessed as fp32)."""

from __future__ import annotations

import pytest

from analysis.traces.tracedb import TraceDB
from gateskip_core import load_model
from gateskip_core.traces.trace import UNRECORDED_WEIGHTS, read_trace
from tests.conftest import spread_gates


@pytest.fixture(scope="module")
def int8_trace():
    model = spread_gates(load_model("tiny-llama", weights="int8"))
    return model.trace(["Which weights ran this trace?"], skip=0.3)


@pytest.mark.parametrize("suffix", [".csv", ".parquet"])
def test_the_weights_round_trip_through_files_and_duckdb(int8_trace, tmp_path, suffix):
    assert int8_trace.weights == "int8"
    assert int8_trace.to_dataframe()["weights"].eq("int8").all()
    path = int8_trace.save(tmp_path / f"t{suffix}")
    back = read_trace(path)
    assert back.weights == "int8"
    assert "| weights int8 |" in back.summary()
    db = TraceDB(path)
    assert db.con.execute("SELECT DISTINCT weights FROM traces").fetchall() == [("int8",)]


def test_a_float_model_records_fp32(tiny_llama):
    assert tiny_llama.trace(["A float backbone."], skip=0.0).weights == "fp32"


@pytest.mark.parametrize("suffix", [".csv", ".parquet"])
def test_a_file_written_before_the_column_reads_as_unrecorded(int8_trace, tmp_path, suffix):
    old = int8_trace.to_dataframe().drop(columns="weights")
    path = tmp_path / f"old{suffix}"
    old.to_csv(path, index=False) if suffix == ".csv" else old.to_parquet(path, index=False)
    assert read_trace(path).weights == UNRECORDED_WEIGHTS
    db = TraceDB(path)
    assert db.con.execute("SELECT DISTINCT weights FROM traces").fetchall() == [(UNRECORDED_WEIGHTS,)]


def test_the_dashboard_shows_the_weights_the_trace_ran_on(app):
    assert any(c.value.startswith("weights: fp32 · gates: ") for c in app.caption)
    app.sidebar.selectbox(key="weights").set_value("int8").run()
    assert not app.exception
    assert any(c.value.startswith("weights: int8 · gates: ") for c in app.caption)
