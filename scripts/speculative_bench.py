"""Self-speculative decoding on SmolLM2 with its default gates: tok/s against our dense walk at draft
budgets 0.25/0.5/0.75 and K = 2/4/6, acceptance rates and the cost of each part of a round, one thread
(`gateskip bench --sections speculative`, `gateskip/bench/speculative.py`). Writes docs/results/speculative.csv,
the table of docs/generation.md.

    python scripts/speculative_bench.py [--out docs/results/speculative.csv] [--new-tokens 48]
"""

from __future__ import annotations

import argparse
from pathlib import Path

import pandas as pd
import torch

from gateskip.bench.suite import BenchConfig, machine, run


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="docs/results/speculative.csv")
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--gates", default="default")
    parser.add_argument("--new-tokens", type=int, default=48)
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(1)
    cfg = BenchConfig(
        model=args.model,
        gates=args.gates,
        sections=("speculative",),
        speculative_new_tokens=args.new_tokens,
        repeats=args.repeats,
    )
    results = run(cfg)
    frame = pd.DataFrame(results["speculative"])
    frame.insert(0, "model", args.model)
    frame.insert(1, "gates", args.gates)
    frame["prompt_tokens"] = cfg.speculative_prompt
    frame["new_tokens"] = cfg.speculative_new_tokens
    frame["machine"] = f"{machine()['cpu']}, 1 thread"
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    frame.to_csv(args.out, index=False, float_format="%.4g")
    print(frame.to_string(index=False, float_format=lambda v: f"{v:.3g}"))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
