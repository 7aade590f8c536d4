"""The `gateskip` command line: outputs and one-line errors."""

from __future__ import annotations

import pandas as pd
import pytest

from gateskip_core import GateCheckpoint, GateSet, save_gates
from gateskip_core.traces.trace import TRACE_COLUMNS

from .conftest import run_cli as run

REQUIRED = [
    "sequence_id",
    "position",
    "token_id",
    "token",
    "layer",
    "branch",
    "gate",
    "threshold",
    "skipped",
    "skip_budget",
    "policy",
]


def test_trace_from_file_writes_one_row_per_position_layer_branch(tmp_path):
    text = tmp_path / "in.txt"
    text.write_text("First paragraph, here.\n\n\nSecond one\nwith two lines.\n\n")
    out = tmp_path / "t.csv"
    res = run(
        "trace",
        "--model",
        "tiny-llama",
        "--gates",
        "untrained",
        "--skip",
        "0.25",
        "--file",
        str(text),
        "--out",
        str(out),
        "--path",
        "physical",
    )
    assert res.returncode == 0, res.stderr
    df = pd.read_csv(out, keep_default_na=False)
    assert set(REQUIRED) <= set(df.columns) and list(df.columns) == TRACE_COLUMNS
    assert sorted(df["sequence_id"].unique()) == [0, 1]
    assert set(df["branch"]) == {"attn", "mlp"} and set(df["skipped"]) == {0, 1}
    assert "net FLOPs saved" in res.stdout


def test_models_lists_registry():
    res = run("models")
    assert res.returncode == 0
    for name in ["smollm2-135m-instruct", "gemma3-270m", "tiny-llama", "tiny-gemma3"]:
        assert name in res.stdout


@pytest.fixture
def other_model_gates(tmp_path):
    gates = GateSet(7, 32, "scalar")
    ckpt = GateCheckpoint(
        gates=gates, model="other", fingerprint={"model_type": "llama", "n_layers": 7, "d_model": 32, "vocab_size": 10}
    )
    return save_gates(ckpt, tmp_path / "other.safetensors")


@pytest.mark.parametrize(
    "args, message",
    [
        (["--model", "no-such-model", "--text", "hi"], "unknown model"),
        (["--model", "tiny-llama", "--file", "/nonexistent/x.txt"], "file not found"),
        (["--model", "tiny-llama", "--skip", "1.5", "--text", "hi"], "skip budget must lie in [0, 1]"),
        (["--model", "tiny-llama", "--skip", "abc", "--text", "hi"], "skip budget must be a number"),
        (["--model", "tiny-llama", "--text", "   "], "text is empty"),
        (["--model", "tiny-llama", "--gates", "OTHER", "--text", "hi"], "was trained for other"),
        (["--model", "tiny-llama", "--text", "hi", "--skip", "0.3"], "ranks tokens by their gates"),
        (["--model", "tiny-llama", "--gates", "default", "--text", "hi"], "no trained gates 'default' ship"),
    ],
)
def test_user_errors_exit_nonzero_with_one_line(tmp_path, other_model_gates, args, message):
    args = [str(other_model_gates) if a == "OTHER" else a for a in args]
    res = run("trace", *args, "--out", str(tmp_path / "o.csv"))
    assert res.returncode == 2
    lines = [line for line in res.stderr.strip().splitlines() if line.strip()]
    assert len(lines) == 1 and message in lines[0], res.stderr
    assert "Traceback" not in res.stderr
    assert not (tmp_path / "o.csv").exists()


def test_empty_file_and_bad_output_suffix(tmp_path):
    empty = tmp_path / "empty.txt"
    empty.write_text("\n\n  \n")
    res = run("trace", "--model", "tiny-llama", "--file", str(empty), "--out", str(tmp_path / "o.csv"))
    assert res.returncode == 2 and "text is empty" in res.stderr
    res = run("trace", "--model", "tiny-llama", "--text", "hi", "--out", str(tmp_path / "o.json"))
    assert res.returncode == 2 and ".csv or .parquet" in res.stderr


def test_the_core_imports_nothing_from_the_packages_built_on_it():
    """gateskip_core is the bottom layer: no module of it imports analysis, dashboard, bench or gateskip."""
    import ast
    from pathlib import Path

    above = {"analysis", "dashboard", "bench", "gateskip"}
    core = Path(__file__).resolve().parent.parent / "gateskip_core"
    offenders = []
    for path in core.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            names = []
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names = [node.module]
            offenders += [f"{path.name}: {n}" for n in names if n.split(".")[0] in above]
    assert not offenders, offenders


def test_every_package_contributes_its_commands_to_one_entry_point():
    from gateskip.cli import build_parser

    commands = set(build_parser()._subparsers._group_actions[0].choices)
    assert {"models", "trace", "train", "fit-fill"} <= commands  # core
    assert {"quality", "sweep", "collect", "stats", "faithfulness", "settled"} <= commands  # analysis
    assert {"bench", "dashboard"} <= commands


def test_commands_print_the_notices_their_results_carry(tmp_path):
    """Truncation notices come back with each call's result and every command that produces them
    prints them: `trace`, and `collect` into a file and into a dataset folder."""
    text = tmp_path / "long.txt"
    text.write_text("A long paragraph about gates and layers that will not fit. " * 80 + "\n\nShort one.")
    out = run("trace", "--model", "tiny-llama", "--gates", "untrained", "--skip", "0.2", "--file", str(text),
              "--out", str(tmp_path / "t.csv"))  # fmt: skip
    assert out.returncode == 0, out.stderr
    assert "warning: text 0 truncated to its first 512 tokens" in out.stderr and "text 1" not in out.stderr
    for target in (str(tmp_path / "c.parquet"), str(tmp_path / "ds") + "/"):
        out = run("collect", "--model", "tiny-llama", "--gates", "untrained", "--skip", "0.2", "--file", str(text),
                      "--max-tokens", "16", "--out", target)  # fmt: skip
        assert out.returncode == 0, out.stderr
        assert "1 truncated to 16 tokens" in out.stdout or "warning: 1 text(s) truncated" in out.stderr, target
