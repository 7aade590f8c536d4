"""The README's benchmark tables, rendered from `gateskip bench --out` JSON files.

    python -m gateskip.bench.report docs/results/bench.json [docs/results/bench_collect.json ...]

Sections are taken from every file given; rows of a section that several files hold
(e.g. `collect` at the default sizes and at 50k/500k tokens) are listed together.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def _x(value: float) -> str:
    return f"{value:.2f}x"


def _pct(value: float) -> str:
    return f"{value:.1%}"


def decode_table(rows: list[dict]) -> str:
    """The decoding rows; with a `setting` column (prose / chat) and best-of-each ratios where the rows have them."""
    settings = any("setting" in r for r in rows)
    lines = [
        ("| setting " if settings else "")
        + "| batch | method | skip | tok/s | vs our dense walk | skipped (generated) | FLOP model | bytes model "
        "| realised / bytes model |",
        ("|---" if settings else "") + "|---:|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        first = f"| {r.get('setting', 'prose')} " if settings else ""
        weights = "" if r.get("weights", "original") == "original" else f" ({r['weights']})"
        if r["method"] == "hf-generate":
            lines.append(
                f"{first}| {r['batch']} | Hugging Face `generate`{weights} | – | {r['tokens_per_s']:.2f} | | | | | |"
            )
        elif r["method"] == "dense-walk":
            best = f", best {_x(r['vs_hf_generate_best'])}" if "vs_hf_generate_best" in r else ""
            lines.append(
                f"{first}| {r['batch']} | our dense walk{weights} | – | {r['tokens_per_s']:.2f} "
                f"({_x(r['vs_hf_generate'])} HF{best}) | 1.00x | | | | |"
            )
        else:
            gates = f"gated {r['gates']}" if "gates" in r else "gated"
            best = f" (best {_x(r['speedup_vs_dense_walk_best'])})" if "speedup_vs_dense_walk_best" in r else ""
            lines.append(
                f"{first}| {r['batch']} | {gates} | {r['skip']:g} | {r['tokens_per_s']:.2f} "
                f"| {_x(r['speedup_vs_dense_walk'])}{best} | {_pct(r['reached_skip_rate'])} "
                f"| {_x(r['predicted_speedup_flops'])} | {_x(r['predicted_speedup_bytes'])} "
                f"| {r['realised_over_bytes_model']:.2f} |"
            )
    return "\n".join(lines)


def prefill_table(rows: list[dict], path: str = "physical") -> str:
    lines = [
        "| batch | gates | skip | tok/s | dense tok/s | speedup | predicted | realised / predicted | net FLOPs saved |",
        "|---:|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        if r["path"] == path:
            groups.setdefault((r["batch"], r["gates"]), []).append(r)
    for (batch, gates), group in groups.items():
        group.sort(key=lambda r: r["skip"])

        def cells(fmt, key, group=group):
            return " / ".join(fmt(r[key]) for r in group)

        lines.append(
            f"| {batch} | {gates} | {cells(lambda v: f'{v:g}', 'skip')} | {cells(lambda v: f'{v:.0f}', 'tokens_per_s')} "
            f"| {group[0]['dense_tokens_per_s']:.0f} | {cells(_x, 'speedup_vs_dense')} | {cells(_x, 'predicted_speedup')} "
            f"| {cells(lambda v: f'{v:.2f}', 'realised_over_predicted')} | {cells(lambda v: f'{v:+.1%}', 'net_flops_saved')} |"
        )
    return "\n".join(lines)


def memory_table(runs: list[tuple[str, list[dict]]]) -> str:
    """The memory section of each (model, rows) run: peak resident memory of a fresh process that loads the
    model and traces a sentence, against `--gates none`."""
    lines = ["| model | gates | peak RSS | vs `--gates none` |", "|---|---|---:|---:|"]
    for model, rows in runs:
        for r in rows:
            lines.append(f"| {model} | {r['gates']} | {r['peak_rss_mb']:.0f} MB | {_x(r['vs_no_gates'])} |")
    return "\n".join(lines)


def speedup_table(rows: list[dict], section: str, skips: list[float]) -> str:
    """Batch 1 speedups over our dense walk per gate spec and budget (decode: calibrated policy; prefill:
    the physical path), with the model's prediction for the first spec in the last row (decode: bytes,
    with the realised share of it at the highest budget; prefill: FLOPs)."""
    decode = section == "decode"
    gated = [r for r in rows if r["batch"] == 1 and "gates" in r and (decode or r["path"] == "physical")]
    gated = [r for r in gated if r.get("setting", "prose") == "prose"]  # a chat setting's rows have their own table
    speedup, predicted = (
        ("speedup_vs_dense_walk", "predicted_speedup_bytes") if decode else ("speedup_vs_dense", "predicted_speedup")
    )
    head = f"| {'decoding, batch 1' if decode else 'prefill, batch 1, physical path'} | budget " + " | ".join(
        f"{s:g}" for s in skips
    )
    lines = [
        head + (f" | realised / bytes model at {skips[-1]:g} |" if decode else " |"),
        "|---|" + "---:|" * (len(skips) + decode),
    ]
    by_spec: dict[str, dict[float, dict]] = {}
    for r in gated:
        by_spec.setdefault(r["gates"], {})[r["skip"]] = r
    for spec, at in by_spec.items():
        cells = [_x(at[s][speedup]) for s in skips] + (
            [f"{at[skips[-1]]['realised_over_bytes_model']:.2f}"] if decode else []
        )
        lines.append(f"| `{spec}` | " + " | ".join(cells) + " |")
    first, at = next(iter(by_spec.items()))
    model = "bytes model" if decode else "FLOP account's prediction"
    lines.append(
        f"| {model} for `{first}` | "
        + " | ".join(_x(at[s][predicted]) for s in skips)
        + " |"
        + (" |" if decode else "")
    )
    return "\n".join(lines)


def rest_table(results: dict) -> str:
    lines = ["| what | measured |", "|---|---|"]
    if "capture" in results:
        over = [r["overhead"] for r in results["capture"][1:]]
        lines.append(
            "| trace capture overhead (gated forward alone vs + trace; vs + trace with gate vectors) "
            f"| {over[0]:+.1%}; {over[1]:+.1%} |"
        )
    for r in results.get("collect", []):
        lines.append(
            f"| `collect` (batch 8, budget 0.25, Parquet), {r['tokens']:,} tokens in {r['seconds']:.0f} s "
            f"| {r['tokens_per_s']:.0f} tok/s; peak RSS +{r['peak_growth_mb']:.0f} MB over the loaded model; "
            f"file {r['file_mb']:.1f} MB |"
        )
    if "dashboard" in results:
        modes = {r["mode"]: r for r in results["dashboard"]}
        lines.append(
            f"| dashboard, {modes['estimate']['tokens']}-token prompt | estimate mode "
            f"{modes['estimate']['median_s'] * 1e3:.0f} ms; exact mode {modes['exact']['median_s']:.2f} s |"
        )
    if "rates" in results:
        rates = results["rates"]
        names = " / ".join(r["domain"] for r in rates)
        lines.append(
            f"| calibrated policy at budget {rates[0]['budget']:g} (asks {_pct(rates[0]['budget_asks'])} of branch "
            f"evaluations): reached on {names} | {' / '.join(_pct(r['reached']) for r in rates)} |"
        )
    return "\n".join(lines)


def merge(files: list[Path]) -> dict:
    merged: dict = {}
    for path in files:
        results = json.loads(path.read_text())
        for key, value in results.items():
            if isinstance(value, list):
                merged.setdefault(key, []).extend(value)
            else:
                merged.setdefault(key, value)
    return merged


def markdown(results: dict) -> str:
    machine = results["machine"]
    out = [
        f"Machine: {machine['cpu']} ({machine['cores']} cores), torch threads {machine['torch_threads']}, "
        f"torch {machine['torch']}, transformers {machine['transformers']}; {results['seconds']:.0f} s."
    ]
    if "decode" in results:
        weights = sorted({r.get("weights", "original") for r in results["decode"]})
        out += [
            "",
            f"Decoding runs the {' / '.join(weights)} weights in every method.",
            "",
            decode_table(results["decode"]),
        ]
    if "prefill" in results:
        out += ["", prefill_table(results["prefill"])]
    if "memory" in results:
        out += ["", memory_table([(results["config"]["model"], results["memory"])])]
    out += ["", rest_table(results)]
    if "corpus" in results:
        out += ["", corpus_table(results["corpus"])]
    return "\n".join(out)


def corpus_table(rows: list[dict]) -> str:
    """Collection throughput, then query latency / peak RSS with one column per dataset size."""
    lines = []
    for r in rows:
        if r["measure"].startswith("collect"):
            lines.append(
                f"- `gateskip collect` into a dataset, {r['measure'].split(', ')[1]}: {r['tokens']:,} tokens in "
                f"{r['seconds']:.0f} s = {r['tokens_per_s']:.0f} tok/s (model loading included)"
            )
    queries = [r for r in rows if r["measure"].startswith("query")]
    sizes = sorted({r["tokens"] for r in queries})
    rows_of = {r["tokens"]: r["trace_rows"] for r in queries}
    if sizes:
        lines += [
            "",
            "| query | " + " | ".join(f"{n:,} tokens ({rows_of[n]:,} trace rows)" for n in sizes) + " |",
            "|---|" + "---|" * len(sizes),
        ]
        for name in dict.fromkeys(r["measure"] for r in queries):
            cells = []
            for n in sizes:
                r = next(q for q in queries if q["measure"] == name and q["tokens"] == n)
                cells.append(f"{r['seconds']:.2f} s, {r['peak_rss_mb']:.0f} MB")
            lines.append(f"| {name.removeprefix('query ')} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m gateskip.bench.report", description=__doc__.splitlines()[0])
    parser.add_argument("files", nargs="+", type=Path, help="JSON written by gateskip bench --out")
    args = parser.parse_args(argv)
    try:
        print(markdown(merge(args.files)))
    except (OSError, ValueError, KeyError) as exc:
        print(f"error: cannot render {', '.join(map(str, args.files))}: {exc!r}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
