"""`gateskip bench` (assembled into the command line by `gateskip.cli`)."""

from __future__ import annotations

import argparse
import math

from gateskip_core.backbone.registry import DEFAULT_MODEL
from gateskip_core.cli import add_device_dtype_args
from gateskip_core.files import check_writable, write_all
from gateskip_core.validation import cli_type, whole_number


def _numbers(kind, name: str, minimum=None, maximum=None):
    def parse(text: str):
        try:
            values = tuple(kind(x) for x in text.split(",") if x.strip())
        except ValueError:
            raise argparse.ArgumentTypeError(f"{name} must be comma-separated {kind.__name__}s, got {text!r}") from None
        low = minimum if minimum is not None else -math.inf
        high = maximum if maximum is not None else math.inf
        if not values or not all(low <= v <= high for v in values):  # NaN fails too
            bounds = f"in [{minimum}, {maximum}]" if maximum is not None else f">= {minimum}"
            raise argparse.ArgumentTypeError(f"{name} must be {bounds}, got {text!r}")
        return values

    return parse


def cmd_bench(args: argparse.Namespace) -> int:
    from pathlib import Path

    from .suite import BenchConfig, run, save, tables

    out = check_writable(Path(args.out), "--out") if args.out else None
    cfg = BenchConfig(
        model=args.model,
        device=args.device,
        dtype=args.dtype,
        weights=args.weights,
        gates=args.gates,
        variants=tuple(v.strip() for v in args.variants.split(",") if v.strip()),
        memory_variants=tuple(v.strip() for v in args.memory_variants.split(",") if v.strip()),
        decode_variants=tuple(v.strip() for v in (args.decode_variants or args.gates).split(",") if v.strip()),
        prefill_tokens=args.prefill_tokens,
        prefill_skips=args.prefill_skips,
        prefill_batches=args.prefill_batches,
        decode_prompt=args.decode_prompt,
        new_tokens=args.new_tokens,
        chat_new_tokens=args.chat_new_tokens,
        clock=args.clock,
        decode_skips=args.decode_skips,
        decode_batches=args.decode_batches,
        collect_tokens=args.collect_tokens,
        corpus_collect_tokens=args.corpus_collect_tokens,
        corpus_query_tokens=args.corpus_query_tokens,
        dashboard_tokens=args.dashboard_tokens,
        repeats=args.repeats,
        decode_repeats=args.decode_repeats,
        batched_decode_repeats=args.batched_decode_repeats,
        sections=tuple(s.strip() for s in args.sections.split(",") if s.strip()),
    )
    results = run(cfg)
    print(tables(results))
    if out is not None:
        write_all({out: save(results, out)})
        print(f"wrote {out}")
    return 0


def register(sub, commands) -> None:
    p = sub.add_parser("bench", help="speed and memory of prefill, decoding, capture, collect and the dashboard")
    _model_args(p)
    _prefill_args(p)
    _decode_args(p)
    _section_args(p)
    commands["bench"] = cmd_bench


def _model_args(p: argparse.ArgumentParser) -> None:
    """The model, its gates and weights, and what is measured."""
    p.add_argument("--model", default=DEFAULT_MODEL, help="registry name, checkpoint dir or hub id")
    p.add_argument("--gates", default="default", help="gates for decode, capture, collect, dashboard and rates")
    add_device_dtype_args(p)  # the same flags, checked the same way, as every other command's
    p.add_argument(
        "--weights",
        default="fp32",
        help="the prefill and decoding model's projections: fp32 | int8 | int4 (dequantised: float32 speed) | "
        "int4:quanto (quanto's kernels); the memory and dashboard rows load fp32",
    )
    p.add_argument(
        "--variants",
        default="default,default@all,default@merged,default-scalar,untrained:vector",
        help="prefill gate variants: GATES, GATES@all | GATES@skipped (adapter scope), GATES@merged (merged adapter)",
    )
    p.add_argument(
        "--sections",
        default="prefill,decode,memory,capture,collect,dashboard,rates,corpus",
        help="comma-separated sections to measure",
    )
    p.add_argument("--memory-variants", default="default,default-scalar", help="gates whose peak memory is measured")


def _prefill_args(p: argparse.ArgumentParser) -> None:
    """The prefill section's prompt length, budgets and batch sizes."""
    p.add_argument(
        "--prefill-tokens",
        type=cli_type(whole_number, "--prefill-tokens", minimum=2),
        default=128,
        help="prompt tokens of the prefill section",
    )
    p.add_argument(
        "--prefill-skips",
        type=_numbers(float, "--prefill-skips", 0, 1),
        default=(0.0, 0.15, 0.25, 0.5, 0.7),
        help="comma-separated skip budgets of the prefill section",
    )
    p.add_argument(
        "--prefill-batches",
        type=_numbers(int, "--prefill-batches", 1),
        default=(1, 8),
        help="comma-separated batch sizes of the prefill section",
    )


def _decode_args(p: argparse.ArgumentParser) -> None:
    """The decode section's prompt, length, budgets, batch sizes and repeats."""
    p.add_argument(
        "--decode-variants",
        default="default,default@all,default@merged",
        help="gate variants decoded at batch 1 (larger batches decode --gates); '' = --gates",
    )
    p.add_argument(
        "--decode-prompt",
        type=cli_type(whole_number, "--decode-prompt", minimum=2),
        default=256,
        help="prompt tokens before decoding",
    )
    p.add_argument(
        "--new-tokens", type=cli_type(whole_number, "--new-tokens", minimum=1), default=128, help="tokens decoded"
    )
    p.add_argument(
        "--decode-skips",
        type=_numbers(float, "--decode-skips", 0, 1),
        default=(0.0, 0.25, 0.5),
        help="comma-separated skip budgets of the decode section",
    )
    p.add_argument(
        "--decode-batches",
        type=_numbers(int, "--decode-batches", 1),
        default=(1, 8),
        help="comma-separated batch sizes of the decode section",
    )
    p.add_argument(
        "--decode-repeats",
        type=cli_type(whole_number, "--decode-repeats", minimum=1),
        default=2,
        help="repeats of decoding at batch size 1",
    )
    p.add_argument(
        "--batched-decode-repeats",
        type=cli_type(whole_number, "--batched-decode-repeats", minimum=1),
        default=1,
        help="repeats of decoding at batch sizes above 1",
    )
    p.add_argument(
        "--chat-new-tokens",
        type=cli_type(whole_number, "--chat-new-tokens", minimum=0),
        default=48,
        help="the chat setting: tokens answered to a chat prompt (a calibration prompt, never trained on) at batch 1 with --gates (0: none)",
    )
    p.add_argument(
        "--clock",
        choices=["wall", "cpu"],
        default="wall",
        help="time by the wall clock, or (CPU runs on a shared machine) by this process's CPU time",
    )


def _section_args(p: argparse.ArgumentParser) -> None:
    """The corpus, collect and dashboard sections, repeats and the output."""
    p.add_argument(
        "--corpus-collect-tokens",
        type=cli_type(whole_number, "--corpus-collect-tokens"),
        default=20_000,
        help="corpus section: tokens collected for real with 1 and 2 processes",
    )
    p.add_argument(
        "--corpus-query-tokens",
        type=_numbers(int, "--corpus-query-tokens", 1),
        default=(100_000, 1_000_000),
        help="corpus section: dataset sizes the queries are timed on (synthesised from the collected one)",
    )
    p.add_argument(
        "--collect-tokens",
        type=_numbers(int, "--collect-tokens", 1),
        default=(2_000, 10_000),
        help="comma-separated corpus sizes (tokens) of the collect section",
    )
    p.add_argument(
        "--dashboard-tokens",
        type=cli_type(whole_number, "--dashboard-tokens", minimum=2),
        default=128,
        help="tokens of the text the dashboard section runs",
    )
    p.add_argument(
        "--repeats", type=cli_type(whole_number, "--repeats", minimum=1), default=2, help="repeats of each timing"
    )
    p.add_argument("--out", help="also write the results as JSON")
