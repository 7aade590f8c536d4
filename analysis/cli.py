"""Analysis subcommands of `gateskip` (assembled into the command line by `gateskip.cli`)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from gateskip_core.backbone.registry import DEFAULT_MODEL
from gateskip_core.branches import branches_per_token
from gateskip_core.cli import add_adapter_scope_arg, add_device_args
from gateskip_core.errors import GateSkipError
from gateskip_core.files import write_all
from gateskip_core.validation import cli_type, skip_args_of, whole_number

from .inputs import budget_list, check_out, paragraphs_of


def _csv(table):
    return lambda tmp: table.to_csv(tmp, index=False)


def cmd_quality(args: argparse.Namespace) -> int:
    from gateskip_core import load_model

    from .experiments.quality import evaluation_blocks, quality_table

    out = check_out(args.out)
    model = load_model(args.model, device=args.device, dtype=args.dtype, weights=args.weights)
    specs = dict(item.split("=", 1) if "=" in item else (item, item) for item in args.gates)
    texts = paragraphs_of(args.file) if args.file else None
    table = quality_table(model, specs, args.budgets, evaluation_blocks(model, texts, n_blocks=args.blocks))
    write_all({out: _csv(table)})
    print(table.to_string(index=False, float_format=lambda v: f"{v:.4g}"))
    print(f"wrote {out}")
    return 0


def cmd_chat_fidelity(args: argparse.Namespace) -> int:
    from gateskip_core import load_model

    from .experiments.quality import chat_fidelity

    out = check_out(args.out)
    model = load_model(args.model, gates=args.gates, device=args.device, dtype=args.dtype, weights=args.weights)
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


def cmd_collect(args: argparse.Namespace) -> int:
    from gateskip_core import load_model

    if Path(args.out).suffix.lower() in (".csv", ".parquet"):
        return _collect_file(args)
    from analysis.experiments.collect import check_dataset_folder, collect_dataset, process_state

    out = check_dataset_folder(args.out)
    sources = [(Path(f).name, paragraphs_of(f)) for f in args.file]
    state = process_state()
    device = str(state.device) if state.num_processes > 1 and state.device.type != "cpu" else args.device
    model = load_model(args.model, gates=args.gates, device=device, dtype=args.dtype, weights=args.weights)
    log = print if state.is_main_process else (lambda msg: None)
    counts = collect_dataset(
        model,
        sources,
        out,
        batch_size=args.batch_size,
        max_tokens=args.max_tokens,
        shard_size=args.shard_size,
        log=log,
        **skip_args_of(args),
    )
    log(
        f"wrote {counts['shards_written']} shard(s) ({counts['tokens_written']} tokens) in "
        f"{counts['processes']} process(es); {out} holds {counts['sequences']} sequences, {counts['tokens']} tokens "
        f"in {counts['shards']} shards"
    )
    if counts["truncated"]:
        print(
            f"warning: {counts['truncated']} text(s) truncated to their first {args.max_tokens} tokens", file=sys.stderr
        )
    return 0


def _collect_file(args: argparse.Namespace) -> int:
    from analysis.experiments.collect import collect, process_state
    from gateskip_core import load_model

    check_out(args.out, (".csv", ".parquet"))
    if process_state().num_processes > 1:
        raise GateSkipError("collecting with several processes needs a dataset folder as --out, not one file")
    if len(args.file) > 1:
        raise GateSkipError("several --file sources need a dataset folder as --out, not one file")
    paras = paragraphs_of(args.file[0])
    model = load_model(args.model, gates=args.gates, device=args.device, dtype=args.dtype, weights=args.weights)
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
    from .traces.flow import layer_skip_summary
    from .traces.tracedb import TraceDB

    out = check_out(args.out)
    optional = {
        name: check_out(getattr(args, name), option="--" + name.replace("_", "-"))
        for name in ("bos_out", "types_out", "tokens_out")
    }
    db = TraceDB(args.trace, cells=args.cells)
    counts = db.counts()
    table = db.layer_table()
    outputs = {out: _csv(table)}
    print(f"{counts['sequences']} sequences, {counts['tokens']} tokens, {counts['layers']} layers")
    print(
        _CELLS_WORDS[args.cells]
        + "; skip rates pool the eligible tokens; [low, high]: 95% intervals clustered by sequence"
    )
    print(_layer_lines(table).to_string(index=False))
    print(
        "early / late layers: the first / last third; their gate mean and skip rate are cell-weighted "
        "(pooled over the window's cells: *_gate_n gates, *_eligible tokens), not a mean of the layer means"
    )
    print(layer_skip_summary(table).to_string(index=False, float_format=lambda v: f"{v:.4g}"))
    bos = db.bos_table()
    _print_bos(bos, counts["layers"], args.cells)
    if optional["bos_out"]:
        outputs[optional["bos_out"]] = _csv(bos)
    if optional["types_out"]:
        outputs[optional["types_out"]] = _csv(db.token_type_table())
    tokens = db.token_table(min_count=args.min_count)
    ranked = tokens.dropna(subset=["mean_gate"])
    if len(ranked):

        def show(part) -> str:
            rows = zip(part["token"], part["mean_gate"], part["count"])
            return ", ".join(f"{t!r} {g:.3f} (x{c})" for t, g, c in rows)

        shown = min(8, len(ranked) // 2) or len(ranked)
        print(
            f"highest mean gate over {args.cells} cells (tokens seen >= {args.min_count} times): {show(ranked.head(shown))}"
        )
        if len(ranked) >= 2 * shown:
            print(f"lowest mean gate: {show(ranked.tail(shown))}")
    if optional["tokens_out"]:
        outputs[optional["tokens_out"]] = _csv(tokens)
    write_all(outputs)
    print(f"wrote {', '.join(map(str, outputs))}")
    return 0


_CELLS_WORDS = {
    "applied": "gate statistics pool the applied cells only (the gate scaled the branch's output; gate_n of them)",
    "all": "gate statistics pool every token's gate (the ranking score; in adapter scope 'skipped' most scaled nothing)",
}


def _layer_lines(table):
    """The layer table as printed: each mean with its interval."""
    import pandas as pd

    def with_interval(column: str):
        return [
            "-" if pd.isna(v) else f"{v:.3f} [{lo:.3f}, {hi:.3f}]"
            for v, lo, hi in zip(table[column], table[f"{column}_low"], table[f"{column}_high"])
        ]

    return pd.DataFrame(
        {
            "layer": table["layer"],
            "branch": table["branch"],
            "gate_n": table["gate_n"],
            "gate_mean": with_interval("gate_mean"),
            "skip_rate": with_interval("skip_rate"),
            "applied_share": [f"{v:.2f}" if v == v else "-" for v in table["applied_share"]],
        }
    )


def _print_bos(bos, n_layers: int, cells: str) -> None:
    """The BOS/others gate ratio over the early layers (`depth_windows`), labelled with those layers."""
    from .traces.flow import depth_windows, layer_span

    early = depth_windows(n_layers)[0] or [0]
    for branch in ("attn", "mlp"):
        part = bos[(bos["branch"] == branch) & bos["layer"].isin(early)]
        if not part["sequences"].any():
            print(f"BOS ({branch}), layers {layer_span(early)}: its gate never acted ({cells} cells: none)")
            continue
        ratios = " ".join("-" if r != r else f"{r:.3f}" for r in part["ratio"])
        print(f"BOS/others gate ratio ({branch}), layers {layer_span(early)}: {ratios}")
    distinct, sequences = int(bos["bos_distinct"].max()), int(bos["sequences"].max())
    if sequences > 1 and distinct == 1:
        print(f"BOS's gate is one value in all {sequences} sequences: one measurement repeated, not {sequences}")


READY_QUERIES = ("skip-rates", "tokens", "positions", "types", "contexts")


def cmd_query(args: argparse.Namespace) -> int:
    from .traces.tracedb import TraceDB, context_strings

    if (args.sql is None) == (args.ready is None):
        raise GateSkipError("give either SQL or --ready NAME (one of " + ", ".join(READY_QUERIES) + ")")
    out = check_out(args.out, (".csv", ".parquet")) if args.out else None
    db = TraceDB(args.dataset, memory_limit=args.memory_limit, cells=args.cells)
    if args.sql is not None:
        relation = db.sql(args.sql)
        if relation is None:
            raise GateSkipError("the SQL returned no table (use a SELECT ... statement)")
        table = None
    else:
        needs_cell = args.ready in ("tokens", "contexts")
        if needs_cell and (args.layer is None or args.branch is None):
            raise GateSkipError(f"--ready {args.ready} needs --layer and --branch")
        if args.ready == "skip-rates":
            table = db.skip_rates()
        elif args.ready == "positions":
            table = db.position_profile()
        elif args.ready == "types":
            table = db.type_profile()
        elif args.ready == "tokens":
            types = [t.strip() for t in args.token_types.split(",")] if args.token_types else None
            table = db.token_leaderboard(
                args.layer, args.branch, args.min_count, types, args.limit, most_skipped=not args.least
            )
        else:
            table = db.example_contexts(args.layer, args.branch, n=args.limit, lowest=not args.highest)
            if not args.out:
                table = context_strings(table)
        relation = None
    if out is not None:
        if relation is not None:
            from gateskip_core.files import atomic_write

            write = relation.write_parquet if out.suffix.lower() == ".parquet" else relation.write_csv
            atomic_write(out, lambda tmp: write(str(tmp)))
        elif out.suffix.lower() == ".parquet":
            write_all({out: lambda tmp: table.to_parquet(tmp, index=False)})
        else:
            write_all({out: _csv(table)})
    preview = relation.limit(args.show).df() if relation is not None else table.head(args.show)
    with_width = dict(index=False, float_format=lambda v: f"{v:.4g}")
    print(preview.to_string(**with_width) if len(preview) else "(no rows)")
    if out is not None:
        print(f"wrote {out}")
    return 0


def cmd_sweep(args: argparse.Namespace) -> int:
    from gateskip_core import load_model

    from .experiments.pruning import check_method_names, prune_count
    from .experiments.quality import evaluation_blocks
    from .experiments.sweep import METHODS, at_matched_savings, sweep

    out = check_out(args.out)
    figure = check_out(args.figure, (".html",), "--figure")
    matched_out = check_out(args.matched_out, option="--matched-out")
    methods = check_method_names(args.methods.split(","), METHODS)
    texts = paragraphs_of(args.file) if args.file else None
    model = load_model(args.model, gates=args.gates, device=args.device, dtype=args.dtype, weights=args.weights)
    for method in methods:  # K must leave a layer: checked once the model's depth is known
        prune_count(method, model.spec.n_layers)
    blocks = evaluation_blocks(model, texts, n_blocks=args.blocks, seq_len=args.seq_len)
    from tqdm.auto import tqdm

    bar = tqdm(total=len(methods) * len(args.budgets), desc="sweep")
    table = sweep(model, args.budgets, methods, blocks, on_step=lambda done, total, name: bar.update(1))
    bar.close()
    print(table.drop(columns=["setting"]).to_string(index=False, float_format=lambda v: f"{v:.4g}"))
    matched = at_matched_savings(table)
    print("at matched net FLOPs saved:")
    print(matched.to_string(index=False, float_format=lambda v: f"{v:.4g}"))
    for line in _unreached_targets(table, matched):
        print(line)
    outputs = {out: _csv(table)}
    if matched_out:
        outputs[matched_out] = _csv(matched)
    if figure:
        from .traces.figures import sweep_figure

        fig = sweep_figure(table, args.metric)
        outputs[figure] = lambda tmp: fig.write_html(tmp, include_plotlyjs="cdn")
    write_all(outputs)
    print(f"wrote {', '.join(map(str, outputs))}")
    return 0


def _unreached_targets(table, matched) -> list[str]:
    """Why a matched row is NaN: the method's sweep did not reach that saving (values are interpolated
    between the budgets swept, never extrapolated)."""
    lines = []
    for method, part in matched.groupby("method", sort=False):
        missing = part.loc[part["top1_agreement"].isna(), "net_flops_saved"]
        if len(missing):
            saved = table.loc[table["method"] == method, "flops_saved"]
            lines.append(
                f"NaN: {method} saves {saved.min():.1%} to {saved.max():.1%} of net FLOPs over the budgets swept, "
                f"so {', '.join(f'{t:.0%}' for t in missing)} lie outside (add budgets that reach them)"
            )
    return lines


def cmd_faithfulness(args: argparse.Namespace) -> int:
    import time

    from gateskip_core import load_model

    from .experiments.faithfulness import DEFAULT_PER_CELL, exact_harm, signal_summary, signal_table

    out = check_out(args.out)
    entries_out = check_out(args.entries_out, option="--entries-out")
    figure = check_out(args.figure, (".html",), option="--figure")
    if not 0 < args.skip_fraction < 1:
        raise GateSkipError(f"--skip-fraction must lie in (0, 1), got {args.skip_fraction:g}")
    text = args.text if args.text is not None else "\n\n".join(paragraphs_of(args.file))
    if not text.strip():
        raise GateSkipError("text is empty")
    if args.texts > 1 and args.file is None:
        raise GateSkipError("--texts streams blocks of a corpus: give it with --file")
    if args.exact is not None and args.per_cell is not None:
        raise GateSkipError("give --per-cell (entries per (layer, branch)) or --exact (entries in all), not both")
    model = load_model(args.model, gates=args.gates, device=args.device, dtype=args.dtype, weights=args.weights)
    per_cell = DEFAULT_PER_CELL if args.per_cell is None else args.per_cell
    n_entries = args.exact if args.exact is not None else per_cell * branches_per_token(model.spec.n_layers)
    start = time.perf_counter()
    if args.texts > 1:
        from .experiments.faithfulness import corpus_harm

        entries = corpus_harm(
            model,
            paragraphs_of(args.file),
            args.texts,
            n_entries=n_entries,
            seed=args.seed,
            seq_len=args.max_tokens,
            batch_size=args.batch_size,
        )
    else:
        entries = exact_harm(
            model, text, n_entries, seed=args.seed, max_tokens=args.max_tokens, batch_size=args.batch_size
        )
    signals = signal_table(entries, args.skip_fraction, resamples=args.resamples, seed=args.seed)
    seconds = time.perf_counter() - start
    outputs = {out: _csv(signals), **({entries_out: _csv(entries)} if entries_out else {})}
    if figure:
        from .traces.figures import faithfulness_figure

        fig = faithfulness_figure(entries, signals)
        outputs[figure] = lambda tmp: fig.write_html(tmp, include_plotlyjs="cdn")
    write_all(outputs)
    print(signal_summary(signals).to_string(index=False))
    print(
        f"[low, high]: 95% bootstrap intervals over {signals['clusters'].iloc[0]}, "
        f"{signals['entries_per_stratum'].iloc[0]} entries per (layer, branch)"
    )
    tracks = entries[["estimate", "delta_loss"]].corr(method="spearman").iloc[0, 1]
    print(f"first-order estimate vs exact loss change: Spearman {tracks:.3f}")
    blocks = f" over {args.texts} texts" if args.texts > 1 else ""
    print(f"{len(entries)} exact single-entry ablations{blocks} in {seconds:.0f} s")
    print(f"wrote {', '.join(map(str, outputs))}")
    return 0


def cmd_settled(args: argparse.Namespace) -> int:
    from gateskip_core import load_model

    from .experiments.logit_lens import settled_corpus, settled_summary

    out = check_out(args.out)
    figure = check_out(args.figure, (".html",), "--figure")
    summary_out = check_out(args.summary_out, option="--summary-out")
    texts = paragraphs_of(args.file) if args.file else None
    model = load_model(args.model, gates=args.gates, device=args.device, dtype=args.dtype, weights=args.weights)
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
    print(
        "ratio: skipped vs ran compared within each layer (Mantel-Haenszel), 95% interval ratio_low-ratio_high "
        "(tokens as independent trials); pooled_ratio pools the layers first"
    )
    outputs = {out: _csv(table), **({summary_out: _csv(summary)} if summary_out else {})}
    if figure:
        from .traces.figures import settled_figure

        fig = settled_figure(table)
        outputs[figure] = lambda tmp: fig.write_html(tmp, include_plotlyjs="cdn")
    write_all(outputs)
    print(f"wrote {', '.join(map(str, outputs))}")
    return 0


def register(sub, commands, add_model_args, add_skip_args, budget_type) -> None:
    """Every analysis command's parser, each in its own function below."""
    _register_collect(sub, commands, add_model_args, add_skip_args)
    _register_stats(sub, commands)
    _register_query(sub, commands)
    _register_sweep(sub, commands, add_model_args)
    _register_faithfulness(sub, commands, add_model_args)
    _register_quality(sub, commands)
    _register_chat_fidelity(sub, commands, add_model_args)
    _register_settled(sub, commands, add_model_args, add_skip_args)

    from .evaluation.cli import register_eval  # its own module: lm-eval is imported only when it runs

    register_eval(sub, commands, add_model_args)

    from .causal_cli import register_causal  # its own module: the gate beside the causal measures

    register_causal(sub, commands, add_model_args, budget_type)


def _register_collect(sub, commands, add_model_args, add_skip_args) -> None:
    p = sub.add_parser(
        "collect",
        help="trace a corpus (one sequence per paragraph) into a dataset folder of Parquet shards (resumable, "
        "shards over `accelerate launch` processes), or into one .parquet/.csv file",
    )
    add_model_args(p, gates_default="default")
    add_skip_args(p)
    p.add_argument("--file", required=True, nargs="+", help="text file(s); paragraphs are separated by blank lines")
    p.add_argument(
        "--out",
        required=True,
        help="DIR/ (a dataset: resumable, appendable, sharded) or traces.parquet / traces.csv (one file)",
    )
    p.add_argument(
        "--batch-size", type=cli_type(whole_number, "--batch-size"), default=8, help="paragraphs per forward pass"
    )
    p.add_argument(
        "--max-tokens",
        type=cli_type(whole_number, "--max-tokens"),
        default=256,
        help="truncate each paragraph to this many tokens",
    )
    p.add_argument(
        "--shard-size",
        type=cli_type(whole_number, "--shard-size"),
        default=256,
        help="paragraphs per shard of a dataset (a crash loses at most one unfinished shard)",
    )
    commands["collect"] = cmd_collect


def _register_stats(sub, commands) -> None:
    p = sub.add_parser("stats", help="per-layer gate statistics of a trace dataset or file (DuckDB)")
    p.add_argument("--trace", required=True, help="a dataset folder, or a .parquet / .csv trace file")
    p.add_argument("--out", required=True, help="layer_stats.csv")
    p.add_argument("--bos-out", help="also write the BOS anchor table (CSV)")
    p.add_argument("--types-out", help="also write the token-type table (CSV)")
    p.add_argument("--tokens-out", help="also write per-token-id importance over the corpus (CSV)")
    p.add_argument(
        "--cells",
        choices=["applied", "all"],
        default="applied",
        help="cells the gate statistics pool: where the gate scaled the branch (default), or every token's gate",
    )
    p.add_argument(
        "--min-count",
        type=cli_type(whole_number, "--min-count"),
        default=5,
        help="occurrences a token needs to be ranked",
    )
    commands["stats"] = cmd_stats


def _register_query(sub, commands) -> None:
    p = sub.add_parser(
        "query",
        help="SQL over a trace dataset (views: traces, tokens) or a ready-made corpus question, with DuckDB",
    )
    p.add_argument("dataset", help="a dataset folder, or a .parquet / .csv trace file")
    p.add_argument("sql", nargs="?", help="a SELECT over the views traces (token x layer x branch) and tokens")
    p.add_argument("--ready", choices=READY_QUERIES, help="a ready-made query instead of SQL")
    p.add_argument("--layer", type=cli_type(whole_number, "--layer", minimum=0), help="layer (tokens, contexts)")
    p.add_argument("--branch", choices=["attn", "mlp"], help="branch (tokens, contexts)")
    p.add_argument(
        "--min-count", type=cli_type(whole_number, "--min-count"), default=20, help="tokens: occurrences needed"
    )
    p.add_argument("--token-types", help="tokens: only these comma-separated token types (e.g. content,stopword)")
    p.add_argument("--least", action="store_true", help="tokens: the least often skipped instead of the most")
    p.add_argument("--highest", action="store_true", help="contexts: the highest gates instead of the lowest")
    p.add_argument("--limit", type=cli_type(whole_number, "--limit"), default=20, help="rows (tokens) or examples")
    p.add_argument("--show", type=cli_type(whole_number, "--show"), default=40, help="rows printed")
    p.add_argument(
        "--cells",
        choices=["applied", "all"],
        default="applied",
        help="ready-made queries: the cells their gates pool (contexts: the cells picked), where the gate scaled "
        "the branch (default) or every eligible token",
    )
    p.add_argument("--memory-limit", default="1GB", help="DuckDB's memory limit (it spills to disk beyond)")
    p.add_argument("--out", help="write the whole result (.csv or .parquet)")
    commands["query"] = cmd_query


def _register_sweep(sub, commands, add_model_args) -> None:
    p = sub.add_parser("sweep", help="quality vs net FLOPs for GateSkip and baselines")
    add_model_args(p, gates_default="default")
    p.add_argument("--file", help="held-out text (default: the pydoc validation split)")
    p.add_argument(
        "--budgets",
        type=budget_list,
        default=[0.0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6],
        help="comma-separated skip budgets in [0, 1], each run by every method",
    )
    p.add_argument(
        "--methods",
        default="gateskip,gateskip-uniform,random,shortgpt,shortgpt-calibration,attn-only,mlp-only",
        help="comma-separated; shortgpt+gateskip:K removes the K lowest-influence layers and gates the rest",
    )
    p.add_argument(
        "--blocks", type=cli_type(whole_number, "--blocks"), default=8, help="held-out token blocks every run scores"
    )
    p.add_argument(
        "--seq-len", type=cli_type(whole_number, "--seq-len", minimum=2), default=128, help="tokens per block"
    )
    p.add_argument("--figure", help="also write the quality-vs-FLOPs figure (HTML)")
    p.add_argument("--matched-out", help="also write each method's quality at 10/20/30%% net FLOPs saved (CSV)")
    p.add_argument(
        "--metric",
        default="top1_agreement",
        choices=["top1_agreement", "ppl", "kl_to_full"],
        help="the figure's quality axis",
    )
    p.add_argument("--out", required=True, help="sweep.csv: one row per (method, budget)")
    commands["sweep"] = cmd_sweep


def _register_faithfulness(sub, commands, add_model_args) -> None:
    p = sub.add_parser("faithfulness", help="which signal predicts the exact harm of a skip? (batched ablations)")
    add_model_args(p, gates_default="default")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--text", help="one text whose skips are ablated")
    src.add_argument("--file", help="a text file (with --texts: a corpus streamed in blocks)")
    p.add_argument(
        "--per-cell",
        type=cli_type(whole_number, "--per-cell"),
        default=None,
        help="entries ablated exactly per (layer, branch) and text (default 16; on SmolLM2 the gate Spearman's "
        "interval is 0.32 wide with 4, 0.20 with 10: docs/results/faithfulness_interval_width.csv)",
    )
    p.add_argument(
        "--exact",
        type=cli_type(whole_number, "--exact"),
        default=None,
        help="instead of --per-cell: entries ablated exactly in all, the same number from every (layer, branch)",
    )
    p.add_argument(
        "--texts",
        type=cli_type(whole_number, "--texts"),
        default=1,
        help="stream the --file corpus: this many consecutive blocks of --max-tokens tokens, sampled alike; "
        "the intervals then resample texts",
    )
    p.add_argument(
        "--resamples",
        type=cli_type(whole_number, "--resamples"),
        default=1000,
        help="bootstrap draws for the 95%% intervals",
    )
    p.add_argument(
        "--batch-size", type=cli_type(whole_number, "--batch-size"), default=16, help="ablations per forward"
    )
    p.add_argument("--skip-fraction", type=float, default=0.25, help="the budget's skip fraction for the ranking check")
    p.add_argument(
        "--max-tokens", type=cli_type(whole_number, "--max-tokens"), default=128, help="tokens per text (or block)"
    )
    p.add_argument("--seed", type=int, default=0, help="seed of the sampled entries and the bootstrap")
    p.add_argument("--entries-out", help="also write every sampled entry: signals and harm (CSV)")
    p.add_argument("--figure", help="also write the figure (HTML)")
    p.add_argument("--out", required=True, help="faithfulness.csv: one row per signal")
    commands["faithfulness"] = cmd_faithfulness


def _register_quality(sub, commands) -> None:
    p = sub.add_parser("quality", help="perplexity / agreement of gates vs random skipping on held-out text")
    p.add_argument("--model", default=DEFAULT_MODEL, help="registry name, checkpoint dir or hub id")
    add_device_args(p)
    p.add_argument(
        "--gates",
        nargs="+",
        default=["trained=default", "untrained=untrained"],
        help="LABEL=SPEC pairs; the first is also run with random skipping",
    )
    p.add_argument(
        "--budgets", type=budget_list, default=[0.1, 0.25, 0.5], help="comma-separated skip budgets in [0, 1]"
    )
    p.add_argument("--blocks", type=cli_type(whole_number, "--blocks"), default=8, help="held-out blocks of 128 tokens")
    p.add_argument("--file", help="held-out text (default: the pydoc validation split)")
    p.add_argument("--out", required=True, help="quality.csv: one row per (gates, policy, budget)")
    commands["quality"] = cmd_quality


def _register_chat_fidelity(sub, commands, add_model_args) -> None:
    p = sub.add_parser(
        "chat-fidelity", help="KL / top-1 on the original model's own answers to 20 held-out chat prompts"
    )
    add_model_args(p, gates_default="default")
    p.add_argument(
        "--budgets", type=budget_list, default=[0.0, 0.25, 0.5], help="comma-separated skip budgets in [0, 1]"
    )
    p.add_argument("--policies", default="quantile,calibrated", help="comma-separated skip policies")
    p.add_argument(
        "--max-new-tokens",
        type=cli_type(whole_number, "--max-new-tokens"),
        default=64,
        help="tokens of each answer the original model writes",
    )
    add_adapter_scope_arg(p)
    p.add_argument("--out", required=True, help="chat_fidelity.csv")
    commands["chat-fidelity"] = cmd_chat_fidelity


def _register_settled(sub, commands, add_model_args, add_skip_args) -> None:
    p = sub.add_parser(
        "settled", help="logit lens: had tokens' predictions settled when they skipped a layer? (streams a corpus)"
    )
    add_model_args(p, gates_default="default")
    add_skip_args(p)
    p.set_defaults(skip=0.25)
    p.add_argument("--file", help="text to stream (default: the pydoc validation split)")
    p.add_argument("--blocks", type=cli_type(whole_number, "--blocks"), default=16, help="token blocks to run")
    p.add_argument(
        "--seq-len", type=cli_type(whole_number, "--seq-len", minimum=2), default=128, help="tokens per block"
    )
    p.add_argument("--batch-size", type=cli_type(whole_number, "--batch-size"), default=4, help="blocks per forward")
    p.add_argument(
        "--from-layer",
        type=cli_type(whole_number, "--from-layer", minimum=0),
        default=None,
        help="first layer pooled in the summary (default: the second half)",
    )
    p.add_argument("--figure", help="also write the settled-rate figure (HTML)")
    p.add_argument("--summary-out", help="also write the summary: the within-layer ratio per branch (CSV)")
    p.add_argument("--out", required=True, help="settled.csv: counts and rates per (layer, branch)")
    commands["settled"] = cmd_settled
