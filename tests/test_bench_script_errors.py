"""The standalone bench scripts (gateskip/bench/load_times.py, physical_speedup.py) report bad input
as one line and exit 2, before any loading or timing, like every `gateskip` command."""

from __future__ import annotations

import sys

import pytest

from gateskip.bench import load_times, physical_speedup
from gateskip_core.backbone.registry import CACHE_ENV
from gateskip_core.cli import run_script

CASES = [
    (load_times, ["--models", "no-such-model"], "unknown model 'no-such-model'"),
    (load_times, ["--models", "tiny-llama", "--out", "times.txt"], "--out must end in .json, got 'times.txt'"),
    (physical_speedup, ["--model", "tiny-llama", "--budgets", "0,x"], "--budgets: budgets must be comma-separated"),
    (physical_speedup, ["--model", "tiny-llama", "--budgets", "0,1.5"], "--budgets: budgets must lie in [0, 1]"),
    (physical_speedup, ["--model", "tiny-llama", "--gates", "no-such.safetensors"], "gate checkpoint not found"),
    (
        physical_speedup,
        ["--model", "tiny-llama", "--out", "missing/speedup.json"],
        "--out: folder missing does not exist",
    ),
]


@pytest.mark.parametrize(
    "script,argv,message", CASES, ids=[f"{c[0].__name__.split('.')[-1]}:{c[1][-1]}" for c in CASES]
)
def test_bad_input_is_one_line_and_exit_2(script, argv, message, monkeypatch, tmp_path, capsys):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv(CACHE_ENV, str(tmp_path / "cache"))
    monkeypatch.setattr(sys, "argv", [script.__file__, *argv])
    try:
        status = run_script(script.main)
    except SystemExit as exit_:  # argument errors leave through argparse
        status = exit_.code
    err = capsys.readouterr().err.strip().splitlines()
    assert status == 2
    assert len(err) == 1 and err[0].startswith("gateskip: error: ") and message in err[0], err
    assert list(tmp_path.iterdir()) in ([], [tmp_path / "cache"])  # nothing written
