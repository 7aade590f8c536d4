"""Budgets that generated tokens keep: the skip rate of prompt tokens and of generated tokens against
the budget, with the prompt's thresholds for every token (`prompt`, `generate(...,
generated_thresholds="prompt")`, the behaviour before decode-fitted thresholds) and with the default
`phased` thresholds (prompt tokens: the stored prompt-fitted ones; generated tokens: the stored
decode-fitted ones, scripts/fit_decode_thresholds.py).

Greedy, calibrated policy, physical path, KV cache, `--model`'s `default` gates (SmolLM2 by default;
the prompts go through the chat template where the model has one: Gemma-3-270M has none, so it
continues them as plain text, as its decode set was fitted).
The rates are measured on the held-out chat prompts (analysis/experiments/quality.py
HELDOUT_CHAT_PROMPTS, used by no fit; the decode fit read the answers to the training's calibration
chat prompts, training/chat_data.py chat_prompts()[5::11]). Each rate is pooled over the prompts (as
`Generation.skip_rates`), with a 95% percentile interval from resampling whole prompts (1,000 draws).
`allocated_rate`: the mean of the per-branch rates the budget's allocation sets (the default, global
allocation spends a fraction of compute, so branch evaluations average slightly below the budget).

python scripts/generated_skip_rates.py [--model smollm2-135m-instruct] [--gates default] [--prompts 12] [--out docs/results/generated_skip_rates.csv]

Gemma-3's shipped gates carry no decode set (measured with one, it kept the budget worse than the
prompt set on these prompts); its table was made on a copy given one:
    cp gateskip_core/shipped_gates/gemma3-270m-default.safetensors /tmp/gemma3-decode.safetensors
    python scripts/fit_decode_thresholds.py /tmp/gemma3-decode.safetensors
    python scripts/generated_skip_rates.py --model gemma3-270m --gates /tmp/gemma3-decode.safetensors \
        --out docs/results/generated_skip_rates_gemma3.csv
"""

from __future__ import annotations

import argparse
from functools import partial
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from analysis.experiments.quality import HELDOUT_CHAT_PROMPTS
from analysis.traces.intervals import cluster_bootstrap
from gateskip_core import load_model
from gateskip_core.branches import skipped_fraction

BUDGETS = (0.1, 0.2, 0.25, 0.3, 0.4, 0.5)
NEW_TOKENS = 48
THRESHOLDS = {"prompt": "prompt", "phased": "auto"}  # row label -> generate's generated_thresholds


def pooled_rate(counts: list[tuple[int, int]], n_layers: int) -> float:
    """Skipped over eligible branch evaluations of all (skipped, eligible tokens) pairs, as
    `Generation.skip_rates` pools them."""
    skipped, eligible = np.sum(counts, axis=0)
    return skipped_fraction(skipped, eligible, n_layers)


def part_counts(gen, part: str) -> list[tuple[int, int]]:
    """Per prompt: (skipped branch evaluations, eligible tokens) of its prompt or generated tokens."""
    counts = []
    for seq in gen.trace.sequences:
        span = slice(0, seq.prompt_length) if part == "prompt" else slice(seq.prompt_length, None)
        counts.append((int(seq.skipped[span].sum()), int(seq.eligible[span].sum())))
    return counts


def rates_row(model, gates: str, prompts: list[str], label: str, budget: float) -> dict:
    """One generation over all held-out prompts (a left-padded batch; decisions are per token)."""
    gen = model.generate(
        prompts,
        max_new_tokens=NEW_TOKENS,
        chat=bool(model.tokenizer.chat_template),
        skip=budget,
        path="physical",
        generated_thresholds=THRESHOLDS[label],
    )
    row = {"model": model.name, "gates": gates, "thresholds": label, "skip_budget": budget}
    pooled = partial(pooled_rate, n_layers=model.spec.n_layers)
    for part in ("prompt", "generated"):
        interval = cluster_bootstrap(part_counts(gen, part), pooled)
        row.update(
            {
                f"{part}_skip_rate": round(interval.estimate, 4),
                f"{part}_low": round(interval.low, 4),
                f"{part}_high": round(interval.high, 4),
            }
        )
    row["generated_minus_budget"] = round(row["generated_skip_rate"] - budget, 4)
    # the budget is a fraction of compute; under the global allocation the per-branch rates it sets
    # average (over branch evaluations, as these rates count) to slightly less
    row["allocated_rate"] = round(float(model.budget(budget).fractions.mean()), 4)
    row["generated_tokens"] = sum(s.n_tokens - s.prompt_length for s in gen.trace.sequences)
    row["held_out_prompts"] = len(prompts)
    row["new_tokens_per_prompt"] = NEW_TOKENS
    row["threshold_sets"] = gen.skip_rates().thresholds
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m-instruct", help="a model with shipped `default` gates")
    parser.add_argument("--gates", default="default", help="gates with a decode set (a spec or a checkpoint file)")
    parser.add_argument("--prompts", type=int, default=12, help="held-out chat prompts measured")
    parser.add_argument("--budgets", default=",".join(map(str, BUDGETS)), help="comma separated")
    parser.add_argument("--out", default="docs/results/generated_skip_rates.csv")
    args = parser.parse_args()
    torch.set_num_threads(1)
    model = load_model(args.model, gates=args.gates)
    if model.calibrate_generated(model.budget(0.25)) is None:
        raise SystemExit(
            f"gates {args.gates!r} store no decode-fitted thresholds: run scripts/fit_decode_thresholds.py"
        )
    held_out = HELDOUT_CHAT_PROMPTS[: args.prompts]
    rows = []
    for budget in (float(b) for b in args.budgets.split(",")):
        for label in THRESHOLDS:
            rows.append(rates_row(model, args.gates, held_out, label, budget))
        print(
            pd.DataFrame(rows[-2:]).drop(columns=["model", "gates", "threshold_sets"]).to_string(index=False),
            flush=True,
        )
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    pd.DataFrame(rows).to_csv(out, index=False)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
