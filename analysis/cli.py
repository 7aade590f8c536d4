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


def _paragraphs_of(path: str) -> list[str]:
    from gateskip_core.data import paragraphs

    try:
        text = Path(path).read_text(encoding="utf-8")
    except FileNotFoundError:
        raise GateSkipError(f"file not found: {path}") from None
    except (OSError, UnicodeDecodeError) as err:
        raise GateSkipError(f"cannot read {path}: {err}") from None
    paras = paragraphs(text)
    if not paras:
        raise GateSkipError(f"{path} holds no text")
    return paras


def cmd_collect(args: argparse.Namespace) -> int:
    from gateskip_core import load_model

    from .corpus import collect

    paras = _paragraphs_of(args.file)
    model = load_model(args.model, gates=args.gates)
    counts = collect(model, paras, args.out, batch_size=args.batch_size, total=len(paras), skip=args.skip,
                     policy=args.policy, path=args.path, branches=args.branches,
                     protect_bos=not args.no_protect_bos, seed=args.seed, max_tokens=args.max_tokens)  # fmt: skip
    print(f"wrote {counts['rows']} rows for {counts['sequences']} sequences to {args.out}"
          + (f" ({counts['truncated']} truncated to {args.max_tokens} tokens)" if counts["truncated"] else ""))  # fmt: skip
    return 0


def cmd_stats(args: argparse.Namespace) -> int:
    from .corpus import iter_traces
    from .flow import FlowStats, layer_skip_summary

    out = _check_out(args.out)
    stats = FlowStats()
    for trace in iter_traces(args.trace):
        stats.add(trace)
    table = stats.layer_table()
    table.to_csv(out, index=False)
    print(f"{stats.n_sequences} sequences, {stats.n_tokens} tokens")
    print(table.to_string(index=False, float_format=lambda v: f"{v:.4g}"))
    print(layer_skip_summary(table).to_string(index=False, float_format=lambda v: f"{v:.4g}"))
    bos = stats.bos_table()
    for module in ("attn", "mlp"):
        part = bos[bos["module"] == module]
        print(f"BOS/others gate ratio ({module}), layers 0-4: "
              + " ".join(f"{r:.3f}" for r in part["ratio"].head(5)))  # fmt: skip
    if args.bos_out:
        bos.to_csv(args.bos_out, index=False)
    if args.types_out:
        stats.token_type_table().to_csv(args.types_out, index=False)
    tokens = stats.token_table(min_count=args.min_count)
    if len(tokens):

        def show(part) -> str:
            rows = zip(part["token"], part["mean_gate"], part["count"])
            return ", ".join(f"{t!r} {g:.3f} (x{c})" for t, g, c in rows)

        print(f"most important tokens (>= {args.min_count} occurrences): {show(tokens.head(8))}")
        print(f"least important tokens: {show(tokens.tail(8))}")
    if args.tokens_out:
        tokens.to_csv(args.tokens_out, index=False)
    print(f"wrote {out}")
    return 0


def cmd_sweep(args: argparse.Namespace) -> int:
    from gateskip_core import load_model

    from .quality import evaluation_blocks
    from .sweep import METHODS, sweep

    out = _check_out(args.out)
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    bad = [m for m in methods if m not in METHODS]
    if bad or not methods:
        raise GateSkipError(f"unknown method(s) {', '.join(bad) or '(none)'}; choose from {', '.join(METHODS)}")
    texts = _paragraphs_of(args.file) if args.file else None
    model = load_model(args.model, gates=args.gates)
    blocks = evaluation_blocks(model, texts, n_blocks=args.blocks, seq_len=args.seq_len)
    from tqdm.auto import tqdm

    bar = tqdm(total=len(methods) * len(args.budgets), desc="sweep")
    table = sweep(model, args.budgets, methods, blocks, on_step=lambda done, total, name: bar.update(1))
    bar.close()
    table.to_csv(out, index=False)
    print(table.drop(columns=["setting"]).to_string(index=False, float_format=lambda v: f"{v:.4g}"))
    if args.figure:
        from .figures import sweep_figure

        sweep_figure(table, args.metric).write_html(args.figure, include_plotlyjs="cdn")
        print(f"wrote {args.figure}")
    print(f"wrote {out}")
    return 0


def cmd_faithfulness(args: argparse.Namespace) -> int:
    from gateskip_core import load_model

    from .faithfulness import faithfulness

    out = _check_out(args.out)
    text = args.text if args.text is not None else "\n\n".join(_paragraphs_of(args.file))
    if not text.strip():
        raise GateSkipError("text is empty")
    model = load_model(args.model, gates=args.gates)
    entries, summary = faithfulness(model, text, n_exact=args.exact, seed=args.seed, max_tokens=args.max_tokens)
    summary.to_csv(out, index=False)
    if args.entries_out:
        entries.to_csv(args.entries_out, index=False)
    overall = summary[summary["scope"] != "layer"].loc[lambda d: ~d["scope"].str.startswith("layer")]
    print(overall.to_string(index=False, float_format=lambda v: f"{v:.3f}"))
    print(f"wrote {out}")
    return 0


def register(sub, commands, add_model_args, add_skip_args, budget_type) -> None:
    p = sub.add_parser("collect", help="trace a corpus (one sequence per paragraph) into one file, streaming")
    add_model_args(p, gates_default="default")
    add_skip_args(p)
    p.add_argument("--file", required=True)
    p.add_argument("--out", required=True, help="traces.parquet or traces.csv")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--max-tokens", type=int, default=256, help="truncate each paragraph to this many tokens")
    commands["collect"] = cmd_collect

    p = sub.add_parser("stats", help="per-layer gate statistics of a trace file")
    p.add_argument("--trace", required=True)
    p.add_argument("--out", required=True, help="layer_stats.csv")
    p.add_argument("--bos-out", help="also write the BOS anchor table (CSV)")
    p.add_argument("--types-out", help="also write the token-type table (CSV)")
    p.add_argument("--tokens-out", help="also write per-token-id importance over the corpus (CSV)")
    p.add_argument("--min-count", type=int, default=5, help="occurrences a token needs to be ranked")
    commands["stats"] = cmd_stats

    p = sub.add_parser("sweep", help="quality vs net FLOPs for GateSkip and baselines")
    add_model_args(p, gates_default="default")
    p.add_argument("--file", help="held-out text (default: the pydoc validation split)")
    p.add_argument("--budgets", type=_budgets, default=[0.0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6])
    p.add_argument("--methods", default="gateskip,random,shortgpt,attn-only,mlp-only")
    p.add_argument("--blocks", type=int, default=8)
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--figure", help="also write the quality-vs-FLOPs figure (HTML)")
    p.add_argument("--metric", default="top1_agreement", choices=["top1_agreement", "ppl", "kl_to_full"])
    p.add_argument("--out", required=True)
    commands["sweep"] = cmd_sweep

    p = sub.add_parser("faithfulness", help="do gates rank what matters? (attribution patching + ablation)")
    add_model_args(p, gates_default="default")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--text")
    src.add_argument("--file")
    p.add_argument("--exact", type=int, default=32, help="entries checked by exact ablation")
    p.add_argument("--max-tokens", type=int, default=128)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--entries-out", help="also write every entry (CSV)")
    p.add_argument("--out", required=True, help="faithfulness.csv (correlations)")
    commands["faithfulness"] = cmd_faithfulness

    p = sub.add_parser("quality", help="perplexity / agreement of gates vs random skipping on held-out text")
    p.add_argument("--model", default="smollm2-135m-instruct")
    p.add_argument("--gates", nargs="+", default=["trained=default", "untrained=untrained"],
                   help="LABEL=SPEC pairs; the first is also run with random skipping")  # fmt: skip
    p.add_argument("--budgets", type=_budgets, default=[0.1, 0.25, 0.5])
    p.add_argument("--blocks", type=int, default=8, help="held-out blocks of 128 tokens")
    p.add_argument("--out", required=True)
    commands["quality"] = cmd_quality
