"""`gateskip causal`: per layer and branch, the gate statistic beside the causal ones, as CSV.

A command of its own rather than a `gateskip stats` flag: `stats` reads a trace with DuckDB and never
loads a model, while this one runs the model (one forward per text for gates and norms, and one per
forced skip for the harm).
"""

from __future__ import annotations

import argparse
import time

from gateskip_core.errors import GateSkipError
from gateskip_core.files import check_writable, write_all
from gateskip_core.validation import cli_type, whole_number


def cmd_causal(args: argparse.Namespace) -> int:
    from pathlib import Path

    from analysis.experiments.causal import corpus_effects, layer_effects
    from analysis.inputs import paragraphs_of
    from gateskip_core import load_model

    outputs = {}
    for option, path in (("--out", args.out), ("--cells-out", args.cells_out)):
        if path is not None:
            if Path(path).suffix.lower() != ".csv":
                raise GateSkipError(f"{option} must end in .csv, got {path!r}")
            outputs[option] = check_writable(Path(path), option)
    if args.text is not None and not args.text.strip():
        raise GateSkipError("text is empty")
    texts = [args.text] if args.text is not None else paragraphs_of(args.file)
    model = load_model(args.model, gates=args.gates, device=args.device, dtype=args.dtype, weights=args.weights)
    if args.file is not None:  # headings and one-word lines have no token to skip after BOS: the next paragraphs
        texts = [t for t in texts if model.encode([t], max_tokens=3).input_ids.shape[1] >= 3][: args.texts]
    start = time.perf_counter()
    cells = corpus_effects(
        model,
        texts,
        max_tokens=args.max_tokens,
        skip=args.skip,
        per_branch=args.per_branch,
        harm_texts=args.harm_texts,
        include_bos=args.bos,
        adapter_scope=args.adapter_scope,
        seed=args.seed,
        batch_size=args.batch_size,
        on_step=lambda done, total: print(f"text {done}/{total}", flush=True),
    )
    table = layer_effects(cells, resamples=args.resamples, seed=args.seed)
    files = {outputs["--out"]: lambda tmp: table.to_csv(tmp, index=False)}
    if "--cells-out" in outputs:
        files[outputs["--cells-out"]] = lambda tmp: cells.to_csv(tmp, index=False)
    write_all(files)
    shown = ["layer", "branch", "gate_mean", "gate_mean_applied", "applied_share", "rel_norm", "harm_kl_mean"]
    print(table[shown].to_string(index=False, float_format=lambda v: f"{v:.4g}"))
    n_texts = cells["text"].nunique()
    interval = "95% intervals by bootstrap over texts" if n_texts > 1 else "one text: no interval over texts"
    print(
        f"{n_texts} text(s), {int(cells['sampled'].sum())} forced skips in {time.perf_counter() - start:.0f} s; {interval}"
    )
    print(f"wrote {', '.join(map(str, files))}")
    return 0


def register_causal(sub, commands, add_model_args, budget_type) -> None:
    from gateskip_core.cli import add_adapter_scope_arg

    p = sub.add_parser(
        "causal",
        help="per layer and branch: the gate beside what the branch adds and the exact harm of forced single skips",
    )
    add_model_args(p, gates_default="default")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--text", help="one text (no interval over texts)")
    src.add_argument("--file", help="a text file: its first --texts paragraphs (blank-line separated)")
    p.add_argument("--texts", type=cli_type(whole_number, "--texts"), default=8, help="paragraphs of --file")
    p.add_argument(
        "--harm-texts",
        type=cli_type(whole_number, "--harm-texts", minimum=0),
        default=None,
        help="measure the forced-skip harm on only the first N texts (default: all)",
    )
    p.add_argument(
        "--per-branch",
        type=cli_type(whole_number, "--per-branch", minimum=0),
        default=2,
        help="random tokens forced to skip per (layer, branch) and text",
    )
    p.add_argument("--bos", action="store_true", help="also force BOS to skip (lifts its protection for that alone)")
    p.add_argument("--skip", type=budget_type, default=0.25, help="budget of the gate statistics (gate, applied)")
    add_adapter_scope_arg(p)
    p.add_argument(
        "--max-tokens", type=cli_type(whole_number, "--max-tokens", minimum=3), default=64, help="tokens per text"
    )
    p.add_argument(
        "--batch-size", type=cli_type(whole_number, "--batch-size"), default=16, help="ablations per forward"
    )
    p.add_argument("--resamples", type=cli_type(whole_number, "--resamples"), default=1000, help="bootstrap draws")
    p.add_argument("--seed", type=int, default=0, help="seed of the sampled cells and the bootstrap")
    p.add_argument("--cells-out", help="also write every (text, token, layer, branch) cell (CSV)")
    p.add_argument("--out", required=True, help="layer_causal.csv: one row per (layer, branch)")
    commands["causal"] = cmd_causal
