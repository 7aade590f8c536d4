"""The command line as a new user meets it: `--help` with a line and a default per flag, one error
format for every mistake (argparse's included), inputs checked before the model loads, a mistyped
local model folder named as such, the sweep's unreached savings explained, `dashboard --gates`.

Everything runs in-process (`gateskip.cli.main`, the console script's code) on tiny models."""

from __future__ import annotations

import argparse
import signal

import pytest
from streamlit.testing.v1 import AppTest

from gateskip.cli import build_parser, main
from gateskip_core import GateCheckpoint, load_model, save_gates

from .conftest import APP

TEXT = "Gates decide which tokens skip which layers of the model."
ERROR = "gateskip: error: "


def _subparsers() -> dict[str, argparse.ArgumentParser]:
    parser = build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return dict(sub.choices)


def test_every_flag_of_every_command_has_a_help_line_and_shows_its_default():
    missing_help, missing_default = [], []
    for name, parser in _subparsers().items():
        formatter = parser._get_formatter()
        for action in parser._actions:
            if isinstance(action, argparse._HelpAction):
                continue
            flag = f"{name} {action.option_strings[0] if action.option_strings else action.dest}"
            if not (action.help and action.help.strip()):
                missing_help.append(flag)
            shown = formatter._get_help_string(action) or ""
            switch = isinstance(action, (argparse._StoreTrueAction, argparse._StoreFalseAction))
            if action.default is not None and not switch and "%(default)" not in shown:
                missing_default.append(flag)
    assert not missing_help, missing_help
    assert not missing_default, missing_default


def test_help_prints_the_defaults(capsys):
    with pytest.raises(SystemExit) as stop:
        main(["sweep", "--help"])
    assert stop.value.code == 0
    shown = " ".join(capsys.readouterr().out.split())  # argparse wraps lines
    assert "tokens per block (default: 128)" in shown
    assert "(default: [0.0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6])" in shown


def test_every_command_that_loads_a_model_takes_device_and_dtype():
    loads = {"trace", "train", "fit-fill", "collect", "sweep", "faithfulness", "quality", "chat-fidelity"}
    loads |= {"settled", "eval", "causal", "generate", "bench", "dashboard"}
    parsers = _subparsers()
    lacking = [n for n in sorted(loads) if not {"--device", "--dtype"} <= set(parsers[n]._option_string_actions)]
    assert not lacking, lacking


@pytest.fixture
def cli(capsys, monkeypatch):
    """`gateskip ARGV` in-process: (exit status, stderr lines); `run.loads` counts the backbones loaded."""
    import gateskip_core.model as model_module

    previous = signal.getsignal(signal.SIGTERM)
    real_loader = model_module.load_backbone

    def counting_loader(*args, **kwargs):
        run.loads += 1
        return real_loader(*args, **kwargs)

    monkeypatch.setattr(model_module, "load_backbone", counting_loader)

    def run(argv: list[str]) -> tuple[int, list[str]]:
        try:
            code = main(argv)
        except SystemExit as stop:
            code = stop.code
        return code, [line for line in capsys.readouterr().err.splitlines() if line.strip()]

    run.loads = 0
    yield run
    signal.signal(signal.SIGTERM, previous)


def _mistakes(tmp, gates_file):
    out = str(tmp / "t.csv")
    gates = str(tmp / "g.safetensors")
    trace = ["trace", "--model", "tiny-llama", "--text", TEXT, "--out", out]
    return [  # argv, what the one line says after "gateskip: error: "
        (["trcae"], "unknown command 'trcae'"),
        (["trace", "--model", "tiny-llama", "--text", TEXT], "the following arguments are required: --out"),
        ([*trace, "--policy", "best"], "--policy: invalid choice: 'best'"),
        ([*trace, "--skip", "lots"], "--skip: skip budget must be a number in [0, 1], got 'lots'"),
        (["fit-fill", "--fill", "mean", "--out", "g.safetensors", "--lowest", "most"], "--lowest must be a number"),
        (["dashboard", "--port", "eighty"], "--port must be a whole number, got 'eighty'"),
        (["train", "--out", "g.safetensors", "--steps", "1.5"], "--steps must be a whole number, got '1.5'"),
        (["trace", "--model", "tiny-llama", "--text", " ", "--out", out], "text is empty"),
        ([*trace, "--gates", str(tmp / "missing.safetensors")], "gate checkpoint not found"),
        ([*trace, "--gates", str(gates_file)], "not a valid safetensors gate checkpoint"),
        (["dashboard", "--gates", str(tmp / "missing.safetensors")], "gate checkpoint not found"),
        (["quality", "--gates", f"mine={tmp / 'missing.safetensors'}", "--out", out], "gate checkpoint not found"),
        (["trace", "--model", str(tmp / "no" / "qwen2"), "--text", TEXT, "--out", out], "does not exist"),
        (["dashboard", "--model", str(tmp / "no" / "qwen2")], "does not exist"),
        (["trace", "--model", "tiny-llama", "--device", "cuda:7", "--text", TEXT, "--out", out], "not available"),
        (["train", "--model", "tiny-llama", "--data", str(tmp / "corpus.txt"), "--out", gates], "file not found"),
        (
            ["train", "--model", "tiny-llama", "--init", str(tmp / "start.safetensors"), "--out", gates],
            "gate checkpoint not found",
        ),
        (["train", "--model", "tiny-llama", "--device", "cuda:7", "--out", gates], "not available"),
    ]


def test_every_mistake_is_one_line_in_one_format_before_any_model_loads(cli, tmp_path):
    damaged = tmp_path / "damaged.safetensors"
    damaged.write_bytes(b"\x00" * 64)
    for argv, message in _mistakes(tmp_path, damaged):
        code, lines = cli(argv)
        assert code == 2 and len(lines) == 1, (argv, lines)
        assert lines[0].startswith(ERROR) and message in lines[0], (argv, lines)
    assert cli.loads == 0, "a model was loaded before the error"


def test_a_missing_local_model_folder_reads_the_same_in_trace_and_dashboard(cli, tmp_path):
    folder = tmp_path / "checkpoints" / "qwen2-typo"
    (tmp_path / "checkpoints").mkdir()
    said = []
    for argv in (
        ["trace", "--model", str(folder), "--text", TEXT, "--out", "t.csv"],
        ["dashboard", "--model", str(folder)],
    ):
        code, lines = cli(argv)
        assert code == 2 and len(lines) == 1, lines
        said.append(lines[0])
    assert said[0] == said[1] == f"{ERROR}model folder {folder} does not exist"
    assert "Hugging Face" not in said[0]


def test_the_sweep_says_why_a_matched_row_is_empty(cli, capsys, tmp_path):
    out = tmp_path / "sweep.csv"
    argv = ["sweep", "--model", "tiny-llama", "--gates", "untrained", "--blocks", "1", "--seq-len", "16"]
    code = main([*argv, "--methods", "gateskip", "--budgets", "0,0.1", "--out", str(out)])
    printed = capsys.readouterr().out
    assert code == 0
    import pandas as pd

    saved = pd.read_csv(out)["flops_saved"]
    # untrained gates on a tiny model cost more than a 10% budget saves: no target is reached
    assert saved.max() < 0.1
    line = next(line for line in printed.splitlines() if line.startswith("NaN: gateskip"))
    assert f"{saved.min():.1%} to {saved.max():.1%}" in line and "10%, 20%, 30% lie outside" in line


def test_dashboard_opens_with_the_gates_given_on_the_command_line(monkeypatch, tmp_path):
    tiny = load_model("tiny-llama", gates="untrained:scalar")
    path = save_gates(
        GateCheckpoint(gates=tiny.gates, model=tiny.name, fingerprint=tiny.spec.fingerprint()),
        tmp_path / "mine.safetensors",
    )
    monkeypatch.setenv("GATESKIP_DASHBOARD_MODEL", "tiny-llama")
    monkeypatch.setenv("GATESKIP_DASHBOARD_GATES", str(path))
    app = AppTest.from_file(APP, default_timeout=120)
    app.run()
    assert not app.exception, app.exception
    gates = app.sidebar.selectbox(key="gates")
    assert gates.value == str(path) and str(path) in gates.options
    assert not app.sidebar.error


def test_training_reports_each_slow_phase_and_counts_it_in_the_last_line(capsys, tmp_path):
    out = tmp_path / "g.safetensors"
    argv = ["train", "--model", "tiny-llama", "--steps", "1", "--seq-len", "16", "--batch", "1", "--val-batches", "1"]
    assert main([*argv, "--allocation", "global", "--out", str(out)]) == 0
    lines = capsys.readouterr().err.splitlines()
    said = "\n".join(lines)
    assert "measuring the sensitivity of every (layer, branch)" in said and "measured the sensitivity in" in said
    assert "calibrated uniform thresholds" in said and "calibrated global thresholds" in said
    last = next(line for line in reversed(lines) if line.startswith("wrote "))
    assert "s measuring sensitivity" in last and "s calibrating and saving" in last and "s in all" in last
