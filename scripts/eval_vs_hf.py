"""`gateskip` at budget 0 against lm-eval's own `hf` model on the same tasks, in one run: scores and time.

    OMP_NUM_THREADS=1 python3 scripts/eval_vs_hf.py --out docs/results/eval_vs_hf.csv [--limit 16] [--repeats 2]
        [--tasks T1,T2 --merge]

SmolLM2-135M-Instruct with its shipped gates (adapter scope `skipped`: at budget 0 the original model),
one torch thread, batch size 8. The two models alternate, `--repeats` times per task, and the fastest
run of each counts (the machine is shared: the minimum is the least disturbed). One row per task, with
its item count and repeats. `--merge` keeps the rows of `--out` for other tasks (so tasks can be added in
runs of their own).
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import pandas as pd
import torch

TASKS = ["gateskip_pydoc_nextsent", "gateskip_legal_ppl", "gateskip_legal_lastword_gen"]
# every shipped task: the same cut of two texts into the four task kinds
SHIPPED = [
    f"gateskip_{text}_{kind}" for kind in ("nextsent", "lastword", "lastword_gen", "ppl") for text in ("pydoc", "legal")
]
MAIN_METRIC = {
    "nextsent": "acc,none",
    "lastword": "acc,none",
    "ppl": "word_perplexity,none",
    "gen": "exact_match,strip",
}


def timed(lm, task, manager, limit: int) -> tuple[float, dict]:
    import lm_eval

    start = time.perf_counter()
    out = lm_eval.simple_evaluate(model=lm, tasks=[task], task_manager=manager, limit=limit, log_samples=False)
    name = task.config.task
    return time.perf_counter() - start, {**out["results"][name], "n": out["n-samples"][name]["effective"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True)
    parser.add_argument("--limit", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--tasks", default=",".join(TASKS), help=f"comma-separated, of {', '.join(SHIPPED)}")
    parser.add_argument("--merge", action="store_true", help="keep the rows of --out for the other tasks")
    args = parser.parse_args()
    tasks = args.tasks.split(",")
    torch.set_num_threads(1)
    from lm_eval.models.huggingface import HFLM

    from analysis.evaluation.lm import GateSkipLM
    from analysis.evaluation.task_loading import load_tasks
    from gateskip_core import load_model

    model = load_model("smollm2-135m-instruct", gates="default")
    loaded = load_tasks(tasks)
    rows = []
    for name in tasks:
        task, seconds, scores = loaded.tasks[name], {"hf": [], "gateskip": []}, {}
        for _ in range(args.repeats):
            for kind in ("hf", "gateskip"):
                lm = (
                    HFLM(pretrained=model.original, tokenizer=model.tokenizer, batch_size=8, add_bos_token=True)
                    if kind == "hf"
                    else GateSkipLM(model, skip=0.0, batch_size=8)
                )
                took, scores[kind] = timed(lm, task, loaded.manager, args.limit)
                seconds[kind].append(took)
        metric = MAIN_METRIC[name.rsplit("_", 1)[-1]]
        rows.append(
            {
                "task": name,
                "metric": metric.split(",")[0],
                "n": scores["gateskip"]["n"],  # the items evaluated: the task may have fewer than --limit
                "hf": scores["hf"][metric],
                "gateskip_b0": scores["gateskip"][metric],
                "hf_seconds": min(seconds["hf"]),
                "gateskip_seconds": min(seconds["gateskip"]),
                "time_ratio": min(seconds["gateskip"]) / min(seconds["hf"]),
                "repeats": args.repeats,
            }
        )
        print(rows[-1], flush=True)
    table = pd.DataFrame(rows)
    if args.merge and Path(args.out).exists():
        kept = pd.read_csv(args.out)
        table = pd.concat([kept[~kept.task.isin(tasks)], table], ignore_index=True)
        table["order"] = table.task.map(SHIPPED.index)
        table = table.sort_values("order", kind="stable").drop(columns="order").astype({"repeats": "Int64"})
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    table.to_csv(args.out, index=False)
    print(table.to_string(index=False, float_format=lambda v: f"{v:.4g}"))


if __name__ == "__main__":
    main()
