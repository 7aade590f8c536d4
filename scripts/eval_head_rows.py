"""What computing the LM head only where lm-eval reads it saves: `gateskip` as shipped (the head on each
row's continuation positions) against the same model with the head on every position (what `hf` does),
on the shipped last-word cloze tasks, in one run.

    OMP_NUM_THREADS=1 python3 scripts/eval_head_rows.py --out docs/results/eval_head_rows.csv [--model gemma3-270m] [--limit 16]

The model with its shipped `default` gates at budget 0, one torch thread, batch size 8. The two variants
alternate, `--repeats` times per task, and the fastest run of each counts (the machine is shared: the
minimum is the least disturbed). One row per task: both scores (they must agree) and both times.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import pandas as pd
import torch

TASKS = ["gateskip_pydoc_lastword", "gateskip_legal_lastword"]


def all_positions_model():
    """`GateSkipLM` with the head on every position of every row (the behaviour before the change)."""
    from analysis.evaluation.lm import GateSkipLM

    class AllPositions(GateSkipLM):
        def _scored_logits(self, final_hidden, rows):
            return self.gated.spec.logits(final_hidden)

    return AllPositions


def timed(lm, task, manager, limit: int) -> tuple[float, dict]:
    import lm_eval

    start = time.perf_counter()
    out = lm_eval.simple_evaluate(model=lm, tasks=[task], task_manager=manager, limit=limit, log_samples=False)
    return time.perf_counter() - start, out["results"][task.config.task]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True)
    parser.add_argument("--model", default="gemma3-270m")
    parser.add_argument("--limit", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(1)
    from analysis.evaluation.lm import GateSkipLM
    from analysis.evaluation.task_loading import load_tasks
    from gateskip_core import load_model

    model = load_model(args.model, gates="default")
    loaded = load_tasks(TASKS)
    variants = {"all_positions": all_positions_model(), "continuations": GateSkipLM}
    rows = []
    for name in TASKS:
        task, seconds, scores = loaded.tasks[name], {k: [] for k in variants}, {}
        for _ in range(args.repeats):
            for kind, cls in variants.items():
                took, scores[kind] = timed(cls(model, skip=0.0, batch_size=8), task, loaded.manager, args.limit)
                seconds[kind].append(took)
        rows.append(
            {
                "model": args.model,
                "task": name,
                "n": args.limit,
                "acc_all_positions": scores["all_positions"]["acc,none"],
                "acc_continuations": scores["continuations"]["acc,none"],
                "perplexity_all_positions": scores["all_positions"]["perplexity,none"],
                "perplexity_continuations": scores["continuations"]["perplexity,none"],
                "seconds_all_positions": min(seconds["all_positions"]),
                "seconds_continuations": min(seconds["continuations"]),
                "speedup": min(seconds["all_positions"]) / min(seconds["continuations"]),
            }
        )
        print(rows[-1], flush=True)
    table = pd.DataFrame(rows)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    table.to_csv(args.out, index=False)
    print(table.to_string(index=False, float_format=lambda v: f"{v:.4g}"))


if __name__ == "__main__":
    main()
