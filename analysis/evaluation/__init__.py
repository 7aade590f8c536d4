"""Benchmark tasks through lm-evaluation-harness: accuracy against net compute.

- `lm`: `GateSkipLM`, the gated model as lm-eval's `gateskip` model (one skip plan per run);
- `task_loading`: tasks resolved and their data loaded offline, before any model work;
- `run`: every (task, method, budget) through lm-eval, one table row per metric;
- `cli`: the `gateskip eval` command;
- `tasks/`: the shipped offline tasks (held-out pydoc and legal text), built by scripts/build_eval_tasks.py.

lm-eval is imported only by these modules (it is the `eval` extra).
"""

from pathlib import Path

SHIPPED_TASKS_DIR = Path(__file__).resolve().parent / "tasks"
