"""`gateskip` command line. Every user error exits 2 with one line on stderr."""

from __future__ import annotations

import argparse
import sys
import warnings
from collections.abc import Callable
from pathlib import Path

from .errors import GateSkipError

COMMANDS: dict[str, Callable[[argparse.Namespace], int]] = {}


def _command(name: str):
    def register(fn):
        COMMANDS[name] = fn
        return fn

    return register


def _budget(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"skip budget must be a number in [0, 1], got {text!r}") from None
    if not 0 <= value <= 1:
        raise argparse.ArgumentTypeError(f"skip budget must lie in [0, 1], got {value:g}")
    return value


def _read_text(path: str) -> str:
    try:
        return Path(path).read_text(encoding="utf-8")
    except FileNotFoundError:
        raise GateSkipError(f"file not found: {path}") from None
    except (OSError, UnicodeDecodeError) as err:
        raise GateSkipError(f"cannot read {path}: {err}") from None


def _progress(msg: str) -> None:
    print(msg, file=sys.stderr)


def _add_model_args(p: argparse.ArgumentParser, gates_default: str = "none") -> None:
    p.add_argument("--model", default="smollm2-135m-instruct", help="registry name, checkpoint dir or hub id")
    p.add_argument(
        "--gates", default=gates_default,
        help="none | default (shipped vector) | default-scalar | untrained[:variant] | FILE.safetensors",
    )  # fmt: skip


def _add_skip_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--skip", type=_budget, default=0.0, help="skip budget in [0, 1]")
    p.add_argument("--policy", choices=["quantile", "calibrated", "random"], default="quantile")
    p.add_argument("--path", choices=["masked", "physical"], default="masked")
    p.add_argument("--branches", default="both", help="attn | mlp | both")
    p.add_argument("--no-protect-bos", action="store_true", help="allow the first token to skip")
    p.add_argument("--seed", type=int, default=0, help="seed of the random policy")


@_command("models")
def cmd_models(args: argparse.Namespace) -> int:
    from .registry import REGISTRY, cache_root

    print(f"cache: {cache_root()}  (set GATESKIP_CACHE to move it)")
    for entry in REGISTRY.values():
        state = (
            "built in" if entry.build else ("cached" if entry.is_cached() else "not cached (converted on first load)")
        )
        print(f"{entry.name:24s} {state:38s} {entry.description}; from {entry.source}")
    return 0


@_command("trace")
def cmd_trace(args: argparse.Namespace) -> int:
    from .data import paragraphs
    from .model import load_model

    out = Path(args.out)
    if out.suffix.lower() not in (".csv", ".parquet"):
        raise GateSkipError(f"--out must end in .csv or .parquet, got {args.out!r}")
    if args.text is not None:
        texts = [args.text]
    else:
        texts = paragraphs(_read_text(args.file))
    if not texts or not any(t.strip() for t in texts):
        raise GateSkipError("text is empty")
    model = load_model(args.model, gates=args.gates, progress=_progress)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trace = model.trace(
            texts, skip=args.skip, policy=args.policy, path=args.path, branches=args.branches,
            protect_bos=not args.no_protect_bos, seed=args.seed, chat=args.chat,
        )  # fmt: skip
    for w in caught:
        print(f"warning: {w.message}", file=sys.stderr)
    trace.save(out)
    print(trace.summary())
    print(_skip_map(trace))
    print(f"wrote {len(trace.to_dataframe())} rows to {out}")
    return 0


def _skip_map(trace, width: int = 80) -> str:
    """The first sequence's tokens, each followed by how many of its branches skipped."""
    seq = trace.sequences[0]
    parts = [f"{tok!r}:{int(n)}" for tok, n in zip(seq.tokens, seq.skipped.sum(axis=(1, 2)))]
    lines, line = [], ""
    for part in parts:
        if len(line) + len(part) + 1 > width:
            lines.append(line)
            line = ""
        line += part + " "
    lines.append(line)
    return f"skipped branches per token (of {trace.n_layers * 2}):\n" + "\n".join(lines)


@_command("train")
def cmd_train(args: argparse.Namespace) -> int:
    from .training import TrainConfig, train

    config = TrainConfig(
        model=args.model, gate=args.gate, shared=args.shared, full=args.full, steps=args.steps,
        seq_len=args.seq_len, batch=args.batch, lr=args.lr, sparsity_weight=args.sparsity_weight,
        sparsity_loss=args.sparsity_loss, skip_start=args.skip_start, skip_end=args.skip_end,
        skip_ramp_steps=args.skip_ramp_steps, data=args.data, distill=args.distill, out=args.out,
        resume=args.resume, seed=args.seed, checkpoint_every=args.checkpoint_every, val_every=args.val_every,
        int8=args.int8,
    )  # fmt: skip
    result = train(config, progress=_progress)
    if result.metrics and result.is_main_process:
        print(" ".join(f"{k}={v:.4g}" for k, v in result.metrics.items()))
    return 0


class _OneLineParser(argparse.ArgumentParser):
    """Argument errors print one line (no usage block); `--help` still shows the usage."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message}\n")


@_command("dashboard")
def cmd_dashboard(args: argparse.Namespace) -> int:
    import os
    import subprocess

    app = Path(__file__).resolve().parent.parent / "dashboard" / "app.py"
    if not app.is_file():
        raise GateSkipError(f"dashboard app not found at {app}; install the project with `pip install -e .`")
    env = dict(os.environ, GATESKIP_DASHBOARD_MODEL=args.model)
    cmd = [sys.executable, "-m", "streamlit", "run", str(app), "--server.port", str(args.port),
           "--server.headless", "true", "--browser.gatherUsageStats", "false"]  # fmt: skip
    print(f"GateSkip Lens dashboard on http://localhost:{args.port}  (Ctrl-C to stop)", file=sys.stderr)
    return subprocess.call(cmd, env=env)


def build_parser() -> argparse.ArgumentParser:
    parser = _OneLineParser(prog="gateskip", description="GateSkip Lens: learned residual gates")
    sub = parser.add_subparsers(dest="command", required=True)

    sub.add_parser("models", help="list the model registry and what is cached")

    p = sub.add_parser("trace", help="per-token, per-layer gate values and skips to CSV/Parquet")
    _add_model_args(p)
    _add_skip_args(p)
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--text")
    src.add_argument("--file", help="UTF-8 text; each blank-line separated paragraph is one sequence")
    p.add_argument("--chat", action="store_true", help="format the text as a chat message")
    p.add_argument("--out", required=True, help="FILE.csv or FILE.parquet")

    p = sub.add_parser("train", help="train gates (only gates by default)")
    p.add_argument("--model", default="smollm2-135m-instruct")
    p.add_argument("--gate", choices=["vector", "scalar", "mlp"], default="vector")
    p.add_argument("--shared", action="store_true", help="one gate per branch type shared by all layers")
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--freeze-backbone", action="store_true", help="train only the gates (default)")
    mode.add_argument("--full", action="store_true", help="fine-tune the backbone too")
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--sparsity-weight", type=float, default=0.1)
    p.add_argument("--sparsity-loss", choices=["l2", "l1"], default="l2")
    p.add_argument("--skip-start", type=float, default=0.0)
    p.add_argument("--skip-end", type=float, default=0.2)
    p.add_argument("--skip-ramp-steps", type=int, default=100)
    p.add_argument("--data", nargs="+", default=["builtin"], help="text files, or 'builtin'")
    p.add_argument("--distill", action="store_true", help="KL to the ungated model instead of CE")
    p.add_argument("--out", required=True, help="GATES.safetensors")
    p.add_argument("--resume", action="store_true")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--checkpoint-every", type=int, default=25)
    p.add_argument("--val-every", type=int, default=50)
    p.add_argument("--int8", action="store_true", help="store weights as int8 with per-row scales")

    p = sub.add_parser("dashboard", help="start the Streamlit dashboard")
    p.add_argument("--model", default="smollm2-135m-instruct", help="model selected when the app opens")
    p.add_argument("--port", type=int, default=8501)

    _register_analysis(sub)
    return parser


def _register_analysis(sub) -> None:
    """Analysis commands live in the `analysis` package; register them if it is installed."""
    try:
        from analysis.cli import register
    except ImportError:
        return
    register(sub, COMMANDS, _add_model_args, _add_skip_args, _budget)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return COMMANDS[args.command](args)
    except GateSkipError as err:
        print(f"gateskip: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("gateskip: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
