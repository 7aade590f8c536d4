"""Real compute savings: wall time of the masked and physical paths at several skip budgets.

    python gateskip/bench/physical_speedup.py [--gates default] [--batch 4] [--seq-len 256] [--repeats 3] [--clock cpu] [--out docs/results/bench_physical_speedup.json]

Prefill of held-out text. The masked path computes everything and zeroes skipped outputs (it saves
nothing); the physical path gathers the tokens that run each branch. At each budget the masked path,
the physical path and an ungated dense pass are timed in turns (one warm-up each, then `--repeats`
rounds; the best of each is kept), so a machine whose speed drifts biases none of them. Also prints
the analytic account's net FLOPs saved (gates included). `--out` also writes the figures as JSON,
which scripts/doc_tables.py renders into docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
import time
from pathlib import Path

import torch

from analysis.experiments.quality import evaluation_blocks
from analysis.inputs import budget_list, check_out
from gateskip.bench import clock as clock_module
from gateskip.bench.suite import interleaved, machine
from gateskip_core import load_model
from gateskip_core.backbone.registry import DEFAULT_MODEL
from gateskip_core.cli import add_device_dtype_args, run_script, script_parser


def parse_args() -> argparse.Namespace:
    parser = script_parser(__doc__.splitlines()[0])
    parser.add_argument("--model", default=DEFAULT_MODEL)
    parser.add_argument("--gates", default="default")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--budgets", type=budget_list, default="0,0.25,0.5,0.7", help="comma-separated skip budgets")
    parser.add_argument(
        "--clock",
        choices=["wall", "cpu"],
        default="wall",
        help="time by the wall clock, or (CPU runs on a shared machine) by this process's CPU time",
    )
    parser.add_argument("--out", default=None, help="also write the figures as JSON (the figures the docs quote)")
    add_device_dtype_args(parser)
    args = parser.parse_args()
    if args.clock == "cpu" and args.device != "cpu":
        parser.error(f"--clock cpu times CPU runs only; got --device {args.device}")
    check_out(args.out, (".json",))  # before the timings
    return args


def main() -> None:
    args = parse_args()
    clock_module.CPU_TIME = args.clock == "cpu"
    model = load_model(args.model, gates=args.gates, device=args.device, dtype=args.dtype)
    ids = evaluation_blocks(model, n_blocks=args.batch, seq_len=args.seq_len).to(model.device)  # copied once
    mask, dense = torch.ones_like(ids), model.view()
    print(
        f"{args.model}, {model.gates_label}, batch {args.batch} x {args.seq_len}, torch threads "
        f"{torch.get_num_threads()}, {args.clock} clock, best of {args.repeats}"
    )
    print(f"{'skip':>5s} {'masked tok/s':>13s} {'physical tok/s':>15s} {'speedup vs masked':>18s} "
          f"{'vs dense':>9s} {'net FLOPs saved':>16s}")  # fmt: skip
    rows = []
    for budget in args.budgets:
        plans = {
            "masked": (model, model.make_plan(budget, path="masked")),
            "physical": (model, model.make_plan(budget, path="physical")),
            "dense": (dense, dense.make_plan(0.0)),
        }
        calls = {name: (lambda m=m, p=p: m.forward(ids, mask, p)) for name, (m, p) in plans.items()}
        times, _ = interleaved(calls, args.repeats)
        saved = model.trace(model.tokenizer.decode(ids[0][1:]), skip=budget, max_tokens=args.seq_len).compute
        row = {"skip": budget, **{f"{name}_s": times[name] for name in calls}}
        row["net_flops_saved"] = saved.net_saved_fraction
        rows.append(row)
        best = {name: times[name]["min_s"] for name in calls}
        print(
            f"{budget:5.2f} {ids.numel() / best['masked']:13.0f} {ids.numel() / best['physical']:15.0f} "
            f"{best['masked'] / best['physical']:17.2f}x {best['dense'] / best['physical']:8.2f}x "
            f"{saved.net_saved_fraction:15.1%}"
        )
    if args.out:
        write_results(args, model.gates_label, rows)


def write_results(args: argparse.Namespace, gates_label: str, rows: list[dict]) -> None:
    settings = ("model", "gates", "batch", "seq_len", "repeats", "clock", "device", "dtype")
    results = {
        "script": "physical_speedup",
        "command": shlex.join(["python", "gateskip/bench/physical_speedup.py", *sys.argv[1:]]),
        "config": {name: getattr(args, name) for name in settings} | {"gates_label": gates_label},
        "machine": machine(),
        "rows": rows,
        "date": time.strftime("%Y-%m-%d"),
    }
    Path(args.out).write_text(json.dumps(results, indent=1) + "\n")


def summary(results: dict) -> str:
    """One line of a `--out` file's figures, as docs/benchmarks.md shows them: the ratios of the best
    times of each path (physical over masked, physical over a dense pass)."""
    config, rows = results["config"], results["rows"]
    skips = " / ".join(f"{r['skip']:g}" for r in rows)

    def ratios(base: str) -> str:
        return " / ".join(f"{r[base + '_s']['min_s'] / r['physical_s']['min_s']:.2f}x" for r in rows)

    return (
        f"prefill of {config['batch']} x {config['seq_len']} tokens, best of {config['repeats']} "
        f"({config['clock']} clock): physical vs masked {ratios('masked')}, vs a dense pass {ratios('dense')} "
        f"at skip {skips} (net FLOPs saved " + " / ".join(f"{r['net_flops_saved']:+.1%}" for r in rows) + ")"
    )


if __name__ == "__main__":
    raise SystemExit(run_script(main))
