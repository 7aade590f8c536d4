"""The tables of the docs pages, generated from the data files they cite.

A table is generated when the line above it (blank lines allowed) is a marker naming how it is
rendered and from which files, paths relative to the repository root:

    <!-- table: quality docs/results/quality.csv -->
    | gates | policy | ... |

`python3 scripts/doc_tables.py` rewrites every marked table of README.md and docs/*.md from its files;
`--check` writes nothing, lists the tables that differ and exits 1 (tests/test_docs_tables.py runs it).
The renderers reuse the formatting of `scripts/results_tables.py`, `scripts/skip_signal_table.py` and
`gateskip/bench/report.py`, so a page shows a figure exactly as the script that made it prints it.
"""

from __future__ import annotations

import argparse
import functools
import importlib.util
import re
import sys
from collections.abc import Callable
from pathlib import Path
from types import ModuleType

import pandas as pd

ROOT = Path(__file__).resolve().parent.parent
MARKER = re.compile(r"^<!-- table: (\S+)((?: \S+)*) -->$")


@functools.cache
def _script(name: str) -> ModuleType:
    """A sibling script as a module (scripts/ is not a package)."""
    spec = importlib.util.spec_from_file_location(name, ROOT / "scripts" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _only_table(text: str) -> str:
    """The Markdown table of a renderer's output (gateskip.bench.report also prints bullet lines around it)."""
    return "\n".join(line for line in text.splitlines() if line.startswith("|"))


def _fidelity(raw: str, first: str = "recipe") -> str:
    """Per recipe: budget 0 and matched 10/20/30% net saved per text (RAW.csv and RAW_matched.csv)."""
    rendered = _script("results_tables").fidelity(str(ROOT / raw).removesuffix(".csv"))
    head, _, rest = rendered.partition("\n")
    return head.replace("| recipe |", f"| {first} |", 1) + "\n" + rest


def _third_text(*labels: str) -> str:
    """Perplexity / KL / top-1 at matched 10/20/30% net saved on the third held-out text, one row per gate
    set (docs/results/third_text_LABEL_matched.csv) and per ShortGPT variant (from the first file)."""
    rows: dict[str, list[str]] = {}
    for label in labels:
        matched = pd.read_csv(ROOT / "docs" / "results" / f"third_text_{label}_matched.csv")
        for method, part in matched.groupby("method", sort=False):
            name = label if method == "gateskip" else method
            cells = {
                round(s, 2): f"{p:.1f} / {k:.2f} / {t:.2f}"
                for s, p, k, t in zip(part.net_flops_saved, part.ppl, part.kl_to_full, part.top1_agreement)
            }
            rows.setdefault(name, [cells.get(s, "–") for s in (0.1, 0.2, 0.3)])
    lines = ["| gates | 10% | 20% | 30% |", "|---|---:|---:|---:|"]
    return "\n".join(lines + [f"| {name} | " + " | ".join(cells) + " |" for name, cells in rows.items()])


def _labelled_rows(*specs: str) -> str:
    """LABEL=FILE ...: the files' rows one after another, a first column `gates` naming each file's label,
    the columns of `gateskip chat-fidelity` (policy, budget, KL, top-1, skipped fraction)."""
    tables = _script("results_tables")
    frames = []
    for spec in specs:
        label, _, path = spec.partition("=")
        frames.append(pd.read_csv(ROOT / path).assign(gates=label))
    columns = ["gates", "policy", "skip_budget", "kl_to_full", "top1_agreement", "skipped_fraction"]
    return tables.table(pd.concat(frames)[columns])


def _bench(section: str, *paths: str) -> str:
    """A section of `gateskip bench` JSON files (merged as `python -m gateskip.bench.report` merges them);
    `rest`: the table of the sections without one of their own (capture, collect, dashboard, rates)."""
    from gateskip.bench import report

    results = report.merge([ROOT / path for path in paths])
    if section == "rest":
        return _only_table(report.rest_table(results))
    render = {"decode": report.decode_table, "prefill": report.prefill_table, "corpus": report.corpus_table}[section]
    return _only_table(render(results[section]))


def _fmt(value) -> str:
    return _script("results_tables").fmt(value)


def _eval_vs_hf(path: str) -> str:
    """scripts/eval_vs_hf.py's CSV: each task's score under `hf` and under `gateskip` at budget 0, and their times."""
    lines = [
        "| Task | Metric | n | `hf` | `gateskip`, budget 0 | `hf` time (s) | `gateskip` time (s) | time ratio |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in pd.read_csv(ROOT / path).itertuples():
        lines.append(
            f"| `{r.task}` | {r.metric} | {r.n} | {_fmt(r.hf)} | {_fmt(r.gateskip_b0)} | {r.hf_seconds:.1f} "
            f"| {r.gateskip_seconds:.1f} | {r.time_ratio:.2f} |"
        )
    return "\n".join(lines)


def _quantisation(path: str) -> str:
    """scripts/quantisation_quality.py's CSV: per budget and weights, the gates' row beside the mean of the
    random draws ([lowest, highest] perplexity); at budget 0 the perplexity over fp32's. int4+gates rows
    are left out (the page quotes them)."""
    frame = pd.read_csv(ROOT / path)
    gates = frame[frame.policy == "gates"].set_index(["weights", "skip_budget"])
    random = frame[frame.policy == "random"].groupby(["weights", "skip_budget"])
    lines = [
        "| Weights | Budget | Perplexity, gates | Perplexity, random | KL, gates | KL, random | Top-1, gates "
        "| Top-1, random |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for budget in sorted(frame.skip_budget.unique()):
        for weights in [w for w in dict.fromkeys(frame.weights) if w != "int4+gates"]:
            g = gates.loc[(weights, budget)]
            ppl = f"{g.ppl:.2f}"
            if budget == 0 and weights != "fp32":
                ppl += f" ({g.ppl / gates.loc[('fp32', budget)].ppl:.2f}x)"
            cells = ["", "", ""]
            if (weights, budget) in random.groups:
                r = random.get_group((weights, budget))
                cells = [f"{r.ppl.mean():.2f} [{r.ppl.min():.2f}, {r.ppl.max():.2f}]", f"{r.kl_to_full.mean():.3f}",
                         f"{r.top1_agreement.mean():.1%}"]  # fmt: skip
            lines.append(
                f"| {weights} | {budget:g} | {ppl} | {cells[0]} | {g.kl_to_full:.3f} | {cells[1]} "
                f"| {g.top1_agreement:.1%} | {cells[2]} |"
            )
    return "\n".join(lines)


def _trained_on_int4(path: str) -> str:
    """scripts/quantisation_train.sh's `quality` CSV: each gate set per budget, random skipping above budget 0."""
    frame = pd.read_csv(ROOT / path)
    frame = frame[(frame.gates != "ungated") & ~((frame.gates == "random skipping") & (frame.skip_budget == 0))]
    lines = [
        "| Gates on int4 | Budget | Perplexity | KL to int4 original | Top-1 | Net FLOPs saved |",
        "|---|---|---|---|---|---|",
    ]
    for r in frame.sort_values("skip_budget", kind="stable").itertuples():
        lines.append(
            f"| {r.gates} | {r.skip_budget:g} | {r.ppl:.2f} | {r.kl_to_full:.3f} | {r.top1_agreement:.1%} "
            f"| {r.flops_saved:.1%} |"
        )
    return "\n".join(lines)


def _eval_pair(*specs: str) -> str:
    """LABEL=FILE ...: `gateskip eval` CSVs side by side: each task's accuracy (± lm-eval's standard error)
    at budget 0 and at the other budget measured, per file, then the correct items pooled over the tasks
    with a 95% Wilson interval (analysis.traces.tracedb.wilson)."""
    from analysis.traces.tracedb import wilson

    columns = []  # (heading, the file's measured acc rows at one budget)
    for spec in specs:
        label, _, path = spec.partition("=")
        acc = pd.read_csv(ROOT / path)
        acc = acc[(acc.kind == "measured") & (acc.metric == "acc") & (acc.method == "gateskip")]
        for budget, rows in acc.groupby("skip_budget"):
            columns.append((budget, label, rows.set_index("task")))
    columns.sort(key=lambda c: c[0])
    headings = [
        f"{label}, budget 0" if b == 0 else f"{label}, {rows.net_flops_saved.mean():.0%} net"
        for b, label, rows in columns
    ]
    tasks = list(columns[0][2].index)
    n = int(columns[0][2].n.iloc[0])
    lines = [f"| Task (n = {n} each) | " + " | ".join(headings) + " |", "|---|" + "---|" * len(columns)]
    for task in tasks:
        cells = [f"{rows.value[task]:.2f} ± {rows.stderr[task]:.2f}" for _, _, rows in columns]
        lines.append(f"| `{task}` acc | " + " | ".join(cells) + " |")
    pooled = []
    for _, _, rows in columns:
        correct, total = int(round((rows.value * rows.n).sum())), int(rows.n.sum())
        low, high = wilson(correct, total)
        pooled.append(f"{correct} ({correct / total:.2f} [{low:.2f}, {high:.2f}])")
    pooled_name = "both" if len(tasks) == 2 else "all"
    lines.append(f"| {pooled_name}, correct of {total} [95% Wilson] | " + " | ".join(pooled) + " |")
    return "\n".join(lines)


def _bench_runs(kind: str, *paths: str) -> str:
    """`gateskip bench` JSON files, each with its own model and settings: `memory` (every file's memory
    rows, its model named), `decode` or `prefill` (batch-1 speedups per gate spec at the file's budgets)."""
    import json

    from gateskip.bench import report

    runs = [json.loads((ROOT / path).read_text()) for path in paths]
    if kind == "memory":
        return report.memory_table([(run["config"]["model"], run["memory"]) for run in runs])
    (run,) = runs
    return report.speedup_table(run[kind], kind, list(run["config"][f"{kind}_skips"]))


def _script_runs(*paths: str) -> str:
    """`--out` JSON files of gateskip/bench's stand-alone scripts (load_times.py, physical_speedup.py): per
    file, the command as it was run and its figures as the script's own `summary` words them."""
    import json

    from gateskip.bench import load_times, physical_speedup

    summaries = {"load_times": load_times.summary, "physical_speedup": physical_speedup.summary}
    lines = ["| command | measured |", "|---|---|"]
    for path in paths:
        results = json.loads((ROOT / path).read_text())
        lines.append(f"| `{results['command']}` | {summaries[results['script']](results)} |")
    return "\n".join(lines)


# The speed targets set for the one-backbone form, for the shipped `default` gates at batch 1:
# what, the bench section, the row's field, the budget, the least value that meets the target.
SPEED_TARGETS = (
    ("decoding b1, budget 0: >= 0.97x", "decode", "speedup_vs_dense_walk", 0.0, 0.97),
    ("decoding b1, budget 0.25: >= 1.15x", "decode", "speedup_vs_dense_walk", 0.25, 1.15),
    ("decoding b1, budget 0.5: >= 1.6x", "decode", "speedup_vs_dense_walk", 0.5, 1.6),
    ("realised / bytes model at 0.5: >= 0.8", "decode", "realised_over_bytes_model", 0.5, 0.8),
    ("prefill b1, 128 tokens, budget 0.25: >= 1.05x", "prefill", "speedup_vs_dense", 0.25, 1.05),
    ("prefill b1, 128 tokens, budget 0.5: >= 1.3x", "prefill", "speedup_vs_dense", 0.5, 1.3),
)


def _target_value(run: dict, section: str, field: str, skip: float) -> float:
    """The shipped `default` gates' figure at batch 1 (decoding: the prose setting on the original
    weights; prefill: the physical path), unrounded: a target is judged on the measured figure."""
    (row,) = [
        r for r in run[section]
        if r["batch"] == 1 and r.get("gates") == "default" and r["skip"] == skip and r.get("path", "physical") == "physical"
        and r.get("setting", "prose") == "prose" and r.get("weights", "original") == "original"
    ]  # fmt: skip
    return float(row[field])


def _shown(value: float, least: float) -> str:
    """Two decimals, or three where two would round a miss up to the target (0.968 against 0.97)."""
    return f"{value:.3f}" if value < least <= round(value, 2) else f"{value:.2f}"


def _gap(short: float) -> str:
    """How far a figure falls short, with a third decimal when two would read 0.00."""
    return f"{short:.2f}" if round(short, 2) >= 0.01 else f"{short:.3f}"


def _bench_targets(*paths: str) -> str:
    """SPEED_TARGETS against `gateskip bench` JSON files: one column per run, in how many runs each target
    is met, and by how much the runs that miss it fall short (from the figures as shown)."""
    import json

    runs = {Path(path).name: json.loads((ROOT / path).read_text()) for path in paths}
    lines = ["| target | " + " | ".join(f"`{name}`" for name in runs) + " | met | short by |",
             "|---|" + "---:|" * len(runs) + "---|---|"]  # fmt: skip
    for what, section, field, skip, least in SPEED_TARGETS:
        values = [_target_value(run, section, field, skip) for run in runs.values()]
        unit = "x" if field != "realised_over_bytes_model" else ""
        short = sorted(least - v for v in values if v < least)
        by = "" if not short else _gap(short[0]) + (f"-{_gap(short[-1])}" if _gap(short[-1]) != _gap(short[0]) else "")
        met = sum(v >= least for v in values)
        cells = " | ".join(f"{_shown(v, least)}{unit}" for v in values)
        lines.append(f"| {what} | {cells} | {met} of {len(values)} | {by} |")
    return "\n".join(lines)


def _matched(path: str, *saved: str) -> str:
    """A sweep's --matched-out CSV; with SAVED fractions, only the rows at those net savings."""
    frame = pd.read_csv(ROOT / path)
    if saved:
        frame = frame[frame["net_flops_saved"].round(4).isin([float(s) for s in saved])]
    frame["net_flops_saved"] = frame["net_flops_saved"].map(lambda v: f"{v:.0%}")
    return _script("results_tables").table(frame)


def _columns(path: str, *columns: str) -> str:
    """A CSV's rows as they are, the COLUMNS given (all when none)."""
    frame = pd.read_csv(ROOT / path)
    return _script("results_tables").table(frame[list(columns)] if columns else frame)


def _intervals(path: str, *columns: str) -> str:
    """A CSV's rows, the COLUMNS given; a column with COLUMN_low and COLUMN_high beside it in the file
    shows as `value [low, high]` (a 95% interval, or the lowest and highest draw: the page says which)."""
    frame = pd.read_csv(ROOT / path)
    fmt = _script("results_tables").fmt
    shown = frame[list(columns)].copy()
    for column in columns:
        low, high = f"{column}_low", f"{column}_high"
        if low in frame.columns and high in frame.columns:
            shown[column] = [
                f"{fmt(v)} [{fmt(a)}, {fmt(b)}]" for v, a, b in zip(frame[column], frame[low], frame[high])
            ]
    return _script("results_tables").table(shown)


def _settled(*specs: str) -> str:
    """LABEL=FILE ...: `gateskip settled --summary-out` files, one group of rows per gate set: the share of
    tokens settled among those that skipped / ran each branch in the late layers, the ratio within
    layers with its interval (bold), and the pooled ratio."""
    branches = {"attn": "attention", "mlp": "MLP", "both": "both"}
    lines = [
        "| gates | branch | tokens that skipped: settled | tokens that ran: settled "
        "| ratio within layers [95%] | pooled ratio |",
        "|---|---|---:|---:|---:|---:|",
    ]
    for spec in specs:
        label, _, path = spec.partition("=")
        for number, row in enumerate(pd.read_csv(ROOT / path).itertuples()):
            counts = row.branch != "both"
            skipped = f"{row.settled_rate_skipped:.1%}" + (f" (n={row.skipped_n:,})" if counts else "")
            ran = f"{row.settled_rate_ran:.1%}" + (f" (n={row.ran_n:,})" if counts else "")
            lines.append(
                f"| {'' if number else f'`{label}`'} | {branches[row.branch]} | {skipped} | {ran} "
                f"| **{row.ratio:.2f}** [{row.ratio_low:.2f}, {row.ratio_high:.2f}] | {row.pooled_ratio:.2f} |"
            )
    return "\n".join(lines)


def _results(name: str) -> Callable[[str], str]:
    """A table function of scripts/results_tables.py over one file."""
    return lambda path: getattr(_script("results_tables"), name)(str(ROOT / path))


RENDERERS: dict[str, Callable[..., str]] = {
    "columns": _columns,
    "intervals": _intervals,  # columns, each with its COLUMN_low / COLUMN_high range when the file has them
    "settled": _settled,
    "quality": _results("quality"),  # a `gateskip quality` CSV
    "matched": _matched,
    "faithfulness": _results("faithfulness"),  # a `gateskip faithfulness` signal CSV
    "fidelity": _fidelity,  # scripts/fidelity_ablation.py's CSV (+ _matched); optional first column's name
    "skip_signal": lambda path: _script("skip_signal_table").markdown(pd.read_csv(ROOT / path)),
    "third_text": _third_text,
    "labelled_rows": _labelled_rows,
    "bench": _bench,  # a section of `gateskip bench` JSON files
    "eval_vs_hf": _eval_vs_hf,  # scripts/eval_vs_hf.py's CSV
    "quantisation": _quantisation,  # scripts/quantisation_quality.py's CSV: gates beside random draws
    "trained_on_int4": _trained_on_int4,  # scripts/quantisation_train.sh's quality CSV
    "eval_pair": _eval_pair,  # LABEL=FILE ...: `gateskip eval` CSVs side by side, pooled Wilson row
    "bench_runs": _bench_runs,  # memory FILE ... | decode FILE | prefill FILE: per-run tables of `gateskip bench` JSON
    "script_runs": _script_runs,  # --out JSON files of gateskip/bench/load_times.py and physical_speedup.py
    "bench_targets": _bench_targets,  # SPEED_TARGETS against `gateskip bench` JSON files, a column per run
}


def render(marker: str) -> str:
    """The table a marker line asks for."""
    match = MARKER.match(marker.strip())
    if not match or match.group(1) not in RENDERERS:
        raise ValueError(f"not a table marker this script knows: {marker.strip()}")
    return RENDERERS[match.group(1)](*match.group(2).split())


def marked_tables(lines: list[str]) -> list[tuple[int, int, int]]:
    """(marker line, first table line, line after the table) of every marked table, 0-based."""
    found = []
    for number, line in enumerate(lines):
        if not line.startswith("<!-- table:"):
            continue
        start = number + 1
        while start < len(lines) and not lines[start].strip():
            start += 1
        end = start
        while end < len(lines) and lines[end].startswith("|"):
            end += 1
        if end == start:
            raise ValueError(f"line {number + 1}: a table marker with no table under it")
        found.append((number, start, end))
    return found


def regenerate(text: str) -> tuple[str, list[str]]:
    """The page with every marked table rendered anew, and the markers whose table changed."""
    lines = text.split("\n")
    changed = []
    for number, start, end in reversed(marked_tables(lines)):
        table = render(lines[number]).split("\n")
        if lines[start:end] != table:
            changed.append(f"line {number + 1}: {lines[number].strip()}")
            lines[start:end] = table
    return "\n".join(lines), changed[::-1]


def pages() -> list[Path]:
    return [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]


WHOLE_PAGES: dict[Path, Callable[[], str]] = {  # pages generated whole
    ROOT / "docs" / "results.md": lambda: _script("results_tables").page(),  # every table of the CSVs
}


def whole_pages() -> dict[Path, str]:
    """The pages generated whole, rendered."""
    return {page: render_page() for page, render_page in WHOLE_PAGES.items()}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="scripts/doc_tables.py", description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="write nothing; exit 1 when a table differs")
    parser.add_argument("--show", metavar="'RENDERER ARG ...'", help="print the table a marker would ask for, and stop")
    args = parser.parse_args(argv)
    if args.show:
        try:
            print(render(f"<!-- table: {args.show} -->"))
        except (OSError, ValueError, KeyError, TypeError, IndexError) as err:  # IndexError: a file with no rows to show
            print(f"doc_tables: {err or type(err).__name__}", file=sys.stderr)
            return 2
        return 0
    stale = []
    for page in pages():
        text = page.read_text()
        try:
            new, changed = regenerate(text)
        except (OSError, ValueError, KeyError) as err:
            print(f"doc_tables: {page.relative_to(ROOT)}: {err}", file=sys.stderr)
            return 2
        stale += [f"{page.relative_to(ROOT)} {where}" for where in changed]
        if changed and not args.check:
            page.write_text(new)
    for page, text in whole_pages().items():
        if page.read_text() != text:
            stale.append(f"{page.relative_to(ROOT)} (the whole page)")
            if not args.check:
                page.write_text(text)
    for where in stale:
        print(f"{'differs from its data' if args.check else 'regenerated'}: {where}")
    return 1 if stale and args.check else 0


if __name__ == "__main__":
    raise SystemExit(main())
