"""Real compute savings: wall time of the masked and physical paths at several skip budgets.

    python gateskip/bench/physical_speedup.py [--gates default] [--batch 4] [--seq-len 256] [--repeats 3]

Prefill of held-out text on CPU. The masked path computes everything and zeroes
skipped outputs (it saves nothing); the physical path gathers the tokens that run
each branch. Also prints the analytic account's net FLOPs saved (gates included).
"""

from __future__ import annotations

import argparse

import torch

from analysis.experiments.quality import evaluation_blocks
from gateskip.bench.clock import clock
from gateskip_core import load_model
from gateskip_core.backbone.registry import DEFAULT_MODEL
from gateskip_core.cli import add_device_dtype_args


def timed(model, ids, plan, repeats: int) -> float:
    model.forward(ids, torch.ones_like(ids), plan)  # warm-up
    best = float("inf")
    for _ in range(repeats):
        start = clock()
        model.forward(ids, torch.ones_like(ids), plan)
        best = min(best, clock() - start)
    return best


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default=DEFAULT_MODEL)
    parser.add_argument("--gates", default="default")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--budgets", default="0,0.25,0.5,0.7")
    add_device_dtype_args(parser)
    args = parser.parse_args()
    model = load_model(args.model, gates=args.gates, device=args.device, dtype=args.dtype)
    ids = evaluation_blocks(model, n_blocks=args.batch, seq_len=args.seq_len).to(model.device)  # copied once
    tokens = ids.numel()
    base = timed(model.view(), ids, model.view().make_plan(0.0), args.repeats)
    print(
        f"{args.model}, {model.gates_label}, batch {args.batch} x {args.seq_len}, torch threads "
        f"{torch.get_num_threads()}; ungated dense: {tokens / base:.0f} tok/s"
    )
    print(
        f"{'skip':>5s} {'masked tok/s':>13s} {'physical tok/s':>15s} {'speedup vs masked':>18s} "
        f"{'vs ungated':>11s} {'net FLOPs saved':>16s}"
    )
    for budget in [float(b) for b in args.budgets.split(",")]:
        masked = timed(model, ids, model.make_plan(budget, path="masked"), args.repeats)
        physical = timed(model, ids, model.make_plan(budget, path="physical"), args.repeats)
        saved = model.trace(model.tokenizer.decode(ids[0][1:]), skip=budget, max_tokens=args.seq_len).compute
        print(
            f"{budget:5.2f} {tokens / masked:13.0f} {tokens / physical:15.0f} {masked / physical:17.2f}x "
            f"{base / physical:10.2f}x {saved.net_saved_fraction:15.1%}"
        )


if __name__ == "__main__":
    main()
