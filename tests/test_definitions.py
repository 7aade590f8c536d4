"""One definition per concept: each shared formula or check lives in one place, and these tests fail
when a second copy appears (a source scan) or when the one definition drifts from what it names."""

from __future__ import annotations

import re
import sysconfig
from dataclasses import astuple
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from analysis.traces.tracedb import _CSV_TYPES, TraceDB
from gateskip_core import GateSkipError, branches, data, reference
from gateskip_core.backbone import architecture
from gateskip_core.gating.adapter import AdapterSpec
from gateskip_core.gating.fill import FillSpec
from gateskip_core.gating.gates import parse_gate_variant
from gateskip_core.traces.trace import TRACE_COLUMNS

ROOT = Path(__file__).resolve().parents[1]
PROJECT_DIRS = ("gateskip_core", "analysis", "dashboard", "bench", "scripts")


def project_sources() -> dict[str, str]:
    """Every project Python file's text, by its path relative to the repository."""
    files = [p for d in PROJECT_DIRS for p in (ROOT / d).rglob("*.py")]
    return {str(p.relative_to(ROOT)): p.read_text(encoding="utf-8") for p in files}


def lines_matching(pattern: str, allowed: set[str]) -> list[str]:
    """`path:line: text` of every project line matching `pattern` outside the `allowed` files."""
    regex = re.compile(pattern)
    return [
        f"{path}:{n}: {line.strip()}"
        for path, text in project_sources().items()
        if path not in allowed
        for n, line in enumerate(text.splitlines(), 1)
        if regex.search(line) and not line.lstrip().startswith("#")
    ]


# ---- the trace schema: one column list, one type per column in DuckDB
def test_the_duckdb_types_name_exactly_the_trace_columns_in_order():
    assert list(_CSV_TYPES) == list(TRACE_COLUMNS)


@pytest.mark.parametrize("suffix", [".csv", ".parquet"])
def test_a_written_trace_reads_back_with_the_declared_duckdb_types(tiny_llama, tmp_path, suffix):
    trace = tiny_llama.trace(["Gates decide which tokens skip."], skip=0.3)
    path = tmp_path / f"t{suffix}"
    trace.to_csv(path) if suffix == ".csv" else trace.to_parquet(path)
    db = TraceDB(path)
    described = dict(db.con.execute("SELECT column_name, column_type FROM (DESCRIBE raw_traces)").fetchall())
    assert list(described) == list(TRACE_COLUMNS)
    if suffix == ".csv":  # the CSV reader is told the types; Parquet carries narrower integer types
        assert described == _CSV_TYPES
    else:
        kinds = {c: _kind(t) for c, t in described.items()}
        assert kinds == {c: _kind(t) for c, t in _CSV_TYPES.items()}


def _kind(duckdb_type: str) -> str:
    """Integer, floating or text: what must agree between a trace's Parquet and CSV columns."""
    if duckdb_type in ("TINYINT", "SMALLINT", "INTEGER", "BIGINT", "BOOLEAN"):
        return "integer"
    return {"FLOAT": "floating", "DOUBLE": "floating", "VARCHAR": "text"}[duckdb_type]


# ---- the supported families: one check, one list the module's docstring names
def test_the_registry_and_the_walk_refuse_families_through_one_check(tmp_path):
    (tmp_path / "config.json").write_text('{"model_type": "bert"}')
    from gateskip_core.backbone.registry import check_family

    with pytest.raises(GateSkipError) as from_config:
        check_family(tmp_path)
    with pytest.raises(GateSkipError) as from_type:
        architecture.check_model_type("bert")
    assert str(from_config.value) == str(from_type.value)
    assert (
        lines_matching(
            r"model_type not in (FAMILIES|SUPPORTED_MODEL_TYPES)", {"gateskip_core/backbone/architecture.py"}
        )
        == []
    )


def test_the_architecture_docstring_names_every_supported_family():
    described = re.sub(r"[^a-z0-9]", "", (architecture.__doc__ or "").lower())
    missing = [t for t in architecture.FAMILIES if re.sub(r"[^a-z0-9]", "", t.removesuffix("_text")) not in described]
    assert missing == []


# ---- KL to the reference and top-1 agreement (gateskip_core/reference.py)
def test_kl_to_reference_is_kl_of_the_reference_against_the_run_per_position():
    torch.manual_seed(0)
    ref, run = reference.log_probs(torch.randn(2, 5, 11)), reference.log_probs(torch.randn(2, 5, 11))
    expected = F.kl_div(run, ref, log_target=True, reduction="none").sum(-1)
    assert reference.kl_to_reference(ref, run).shape == (2, 5)
    torch.testing.assert_close(reference.kl_to_reference(ref, run), expected)
    assert float(reference.kl_to_reference(ref, ref).abs().max()) < 1e-6
    assert reference.log_probs(torch.randn(3, 4, dtype=torch.float16)).dtype == torch.float32


def test_top1_agreement_compares_the_most_likely_tokens_per_position():
    ref = torch.tensor([[0.0, 5.0, 1.0], [3.0, 0.0, 1.0]])
    run = torch.tensor([[1.0, 9.0, 0.0], [0.0, 4.0, 1.0]])
    assert reference.top1_agreement(ref, run).tolist() == [1.0, 0.0]


def test_no_module_writes_out_kl_or_top1_agreement_again():
    allowed = {"gateskip_core/reference.py"}
    assert lines_matching(r"\.exp\(\)\s*\*\s*\(", allowed) == []  # p * (log p - log q)
    assert lines_matching(r"argmax\(-1\)\s*==\s*\S*argmax", allowed) == []
    assert lines_matching(r"\bkl_div\(", allowed) == []


# ---- the skipped fraction's denominator (gateskip_core/branches.py)
def test_the_skipped_fraction_counts_both_branches_of_every_layer_per_eligible_token(tiny_llama):
    trace = tiny_llama.trace(PROMPTS_OF_TWO, skip=0.4)
    skipped = sum(int(s.skipped.sum()) for s in trace.sequences)
    eligible = sum(int(s.eligible.sum()) for s in trace.sequences)
    assert 0 < skipped
    assert trace.skipped_fraction() == pytest.approx(skipped / (eligible * tiny_llama.spec.n_layers * 2))
    assert trace.sequences[0].skipped_fraction() == pytest.approx(
        trace.sequences[0].skipped.sum() / (trace.sequences[0].eligible.sum() * tiny_llama.spec.n_layers * 2)
    )
    assert branches.skipped_fraction(0, 0, 4) == 0.0
    assert int(branches.branch_evaluations(torch.tensor(3), 4)) == 24


def test_no_module_writes_out_the_skipped_fraction_denominator_again():
    allowed = {"gateskip_core/branches.py"}
    assert lines_matching(r"n_layers\s*\*\s*2\b|\b2\s*\*\s*[\w.]*n_layers\b", allowed) == []
    assert lines_matching(r"eligible.*\*\s*2\b", allowed) == []


PROMPTS_OF_TWO = ["Gates decide which tokens skip which layers.", "Short one."]


# ---- the 'kind:R' options (gate variant, adapter, skip fill): one parser
@pytest.mark.parametrize(
    ("parse", "text", "expected"),
    [
        (lambda t: parse_gate_variant(t), "lowrank", ("lowrank", 16)),
        (lambda t: parse_gate_variant(t), "lowrank:4", ("lowrank", 4)),
        (lambda t: parse_gate_variant(t), "scalar", ("scalar", 0)),
        (lambda t: astuple(AdapterSpec.parse(t)), " lora:8 ", ("lora", 8)),
        (lambda t: astuple(AdapterSpec.parse(t)), None, ("none", 0)),
        (lambda t: astuple(FillSpec.parse(t)), "lowrank:3", ("lowrank", 3)),
        (lambda t: astuple(FillSpec.parse(t)), None, ("zero", 0)),
    ],
)
def test_kind_rank_options_parse_through_one_function(parse, text, expected):
    assert parse(text) == expected


@pytest.mark.parametrize(
    ("parse", "text", "message"),
    [
        (
            parse_gate_variant,
            "vector:2",
            "gate variant must be 'vector', 'scalar', 'mlp' or 'lowrank:R', got 'vector:2'",
        ),
        (AdapterSpec.parse, "lora", "LoRA rank must be a whole number, got ''"),
        (AdapterSpec.parse, "lora:0", "LoRA rank must be at least 1, got 0"),
        (FillSpec.parse, "mean:2", "skip fill must be 'zero', 'mean' or 'lowrank:R', got 'mean:2'"),
    ],
)
def test_kind_rank_options_are_refused_in_one_format(parse, text, message):
    with pytest.raises(GateSkipError) as err:
        parse(text)
    assert str(err.value) == message


def test_no_module_parses_a_rank_again():
    assert lines_matching(r"\brank_of\(", {"gateskip_core/validation.py"}) == []


# ---- a user's text file: one reader
def test_a_text_file_reads_once_with_one_line_errors(tmp_path):
    (tmp_path / "ok.txt").write_text("first\n\nsecond\n", encoding="utf-8")
    (tmp_path / "latin.txt").write_bytes(b"caf\xe9")
    (tmp_path / "blank.txt").write_text("\n\n")
    assert data.paragraphs_of(tmp_path / "ok.txt") == ["first", "second"]
    for name, message in [("none.txt", "file not found"), ("latin.txt", "cannot read"), ("blank.txt", "holds no text")]:
        with pytest.raises(GateSkipError, match=message):
            data.paragraphs_of(tmp_path / name)


def test_no_module_reads_a_text_file_with_its_own_errors_again():
    allowed = {"gateskip_core/data.py"}
    assert lines_matching(r"except \(OSError, UnicodeDecodeError\)", allowed) == []


# ---- calibration texts: one set for stored thresholds and on-the-fly fits
def test_on_the_fly_fits_use_the_texts_the_stored_thresholds_were_fitted_on(tiny_llama, tmp_path):
    from gateskip_core.gating.checkpoint import GateCheckpoint, load_gates, save_gates
    from gateskip_core.skipping import calibration

    model = tiny_llama
    # Texts of another kind than the fallback (the pydoc calibration prose): Python's LICENSE.
    texts = data.paragraphs_of(Path(sysconfig.get_paths()["stdlib"]) / "LICENSE.txt")
    ckpt = GateCheckpoint(gates=model.gates, model=model.name, fingerprint=model.spec.fingerprint())
    grid = np.array([0.2, 0.4])
    ckpt.calibration_budgets = grid
    ckpt.calibration_thresholds = np.stack(
        [model.fit_thresholds(model.budget(b), texts=texts).thresholds for b in grid]
    )
    calibration.record_calibration_texts(ckpt, texts)
    save_gates(ckpt, tmp_path / "g.safetensors")
    model.attach_gates(model.gates, "recorded", load_gates(tmp_path / "g.safetensors", model.spec.fingerprint()))
    assert calibration.calibration_set(model) == calibration.fitted_texts(texts)
    on_the_fly = calibration.fit_thresholds(model, model.budget(0.4)).thresholds  # no texts given
    np.testing.assert_array_equal(on_the_fly, ckpt.calibration_thresholds[1])
    fallback = calibration.fit_thresholds(
        model, model.budget(0.4), texts=calibration.calibration_set(tiny_llama_without_texts(model))
    )
    assert not np.array_equal(fallback.thresholds, on_the_fly)


def tiny_llama_without_texts(model):
    """The same gates with a checkpoint that recorded no texts (gates saved before they were)."""
    from gateskip_core.gating.checkpoint import GateCheckpoint

    view = model.view()
    view.attach_gates(model.gates, "unrecorded", GateCheckpoint(model.gates, model.name, model.spec.fingerprint()))
    return view


# ---- truncations: counted from the trace's record of them, never parsed from notice text
def test_truncations_are_recorded_by_the_trace_and_counted_by_both_collectors(tiny_llama, tmp_path):
    from analysis.experiments.collect import collect, collect_dataset

    long = "Gates decide which tokens skip which layers, and the trace records every one of them."
    texts = [long, "Short one.", long]
    trace = tiny_llama.trace(texts, max_tokens=16)
    assert trace.truncated == (0, 2) and len(trace.notices) == 2
    assert collect(tiny_llama, texts, tmp_path / "t.parquet", show_progress=False, max_tokens=16)["truncated"] == 2
    counts = collect_dataset(tiny_llama, [("s", texts)], tmp_path / "ds", max_tokens=16, show_progress=False, log=str)
    assert counts["truncated"] == 2
    assert lines_matching(r"len\([\w.]*notices\)|truncated to \" in", set()) == []


# ---- the installed top-level names: the project's packages only
def test_the_install_finds_only_the_projects_top_level_packages():
    import tomllib
    from setuptools import find_packages

    include = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"]["find"]["include"]
    top_level = {name.split(".")[0] for name in find_packages(str(ROOT), include=include)}
    assert top_level == {"gateskip", "gateskip_core", "analysis", "dashboard"}
    assert "gateskip.bench" in find_packages(str(ROOT), include=include)  # `gateskip bench` ships
