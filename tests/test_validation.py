"""Bad arguments to the Python API and numeric command-line options: one clear GateSkipError / exit 2."""

from __future__ import annotations

import math

import pytest

from gateskip_core import GateSkipError, load_model
from gateskip_core.training.loop import TrainConfig

from .conftest import run_cli


@pytest.fixture(scope="module")
def model():
    return load_model("tiny-llama", gates="untrained")


@pytest.mark.parametrize(
    "call, message",
    [
        (lambda m: m.trace(None), "text must be a str or a list of str, got NoneType"),
        (lambda m: m.trace(123), "text must be a str or a list of str, got int"),
        (lambda m: m.trace(b"hi"), "got bytes"),
        (lambda m: m.trace([1, 2]), "an item of type int"),
        (lambda m: m.trace([]), "an empty list"),
        (lambda m: m.trace("  "), "text is empty"),
        (lambda m: m.trace("hi", batch_size=0), "batch_size must be at least 1"),
        (lambda m: m.trace("hi", batch_size=-1), "batch_size must be at least 1"),
        (lambda m: m.trace("hi", max_tokens=-5), "max_tokens must be at least 1"),
        (lambda m: m.trace("hi", max_tokens=0), "max_tokens must be at least 1"),
        (lambda m: m.generate([]), "no prompt given"),
        (lambda m: m.generate(None), "prompt must be a str or a list of str"),
        (lambda m: m.generate("hi", max_new_tokens=2.5), "max_new_tokens must be a whole number"),
        (lambda m: m.generate("hi", max_new_tokens=0), "max_new_tokens must be at least 1"),
        (lambda m: m.generate("hi", do_sample=True, temperature=math.nan), "temperature must be a positive finite"),
        (lambda m: m.generate("hi", do_sample=True, top_k=0), "top_k must be at least 1"),
        (lambda m: m.generate("hi", do_sample=True, top_k=-1), "top_k must be at least 1"),
        (lambda m: m.generate("word " * 600, max_new_tokens=2), "fills the model's context"),
    ],
)
def test_api_argument_errors_are_one_line_gateskip_errors(model, call, message):
    with pytest.raises(GateSkipError) as err:
        call(model)
    assert message in str(err.value) and "\n" not in str(err.value)


def test_generation_keeps_the_prompt_and_caps_new_tokens_at_the_context(model):
    limit = model.max_context
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")  # notices come back with the result, never as process-wide warnings
        out = model.generate("hi", max_new_tokens=limit + 100, stop_at_eos=False, policy="quantile")
    assert len(out.trace.notices) == 1 and "runs past the model's context" in out.trace.notices[0]
    long = model.trace(["word " * (limit + 20), "short"])
    assert long.notices == (f"text 0 truncated to its first {limit} tokens",)
    assert "notice: text 0 truncated" in long.summary()
    seq = out.trace.sequences[0]
    assert seq.prompt_length == len(model.encode(["hi"]).input_ids[0])  # the prompt is kept whole
    assert seq.n_tokens <= limit


@pytest.mark.parametrize(
    "field, value, message",
    [
        ("lr", math.nan, "--lr must be a positive number"),
        ("adapter_lr", -1.0, "--adapter-lr must be a positive number"),
        ("checkpoint_every", 0, "--checkpoint-every must be at least 1"),
        ("val_every", 0, "--val-every must be at least 1"),
        ("seq_len", 0, "--seq-len must be at least 8"),
        ("skip_end", math.nan, "--skip-end must lie in [0, 1]"),
        ("adapter", "lora:0", "LoRA rank must be at least 1"),
        ("gate", "lowrank:x", "rank must be a whole number"),
    ],
)
def test_train_config_validation(field, value, message):
    with pytest.raises(GateSkipError, match=message.replace("[", r"\[").replace("]", r"\]")):
        TrainConfig(**{field: value}).validate()


@pytest.mark.parametrize(
    "args, message",
    [
        (
            ["collect", "--model", "tiny-llama", "--file", "x.txt", "--out", "o.csv", "--batch-size", "0"],
            "--batch-size must be at least 1",
        ),
        (
            ["collect", "--model", "tiny-llama", "--file", "x.txt", "--out", "o.csv", "--max-tokens", "-5"],
            "--max-tokens must be at least 1",
        ),
        (["sweep", "--model", "tiny-llama", "--out", "s.csv", "--seq-len", "1"], "--seq-len must be at least 2"),
        (["sweep", "--model", "tiny-llama", "--out", "s.csv", "--blocks", "0"], "--blocks must be at least 1"),
        (["quality", "--model", "tiny-llama", "--out", "q.csv", "--blocks", "0"], "--blocks must be at least 1"),
        (
            ["faithfulness", "--model", "tiny-llama", "--text", "hi", "--out", "f.csv", "--exact", "-1"],
            "--exact must be at least 1",
        ),
        (["train", "--model", "tiny-llama", "--out", "g.safetensors", "--lr", "nan"], "--lr must be a positive number"),
        (
            ["sweep", "--model", "tiny-llama", "--out", "/nonexistent-dir/s.csv"],
            "folder /nonexistent-dir does not exist",
        ),
        (["train", "--model", "tiny-llama", "--out", "/nonexistent-dir/g.safetensors"], "does not exist"),
    ],
)
def test_cli_numbers_and_output_folders_are_checked_before_any_work(tmp_path, args, message):
    res = run_cli(*args, cwd=tmp_path)
    lines = [line for line in res.stderr.strip().splitlines() if line.strip()]
    assert res.returncode == 2 and len(lines) == 1 and message in lines[0], res.stderr
    assert list(tmp_path.iterdir()) == []  # nothing written


def _damage(tmp_path, how: str):
    model = load_model("tiny-llama", gates="untrained")
    good = tmp_path / "good.csv"
    model.trace(["A first paragraph of a few words.", "And a second, longer paragraph of words."], skip=0.2).to_csv(
        good
    )
    lines = good.read_text().splitlines()
    bad = tmp_path / f"{how}.csv"
    if how == "header-only":
        bad.write_text(lines[0] + "\n")
    elif how == "non-numeric-gate":
        header = lines[0].split(",")
        row = lines[1].split(",")
        row[header.index("gate")] = "banana"
        bad.write_text("\n".join([lines[0], ",".join(row), *lines[2:]]) + "\n")
    elif how == "cut-at-token":  # drop the last token of the last sequence, every row of it
        L2 = model.spec.n_layers * 2
        bad.write_text("\n".join(lines[:-L2]) + "\n")
    return bad


@pytest.mark.parametrize(
    "how, message",
    [
        ("header-only", "holds no rows"),
        ("non-numeric-gate", "column 'gate' holds a non-number ('banana'"),
        ("cut-at-token", "trace is cut: sequence 1 has"),
    ],
)
def test_damaged_trace_files_are_refused_with_the_reason(tmp_path, how, message):
    from analysis.traces.dataset import iter_traces
    from gateskip_core import read_trace

    bad = _damage(tmp_path, how)
    with pytest.raises(GateSkipError, match=message.replace("(", r"\(")):
        read_trace(bad)
    with pytest.raises(GateSkipError, match=message.replace("(", r"\(")):
        list(iter_traces(bad))
    res = run_cli("stats", "--trace", str(bad), "--out", str(tmp_path / "s.csv"))
    lines = [line for line in res.stderr.strip().splitlines() if line.strip()]
    assert res.returncode == 2 and len(lines) == 1 and "Traceback" not in res.stderr, res.stderr
    assert not (tmp_path / "s.csv").exists()


def _gateskip(*args, cwd=None):
    import subprocess
    import sys

    return subprocess.Popen(
        [sys.executable, "-m", "gateskip", *args],
        cwd=cwd,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


@pytest.mark.parametrize("delay", [0.5, 0.8, 1.2, 1.6, 2.0, 3.0])
def test_ctrl_c_at_any_moment_prints_one_line_and_exits_130(delay, tmp_path):
    """Ctrl-C while torch imports (the CI machine hit it at 0.5 s: pybind11 aborted the process),
    while the model loads, or while the command runs: one line, exit status 130."""
    import signal
    import time

    out = tmp_path / "never.csv"
    proc = _gateskip("trace", "--model", "tiny-llama", "--text", "hi", "--out", str(out))
    time.sleep(delay)  # the command takes ~7 s on an idle 2-core machine
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    lines = [line for line in err.strip().splitlines() if line.strip()]
    # -SIGINT: Python ends a process that saw a KeyboardInterrupt escape a C extension's own
    # evaluation by killing itself with SIGINT after our message; a shell reports 130 for both.
    assert proc.returncode in (130, -signal.SIGINT) and lines == ["gateskip: interrupted"], err
    assert not out.exists()


def test_sigterm_during_collect_leaves_no_temporary_or_partial_file(tmp_path):
    import signal
    import time

    corpus = tmp_path / "corpus.txt"
    corpus.write_text(
        "\n\n".join(f"Paragraph {i} talks about gates, layers and tokens at length." for i in range(4000))
    )
    out = tmp_path / "traces.parquet"
    proc = _gateskip(
        "collect", "--model", "tiny-llama", "--gates", "untrained", "--file", str(corpus), "--out", str(out)
    )
    tmp = tmp_path / ".traces.parquet.tmp"
    deadline = time.time() + 120
    while not tmp.exists() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.05)
    assert tmp.exists(), "collect never started writing"
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130 and "interrupted" in err
    assert not tmp.exists() and not out.exists()
