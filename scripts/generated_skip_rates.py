"""Budgets that generated tokens keep: the skip rate of prompt tokens and of generated tokens against
the budget, for thresholds fitted on prompt-like text (the checkpoint's, `prompt`) and on the model's
own answers at decode time (`generated`, `calibration.fit_generated_thresholds`).

Greedy, chat template, calibrated policy, physical path, KV cache. The rates are measured on the
held-out chat prompts (analysis/experiments/quality.py HELDOUT_CHAT_PROMPTS, used by no fit); the
decode-step fit reads the model's answers to the training's calibration chat prompts
(training/chat_data.py chat_prompts()[5::11]), none of them held out.

python scripts/generated_skip_rates.py [--prompts 6] [--fit-prompts 16] [--out docs/results/generated_skip_rates.csv]
"""

from __future__ import annotations

import argparse
from pathlib import Path

import pandas as pd
import torch

from analysis.experiments.quality import HELDOUT_CHAT_PROMPTS
from gateskip_core import load_model
from gateskip_core.skipping.calibration import GENERATED_FIT_TOKENS, fit_generated_thresholds, own_answers
from gateskip_core.training.chat_data import chat_prompts

BUDGETS = (0.1, 0.2, 0.25, 0.3, 0.4, 0.5)
NEW_TOKENS = 48


def rates_row(model, prompts: list[str], calibration: str, budget: float, policy) -> dict:
    """One generation over all held-out prompts (a left-padded batch; decisions are per token)."""
    gen = model.generate(prompts, max_new_tokens=NEW_TOKENS, chat=True, skip=budget, policy=policy, path="physical")
    rates = gen.skip_rates()
    generated = sum(s.n_tokens - s.prompt_length for s in gen.trace.sequences)
    return {
        "model": model.name,
        "gates": "default",
        "calibration": calibration,
        "skip_budget": budget,
        "prompt_skip_rate": round(rates.prompt, 4),
        "generated_skip_rate": round(rates.generated, 4),
        "generated_minus_budget": round(rates.generated - budget, 4),
        "held_out_prompts": len(prompts),
        "generated_tokens": generated,
        "new_tokens_per_prompt": NEW_TOKENS,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prompts", type=int, default=6, help="held-out chat prompts measured")
    parser.add_argument("--fit-prompts", type=int, default=16, help="calibration chat prompts the decode fit answers")
    parser.add_argument("--out", default="docs/results/generated_skip_rates.csv")
    args = parser.parse_args()
    torch.set_num_threads(1)
    model = load_model("smollm2-135m-instruct", gates="default")
    held_out = HELDOUT_CHAT_PROMPTS[: args.prompts]
    fit_prompts = chat_prompts()[5::11][: args.fit_prompts]
    assert not set(fit_prompts) & set(HELDOUT_CHAT_PROMPTS)
    answers = own_answers(model, fit_prompts, GENERATED_FIT_TOKENS)
    rows = []
    for budget in BUDGETS:
        rows.append(rates_row(model, held_out, "prompt", budget, "calibrated"))
        fitted = fit_generated_thresholds(model, model.budget(budget), fit_prompts, answers=answers)
        rows.append(rates_row(model, held_out, "generated", budget, fitted))
        print(pd.DataFrame(rows[-2:]).to_string(index=False), flush=True)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    pd.DataFrame(rows).to_csv(out, index=False)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
