"""Analysis subcommands of `gateskip` (registered by gateskip_core.cli)."""

from __future__ import annotations

import argparse
from pathlib import Path

from gateskip_core.errors import GateSkipError


def _budgets(text: str) -> list[float]:
    try:
        values = [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"budgets must be comma-separated numbers, got {text!r}") from None
    if not values or any(not 0 <= v <= 1 for v in values):
        raise argparse.ArgumentTypeError(f"budgets must lie in [0, 1], got {text!r}")
    return values


def _check_out(path: str, suffixes=(".csv",)) -> Path:
    out = Path(path)
    if out.suffix.lower() not in suffixes:
        raise GateSkipError(f"--out must end in {' or '.join(suffixes)}, got {path!r}")
    return out


def cmd_quality(args: argparse.Namespace) -> int:
    from gateskip_core import load_model

    from .quality import evaluation_blocks, quality_table

    out = _check_out(args.out)
    model = load_model(args.model)
    specs = dict(item.split("=", 1) if "=" in item else (item, item) for item in args.gates)
    table = quality_table(model, specs, args.budgets, evaluation_blocks(model, n_blocks=args.blocks))
    table.to_csv(out, index=False)
    print(table.to_string(index=False, float_format=lambda v: f"{v:.4g}"))
    print(f"wrote {out}")
    return 0


def register(sub, commands, add_model_args, add_skip_args, budget_type) -> None:
    p = sub.add_parser("quality", help="perplexity / agreement of gates vs random skipping on held-out text")
    p.add_argument("--model", default="smollm2-135m-instruct")
    p.add_argument("--gates", nargs="+", default=["trained=default", "untrained=untrained"],
                   help="LABEL=SPEC pairs; the first is also run with random skipping")  # fmt: skip
    p.add_argument("--budgets", type=_budgets, default=[0.1, 0.25, 0.5])
    p.add_argument("--blocks", type=int, default=8, help="held-out blocks of 128 tokens")
    p.add_argument("--out", required=True)
    commands["quality"] = cmd_quality
