"""Every (task, method, budget) through lm-eval: one table row per metric, with its compute account.

Methods, for each skip budget b (as in `gateskip sweep`, see analysis/experiments/sweep.py):
- `gateskip`: the gates' `policy` (default quantile) at budget b, allocation as the gates say;
- `random`: random skipping at budget b (uniform over layers), the same gated model;
- `shortgpt`: the ungated model with its lowest Block-Influence layers removed until the skips'
  saving reaches GateSkip's on the same task at b (gates' own cost not charged: the skips alone).
  BI measured on the pydoc validation split, the text the shipped pydoc tasks come from;
- `shortgpt-calibration`: the same with BI on the calibration split, as ShortGPT does;
- `shortgpt+gateskip:K`: the K lowest-BI layers (calibration split) removed, the gates' policy at
  budget b over the layers kept (analysis/experiments/pruning.py).
Every task runs on its own, so its compute account (`net_flops_saved`: gates charged, summed over
all its requests and processes) belongs to it. Matched rows: each method's value at 10/20/30%
net FLOPs saved, interpolated along its budgets (`kind` = 'matched').
"""

from __future__ import annotations

import functools
import json
import math
from collections.abc import Callable, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field

import numpy as np
import pandas as pd

from gateskip_core import GatedModel, GateSkipError, SkipBudget, SkipPlan

METHODS = ("gateskip", "random", "shortgpt", "shortgpt-calibration")
COLUMNS = [
    "task",
    "metric",
    "filter",
    "value",
    "stderr",
    "method",
    "skip_budget",
    "net_flops_saved",
    "skipped_fraction",
    "n",
    "kind",
    "setting",
]
BI_SEQ_LEN = 128  # block length for Block Influence and for ShortGPT's FLOP matching (as the sweep)


@dataclass
class EvalRun:
    table: pd.DataFrame
    runs: list[dict] = field(default_factory=list)  # lm-eval's results per (task, method, budget)

    def json(self) -> str:
        from lm_eval.utils import handle_non_serializable

        return json.dumps({"runs": self.runs}, indent=2, default=handle_non_serializable)


def check_methods(methods: Sequence[str]) -> list[str]:
    """Known (or `shortgpt+gateskip:K`), non-empty, GateSkip first (ShortGPT is matched to its saving)."""
    from analysis.experiments.pruning import check_method_names

    methods = check_method_names(methods, METHODS)
    if any(m in ("shortgpt", "shortgpt-calibration") for m in methods) and "gateskip" not in methods:
        raise GateSkipError("the shortgpt methods are matched to GateSkip's saving: add gateskip to --methods")
    return sorted(dict.fromkeys(methods), key=lambda m: METHODS.index(m) if m in METHODS else len(METHODS))


@dataclass(frozen=True)
class Setting:
    model: GatedModel
    plan: SkipPlan
    label: str


class MethodPlans:
    """The model and skip plan of each method at a budget (Block Influence measured once)."""

    def __init__(self, model: GatedModel, methods: Sequence[str], policy: str = "quantile", **skip_args):
        from analysis.experiments.pruning import prune_count
        from analysis.experiments.quality import evaluation_blocks
        from analysis.experiments.sweep import block_influence
        from gateskip_core.data import pydoc_texts

        if model.gates is None:
            raise GateSkipError("gateskip eval needs gates; load gates first (e.g. --gates default)")
        self.model, self.policy, self.skip_args = model, policy, skip_args
        self.influence = {}
        if "shortgpt" in methods:
            self.influence["shortgpt"] = block_influence(model, evaluation_blocks(model, seq_len=BI_SEQ_LEN))
        self.pruned = {m: prune_count(m, model.spec.n_layers) for m in methods if prune_count(m) is not None}
        if "shortgpt-calibration" in methods or self.pruned:
            blocks = evaluation_blocks(model, pydoc_texts("calibration"), seq_len=BI_SEQ_LEN)
            self.influence["shortgpt-calibration"] = block_influence(model, blocks)

    def setting(self, method: str, budget: float, gateskip_saving: float | None) -> Setting:
        from analysis.experiments.pruning import lowest_influence, pruned_plan
        from analysis.experiments.sweep import LayerDropPolicy, shortgpt_layers

        model = self.model
        if method in self.pruned:
            layers = lowest_influence(self.influence["shortgpt-calibration"], self.pruned[method])
            plan = pruned_plan(model, layers, budget, self.policy, **self.skip_args)
            removed = ",".join(map(str, layers)) or "none"
            return Setting(model, plan, f"removed layers {removed} + {self.policy} b={budget:g}")
        if method == "gateskip":
            plan = model.make_plan(budget, self.policy, **self.skip_args)
            return Setting(model, plan, f"{self.policy} b={budget:g}")
        if method == "random":
            plan = model.make_plan(budget, "random", **{**self.skip_args, "allocation": "uniform"})
            return Setting(model, plan, f"random b={budget:g}")
        layers = shortgpt_layers(model, self.influence[method], gateskip_saving or 0.0, BI_SEQ_LEN)
        plan = SkipPlan(
            SkipBudget.make(1.0 if layers else 0.0, model.spec.n_layers),
            LayerDropPolicy(frozenset(layers)),
            protect_bos=False,
        )
        return Setting(model.view(), plan, "removed layers " + (",".join(map(str, layers)) or "none"))


def evaluate_tasks(
    model: GatedModel,
    tasks,
    budgets: Sequence[float],
    methods: Sequence[str] = ("gateskip",),
    limit: int | None = None,
    batch_size: int = 8,
    policy: str = "quantile",
    on_step: Callable[[str], None] | None = None,
    chat_template: bool = False,
    **skip_args,
) -> EvalRun:
    """Rows for every (task, method, budget); `tasks`: `task_loading.load_tasks`'s `LoadedTasks`.
    `chat_template`: each request rendered with the model's own chat template (lm-eval's
    `apply_chat_template`, as `lm_eval --apply_chat_template` does for `hf`)."""
    methods = check_methods(methods)
    plans = MethodPlans(model, methods, policy, **skip_args)
    rows, runs = [], []
    for task_name, task in tasks.tasks.items():
        removed_runs = {}  # ShortGPT settings removing the same layers give the same results: run each once
        for budget in budgets:
            gateskip_saving = None
            for method in methods:
                setting = plans.setting(method, budget, gateskip_saving)
                if method in ("shortgpt", "shortgpt-calibration") and setting.label in removed_runs:
                    results, account = removed_runs[setting.label]
                else:
                    results, account = _run_one(setting, task, tasks.manager, limit, batch_size, chat_template)
                if method in ("shortgpt", "shortgpt-calibration"):
                    removed_runs[setting.label] = (results, account)
                if method == "gateskip":
                    gateskip_saving = account.gross_flops_saved
                if results is not None:  # None on the other processes of a launch
                    info = dict(task=task_name, method=method, skip_budget=budget, setting=setting.label)
                    rows.extend(_metric_rows(results, task_name, info, account))
                    runs.append({**info, "account": account.compute.as_dict(), **_kept(results)})
                if on_step is not None:
                    on_step(f"{task_name} {method} b={budget:g}")
    table = pd.DataFrame(rows, columns=COLUMNS)
    matched = matched_rows(table)
    return EvalRun(pd.concat([table, matched], ignore_index=True) if len(matched) else table, runs)


def _run_one(setting: Setting, task, manager, limit: int | None, batch_size: int, chat_template: bool = False):
    import lm_eval

    from .lm import GateSkipLM

    lm = GateSkipLM(setting.model, plan=setting.plan, batch_size=batch_size)
    with _environment_collected_once():
        results = lm_eval.simple_evaluate(
            model=lm,
            tasks=[task],
            task_manager=manager,
            limit=limit,
            log_samples=False,
            apply_chat_template=chat_template,
        )
    if results is not None:  # None on the other processes of a launch; the template as lm-eval's tracker records it
        results["chat_template"] = lm.chat_template(chat_template) if chat_template else None
    return results, lm.gathered_account()


@functools.cache
def _environment() -> dict:
    from lm_eval.loggers.utils import add_env_info

    info: dict = {}
    add_env_info(info)
    return info


@contextmanager
def _environment_collected_once():
    """lm-eval describes the environment (pip list, compilers, GPUs: 4-7 s of subprocesses here) in
    every `simple_evaluate`; a run of ours calls it once per (task, method, budget) in one unchanging
    environment, so it is collected once per process and copied."""
    import lm_eval.evaluator as evaluator

    original = evaluator.add_env_info
    evaluator.add_env_info = lambda storage: storage.update(_environment())
    try:
        yield
    finally:
        evaluator.add_env_info = original


def _kept(results: dict) -> dict:
    return {key: results.get(key) for key in ("results", "configs", "versions", "n-shot", "n-samples", "chat_template")}


def _metric_rows(results: dict, task_name: str, info: dict, account) -> list[dict]:
    values = results["results"][task_name]
    n = results.get("n-samples", {}).get(task_name, {}).get("effective")
    rows = []
    for key, value in values.items():
        if "," not in key or "_stderr," in key:
            continue
        metric, filt = key.split(",", 1)
        stderr = values.get(f"{metric}_stderr,{filt}")
        rows.append(
            {
                **info,
                "metric": metric,
                "filter": filt,
                "value": float(value),
                "stderr": float(stderr) if isinstance(stderr, (int, float)) else math.nan,
                "net_flops_saved": account.net_flops_saved,
                "skipped_fraction": account.skipped_fraction,
                "n": n,
                "kind": "measured",
            }
        )
    return rows


def matched_rows(table: pd.DataFrame, targets: Sequence[float] = (0.1, 0.2, 0.3)) -> pd.DataFrame:
    """Each (task, metric, method)'s value at the same net FLOPs saved: linear interpolation along
    its budgets (`gateskip sweep`'s matching; NaN where a method's budgets do not reach a target)."""
    rows = []
    measured = table[table["kind"] == "measured"]
    for (task, metric, filt, method), part in measured.groupby(["task", "metric", "filter", "method"], sort=False):
        part = part.sort_values("net_flops_saved")
        saved, values = part["net_flops_saved"].to_numpy(), part["value"].to_numpy()
        for target in targets:
            inside = len(saved) > 1 and saved.min() <= target <= saved.max()
            rows.append(
                {
                    "task": task,
                    "metric": metric,
                    "filter": filt,
                    "value": float(np.interp(target, saved, values)) if inside else math.nan,
                    "stderr": math.nan,
                    "method": method,
                    "skip_budget": math.nan,
                    "net_flops_saved": target,
                    "skipped_fraction": math.nan,
                    "n": part["n"].iloc[0],
                    "kind": "matched",
                    "setting": "interpolated between budgets",
                }
            )
    return pd.DataFrame(rows, columns=COLUMNS)
