"""Markdown tables of the README's results, from the CSVs `scripts/reproduce_results.sh` writes to docs/.

python3 scripts/results_tables.py > docs/results.md
"""

from __future__ import annotations

from pathlib import Path

import pandas as pd

DOCS = Path(__file__).resolve().parent.parent / "docs"


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


def flow(prefix: str = "") -> str:
    layers = pd.read_csv(DOCS / f"{prefix}layer_stats.csv")
    branch = "branch" if "branch" in layers.columns else "module"
    L = layers["layer"].max() + 1
    parts = []
    for lo, hi in ((0, L // 3), (L // 3, 2 * L // 3), (2 * L // 3, L)):
        sel = layers[(layers["layer"] >= lo) & (layers["layer"] < hi)]
        means = sel.groupby(branch)["gate_mean"].mean()
        width = (sel["gate_p95"] - sel["gate_p5"]).mean()
        parts.append(
            f"layers {lo}-{hi - 1}: mean gate attn {means['attn']:.3f} / mlp {means['mlp']:.3f}, "
            f"5-95% width {width:.3f}"
        )
    bos = pd.read_csv(DOCS / f"{prefix}bos.csv")
    early = bos[bos["layer"] < 3]
    later = bos[bos["layer"] >= 3]
    parts.append(
        f"BOS/others gate ratio, layers 0-2: {early['ratio'].min():.2f}-{early['ratio'].max():.2f}; "
        f"layers 3+: {later['ratio'].min():.2f}-{later['ratio'].max():.2f} "
        f"(mean rank {later['mean_rank'].mean():.1f})"
    )
    types = pd.read_csv(DOCS / f"{prefix}token_types.csv")
    late = types[types["layer"] >= 2 * L // 3].groupby("token_type")["gate_mean"].mean().sort_values()
    parts.append("late-layer mean gate by token type: " + ", ".join(f"{t} {v:.3f}" for t, v in late.items()))
    return "\n".join(f"- {p}" for p in parts)


def faithfulness() -> str:
    """The signal table of `gateskip faithfulness` (docs/faithfulness.csv)."""
    faith = pd.read_csv(DOCS / "faithfulness.csv")
    return table(faith[["signal", "spearman_within", "spearman_pooled", "harm_of_skipped", "vs_random", "vs_oracle"]])


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


def main() -> None:
    out = [
        "## Quality, held-out pydoc",
        quality("quality.csv"),
        "",
        "## Quality, held-out legal text",
        quality("quality_legal.csv"),
        "",
        "## Matched net FLOPs saved, pydoc",
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
        "## Faithfulness: which signal predicts the exact harm of a skip",
        faithfulness(),
    ]
    if (DOCS / "gemma3_quality.csv").is_file():
        out += [
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
    if (DOCS / "fidelity_ablation.csv").is_file():
        out += ["", "## Skipping-fidelity ablation (ppl / KL / top-1)", fidelity()]
    if (DOCS / "gate_variants.csv").is_file():
        out += ["", "## Gate variants at equal training", quality("gate_variants.csv")]
    print("\n".join(out))


if __name__ == "__main__":
    main()
