"""Analysis subcommands of `gateskip` (assembled into the command line by `gateskip.cli`)."""

from __future__ import annotations

import argparse
from pathlib import Path

from gateskip_core.cli import add_adapter_scope_arg
from gateskip_core.errors import GateSkipError
from gateskip_core.files import check_writable, write_all
from gateskip_core.registry import DEFAULT_MODEL
from gateskip_core.validation import cli_type, skip_args_of, whole_number


def _budgets(text: str) -> list[float]:
    try:
        values = [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"budgets must be comma-separated numbers, got {text!r}") from None
    if not values or any(not 0 <= v <= 1 for v in values):
        raise argparse.ArgumentTypeError(f"budgets must lie in [0, 1], got {text!r}")
    return values


def _check_out(path: str | None, suffixes=(".csv",), option: str = "--out") -> Path | None:
    """Checked before any work: the suffix, and that the file can be written."""
    if path is None:
        return None
    out = Path(path)
    if out.suffix.lower() not in suffixes:
        raise GateSkipError(f"{option} must end in {' or '.join(suffixes)}, got {path!r}")
    return check_writable(out, option)


def _csv(table):
    return lambda tmp: table.to_csv(tmp, index=False)


def cmd_quality(args: argparse.Namespace) -> int:
    from gateskip_core import load_model

    from .quality import evaluation_blocks, quality_table

    out = _check_out(args.out)
    model = load_model(args.model)
    specs = dict(item.split("=", 1) if "=" in item else (item, item) for item in args.gates)
    texts = _paragraphs_of(args.file) if args.file else None
    table = quality_table(model, specs, args.budgets, evaluation_blocks(model, texts, n_blocks=args.blocks))
    write_all({out: _csv(table)})
    print(table.to_string(index=False, float_format=lambda v: f"{v:.4g}"))
    print(f"wrote {out}")
    return 0


def cmd_chat_fidelity(args: argparse.Namespace) -> int:
    from gateskip_core import load_model

    from .quality import chat_fidelity

    out = _check_out(args.out)
    model = load_model(args.model, gates=args.gates, device=args.device)
    table = chat_fidelity(
        model,
        args.budgets,
        args.policies.split(","),
        max_new_tokens=args.max_new_tokens,
        adapter_scope=args.adapter_scope,
    )
    write_all({out: _csv(table)})
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

    _check_out(args.out, (".csv", ".parquet"))
    paras = _paragraphs_of(args.file)
    model = load_model(args.model, gates=args.gates, device=args.device)
    counts = collect(
        model,
        paras,
        args.out,
        batch_size=args.batch_size,
        total=len(paras),
        max_tokens=args.max_tokens,
        **skip_args_of(args),
    )
    print(
        f"wrote {counts['rows']} rows for {counts['sequences']} sequences to {args.out}"
        + (f" ({counts['truncated']} truncated to {args.max_tokens} tokens)" if counts["truncated"] else "")
    )
    return 0


def cmd_stats(args: argparse.Namespace) -> int:
    from .corpus import iter_traces
    from .flow import FlowStats, layer_skip_summary

    out = _check_out(args.out)
    optional = {
        name: _check_out(getattr(args, name), option="--" + name.replace("_", "-"))
        for name in ("bos_out", "types_out", "tokens_out")
    }
    stats = FlowStats()
    for trace in iter_traces(args.trace):
        stats.add(trace)
    table = stats.layer_table()
    outputs = {out: _csv(table)}
    print(f"{stats.n_sequences} sequences, {stats.n_tokens} tokens")
    print(table.to_string(index=False, float_format=lambda v: f"{v:.4g}"))
    print(layer_skip_summary(table).to_string(index=False, float_format=lambda v: f"{v:.4g}"))
    bos = stats.bos_table()
    for branch in ("attn", "mlp"):
        part = bos[bos["branch"] == branch]
        print(f"BOS/others gate ratio ({branch}), layers 0-4: " + " ".join(f"{r:.3f}" for r in part["ratio"].head(5)))
    if optional["bos_out"]:
        outputs[optional["bos_out"]] = _csv(bos)
    if optional["types_out"]:
        outputs[optional["types_out"]] = _csv(stats.token_type_table())
    tokens = stats.token_table(min_count=args.min_count)
    if len(tokens):

        def show(part) -> str:
            rows = zip(part["token"], part["mean_gate"], part["count"])
            return ", ".join(f"{t!r} {g:.3f} (x{c})" for t, g, c in rows)

        print(f"most important tokens (>= {args.min_count} occurrences): {show(tokens.head(8))}")
        print(f"least important tokens: {show(tokens.tail(8))}")
    if optional["tokens_out"]:
        outputs[optional["tokens_out"]] = _csv(tokens)
    write_all(outputs)
    print(f"wrote {', '.join(map(str, outputs))}")
    return 0


def cmd_sweep(args: argparse.Namespace) -> int:
    from gateskip_core import load_model

    from .quality import evaluation_blocks
    from .sweep import METHODS, at_matched_savings, sweep

    out = _check_out(args.out)
    figure = _check_out(args.figure, (".html",), "--figure")
    matched_out = _check_out(args.matched_out, option="--matched-out")
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    bad = [m for m in methods if m not in METHODS]
    if bad or not methods:
        raise GateSkipError(f"unknown method(s) {', '.join(bad) or '(none)'}; choose from {', '.join(METHODS)}")
    texts = _paragraphs_of(args.file) if args.file else None
    model = load_model(args.model, gates=args.gates, device=args.device)
    blocks = evaluation_blocks(model, texts, n_blocks=args.blocks, seq_len=args.seq_len)
    from tqdm.auto import tqdm

    bar = tqdm(total=len(methods) * len(args.budgets), desc="sweep")
    table = sweep(model, args.budgets, methods, blocks, on_step=lambda done, total, name: bar.update(1))
    bar.close()
    print(table.drop(columns=["setting"]).to_string(index=False, float_format=lambda v: f"{v:.4g}"))
    matched = at_matched_savings(table)
    print("at matched net FLOPs saved:")
    print(matched.to_string(index=False, float_format=lambda v: f"{v:.4g}"))
    outputs = {out: _csv(table)}
    if matched_out:
        outputs[matched_out] = _csv(matched)
    if figure:
        from .figures import sweep_figure

        fig = sweep_figure(table, args.metric)
        outputs[figure] = lambda tmp: fig.write_html(tmp, include_plotlyjs="cdn")
    write_all(outputs)
    print(f"wrote {', '.join(map(str, outputs))}")
    return 0


def cmd_faithfulness(args: argparse.Namespace) -> int:
    import time

    from gateskip_core import load_model

    from .faithfulness import faithfulness

    out = _check_out(args.out)
    entries_out = _check_out(args.entries_out, option="--entries-out")
    figure = _check_out(args.figure, (".html",), option="--figure")
    if not 0 < args.skip_fraction < 1:
        raise GateSkipError(f"--skip-fraction must lie in (0, 1), got {args.skip_fraction:g}")
    text = args.text if args.text is not None else "\n\n".join(_paragraphs_of(args.file))
    if not text.strip():
        raise GateSkipError("text is empty")
    model = load_model(args.model, gates=args.gates, device=args.device)
    start = time.perf_counter()
    entries, signals = faithfulness(
        model,
        text,
        n_exact=args.exact,
        seed=args.seed,
        max_tokens=args.max_tokens,
        batch_size=args.batch_size,
        skip_fraction=args.skip_fraction,
    )
    seconds = time.perf_counter() - start
    outputs = {out: _csv(signals), **({entries_out: _csv(entries)} if entries_out else {})}
    if figure:
        from .figures import faithfulness_figure

        fig = faithfulness_figure(entries, signals)
        outputs[figure] = lambda tmp: fig.write_html(tmp, include_plotlyjs="cdn")
    write_all(outputs)
    print(signals.to_string(index=False, float_format=lambda v: f"{v:.3f}"))
    tracks = entries[["estimate", "delta_loss"]].corr(method="spearman").iloc[0, 1]
    print(f"first-order estimate vs exact loss change: Spearman {tracks:.3f}")
    print(f"{len(entries)} exact single-entry ablations in {seconds:.0f} s")
    print(f"wrote {', '.join(map(str, outputs))}")
    return 0


def cmd_settled(args: argparse.Namespace) -> int:
    from gateskip_core import load_model

    from .logit_lens import settled_corpus, settled_summary

    out = _check_out(args.out)
    figure = _check_out(args.figure, (".html",), "--figure")
    texts = _paragraphs_of(args.file) if args.file else None
    model = load_model(args.model, gates=args.gates, device=args.device)
    if args.from_layer is not None and args.from_layer >= model.spec.n_layers:
        raise GateSkipError(f"--from-layer must be below {model.spec.n_layers} ({model.name} has that many layers)")
    table = settled_corpus(
        model,
        texts,
        n_blocks=args.blocks,
        seq_len=args.seq_len,
        batch_size=args.batch_size,
        **skip_args_of(args),
    )
    summary = settled_summary(table, args.from_layer)
    print(f"prediction already settled (final top-1 = top-1 entering the layer), skip {args.skip:g}:")
    print(summary.to_string(index=False, float_format=lambda v: f"{v:.3f}"))
    outputs = {out: _csv(table)}
    if figure:
        from .figures import settled_figure

        fig = settled_figure(table)
        outputs[figure] = lambda tmp: fig.write_html(tmp, include_plotlyjs="cdn")
    write_all(outputs)
    print(f"wrote {', '.join(map(str, outputs))}")
    return 0


def register(sub, commands, add_model_args, add_skip_args, budget_type) -> None:
    p = sub.add_parser("collect", help="trace a corpus (one sequence per paragraph) into one file, streaming")
    add_model_args(p, gates_default="default")
    add_skip_args(p)
    p.add_argument("--file", required=True)
    p.add_argument("--out", required=True, help="traces.parquet or traces.csv")
    p.add_argument("--batch-size", type=cli_type(whole_number, "--batch-size"), default=8)
    p.add_argument(
        "--max-tokens",
        type=cli_type(whole_number, "--max-tokens"),
        default=256,
        help="truncate each paragraph to this many tokens",
    )
    commands["collect"] = cmd_collect

    p = sub.add_parser("stats", help="per-layer gate statistics of a trace file")
    p.add_argument("--trace", required=True)
    p.add_argument("--out", required=True, help="layer_stats.csv")
    p.add_argument("--bos-out", help="also write the BOS anchor table (CSV)")
    p.add_argument("--types-out", help="also write the token-type table (CSV)")
    p.add_argument("--tokens-out", help="also write per-token-id importance over the corpus (CSV)")
    p.add_argument(
        "--min-count",
        type=cli_type(whole_number, "--min-count"),
        default=5,
        help="occurrences a token needs to be ranked",
    )
    commands["stats"] = cmd_stats

    p = sub.add_parser("sweep", help="quality vs net FLOPs for GateSkip and baselines")
    add_model_args(p, gates_default="default")
    p.add_argument("--file", help="held-out text (default: the pydoc validation split)")
    p.add_argument("--budgets", type=_budgets, default=[0.0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6])
    p.add_argument(
        "--methods", default="gateskip,gateskip-uniform,random,shortgpt,shortgpt-calibration,attn-only,mlp-only"
    )
    p.add_argument("--blocks", type=cli_type(whole_number, "--blocks"), default=8)
    p.add_argument("--seq-len", type=cli_type(whole_number, "--seq-len", minimum=2), default=128)
    p.add_argument("--figure", help="also write the quality-vs-FLOPs figure (HTML)")
    p.add_argument("--matched-out", help="also write each method's quality at 10/20/30%% net FLOPs saved (CSV)")
    p.add_argument("--metric", default="top1_agreement", choices=["top1_agreement", "ppl", "kl_to_full"])
    p.add_argument("--out", required=True)
    commands["sweep"] = cmd_sweep

    p = sub.add_parser("faithfulness", help="which signal predicts the exact harm of a skip? (batched ablations)")
    add_model_args(p, gates_default="default")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--text")
    src.add_argument("--file")
    p.add_argument(
        "--exact",
        type=cli_type(whole_number, "--exact"),
        default=600,
        help="entries ablated exactly, the same number from every (layer, branch)",
    )
    p.add_argument(
        "--batch-size", type=cli_type(whole_number, "--batch-size"), default=16, help="ablations per forward"
    )
    p.add_argument("--skip-fraction", type=float, default=0.25, help="the budget's skip fraction for the ranking check")
    p.add_argument("--max-tokens", type=cli_type(whole_number, "--max-tokens"), default=128)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--entries-out", help="also write every sampled entry: signals and harm (CSV)")
    p.add_argument("--figure", help="also write the figure (HTML)")
    p.add_argument("--out", required=True, help="faithfulness.csv: one row per signal")
    commands["faithfulness"] = cmd_faithfulness

    p = sub.add_parser("quality", help="perplexity / agreement of gates vs random skipping on held-out text")
    p.add_argument("--model", default=DEFAULT_MODEL)
    p.add_argument(
        "--gates",
        nargs="+",
        default=["trained=default", "untrained=untrained"],
        help="LABEL=SPEC pairs; the first is also run with random skipping",
    )
    p.add_argument("--budgets", type=_budgets, default=[0.1, 0.25, 0.5])
    p.add_argument("--blocks", type=cli_type(whole_number, "--blocks"), default=8, help="held-out blocks of 128 tokens")
    p.add_argument("--file", help="held-out text (default: the pydoc validation split)")
    p.add_argument("--out", required=True)
    commands["quality"] = cmd_quality

    p = sub.add_parser(
        "chat-fidelity", help="KL / top-1 on the original model's own answers to 20 held-out chat prompts"
    )
    add_model_args(p, gates_default="default")
    p.add_argument("--budgets", type=_budgets, default=[0.0, 0.25, 0.5])
    p.add_argument("--policies", default="quantile,calibrated", help="comma-separated skip policies")
    p.add_argument("--max-new-tokens", type=cli_type(whole_number, "--max-new-tokens"), default=64)
    add_adapter_scope_arg(p)
    p.add_argument("--out", required=True, help="chat_fidelity.csv")
    commands["chat-fidelity"] = cmd_chat_fidelity

    p = sub.add_parser(
        "settled", help="logit lens: had tokens' predictions settled when they skipped a layer? (streams a corpus)"
    )
    add_model_args(p, gates_default="default")
    add_skip_args(p)
    p.set_defaults(skip=0.25)
    p.add_argument("--file", help="text to stream (default: the pydoc validation split)")
    p.add_argument("--blocks", type=cli_type(whole_number, "--blocks"), default=16, help="token blocks to run")
    p.add_argument("--seq-len", type=cli_type(whole_number, "--seq-len", minimum=2), default=128)
    p.add_argument("--batch-size", type=cli_type(whole_number, "--batch-size"), default=4)
    p.add_argument(
        "--from-layer",
        type=cli_type(whole_number, "--from-layer", minimum=0),
        default=None,
        help="first layer pooled in the summary (default: the second half)",
    )
    p.add_argument("--figure", help="also write the settled-rate figure (HTML)")
    p.add_argument("--out", required=True, help="settled.csv: counts and rates per (layer, branch)")
    commands["settled"] = cmd_settled
