"""`gateskip eval`: benchmark tasks through lm-evaluation-harness, accuracy against net compute.

    gateskip eval --model M --gates G --tasks T1,T2 [--include-path DIR] [--budgets 0,0.1,0.2,0.3]
                  [--methods gateskip,random,shortgpt,shortgpt-calibration,shortgpt+gateskip:K]
                  [--limit N] [--batch-size B]
                  --out results.csv

Everything a user can get wrong (outputs, budgets, methods, task names, a task's YAML or data) is
checked before the model is loaded; nothing is written then. lm-eval's full results go to the
JSON next to the CSV (results.json). Under `accelerate launch` the requests of every task are
split over the processes (lm-eval's data parallelism); the main process writes the files.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from gateskip_core.errors import GateSkipError
from gateskip_core.validation import cli_type, whole_number


def cmd_eval(args: argparse.Namespace) -> int:
    from analysis.experiments.collect import process_state
    from analysis.inputs import check_out
    from gateskip_core import load_model
    from gateskip_core.files import write_all

    from .run import check_methods, evaluate_tasks
    from .task_loading import load_tasks

    try:
        import lm_eval  # noqa: F401
    except ImportError:
        raise GateSkipError("lm-eval is not installed: pip install -e '.[eval]' (or bash scripts/setup.sh)") from None
    out = check_out(args.out)
    json_out = check_out(str(Path(args.out).with_suffix(".json")), (".json",), "--out (its .json)")
    methods = check_methods(args.methods.split(","))
    tasks = load_tasks(args.tasks.split(","), args.include_path or ())
    state = process_state()
    device = str(state.device) if state.num_processes > 1 and state.device.type != "cpu" else args.device
    model = load_model(args.model, gates=args.gates, device=device, dtype=args.dtype, weights=args.weights)
    if args.chat_template and not model.tokenizer.chat_template:
        raise GateSkipError(f"--chat-template: {args.model}'s tokenizer has no chat template")
    from tqdm.auto import tqdm

    total = len(tasks.tasks) * len(args.budgets) * len(methods)
    bar = tqdm(total=total, desc="eval", disable=not state.is_main_process)
    run = evaluate_tasks(
        model,
        tasks,
        args.budgets,
        methods,
        limit=args.limit,
        batch_size=args.batch_size,
        policy=args.policy,
        chat_template=args.chat_template,
        on_step=lambda name: (bar.set_postfix_str(name), bar.update(1)),
        allocation=args.allocation,
        adapter_scope=args.adapter_scope,
    )
    bar.close()
    if not state.is_main_process:
        return 0
    write_all(
        {out: lambda tmp: run.table.to_csv(tmp, index=False), json_out: lambda tmp: Path(tmp).write_text(run.json())}
    )
    shown = run.table[run.table["kind"] == "measured"].drop(columns=["kind", "setting"])
    print(shown.to_string(index=False, float_format=lambda v: f"{v:.4g}"))
    print(f"wrote {out}, {json_out}")
    return 0


def _budgets(text: str) -> list[float]:
    from analysis.inputs import budget_list as parse

    return parse(text)


def register_eval(sub, commands, add_model_args) -> None:
    from gateskip_core.cli import add_adapter_scope_arg

    p = sub.add_parser(
        "eval",
        help="benchmark tasks through lm-evaluation-harness: accuracy against net FLOPs for GateSkip and baselines",
    )
    add_model_args(p, gates_default="default")
    p.add_argument(
        "--tasks",
        required=True,
        help="comma-separated lm-eval tasks, groups or tags (gateskip_heldout: the shipped offline tasks)",
    )
    p.add_argument("--include-path", action="append", help="a folder of extra task YAMLs (repeatable)")
    p.add_argument(
        "--budgets", type=_budgets, default=[0.0, 0.1, 0.2, 0.3], help="comma-separated skip budgets in [0, 1]"
    )
    p.add_argument(
        "--methods",
        default="gateskip,random,shortgpt,shortgpt-calibration",
        help="comma-separated; shortgpt+gateskip:K removes the K lowest-influence layers and gates the rest",
    )
    p.add_argument("--policy", choices=["quantile", "calibrated"], default="quantile", help="GateSkip's skip policy")
    p.add_argument(
        "--allocation",
        choices=["auto", "uniform", "global"],
        default="auto",
        help="spread of GateSkip's budget over layers (random skipping is always uniform)",
    )
    add_adapter_scope_arg(p)
    p.add_argument("--limit", type=cli_type(whole_number, "--limit"), default=None, help="items per task")
    p.add_argument(
        "--batch-size", type=cli_type(whole_number, "--batch-size"), default=8, help="requests per forward pass"
    )
    p.add_argument(
        "--chat-template",
        action="store_true",
        help="render each request with the model's own chat template (lm-eval's --apply_chat_template)",
    )
    p.add_argument("--out", required=True, help="results.csv (lm-eval's full results go to results.json)")
    commands["eval"] = cmd_eval
