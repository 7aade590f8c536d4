"""Every command and API entry point against one table of bad inputs.

CLI: exit status 2, exactly one line on stderr (no traceback, no progress bar), and no output
file left under its final name (nor a temporary); errors that can be known before a model is
loaded are raised before it (the loader is watched). API: a one-line `GateSkipError`.

The whole table runs in-process (`gateskip.cli.main`, the code the console script runs), which
is fast; one case of every (command, kind of error) pair also runs as a real `gateskip`
subprocess, two at a time, where everything a user sees on stderr (warnings, logging) counts.
"""

from __future__ import annotations

import math
import signal

import pytest
import torch

from gateskip.cli import main
from gateskip_core import GateCheckpoint, GateSet, GateSkipError, load_model, save_gates

TEXT = "Gates decide which tokens skip which layers of the model."
READ_ONLY = "/sys"  # a read-only file system: permissions do not stop root, this does


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    """Good and damaged input files, made once."""
    root = tmp_path_factory.mktemp("inputs")
    model = load_model("tiny-llama", gates="untrained")
    files = {}
    files["corpus"] = root / "corpus.txt"
    files["corpus"].write_text("\n\n".join([TEXT, "A second paragraph about layers."] * 20))
    files["trace"] = root / "trace.csv"
    model.trace([TEXT, "Another one."], skip=0.2).to_csv(files["trace"])
    files["binary"] = root / "binary.txt"
    files["binary"].write_bytes(bytes(range(256)) * 8)  # not UTF-8 text
    files["binary_csv"] = root / "binary.csv"
    files["binary_csv"].write_bytes(b"\x00\xff\xfe" * 500)
    good_gates = save_gates(
        GateCheckpoint(gates=model.gates, model="tiny-llama", fingerprint=model.spec.fingerprint()),
        root / "good.safetensors",
    )
    files["gates_truncated"] = root / "truncated.safetensors"
    files["gates_truncated"].write_bytes(good_gates.read_bytes()[: good_gates.stat().st_size // 2])
    files["gates_random"] = root / "random.safetensors"
    files["gates_random"].write_bytes(torch.randint(0, 255, (4096,), dtype=torch.uint8).numpy().tobytes())
    other = GateCheckpoint(
        gates=GateSet(7, 32, "scalar"),
        model="other",
        fingerprint={"model_type": "llama", "n_layers": 7, "d_model": 32, "vocab_size": 10},
    )
    files["gates_other"] = save_gates(other, root / "other.safetensors")
    from safetensors.torch import save_file

    files["gates_foreign"] = root / "foreign.safetensors"
    save_file({"weight": torch.zeros(3)}, str(files["gates_foreign"]))  # safetensors, but not gates
    files["gates_missing"] = root / "missing.safetensors"
    files["gates_good"] = good_gates
    return files


# command -> (arguments that work, {output option: file name})
def commands(f) -> dict[str, tuple[list[str], dict[str, str]]]:
    tiny = ["--model", "tiny-llama"]
    return {
        "trace": (["trace", *tiny, "--text", TEXT], {"--out": "t.csv"}),
        "collect": (["collect", *tiny, "--gates", "untrained", "--file", str(f["corpus"])], {"--out": "c.parquet"}),
        "stats": (
            ["stats", "--trace", str(f["trace"])],
            {"--out": "s.csv", "--bos-out": "b.csv", "--types-out": "ty.csv", "--tokens-out": "tk.csv"},
        ),
        "sweep": (
            ["sweep", *tiny, "--gates", "untrained", "--blocks", "1", "--seq-len", "16", "--methods", "gateskip"],
            {"--out": "sw.csv", "--figure": "sw.html", "--matched-out": "m.csv"},
        ),
        "quality": (
            ["quality", *tiny, "--gates", "u=untrained", "--blocks", "1", "--budgets", "0.2"],
            {"--out": "q.csv"},
        ),
        "faithfulness": (
            ["faithfulness", *tiny, "--gates", "untrained", "--text", TEXT, "--exact", "2"],
            {"--out": "f.csv", "--entries-out": "e.csv", "--figure": "f.html"},
        ),
        "train": (["train", *tiny, "--steps", "1", "--seq-len", "16", "--batch", "1"], {"--out": "g.safetensors"}),
        "settled": (
            ["settled", *tiny, "--gates", "untrained", "--blocks", "1", "--seq-len", "16"],
            {"--out": "st.csv", "--figure": "st.html"},
        ),
        "bench": (
            ["bench", *tiny, "--gates", "untrained", "--sections", "capture", "--prefill-tokens", "16"],
            {"--out": "b.json"},
        ),
        "fit-fill": (
            ["fit-fill", *tiny, "--gates", str(f["gates_good"]), "--fill", "mean", "--no-calibrate"],
            {"--out": "ff.safetensors"},
        ),
        "query": (["query", str(f["trace"]), "SELECT 1 AS one"], {"--out": "q.csv"}),
        "chat-fidelity": (
            ["chat-fidelity", *tiny, "--gates", "untrained", "--max-new-tokens", "2", "--budgets", "0"],
            {"--out": "cf.csv"},
        ),
        "generate": (
            ["generate", TEXT, *tiny, "--gates", "untrained", "--policy", "random", "--draft-skip", "0.5"],
            {"--out": "gen.csv"},
        ),
    }


# numeric options: command -> [(option, bad value, message)]
NUMBERS = {
    "trace": [
        ("--skip", "nan", "skip budget must lie in [0, 1]"),
        ("--skip", "-0.1", "skip budget must lie in [0, 1]"),
    ],
    "collect": [
        ("--batch-size", "0", "--batch-size must be at least 1"),
        ("--batch-size", "-1", "--batch-size must be at least 1"),
        ("--max-tokens", "-5", "--max-tokens must be at least 1"),
        ("--max-tokens", "nan", "--max-tokens must be a whole number"),
        ("--skip", "2", "skip budget must lie in [0, 1]"),
    ],
    "stats": [("--min-count", "0", "--min-count must be at least 1")],
    "query": [("--limit", "0", "--limit must be at least 1"), ("--layer", "-1", "--layer must be at least 0")],
    "sweep": [
        ("--seq-len", "1", "--seq-len must be at least 2"),
        ("--blocks", "0", "--blocks must be at least 1"),
        ("--budgets", "0.1,nan", "budgets must lie in [0, 1]"),
    ],
    "quality": [("--blocks", "0", "--blocks must be at least 1"), ("--budgets", "-1", "budgets must lie in [0, 1]")],
    "faithfulness": [
        ("--exact", "0", "--exact must be at least 1"),
        ("--max-tokens", "0", "--max-tokens must be at least 1"),
    ],
    "train": [
        ("--lr", "nan", "--lr must be a positive number"),
        ("--lr", "-1", "--lr must be a positive number"),
        ("--steps", "0", "--steps must be at least 1"),
        ("--checkpoint-every", "0", "--checkpoint-every must be at least 1"),
        ("--val-every", "0", "--val-every must be at least 1"),
        ("--seq-len", "4", "--seq-len must be at least 8"),
        ("--skip-end", "nan", "--skip-end must lie in [0, 1]"),
    ],
    "settled": [
        ("--blocks", "0", "--blocks must be at least 1"),
        ("--batch-size", "-1", "--batch-size must be at least 1"),
        ("--from-layer", "-1", "--from-layer must be at least 0"),
    ],
    "bench": [
        ("--repeats", "0", "--repeats must be at least 1"),
        ("--prefill-skips", "nan", "--prefill-skips must be"),
    ],
    "generate": [
        ("--max-new-tokens", "0", "--max-new-tokens must be at least 1"),
        ("--draft-skip", "1.5", "skip budget must lie in [0, 1]"),
        ("--draft-tokens", "0", "--draft-tokens must be at least 1"),
    ],
}
GATED = [
    "trace",
    "collect",
    "sweep",
    "faithfulness",
    "settled",
    "quality",
    "bench",
    "fit-fill",
    "chat-fidelity",
    "generate",
]
DAMAGED_GATES = {
    "gates_truncated": "not a valid safetensors gate checkpoint",
    "gates_random": "not a valid safetensors gate checkpoint",
    "gates_other": "was trained for other",
    "gates_foreign": "not a GateSkip gate checkpoint",
    "gates_missing": "not found",
}
TEXT_INPUTS = {  # command -> option reading a text file
    "trace": "--file",
    "collect": "--file",
    "sweep": "--file",
    "quality": "--file",
    "faithfulness": "--file",
    "settled": "--file",
    "train": "--data",
}
# Kinds of error that are known before any model is loaded (and must be reported before it).
BEFORE_LOADING = {"missing-folder", "read-only", "output-is-folder", "number"}


def _cases():
    f = {k: f"<{k}>" for k in ("corpus", "trace", "gates_good")}  # placeholders, resolved in the test
    cases = []
    for name, (_, outputs) in commands(f).items():
        for option in outputs:
            cases.append((name, "missing-folder", option, None, "does not exist"))
            cases.append((name, "read-only", option, None, "cannot write"))
            cases.append((name, "output-is-folder", option, None, "is a folder"))
        for option, value, message in NUMBERS.get(name, []):
            cases.append((name, "number", option, value, message))
    for name in GATED:
        for damage, message in DAMAGED_GATES.items():
            cases.append((name, "damaged-gates", "--gates", damage, message))
    for name, option in TEXT_INPUTS.items():
        cases.append((name, "non-text", option, "binary", "cannot read"))
    cases.append(("stats", "non-text", "--trace", "binary_csv", "trace"))
    cases.append(("train", "damaged-state", "--resume", "state_damaged", "cannot resume"))
    cases.append(("dashboard", "unknown-model", "--model", "no-such-model", "unknown model 'no-such-model'"))
    cases.append(("dashboard", "bad-host", "--host", "example.com", "--host must be an IP address"))
    cases.append(("dashboard", "bad-port", "--port", "70000", "--port must be a whole number in 1..65535"))
    cases.append(("dashboard", "data-dir-file", "--data-dir", "binary", "is not a folder"))
    return cases


def _ids(case):
    return "-".join(str(part) for part in case[:4] if part is not None)


@pytest.fixture
def cli(capsys, monkeypatch):
    """Runs `gateskip ARGV` in-process; `run.loads` counts the models it loaded."""
    import gateskip_core.model as model_module

    previous = signal.getsignal(signal.SIGTERM)
    monkeypatch.setenv("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    real_loader = model_module.load_backbone

    def counting_loader(*args, **kwargs):
        run.loads += 1
        return real_loader(*args, **kwargs)

    monkeypatch.setattr(model_module, "load_backbone", counting_loader)

    def run(argv) -> tuple[int, list[str], str]:
        try:
            code = main(argv)
        except SystemExit as exit_:
            code = exit_.code
        captured = capsys.readouterr()
        return code, [line for line in captured.err.splitlines() if line.strip()], captured.err

    run.loads = 0
    yield run
    signal.signal(signal.SIGTERM, previous)


def _with(argv: list[str], option: str, value: str) -> list[str]:
    argv = list(argv)
    if option in argv:
        argv[argv.index(option) + 1] = value
    else:
        argv += [option, value]
    return argv


def _argv(case, inputs, tmp_path) -> tuple[list[str], object]:
    """The command line of a case, and the folder its outputs go to."""
    name, kind, option, value, message = case
    if name == "dashboard":
        out_dir = tmp_path / "out"
        out_dir.mkdir()
        return ["dashboard", option, str(inputs[value]) if value in inputs else value], out_dir
    argv, outputs = commands(inputs)[name]
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    for out_option, file_name in outputs.items():
        if out_option == "--out" or (kind != "number" and out_option == option):
            argv = _with(argv, out_option, str(out_dir / file_name))
    if kind == "missing-folder":
        argv = _with(argv, option, str(tmp_path / "no-such-folder" / outputs[option]))
    elif kind == "read-only":
        argv = _with(argv, option, f"{READ_ONLY}/{outputs[option]}")
    elif kind == "output-is-folder":
        (out_dir / outputs[option]).mkdir()
    elif kind == "number":
        argv = _with(argv, option, value)
    elif kind == "damaged-state":  # a training state next to --out that is not a state
        (out_dir / (outputs["--out"].removesuffix(".safetensors") + ".state.safetensors")).write_bytes(b"\x00" * 64)
        argv = argv + ["--resume"]
    else:  # damaged gates, non-text inputs
        if option == "--file" and "--text" in argv:  # one source of text at a time
            at = argv.index("--text")
            argv = argv[:at] + argv[at + 2 :]
        path = str(inputs[value])
        argv = _with(argv, option, f"x={path}" if (name, option) == ("quality", "--gates") else path)
    return argv, out_dir


@pytest.mark.parametrize("case", _cases(), ids=_ids)
def test_every_command_refuses_bad_input_with_one_line_and_writes_nothing(case, inputs, cli, tmp_path):
    name, kind, option, value, message = case
    argv, out_dir = _argv(case, inputs, tmp_path)
    code, lines, err = cli(argv)
    assert code == 2, (argv, err)
    assert len(lines) == 1 and message in lines[0], (argv, err)
    assert "Traceback" not in err and "\r" not in err  # no progress bar on the error's line
    if kind in BEFORE_LOADING or name == "dashboard":
        assert cli.loads == 0, f"{argv}: a model was loaded before the error"
    left = [p.name for p in out_dir.iterdir() if not (kind in ("output-is-folder", "damaged-state") and p.is_dir())]
    left = [p for p in left if not (kind == "damaged-state" and p.endswith(".state.safetensors"))]
    assert left == [], left  # nothing under a final name, no temporary either


OUTPUT_KINDS = ("missing-folder", "read-only", "output-is-folder")  # one family: where an output goes


def _one_case_per_command_and_kind():
    """One case per (command, kind of error); the three output-folder kinds count as one kind,
    taking turns across commands so that each of them runs for several commands."""
    chosen = {}
    for case in _cases():
        name, kind = case[0], case[1]
        family = "output" if kind in OUTPUT_KINDS else kind
        turn = OUTPUT_KINDS[len([k for k in chosen if k[1] == "output"]) % 3] if family == "output" else kind
        if (name, family) not in chosen and kind == turn:
            chosen[(name, family)] = case
    return list(chosen.values())


def test_a_real_subprocess_per_command_and_kind_of_error_prints_exactly_one_line(inputs, tmp_path):
    """What a user sees: `gateskip` as its own process, everything it writes to stderr counted."""
    from concurrent.futures import ThreadPoolExecutor

    from .conftest import run_cli

    cases = _one_case_per_command_and_kind()

    def run(i_case):
        i, case = i_case
        folder = tmp_path / str(i)
        folder.mkdir()
        argv, out_dir = _argv(case, inputs, folder)
        return case, argv, out_dir, run_cli(*argv)

    with ThreadPoolExecutor(max_workers=2) as pool:
        results = list(pool.map(run, enumerate(cases)))
    failures = []
    for case, argv, out_dir, done in results:
        kind, message = case[1], case[4]
        lines = [line for line in done.stderr.splitlines() if line.strip()]
        written = [p.name for p in out_dir.iterdir() if p.is_file() and not p.name.endswith(".state.safetensors")]
        if done.returncode != 2 or len(lines) != 1 or message not in lines[0] or written:
            failures.append(f"{' '.join(argv[:2])} [{kind}]: exit {done.returncode}, {written}, {done.stderr!r}")
    assert not failures, "\n".join(failures)
    assert len(results) >= 35


def test_a_stale_temporary_from_a_killed_run_is_cleaned_and_outputs_are_whole(inputs, cli, tmp_path):
    out = tmp_path / "s.csv"
    stale = tmp_path / ".s.csv.tmp"
    stale.write_text("half of an earlier run, killed with SIGKILL")
    code, lines, err = cli(["stats", "--trace", str(inputs["trace"]), "--out", str(out)])
    assert code == 0, err
    assert not stale.exists() and out.read_text().startswith("layer")


def test_one_bad_output_among_several_writes_none_of_them(inputs, cli, tmp_path):
    ok, bad = tmp_path / "s.csv", tmp_path / "missing" / "b.csv"
    code, lines, _ = cli(["stats", "--trace", str(inputs["trace"]), "--out", str(ok), "--bos-out", str(bad)])
    assert code == 2 and len(lines) == 1 and not ok.exists()


# ---- the Python API: the same table, GateSkipError with one line
@pytest.fixture(scope="module")
def model():
    return load_model("tiny-llama", gates="untrained:lowrank:4")


def _damaged_dataset(data, tmp_path):
    """A folder in the data directory whose manifest is damaged: listed as a problem, never opened."""
    import os

    folder = data.root / "broken"
    folder.mkdir(parents=True)
    (folder / "manifest.json").write_text("{not json")
    try:
        assert data.datasets() == [] and data.problems()[0].startswith("broken: ")
        data.open("broken")
    finally:  # the case asserts nothing was left behind
        os.remove(folder / "manifest.json")


def _api_cases():
    from analysis.experiments.collect import collect
    from analysis.experiments.lens import GatedLens
    from analysis.experiments.logit_lens import logit_lens, settled_corpus
    from analysis.experiments.quality import evaluation_blocks
    from dashboard.service import DataDir
    from gateskip_core import load_gates, read_trace

    return [
        ("trace-none", lambda m, f, t: m.trace(None), "got NoneType"),
        ("trace-bytes", lambda m, f, t: m.trace(b"hi"), "got bytes"),
        ("trace-ints", lambda m, f, t: m.trace([1, 2]), "an item of type int"),
        ("trace-skip-nan", lambda m, f, t: m.trace(TEXT, skip=math.nan), "skip budget must lie in [0, 1]"),
        ("trace-skip-neg", lambda m, f, t: m.trace(TEXT, skip=-0.5), "skip budget must lie in [0, 1]"),
        ("trace-batch-0", lambda m, f, t: m.trace(TEXT, batch_size=0), "batch_size must be at least 1"),
        ("trace-max-tokens", lambda m, f, t: m.trace(TEXT, max_tokens=-5), "max_tokens must be at least 1"),
        ("trace-policy", lambda m, f, t: m.trace(TEXT, skip=0.2, policy="best"), "policy"),
        ("trace-path", lambda m, f, t: m.trace(TEXT, path="fast"), "execution path must be one of"),
        ("trace-branches", lambda m, f, t: m.trace(TEXT, branches="ffn"), "branch types must be"),
        ("generate-none", lambda m, f, t: m.generate(None), "prompt must be a str"),
        ("generate-tokens", lambda m, f, t: m.generate(TEXT, max_new_tokens=2.5), "max_new_tokens must be a whole"),
        ("generate-temp", lambda m, f, t: m.generate(TEXT, do_sample=True, temperature=math.nan), "temperature"),
        ("generate-topk", lambda m, f, t: m.generate(TEXT, do_sample=True, top_k=0), "top_k must be at least 1"),
        ("estimate-skip", lambda m, f, t: m.estimate(m.trace(TEXT), skip=math.inf), "skip budget must lie"),
        ("load-gates-truncated", lambda m, f, t: m.load_gates(f["gates_truncated"]), "not a valid safetensors"),
        ("load-gates-random", lambda m, f, t: load_gates(f["gates_random"]), "not a valid safetensors"),
        ("load-gates-foreign", lambda m, f, t: m.load_gates(f["gates_foreign"]), "not a GateSkip gate checkpoint"),
        ("load-gates-other", lambda m, f, t: m.load_gates(f["gates_other"]), "was trained for other"),
        ("load-model-gates", lambda m, f, t: load_model("tiny-llama", gates=f["gates_random"]), "not a valid"),
        ("read-trace-binary", lambda m, f, t: read_trace(f["binary_csv"]), "trace"),
        ("read-trace-missing", lambda m, f, t: read_trace(t / "nope.csv"), "not found"),
        ("to-csv-missing-folder", lambda m, f, t: m.trace(TEXT).to_csv(t / "no" / "x.csv"), "cannot write"),
        ("collect-missing-folder", lambda m, f, t: collect(m, [TEXT], t / "no" / "c.parquet", show_progress=False), "cannot write"),
        ("collect-batch-0", lambda m, f, t: collect(m, [TEXT], t / "c.csv", batch_size=0, show_progress=False), "batch_size must be at least 1"),
        ("settled-blocks-0", lambda m, f, t: settled_corpus(m, [TEXT], n_blocks=0, show_progress=False), "n_blocks must be at least 1"),
        ("logit-lens-int", lambda m, f, t: logit_lens(m, 123), "text must be a str"),
        ("lens-bytes", lambda m, f, t: GatedLens(m).run_with_cache(b"hi"), "got bytes"),
        ("eval-blocks-0", lambda m, f, t: evaluation_blocks(m, [TEXT], n_blocks=0), "n_blocks must be at least 1"),
        ("data-dir-outside", lambda m, f, t: DataDir(t / "data").open("/etc"), "is not a dataset in the dashboard's data folder"),
        ("data-dir-missing", lambda m, f, t: DataDir(t / "data").open("/no/such/place"), "is not a dataset in the dashboard's data folder"),
        ("data-dir-damaged", lambda m, f, t: _damaged_dataset(DataDir(t / "data"), t), "is not a dataset in the dashboard's data folder"),
        ("upload-oversize", lambda m, f, t: DataDir(t / "data", upload_limit=10).collect(m, "u", "u.txt", b"x" * 11), "uploads are limited to"),
        ("upload-binary", lambda m, f, t: DataDir(t / "data").collect(m, "u", "u.txt", b"\xff\xfe"), "not UTF-8 text"),
        ("save-gates-read-only", lambda m, f, t: save_gates(GateCheckpoint(gates=m.gates, model="tiny-llama", fingerprint=m.spec.fingerprint()), f"{READ_ONLY}/g.safetensors"), "cannot write"),
    ]  # fmt: skip


@pytest.mark.parametrize("case", _api_cases(), ids=lambda c: c[0])
def test_every_api_entry_point_raises_one_line_gateskip_errors(case, model, inputs, tmp_path):
    _, call, message = case
    with pytest.raises(GateSkipError) as err:
        call(model, inputs, tmp_path)
    assert message in str(err.value) and "\n" not in str(err.value), str(err.value)
    assert [p for p in tmp_path.rglob("*") if p.is_file()] == []  # nothing written
