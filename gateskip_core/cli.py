"""The core's commands of the `gateskip` command line, and the runner every command goes through.

Each package keeps its own commands (`analysis.cli`, `gateskip.bench.cli`, `dashboard.cli`); the entry
point that assembles them lives above all of them, in `gateskip.cli`. Every user error exits 2
with one line on stderr."""

from __future__ import annotations

import argparse
import os
import re
import signal
import sys
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

from gateskip_core.backbone.registry import DEFAULT_MODEL
from gateskip_core.branches import branches_per_token
from gateskip_core.errors import GateSkipError
from gateskip_core.files import check_writable
from gateskip_core.validation import cli_type, skip_args_of, whole_number

COMMANDS: dict[str, Callable[[argparse.Namespace], int]] = {}


def _command(name: str):
    def register(fn):
        COMMANDS[name] = fn
        return fn

    return register


def budget_type(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"skip budget must be a number in [0, 1], got {text!r}") from None
    if not 0 <= value <= 1:
        raise argparse.ArgumentTypeError(f"skip budget must lie in [0, 1], got {value:g}")
    return value


def check_inputs(args: argparse.Namespace) -> None:
    """What every command can check before any model loads: a --device or --dtype this machine lacks, a
    --model folder that does not exist, and a --gates FILE, read in full (whether it fits the model is
    checked once the model is loaded; quality's LABEL=SPEC too). A mistake is then reported in a second,
    not after the model loaded."""
    from gateskip_core.backbone.registry import missing_folder
    from gateskip_core.gating.checkpoint import load_gates
    from gateskip_core.model import RETIRED_GATES, SHIPPED_GATES, resolve_device, resolve_dtype

    if isinstance(getattr(args, "device", None), str):  # a device or dtype this machine lacks, in one line
        resolve_device(args.device)
    if isinstance(getattr(args, "dtype", None), str):
        resolve_dtype(args.dtype)
    model = getattr(args, "model", None)
    if isinstance(model, str) and missing_folder(model):
        raise GateSkipError(missing_folder(model))
    given = getattr(args, "gates", None)
    for spec in [given] if isinstance(given, str) else given or []:
        spec = spec.partition("=")[2] if "=" in spec else spec
        if spec in ("none", *SHIPPED_GATES, *RETIRED_GATES) or spec.startswith("untrained"):
            continue
        load_gates(spec)


def _progress(msg: str) -> None:
    print(msg, file=sys.stderr)


def add_model_args(p: argparse.ArgumentParser, gates_default: str = "none") -> None:
    p.add_argument("--model", default=DEFAULT_MODEL, help="registry name, checkpoint dir or hub id")
    p.add_argument(
        "--gates",
        default=gates_default,
        help="none | default (shipped gates + adapter + stand-ins) | default-v2 (the previous default) | "
        "default-scalar | untrained[:variant] | FILE.safetensors",
    )
    add_device_args(p)


def add_device_args(p: argparse.ArgumentParser) -> None:
    """--device, --dtype and --weights of a command that loads a model (`load_model` checks them)."""
    add_device_dtype_args(p)
    p.add_argument(
        "--weights",
        default="fp32",
        help="the backbone's projections: fp32 | int8 | int4 (weight-only quantisation by optimum-quanto, run as "
        "its dequantised weights; gates, adapter and stand-ins stay float) | int8:quanto | int4:quanto (quanto's kernels)",
    )


def add_device_dtype_args(p: argparse.ArgumentParser) -> None:
    """--device and --dtype alone, for a command with its own --weights (bench, dashboard); `check_inputs`
    checks both before any model loads."""
    p.add_argument("--device", default="cpu", help="where the model runs: cpu | cuda | cuda:N | mps")
    p.add_argument(
        "--dtype", default="float32", help="the model's weights and activations: float32 | bfloat16 | float16"
    )


def add_skip_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--skip", type=budget_type, default=0.0, help="skip budget in [0, 1]")
    p.add_argument(
        "--policy",
        choices=["quantile", "calibrated", "random"],
        default="quantile",
        help="which tokens skip: the lowest gates per sequence (quantile), the checkpoint's fitted thresholds "
        "(calibrated), or random tokens at the same budget",
    )
    p.add_argument(
        "--path",
        choices=["masked", "physical"],
        default="masked",
        help="masked: every token runs, skipped outputs are dropped; physical: skipped tokens are left out of "
        "the branch's compute",
    )
    p.add_argument("--branches", default="both", help="attn | mlp | both")
    p.add_argument("--no-protect-bos", action="store_true", help="allow the first token to skip")
    p.add_argument("--seed", type=int, default=0, help="seed of the random policy")
    p.add_argument(
        "--allocation",
        choices=["auto", "uniform", "global"],
        default="auto",
        help="spread of the budget over layers: uniform, global (by sensitivity and FLOPs; needs gates "
        "trained with it) or auto (global when the gates support it)",
    )
    add_adapter_scope_arg(p)


def add_adapter_scope_arg(p: argparse.ArgumentParser, help_text: str | None = None) -> None:
    """--adapter-scope auto | all | skipped (see `GatedModel.make_plan`)."""
    p.add_argument(
        "--adapter-scope",
        choices=["auto", "all", "skipped"],
        default="auto",
        help=help_text
        or "where the gates' adapter applies: all tokens, or only tokens from their first skipped branch on "
        "(nothing skipped = the original model); auto: what the gates were trained for",
    )


@_command("models")
def cmd_models(args: argparse.Namespace) -> int:
    from gateskip_core.backbone.registry import REGISTRY, cache_root

    print(f"cache: {cache_root()}  (set GATESKIP_CACHE to move it)")
    for entry in REGISTRY.values():
        state = (
            "built in" if entry.build else ("cached" if entry.is_cached() else "not cached (converted on first load)")
        )
        print(f"{entry.name:24s} {state:38s} {entry.description}; from {entry.source}")
    from gateskip_core.backbone.architecture import SUPPORTED_MODEL_TYPES

    print(f"or a local checkpoint directory of a supported family: {', '.join(SUPPORTED_MODEL_TYPES)}")
    return 0


@_command("trace")
def cmd_trace(args: argparse.Namespace) -> int:
    from gateskip_core.data import paragraphs, read_text_file
    from gateskip_core.model import load_model

    out = Path(args.out)
    if out.suffix.lower() not in (".csv", ".parquet"):
        raise GateSkipError(f"--out must end in .csv or .parquet, got {args.out!r}")
    check_writable(out)
    if args.text is not None:
        texts = [args.text]
    else:
        texts = paragraphs(read_text_file(args.file))
    if not texts or not any(t.strip() for t in texts):
        raise GateSkipError("text is empty")
    model = load_model(
        args.model, gates=args.gates, progress=_progress, device=args.device, dtype=args.dtype, weights=args.weights
    )
    trace = model.trace(texts, chat=args.chat, **skip_args_of(args))
    for notice in trace.notices:
        print(f"warning: {notice}", file=sys.stderr)
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
    return f"skipped branches per token (of {branches_per_token(trace.n_layers)}):\n" + "\n".join(lines)


@_command("generate")
def cmd_generate(args: argparse.Namespace) -> int:
    from gateskip_core.model import load_model

    prompt, out = _generate_inputs(args)
    model = load_model(
        args.model, gates=args.gates, progress=_progress, device=args.device, dtype=args.dtype, weights=args.weights
    )
    skip_args = skip_args_of(args)
    if args.draft_skip is not None:
        skip_args.pop("skip")
    gen = model.generate(
        prompt,
        max_new_tokens=args.max_new_tokens,
        chat=args.chat,
        draft_skip=args.draft_skip,
        draft_tokens=args.draft_tokens,
        generated_thresholds=args.generated_thresholds,
        **skip_args,
    )
    for notice in gen.trace.notices:
        print(f"warning: {notice}", file=sys.stderr)
    print(gen.text)
    print(generation_summary(gen))
    if out is not None:
        gen.trace.save(out)
        print(f"wrote {len(gen.trace.to_dataframe())} rows to {out}")
    return 0


def _generate_inputs(args: argparse.Namespace) -> tuple[str, Path | None]:
    """The prompt and the trace file of `gateskip generate`, checked before any model loads."""
    if (args.prompt is None) == (args.file is None):
        both = args.prompt is not None
        raise GateSkipError("give a prompt or --file, not both" if both else "give a prompt or --file")
    if args.draft_skip is None and args.draft_tokens is not None:
        raise GateSkipError("--draft-tokens needs --draft-skip (the draft's skip budget)")
    if args.draft_skip is not None and args.skip:
        raise GateSkipError("with --draft-skip the output is the original's; give the draft's budget as --draft-skip")
    if args.draft_skip is not None and args.policy == "quantile":
        raise GateSkipError("--draft-skip needs --policy calibrated or random (quantile ranks by the cache's history)")
    out = None
    if args.out is not None:
        out = Path(args.out)
        if out.suffix.lower() not in (".csv", ".parquet"):
            raise GateSkipError(f"--out must end in .csv or .parquet, got {args.out!r}")
        check_writable(out)
    from gateskip_core.data import read_text_file

    prompt = args.prompt if args.file is None else read_text_file(args.file)
    if not prompt.strip():
        raise GateSkipError("prompt is empty")
    return prompt, out


def generation_summary(gen) -> str:
    """One line: tokens generated, the skip rates of prompt and generated tokens next to the budget
    (they can differ: `Generation.skip_rates`), and the drafts' acceptance."""
    n_new = len(gen.trace.extra["generated_token_ids"][0])
    rates = gen.skip_rates()
    line = (
        f"{n_new} new tokens | skipped: prompt {rates.prompt:.1%}, generated {rates.generated:.1%} "
        f"of eligible branches at budget {rates.budget:.1%}"
    )
    if rates.thresholds:
        line += f" (thresholds: {rates.thresholds})"
    record = gen.speculative
    if record is not None:
        line += (
            f" (the original's passes) | draft at skip {record.draft_skip:g}, K={record.draft_tokens}: "
            f"accepted {record.accepted} of {record.drafted} drafted ({record.acceptance_rate:.1%}), "
            f"draft skipped {record.draft_skip_rate:.1%}"
        )
    return line


@_command("train")
def cmd_train(args: argparse.Namespace) -> int:
    from dataclasses import fields

    from gateskip_core.training.loop import TrainConfig, train

    values = {f.name: getattr(args, f.name) for f in fields(TrainConfig) if hasattr(args, f.name)}
    if args.full:
        values["adapter"] = "full"
    result = train(TrainConfig(**values), progress=_progress)
    if result.metrics and result.is_main_process:
        print(" ".join(f"{k}={v:.4g}" for k, v in result.metrics.items()))
    return 0


TRAIN_HELP = {
    "model": "registry name, checkpoint dir or hub id",
    "gate": "vector | scalar | mlp | lowrank:R (d -> R -> d)",
    "shared": "one gate per branch type shared by all layers",
    "adapter": "none (only gates train) | lora:R (LoRA on every projection, trained with the gates) | full",
    "steps": "optimiser steps",
    "seq_len": "tokens per training block (at least 8)",
    "batch": "blocks per step",
    "lr": "AdamW learning rate of the gates",
    "adapter_lr": "AdamW learning rate of the adapter (or of the backbone with --adapter full)",
    "sparsity_weight": "lambda of the sparsity term",
    "sparsity_loss": "l2: mean(g^2) | l1: mean(|g|)",
    "skip_start": "budget at step 0 (ramp) or lowest budget drawn (random)",
    "skip_end": "budget after the ramp (ramp) or highest budget drawn (random)",
    "skip_ramp_steps": "steps of the linear ramp",
    "budget_schedule": "ramp | random (a budget drawn each step, for the whole slider)",
    "allocation": "uniform (the same fraction everywhere) | global (by measured sensitivity and FLOPs)",
    "bf16": "bfloat16 autocast for the forward passes",
    "device": "where training runs: cpu | cuda | cuda:N | mps (under `accelerate launch`: each process's own device)",
    "dtype": "the frozen backbone's weights: float32 | bfloat16 | float16 (what trains stays float32)",
    "data": "text files, or 'builtin' (pydoc train split + the model's own chat answers)",
    "distill": "KL to the original (frozen) model instead of cross-entropy",
    "out": "GATES.safetensors",
    "resume": "continue the run whose state file sits next to --out",
    "seed": "seed of initialisation, data order and drawn budgets",
    "checkpoint_every": "save the training state every N steps",
    "val_every": "validation loss every N steps",
    "val_batches": "validation batches",
    "int8": "store gate weights as int8 with per-row scales",
    "calibrate": "fit calibrated thresholds at the end",
    "skip_fill": "what a skipped branch adds: zero (the paper) | mean | lowrank:R (trained with the gates)",
    "adapter_scope": "all (every token runs the adapter and soft gates) | skipped (only tokens from their first "
    "skipped branch on: with nothing skipped the model is the original)",
    "init": "a gate checkpoint to start from (same gate variant and adapter); stand-ins it lacks are fitted first",
    "teacher_top_k": "with --distill: the teacher's top-k log-probs per block, computed once and reused (0: exact)",
    "skip_gradient": "none (the paper: a skipped token's gate gets no task gradient) | straight-through (it gets the "
    "first-order cost of its skip)",
    "rank_weight": "weight of a pairwise loss ranking each branch's gates by what a skip costs (--rank-target)",
    "rank_target": "what the ranking loss orders tokens by: residual (how much a skip changes the residual, "
    "|branch - stand-in| / |h|) | first-order (|gradient . (branch - stand-in)|: the skip's first-order cost to "
    "the task loss; one more backward pass per step)",
    "router_first": "steps at the start in which only the gates and stand-ins train (the adapter joins after)",
    "weights": "the backbone's projections: fp32 | int8 | int4 (weight-only quantisation by optimum-quanto; the "
    "gates, adapter and stand-ins train in float32)",
    "chat_share": "with --data builtin: the least share of the training text that is the model's own chat answers "
    "(they repeat to reach it; 0: the built-in mix, about a sixth)",
}


def _add_train_args(p: argparse.ArgumentParser) -> None:
    """One flag per `TrainConfig` field, defaults taken from it (so they cannot disagree; `--help` shows them)."""
    from dataclasses import MISSING, fields

    from gateskip_core.training.loop import TrainConfig

    for f in fields(TrainConfig):
        flag = "--" + f.name.replace("_", "-")
        default = f.default if f.default is not MISSING else f.default_factory()
        help_text = TRAIN_HELP[f.name]
        if f.name == "out":
            p.add_argument(flag, required=True, help=TRAIN_HELP[f.name])
        elif f.name == "data":
            p.add_argument(flag, nargs="+", default=default, help=help_text)
        elif isinstance(default, bool):
            p.add_argument(flag, action=argparse.BooleanOptionalAction, default=default, help=TRAIN_HELP[f.name])
        else:
            p.add_argument(flag, type=type(default), default=default, help=help_text)
    p.add_argument("--full", action="store_true", help="the same as --adapter full")


class _DefaultsFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """`--help` shows every flag's default, except where there is none to show (None, an on/off switch)."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        if action.default is None or isinstance(action, (argparse._StoreTrueAction, argparse._StoreFalseAction)):
            return action.help
        return super()._get_help_string(action)


# argparse's own wording of a value its type conversion refused, and ours
_INVALID_VALUE = re.compile(r"argument (?P<flag>\S+): invalid (?P<kind>int|float) value: (?P<value>.*)")
_KINDS = {"int": "a whole number", "float": "a number"}


def error_line(message: str) -> str:
    """The one format of every error a command reports: `gateskip: error: <message>`."""
    return f"gateskip: error: {message}"


def _argparse_message(message: str) -> str:
    """argparse's message in our words: "--lowest must be a number, got 'x'", not "argument --lowest:
    invalid float value: 'x'"."""
    found = _INVALID_VALUE.fullmatch(message)
    if found:
        return f"{found['flag']} must be {_KINDS[found['kind']]}, got {found['value']}"
    if message.startswith("argument command: invalid choice: "):
        return "unknown command " + message.removeprefix("argument command: invalid choice: ")
    return message.removeprefix("argument ")


class _OneLineParser(argparse.ArgumentParser):
    """Argument errors print one line (no usage block) in the format of every other error;
    `--help` shows each flag's default."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("formatter_class", _DefaultsFormatter)
        super().__init__(*args, **kwargs)

    def error(self, message: str):
        self.exit(2, error_line(_argparse_message(message)) + "\n")


@_command("fit-fill")
def cmd_fit_fill(args: argparse.Namespace) -> int:
    from dataclasses import replace

    from gateskip_core.gating.checkpoint import save_gates
    from gateskip_core.gating.fill import FillSpec
    from gateskip_core.model import load_model
    from gateskip_core.training.calibration_texts import calibration_texts
    from gateskip_core.training.fill_fitting import fit_fill
    from gateskip_core.training.loop import calibrate_checkpoint

    spec = FillSpec.parse(args.fill)
    if spec.kind == "zero":
        raise GateSkipError("--fill zero adds nothing: there is nothing to fit")
    if not 0 < args.lowest <= 1:
        raise GateSkipError(f"--lowest must lie in (0, 1], got {args.lowest:g}")
    out = check_writable(args.out)
    if not out.name.endswith(".safetensors"):
        raise GateSkipError("--out must end in .safetensors")
    model = load_model(
        args.model, gates=args.gates, progress=_progress, device=args.device, dtype=args.dtype, weights=args.weights
    )
    if model.checkpoint is None:
        raise GateSkipError("fit-fill needs a gate checkpoint (default, default-v2, default-scalar or a file)")
    scope = model.checkpoint.adapter_scope if args.adapter_scope == "auto" else args.adapter_scope
    base = replace(model.checkpoint, fill=None, adapter_scope=scope)
    model.attach_gates(model.gates, "fitting", base)
    texts = calibration_texts(model, _progress)
    ckpt = replace(base, fill=fit_fill(model, spec, texts, lowest=args.lowest, progress=_progress))
    if args.calibrate:
        model.attach_gates(model.gates, "fitted", ckpt)
        _progress("calibrating thresholds with the stand-ins")
        calibrate_checkpoint(model, ckpt, texts, _progress)
    save_gates(ckpt, out, int8=ckpt.weights != "float32")
    print(f"wrote {out} ({out.stat().st_size / 1e6:.1f} MB): {spec.label} stand-ins, adapter scope {scope}")
    return 0


def new_parser() -> tuple[argparse.ArgumentParser, argparse._SubParsersAction]:
    """The `gateskip` parser with no commands yet, and its subcommand table."""
    parser = _OneLineParser(prog="gateskip", description="GateSkip Lens: learned residual gates")
    return parser, parser.add_subparsers(dest="command", required=True)


def register(sub) -> None:
    """The core's commands: models, trace, generate, train, fit-fill."""
    sub.add_parser("models", help="list the model registry and what is cached")

    p = sub.add_parser("trace", help="per-token, per-layer gate values and skips to CSV/Parquet")
    add_model_args(p)
    add_skip_args(p)
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--text", help="one text to trace")
    src.add_argument("--file", help="UTF-8 text; each blank-line separated paragraph is one sequence")
    p.add_argument("--chat", action="store_true", help="format the text as a chat message")
    p.add_argument("--out", required=True, help="FILE.csv or FILE.parquet")

    p = sub.add_parser("generate", help="generate a continuation under skipping, or drafted by it (exact)")
    add_model_args(p)
    add_skip_args(p)
    p.set_defaults(policy="calibrated", path="physical")  # decoding decides token by token, and saves compute
    p.add_argument("prompt", nargs="?", help="the prompt (or --file)")
    p.add_argument("--file", help="UTF-8 text: the whole file is the prompt")
    p.add_argument("--chat", action="store_true", help="format the prompt as a chat message")
    p.add_argument(
        "--max-new-tokens", type=cli_type(whole_number, "--max-new-tokens"), default=32, help="tokens generated at most"
    )
    p.add_argument(
        "--draft-skip",
        type=budget_type,
        help="self-speculative decoding: the gated model at this budget drafts, the original checks "
        "(output = the original's greedy tokens); the skip options then steer the draft",
    )
    p.add_argument("--draft-tokens", type=cli_type(whole_number, "--draft-tokens"), help="tokens per draft (4)")
    p.add_argument(
        "--generated-thresholds",
        choices=("auto", "prompt"),
        default="auto",
        help="calibrated policy: 'auto' decides generated tokens with the gates' decode-fitted thresholds "
        "where they store them; 'prompt': every token with the prompt's",
    )
    p.add_argument("--out", help="the trace of the generation: FILE.csv or FILE.parquet")

    p = sub.add_parser("train", help="train gates (only gates by default)")
    _add_train_args(p)

    p = sub.add_parser("fit-fill", help="fit stand-ins for skipped branches to gates, without training")
    add_model_args(p, gates_default="default")
    p.add_argument("--fill", required=True, help="mean | lowrank:R")
    p.add_argument("--lowest", type=float, default=0.3, help="fit on this fraction of lowest-gate tokens")
    add_adapter_scope_arg(p, "the scope to fit the stand-ins in (and to store with them)")
    p.add_argument("--calibrate", action=argparse.BooleanOptionalAction, default=True, help="refit thresholds")
    p.add_argument("--out", required=True, help="GATES.safetensors (the gates, adapter and the fitted stand-ins)")


class _Interrupts:
    """Turns Ctrl-C and SIGTERM into KeyboardInterrupt (so that `finally` blocks remove temporary
    files) and remembers that one came: a KeyboardInterrupt raised inside a destructor is only
    printed by Python as "Exception ignored", and the command would otherwise finish as if the
    user had not asked it to stop."""

    def __init__(self) -> None:
        self.received = False
        self._held = False
        for signum in (signal.SIGINT, signal.SIGTERM):
            signal.signal(signum, self._on_signal)

    def _on_signal(self, signum, frame) -> None:
        self.received = True
        if not self._held:
            raise KeyboardInterrupt

    @contextmanager
    def held(self) -> Iterator[None]:
        """Record a signal during the block without raising; raise once the block ends.

        Importing torch runs Python callbacks from C++: a KeyboardInterrupt raised inside one
        aborts the process (pybind11 `terminate`) instead of unwinding."""
        self._held = True
        try:
            yield
        finally:
            self._held = False
        if self.received:
            raise KeyboardInterrupt


def script_parser(description: str | None = None) -> argparse.ArgumentParser:
    """The argument parser of a standalone script (gateskip/bench/*.py): bad arguments are one line,
    in the format of every other error (`run_script` reports the rest)."""
    return _OneLineParser(description=description)


def _reported(work: Callable[[], int]) -> tuple[int, bool]:
    """`work()`'s exit status; a `GateSkipError` is reported as one line and exit 2, an interrupt as
    one line and exit 130 (then the flag is True: the error is reported)."""
    try:
        return work(), False
    except GateSkipError as err:
        print(error_line(str(err)), file=sys.stderr)
        return 2, True
    except KeyboardInterrupt:
        print("gateskip: interrupted", file=sys.stderr)
        return 130, True


def run_script(main: Callable[[], object]) -> int:
    """Run a standalone script's `main()` as `run` runs a command: a `GateSkipError` (an unknown
    model, a missing gate file) is one line and exit 2, an interrupt one line and exit 130."""
    return _reported(lambda: main() or 0)[0]


def run(build_parser: Callable[[], argparse.ArgumentParser], argv: list[str] | None = None) -> int:
    """Parse `argv` with `build_parser()` and run the command: user errors exit 2 with one line,
    an interrupt exits 130 with one line."""
    interrupts = _Interrupts()
    # One line per error on stderr: no library progress bars ("Loading weights") or deprecation
    # notices from dependencies before it. Our own long steps print their own progress.
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    warnings.filterwarnings("ignore", category=FutureWarning)

    def command() -> int:
        with interrupts.held():
            import torch  # noqa: F401  (held: see _Interrupts.held)

            parser = build_parser()  # builds the train flags from TrainConfig
        args = parser.parse_args(argv)
        check_inputs(args)
        return COMMANDS[args.command](args)

    status, reported = _reported(command)
    if reported:
        return status
    if interrupts.received:  # swallowed where Python ignores exceptions (a destructor)
        print("gateskip: interrupted", file=sys.stderr)
        return 130
    return status
