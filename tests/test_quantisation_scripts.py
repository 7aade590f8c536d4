"""scripts/quantisation_quality.py's gate shift (how int4 weights move the gates and their decisions),
on the tiny random model: zero against itself, non-zero against its int4 backbone, and the shift-only
mode that writes no quality table."""

from __future__ import annotations

import pandas as pd
import pytest

from analysis.experiments.quality import evaluation_blocks
from gateskip_core import load_model

from .conftest import load_script, spread_gates


@pytest.fixture(scope="module")
def script():
    return load_script("quantisation_quality")


def spread(weights: str):
    return spread_gates(load_model("tiny-llama", weights=weights))  # same seed: the same gates on both


def test_the_gate_shift_is_zero_against_itself_and_not_against_int4(script):
    fp32, int4 = spread("fp32"), spread("int4")
    blocks = evaluation_blocks(fp32, n_blocks=2, seq_len=32)
    same = script.gate_shift(fp32, fp32, blocks, [0.5])
    assert len(same) == 2 * fp32.spec.n_layers
    assert (same.mean_abs_shift == 0).all() and (same["flipped_at_0.5"] == 0).all()
    moved = script.gate_shift(fp32, int4, blocks, [0.5])
    # layer 0's attention gate reads the embeddings, which stay float; every later gate reads int4 outputs
    first = (moved.layer == 0) & (moved.branch == "attn")
    assert (moved.mean_abs_shift[first] == 0).all() and (moved.mean_abs_shift[~first] > 0).all()
    assert moved["flipped_at_0.5"].max() > 0
    assert (moved.mean_abs_shift >= moved.mean_shift.abs()).all()


def test_shift_only_writes_the_shift_and_loads_no_int8(script, tmp_path, monkeypatch):
    loaded = []
    monkeypatch.setattr(script, "load_model", lambda name, gates, weights: loaded.append(weights) or spread(weights))
    shift = tmp_path / "shift.csv"
    assert script.main(["--model", "tiny-llama", "--blocks", "1", "--budgets", "0,0.5", "--shift-out", str(shift)]) == 0
    assert loaded == ["fp32", "int4"]
    table = pd.read_csv(shift)
    assert list(table.columns[-2:]) == ["tokens", "flipped_at_0.5"] and (table.model == "tiny-llama").all()


def test_nothing_to_write_is_refused(script, capsys):
    with pytest.raises(SystemExit) as refused:
        script.main(["--model", "tiny-llama"])
    assert refused.value.code == 2
    assert "nothing to write" in capsys.readouterr().err
