"""Why generated tokens miss the budget: prompts vs drift.

A decode set is fitted on the original's (budget 0) answers to the calibration chat prompts. In a
generation at budget b two things differ: the prompts (held out, not the fit's) and the answers
(the gated model's own, drifting from the original's). This scores the decode set's skip rate on
the original's budget-0 answers, teacher-forced in one pass as a phased generation decides them
(prompt set for the prompt's tokens, decode set for the answer's), to the fit's prompts and to
held-out ones. fit prompts vs budget: the fit itself (the first 12 of its 24 prompts); held-out vs
fit prompts: the prompt shift; held-out here vs the generation's rate in
docs/results/generated_skip_rates*.csv: the drift. One row per (model, prompts, budget), a 95%
percentile interval from resampling whole answers (1,000 draws).

python scripts/decode_fit_shift.py [--models smollm2-135m-instruct] [--out docs/results/decode_fit_shift.csv]
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from analysis.experiments.quality import HELDOUT_CHAT_PROMPTS
from analysis.traces.intervals import cluster_bootstrap
from gateskip_core import load_model
from gateskip_core.skipping.calibration import GENERATED_FIT_TOKENS, own_answers, phased_answer_skips
from gateskip_core.training.chat_data import chat_prompts

BUDGETS = (0.1, 0.25, 0.5)
PROMPTS = 12


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--models", default="smollm2-135m-instruct", help="models whose `default` gates carry a decode set"
    )
    parser.add_argument("--out", default="docs/results/decode_fit_shift.csv")
    args = parser.parse_args()
    torch.set_num_threads(1)
    rows = []
    for name in args.models.split(","):
        model = load_model(name, gates="default")
        sets = {"fit": chat_prompts()[5::11][:PROMPTS], "held-out": HELDOUT_CHAT_PROMPTS[:PROMPTS]}
        for label, prompts in sets.items():
            answers = own_answers(model, prompts, GENERATED_FIT_TOKENS)
            for budget in BUDGETS:
                counts = phased_answer_skips(model, answers, model.budget(budget))
                interval = cluster_bootstrap(counts, lambda c: float(np.sum(c, axis=0)[0] / np.sum(c, axis=0)[1]))
                rows.append({"model": name, "prompts": label, "answers": "original (budget 0), teacher-forced",
                             "skip_budget": budget, "generated_skip_rate": round(interval.estimate, 4),
                             "generated_low": round(interval.low, 4), "generated_high": round(interval.high, 4),
                             "answers_n": len(answers)})  # fmt: skip
                print(rows[-1], flush=True)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    pd.DataFrame(rows).to_csv(args.out, index=False)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
