"""One row per recipe of the skip-signal ablation (scripts/skip_signal_ablation.sh): training steps and
seconds, ranking against exact harm, quality at budget 0 and matched 10/20/30% net saved on each
held-out text (with both ShortGPT variants), and chat fidelity. Writes docs/results/skip_signal.csv and
prints it as a Markdown table.

    python scripts/skip_signal_table.py RUNS_DIR LABEL [LABEL ...]
"""

from __future__ import annotations

import sys
from pathlib import Path

import pandas as pd
from safetensors import safe_open

QUALITY = Path("docs/results/skip_signal_quality.csv")


def training_of(runs: Path, label: str) -> dict:
    path = runs / f"sig-{label}.safetensors"
    if not path.is_file():
        return {"steps": 0, "s_per_step": float("nan")}
    import json

    with safe_open(str(path), framework="pt") as f:
        training = json.loads(f.metadata()["training"])
    return {"steps": training["steps"], "s_per_step": training["seconds"] / training["steps"]}


def main() -> None:
    runs, labels = Path(sys.argv[1]), sys.argv[2:]
    quality = pd.read_csv(QUALITY)
    matched = pd.read_csv(QUALITY.with_name(QUALITY.stem + "_matched.csv"))
    rows = []
    for label in [*labels, "shortgpt", "shortgpt-calibration"]:
        row = {"recipe": label}
        if label in labels:
            row.update(training_of(runs, label))
            faith = pd.read_csv(runs / f"faith-{label}.csv").set_index("signal")
            row["spearman_within"] = faith.loc["gate", "spearman_within"]
            row["gate_vs_random"] = faith.loc["gate", "vs_random"]
            row["gate_vs_oracle"] = faith.loc["gate", "vs_oracle"]
            chat = pd.read_csv(runs / f"chat-{label}.csv").set_index("skip_budget")
            row["chat_top1_at_0.25"] = chat.loc[0.25, "top1_agreement"]
            row["chat_kl_at_0.25"] = chat.loc[0.25, "kl_to_full"]
        for text in quality.text.unique():
            zero = quality[(quality.text == text) & (quality.method == label) & (quality.skip_budget == 0)]
            if len(zero):
                row[f"{text}_b0_kl"] = float(zero.kl_to_full.iloc[0])
            for saved in (0.1, 0.2, 0.3):
                m = matched[(matched.text == text) & (matched.method == label) & (matched.net_flops_saved == saved)]
                if len(m):
                    row[f"{text}_{int(saved * 100)}_ppl"] = float(m.ppl.iloc[0])
                    row[f"{text}_{int(saved * 100)}_kl"] = float(m.kl_to_full.iloc[0])
                    row[f"{text}_{int(saved * 100)}_top1"] = float(m.top1_agreement.iloc[0])
        rows.append(row)
    table = pd.DataFrame(rows)
    table.to_csv("docs/results/skip_signal.csv", index=False)
    print(markdown(table))


def markdown(table: pd.DataFrame) -> str:
    """Compact Markdown: per recipe, ranking and chat, then ppl / KL / top-1 at 10 / 20 / 30% per text."""

    def cell(row, text, saved):
        ppl = row.get(f"{text}_{saved}_ppl")
        if ppl is None or pd.isna(ppl):
            return "–"
        return f"{ppl:.1f} / {row[f'{text}_{saved}_kl']:.2f} / {row[f'{text}_{saved}_top1']:.2f}"

    def num(value, fmt):
        return "–" if value is None or pd.isna(value) else format(value, fmt)

    lines = [
        "| recipe | steps | Spearman | lowest quarter vs random / vs oracle | chat top-1 / KL at 0.25 "
        "| pydoc 10% | 20% | 30% | legal 10% | 20% | 30% |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for row in table.to_dict("records"):
        ranking = (
            f"{num(row.get('gate_vs_random'), '.2f')}x / {num(row.get('gate_vs_oracle'), '.2f')}x"
            if "gate_vs_random" in row and not pd.isna(row.get("gate_vs_random"))
            else "–"
        )
        chat = (
            f"{num(row.get('chat_top1_at_0.25'), '.2f')} / {num(row.get('chat_kl_at_0.25'), '.2f')}"
            if not pd.isna(row.get("chat_top1_at_0.25", float("nan")))
            else "–"
        )
        cells = [cell(row, text, saved) for text in ("pydoc", "legal") for saved in (10, 20, 30)]
        steps = row.get("steps")
        lines.append(
            f"| {row['recipe']} | {'–' if pd.isna(steps) else int(steps)} | {num(row.get('spearman_within'), '+.3f')} "
            f"| {ranking} | {chat} | " + " | ".join(cells) + " |"
        )
    return "\n".join(lines)


if __name__ == "__main__":
    main()
