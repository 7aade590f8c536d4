"""docs/ as pages: every data file lives under docs/results/, is named on a page and written by a script;
every table of a page is rendered from its data by scripts/doc_tables.py (or says why it is not)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from .conftest import load_script

ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs"
RESULTS = DOCS / "results"
PAGES = [ROOT / "README.md", *sorted(DOCS.glob("*.md"))]
WRITERS = [*sorted((ROOT / "scripts").glob("*")), *sorted((ROOT / "gateskip" / "bench").glob("*.py"))]


def doc_tables():
    return load_script("doc_tables")


def visible(page: Path) -> str:
    """A page as a reader sees it: without HTML comments (the table markers)."""
    return re.sub(r"<!--.*?-->", "", page.read_text(), flags=re.S)


def test_every_marked_table_equals_its_data():
    tables = doc_tables()
    stale = {page.name: tables.regenerate(page.read_text())[1] for page in PAGES}
    assert {name: changed for name, changed in stale.items() if changed} == {}, "run python3 scripts/doc_tables.py"
    assert [p.name for p, text in tables.whole_pages().items() if p.read_text() != text] == []


EDITS = [  # page, a figure as the page shows it, the same figure edited, the marker that must catch it
    ("training.md", "| default | quantile | 0.1 | 25.35 |", "| default | quantile | 0.1 | 25.36 |", "quality docs/results/quality.csv"),
    ("evaluation.md", "| 45.8 | 44.7 | 0.98 |", "| 45.8 | 44.7 | 0.97 |", "eval_vs_hf docs/results/eval_vs_hf.csv"),
    ("quantisation.md", "| int4 | 0 | 50.08 (1.62x) |", "| int4 | 0 | 50.08 (1.60x) |", "quantisation docs/results/quantisation_smollm2-135m-instruct.csv"),
    ("quantisation.md", "| 11 (0.18 [0.11, 0.30]) |", "| 12 (0.20 [0.11, 0.30]) |", "eval_pair fp32=docs/results/quantisation_eval_fp32.csv int4=docs/results/quantisation_eval_int4.csv"),
    ("quantisation.md", "| int4-continued | 0.1 | 49.15 |", "| int4-continued | 0.1 | 44.15 |", "trained_on_int4 docs/results/quantisation_trained_on_int4.csv"),
    ("benchmarks.md", "| `default@all` | 0.83x | 1.07x | 1.39x | 0.68 |", "| `default@all` | 0.88x | 1.07x | 1.39x | 0.68 |", "bench_runs decode docs/results/bench_one_backbone.json"),
    ("benchmarks.md", "| `default-scalar` | 1.00x | 1.05x | 1.25x |", "| `default-scalar` | 1.00x | 1.05x | 1.26x |", "bench_runs prefill docs/results/bench_one_backbone.json"),
    ("benchmarks.md", "| gemma3-270m | default | 1831 MB | 1.01x |", "| gemma3-270m | default | 1831 MB | 1.00x |", "bench_runs memory docs/results/bench_one_backbone.json docs/results/bench_memory_gemma3.json"),
    ("benchmarks.md", "vs a dense pass 0.93x / 1.01x / 1.26x", "vs a dense pass 0.93x / 1.05x / 1.26x", "script_runs docs/results/bench_load_times.json docs/results/bench_physical_speedup.json"),
    ("benchmarks.md", "| 0.99x | 0.968x | 1 of 2 | 0.002 |", "| 0.99x | 0.97x | 2 of 2 |  |", "bench_targets docs/results/bench.json docs/results/bench_one_backbone.json"),
]  # fmt: skip


@pytest.mark.parametrize("page, shown, edited_figure, marker", EDITS)
def test_a_figure_edited_by_hand_is_caught(page, shown, edited_figure, marker):
    tables = doc_tables()
    text = (DOCS / page).read_text()
    edited = text.replace(shown, edited_figure, 1)
    assert edited != text, f"{page} no longer shows {shown!r}"
    restored, changed = tables.regenerate(edited)
    assert [c.split(": ", 1)[1] for c in changed] == [f"<!-- table: {marker} -->"]
    assert restored == text


def test_the_scripts_out_files_render_as_the_page_shows_them(tmp_path, monkeypatch):
    """load_times.py and physical_speedup.py, run on a tiny model with --out, write what the `script_runs`
    renderer reads: the command as run, then the figures of the file (load times; ratios of best times)."""
    import json
    import sys

    from gateskip.bench import load_times, physical_speedup
    from gateskip_core.backbone.registry import CACHE_ENV

    monkeypatch.setenv(CACHE_ENV, str(tmp_path / "cache"))  # load_times points it at a temporary folder
    runs = {
        load_times: ["--models", "tiny-llama", "--out", str(tmp_path / "load.json")],
        physical_speedup: ["--model", "tiny-llama", "--gates", "untrained", "--batch", "1", "--seq-len", "16",
                           "--repeats", "1", "--budgets", "0,0.5", "--out", str(tmp_path / "speedup.json")],
    }  # fmt: skip
    for script, argv in runs.items():
        monkeypatch.setattr(sys, "argv", ["script.py", *argv])
        script.main()
    lines = doc_tables().render(f"<!-- table: script_runs {tmp_path / 'load.json'} {tmp_path / 'speedup.json'} -->")
    load, speedup = (json.loads((tmp_path / name).read_text()) for name in ("load.json", "speedup.json"))
    ratios = " / ".join(f"{r['masked_s']['min_s'] / r['physical_s']['min_s']:.2f}x" for r in speedup["rows"])
    load_row, speedup_row = lines.split("\n")[2:]
    assert load_row.startswith(f"| `python gateskip/bench/load_times.py {' '.join(runs[load_times])}` | tiny-llama:")
    assert f"warm {load['loads'][0]['warm_s']:.2f} s" in load_row
    assert speedup_row.startswith("| `python gateskip/bench/physical_speedup.py --model tiny-llama")
    assert f"physical vs masked {ratios}, vs a dense pass" in speedup_row and "at skip 0 / 0.5" in speedup_row


EVAL_REPORT = "printed from eval_*.csv by scripts/eval_report.py; tests/test_eval_report.py checks the page holds it"
# Tables that are not rendered from one data file, and why. A table is known by its page and header.
NOT_GENERATED = {
    ("README.md", "| page | what |"): "links, no data",
    ("api.md", "| command | does |"): "reference, no data",
    ("architecture.md", "| folder | what | depends on |"): "reference, no data",
    ("models.md", "| family (`model_type`) | e.g. | what the description handles | tested (`tests/test_families.py`) |"): "reference, no data",
    ("lens.md", "| hook point | shape | value |"): "reference, no data",
    ("training.md", "| spec | what | file |"): "the shipped gate files: recipes and sizes, no data file",
    ("training.md", "| target | `default` | met? |"): "targets against figures of the generated tables above it",
    ("training.md", "| claim (paper or old docs) | Gemma-3-270M | SmolLM2-135M |"): "a summary of analysis.md's generated findings tables",
    ("analysis.md", "| claim | here |"): "a summary of the generated tables of the page",
    ("evaluation.md", "| Option | Meaning |"): "reference, no data",
    ("quantisation.md", "| `--weights` | What runs |"): "reference, no data",
    ("evaluation.md", "| Task | Type | Items (pydoc / legal) | Metric |"): "the shipped task files, no data file",
    ("evaluation.md", "| Method | budget 0 | budget 0.1 | budget 0.2 | budget 0.3 |"): EVAL_REPORT,
    ("evaluation.md", "| Task | Metric | Net saved | gateskip | random | shortgpt | shortgpt-calibration | GateSkip ahead of best ShortGPT by |"): EVAL_REPORT,
}  # fmt: skip
FINDINGS = re.compile(r"<!-- findings-tables:begin.*?<!-- findings-tables:end -->", flags=re.S)  # test_causal.py


def unmarked_tables(page: Path) -> list[str]:
    """The header line of every table of the page that no marker generates."""
    if page in doc_tables().WHOLE_PAGES:
        return []
    lines = FINDINGS.sub("", page.read_text()).split("\n")
    headers = []
    for number, line in enumerate(lines[1:], start=1):
        if re.fullmatch(r"\|[-: |]+\|", line) and lines[number - 1].startswith("|"):
            above = [text for text in lines[: number - 1] if text.strip()]
            if not (above and above[-1].startswith("<!-- table:")):
                headers.append(lines[number - 1])
    return headers


def test_every_table_is_generated_or_says_why():
    unexplained = [(p.name, h) for p in PAGES for h in unmarked_tables(p) if (p.name, h) not in NOT_GENERATED]
    assert unexplained == [], "render it from its data (a `<!-- table: ...` marker) or say here why not"
    shown = {(p.name, h) for p in PAGES for h in unmarked_tables(p)}
    exists = {p.name for p in PAGES}
    stale = [key for key in NOT_GENERATED if key not in shown and key[0] in exists]
    assert stale == []  # an entry of a page that is gone is kept: pages are added and removed in parallel work


def test_docs_holds_pages_and_folders_only():
    loose = [p.name for p in DOCS.iterdir() if p.is_file() and p.suffix != ".md"]
    assert loose == [], "data files go under docs/results/, images under docs/images/"
    assert {p.name for p in DOCS.iterdir() if p.is_dir()} <= {"results", "images", "examples"}


def _pattern(reference: str) -> re.Pattern:
    """A path a script writes, its shell or Python variables ($label, ${label}, {label}) as wildcards."""
    parts = re.split(r"\$\{\w+\}|\$\w+|\{\w+\}|\*|<\w+>", reference)
    return re.compile(".+".join(map(re.escape, parts)))


def written_by_a_script(name: str) -> bool:
    """A script names it, or a command a page shows writes it (`gateskip bench --out docs/results/x.json`).
    A sweep's `_matched.csv` and an evaluation's `.json` are written beside their CSV."""
    path = r"docs/results/[\w.${}*<>\-]+"
    references = {m for w in WRITERS if w.is_file() for m in re.findall(path, w.read_text())}
    references |= {m for p in PAGES for m in re.findall(rf"--[\w-]*out[ =]({path})", p.read_text())}
    names = {name, name.replace("_matched.csv", ".csv"), name.replace(".json", ".csv")}
    return any(_pattern(r).fullmatch(f"docs/results/{n}") for r in references for n in names)


# Data files no script in the tree writes any more, and why they stay.
UNWRITTEN: dict[str, str] = {}


def test_every_data_file_is_named_on_a_page_and_written_by_a_script():
    pages = "\n".join(visible(page) for page in PAGES if page.name != "results.md")  # not a list of names
    files = sorted(p.name for p in RESULTS.iterdir())
    assert [name for name in files if f"docs/results/{name}" not in pages] == []
    assert [name for name in files if not written_by_a_script(name) and name not in UNWRITTEN] == []
    assert [name for name in UNWRITTEN if name not in files or written_by_a_script(name)] == []  # none stale


def test_every_data_file_a_page_names_exists():
    named = {m for page in PAGES for m in re.findall(r"docs/results/([\w.\-]+\.(?:csv|json|html))", visible(page))}
    assert sorted(name for name in named if not (RESULTS / name).is_file()) == []


def test_a_target_is_judged_on_the_measured_figure_not_the_rounded_one():
    """0.968x against a 0.97x target is a miss, shown with the third decimal that makes it visible."""
    tables = doc_tables()
    assert tables._shown(0.9678, 0.97) == "0.968" and tables._gap(0.97 - 0.9678) == "0.002"
    assert tables._shown(0.9912, 0.97) == "0.99" and tables._shown(1.0132, 1.15) == "1.01"
    assert tables._gap(0.1372) == "0.14"
