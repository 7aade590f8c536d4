"""Markdown tables of the results, from the CSVs `scripts/reproduce_results.sh` (and the other scripts the
pages name) write to docs/results/: docs/results.md shows them all, and `scripts/doc_tables.py` renders
the tables of the pages with the same functions (tests/test_docs_tables.py checks both).

python3 scripts/results_tables.py > docs/results.md
"""

from __future__ import annotations

from pathlib import Path

import pandas as pd

DOCS = Path(__file__).resolve().parent.parent / "docs" / "results"


ACCOUNT_NOTE = (
    "Net FLOPs saved as `gateskip sweep` / `quality` charge it: the physical path's account, which the one "
    "compute account (commit 7d9e4cb) left unchanged, so files written before it need no correction."
)


def fmt(value) -> str:
    if isinstance(value, float):
        if value != value:
            return "—"
        return f"{value:.4g}" if abs(value) >= 1e-3 or value == 0 else f"{value:.2e}"
    return str(value)


def table(df: pd.DataFrame) -> str:
    head = "| " + " | ".join(df.columns) + " |"
    rule = "|" + "|".join("---" for _ in df.columns) + "|"
    rows = ["| " + " | ".join(fmt(v) for v in row) + " |" for row in df.itertuples(index=False)]
    return "\n".join([head, rule, *rows])


def quality(name: str) -> str:
    df = pd.read_csv(DOCS / name)
    df["flops_saved"] = df["flops_saved"].map(lambda v: f"{v:+.1%}")
    return table(
        df[["gates", "policy", "skip_budget", "ppl", "kl_to_full", "top1_agreement", "skipped_fraction", "flops_saved"]]
    )


def matched(name: str) -> str:
    df = pd.read_csv(DOCS / name)
    df["net_flops_saved"] = df["net_flops_saved"].map(lambda v: f"{v:.0%}")
    return table(df)


def sweep(name: str) -> str:
    df = pd.read_csv(DOCS / name)
    df["flops_saved"] = df["flops_saved"].map(lambda v: f"{v:+.1%}")
    return table(
        df[
            [
                "method",
                "skip_budget",
                "skipped_fraction",
                "flops_saved",
                "ppl",
                "kl_to_full",
                "top1_agreement",
                "setting",
            ]
        ]
    )


def _pooled_cells(df: pd.DataFrame) -> str:
    """Which cells a gate statistic pools, as `gateskip stats` names them (older files: every cell)."""
    if "gate_cells" not in df.columns:
        return "every token's gate (file written before `gate_cells`)"
    cells = set(df["gate_cells"].dropna())
    return {"applied": "cells where the gate scaled the branch", "all": "every token's gate"}.get(
        cells.pop() if len(cells) == 1 else "", f"cells {sorted(cells)}"
    )


def _weighted_mean(sel: pd.DataFrame) -> float:
    """The gate mean over the group's pooled cells: each branch weighted by its cells (`gate_n`)."""
    sel = sel[sel["gate_mean"].notna()]
    if "gate_n" not in sel.columns:
        return float(sel["gate_mean"].mean())
    return (
        float((sel["gate_mean"] * sel["gate_n"]).sum() / sel["gate_n"].sum()) if sel["gate_n"].sum() else float("nan")
    )


def _layer_groups(layers: pd.DataFrame, branch: str) -> list[str]:
    L = layers["layer"].max() + 1
    parts = []
    for lo, hi in ((0, L // 3), (L // 3, 2 * L // 3), (2 * L // 3, L)):
        sel = layers[(layers["layer"] >= lo) & (layers["layer"] < hi)]
        width = (sel["gate_p95"] - sel["gate_p5"]).dropna()
        empty = sel[sel["gate_mean"].isna()]
        note = (
            f" (no pooled cell: {', '.join(f'{r.layer} {r[branch]}' for _, r in empty.iterrows())})"
            if len(empty)
            else ""
        )
        parts.append(
            f"layers {lo}-{hi - 1}: mean gate attn {_weighted_mean(sel[sel[branch] == 'attn']):.3f} / "
            f"mlp {_weighted_mean(sel[sel[branch] == 'mlp']):.3f}; per-branch 5-95% width "
            f"{width.min():.3f}-{width.max():.3f}{note}"
        )
    return parts


def _bos_line(bos: pd.DataFrame) -> str:
    """BOS's gate against the other tokens', as a difference: a ratio of two saturated gates (1.0 over
    1e-10) is meaningless. NaN rows are branches where BOS's gate never scaled anything."""
    acted = bos[bos["bos_gate"].notna() & bos["others_gate"].notna()]
    if acted.empty:
        return (
            "BOS's gate never scaled a branch in the pooled cells (BOS is protected and never skips, so in "
            "adapter scope `skipped` its gate never acts): no BOS contrast"
        )
    diff = acted["bos_gate"] - acted["others_gate"]
    return (
        f"BOS gate minus the other tokens' mean gate: {diff.min():+.2f} to {diff.max():+.2f} over "
        f"{len(acted)} branches, BOS higher in {int((diff > 0).sum())}; one measurement per model, "
        "not a sample (BOS sits at position 0 and reads only itself)"
    )


def flow(prefix: str = "") -> str:
    layers = pd.read_csv(DOCS / f"{prefix}layer_stats.csv")
    branch = "branch" if "branch" in layers.columns else "module"
    L = layers["layer"].max() + 1
    parts = [f"gate statistics pool: {_pooled_cells(layers)}", *_layer_groups(layers, branch)]
    parts.append(_bos_line(pd.read_csv(DOCS / f"{prefix}bos.csv")))
    types = pd.read_csv(DOCS / f"{prefix}token_types.csv")
    late = types[types["layer"] >= 2 * L // 3].groupby("token_type")["gate_mean"].mean().dropna().sort_values()
    parts.append(
        f"layers {2 * L // 3}-{L - 1}, mean gate by token type (mean over branches): "
        + ", ".join(f"{t} {v:.3f}" for t, v in late.items())
    )
    return "\n".join(f"- {p}" for p in parts)


def faithfulness(name: str) -> str:
    """A `gateskip faithfulness` signal table; values with their 95% intervals where the file has them.
    `unsettled` (a 0/1 signal) in a file without intervals broke its ties by row order: not printed."""
    faith = pd.read_csv(DOCS / name)
    columns = ["signal", "spearman_within", "spearman_pooled", "harm_of_skipped", "vs_random", "vs_oracle"]
    if "vs_random_low" in faith.columns:
        for column in ("spearman_within", "vs_random", "vs_oracle"):
            faith[column] = [
                "—" if v != v else f"{v:.3g} [{lo:.3g}, {hi:.3g}]"
                for v, lo, hi in zip(faith[column], faith[f"{column}_low"], faith[f"{column}_high"])
            ]
        with_interval = {c: f"{c} [95%]" for c in ("spearman_within", "vs_random", "vs_oracle")}
        return table(faith[columns].rename(columns=with_interval))
    else:
        stale = faith["signal"] == "unsettled"
        for column in columns[1:]:
            faith[column] = faith[column].astype(object)
            faith.loc[stale, column] = "— (ties broken by row order)"
    return table(faith[columns])


def fidelity(name: str = "fidelity_ablation") -> str:
    """One row per recipe: budget 0 and matched 10 / 20 / 30% net saved, ppl / KL / top-1, per text."""
    raw = pd.read_csv(DOCS / f"{name}.csv")
    matched_ = pd.read_csv(DOCS / f"{name}_matched.csv")
    rows = []
    for method in raw["method"].unique():
        row = {"recipe": method}
        for text in raw["text"].unique():
            zero = raw[(raw.method == method) & (raw.text == text) & (raw.skip_budget == 0)]
            if len(zero) and not method.startswith("shortgpt"):
                z = zero.iloc[0]
                row[f"{text}: budget 0"] = f"{z.ppl:.1f} / {z.kl_to_full:.2f} / {z.top1_agreement:.2f}"
            else:
                row[f"{text}: budget 0"] = "original"
            for target in (0.1, 0.2, 0.3):
                m = matched_[
                    (matched_.method == method) & (matched_.text == text) & (matched_.net_flops_saved == target)
                ]
                v = m.iloc[0] if len(m) else None
                row[f"{text}: {target:.0%}"] = (
                    "—" if v is None or v.ppl != v.ppl else f"{v.ppl:.1f} / {v.kl_to_full:.2f} / {v.top1_agreement:.2f}"
                )
        rows.append(row)
    return table(pd.DataFrame(rows))


HEADER = [
    "# Result tables",
    "",
    "Every table of the CSVs in `docs/results/`, generated (`python3 scripts/results_tables.py > docs/results.md`;",
    "do not edit). The pages quote them with what they mean: [training](training.md),",
    "[analysis](analysis.md); which Python's texts the figures used: [data](data.md).",
    "",
]


def page() -> str:
    """docs/results.md."""
    out = [*HEADER, *smollm2_sections()]
    if (DOCS / "gemma3_quality.csv").is_file():
        out += gemma3_sections()
    if (DOCS / "fidelity_ablation.csv").is_file():
        out += ["", "## Skipping-fidelity ablation (ppl / KL / top-1)", fidelity()]
    if (DOCS / "gate_variants_matched.csv").is_file():
        out += ["", "## Gate variants at equal training (matched net, 95% bootstrap intervals)"]
        out += [table(pd.read_csv(DOCS / "gate_variants_matched.csv").round(4))]
    return "\n".join(out) + "\n"


def smollm2_sections() -> list[str]:
    """The shipped SmolLM2 gates: quality, matched savings, sweep, information flow, faithfulness."""
    return [
        "## Quality, held-out pydoc",
        quality("quality.csv"),
        "",
        "## Quality, held-out legal text",
        quality("quality_legal.csv"),
        "",
        "## Matched net FLOPs saved, pydoc",
        "",
        ACCOUNT_NOTE,
        "",
        matched("sweep_matched.csv"),
        "",
        "## Matched net FLOPs saved, legal",
        matched("sweep_legal_matched.csv"),
        "",
        "## Sweep, pydoc",
        sweep("sweep.csv"),
        "",
        "## Information flow",
        flow(),
        "",
        "## Faithfulness: which signal predicts the exact harm of a skip, shipped `default` gates",
        "",
        "`docs/results/faithfulness_default.csv` (95% bootstrap intervals over the layers of the text):",
        "",
        faithfulness("faithfulness_default.csv"),
        "",
        "## Faithfulness, the previous `default-v2` gates",
        "",
        "`docs/results/faithfulness.csv`:",
        "",
        faithfulness("faithfulness.csv"),
    ]


def gemma3_sections() -> list[str]:
    """Gemma-3-270M: quality, matched savings, information flow, attention kinds."""
    return [
        "",
        "## Gemma-3-270M: quality, held-out pydoc",
        quality("gemma3_quality.csv"),
        "",
        "## Gemma-3-270M: quality, held-out legal text",
        quality("gemma3_quality_legal.csv"),
        "",
        "## Gemma-3-270M: matched net FLOPs saved, pydoc",
        matched("gemma3_sweep_matched.csv"),
        "",
        "## Gemma-3-270M: matched net FLOPs saved, legal",
        matched("gemma3_sweep_legal_matched.csv"),
        "",
        "## Gemma-3-270M: information flow",
        flow("gemma3_"),
        "",
        "## Gemma-3-270M: sliding-window vs global attention layers",
        table(pd.read_csv(DOCS / "gemma3_attention_kinds.csv")),
    ]


def main() -> None:
    print(page(), end="")


if __name__ == "__main__":
    main()
