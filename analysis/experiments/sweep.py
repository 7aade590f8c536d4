"""Quality against net compute: GateSkip and baselines at matched budgets.

Methods, for each skip budget b:
- `gateskip`: the gates' quantile policy at budget b (both branches), spread over
  layers by the gates' default allocation (global when they carry a sensitivity
  profile, else uniform);
- `gateskip-uniform`: the same gates with the paper's uniform per-layer rule;
- `random`: random skipping at budget b, same gated model;
- `shortgpt`: the ungated model with whole layers removed, lowest Block Influence
  first (BI = 1 - cosine(layer input, layer output), measured on the evaluated
  text), until its FLOP saving reaches what GateSkip's skips save at b;
- `shortgpt-calibration`: the same with BI measured on calibration text (the pydoc
  calibration split), as ShortGPT does; compare against the stronger of the two;
- `attn-only` / `mlp-only`: the gates' quantile policy on one branch type, at the
  rate that gives the same FLOP saving (capped at skipping every eligible token);
- `shortgpt+gateskip:K`: the K lowest-BI layers (BI on calibration text) removed, then the
  gates' quantile policy at budget b over the layers kept (`pruning.py`); its own curve
  over b, so `at_matched_savings` matches each K at a net saving.
`flops_saved` is always net of the gates' own cost (see gateskip_core.traces.compute).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F

from gateskip_core import Capture, GatedModel, GateSkipError, SkipBudget, SkipPlan, account_sequence
from gateskip_core.data import pydoc_texts
from gateskip_core.skipping.policies import BranchInput, Decision, SkipPolicy

from .pruning import check_method_names, lowest_influence, prune_count, pruned_plan
from .quality import evaluate, evaluation_blocks, reference

METHODS = ("gateskip", "gateskip-uniform", "random", "shortgpt", "shortgpt-calibration", "attn-only", "mlp-only")
SWEEP_COLUMNS = [
    "method",
    "skip_budget",
    "skipped_fraction",
    "flops_saved",
    "ppl",
    "kl_to_full",
    "top1_agreement",
    "tokens",
    "flops_saved_gross",
    "setting",
]


@dataclass(frozen=True)
class LayerDropPolicy(SkipPolicy):
    """ShortGPT as a skip policy: every token skips both branches of the removed layers."""

    layers: frozenset = frozenset()
    name: str = "shortgpt"
    needs_gates: bool = False

    def decide(self, inp: BranchInput) -> Decision:
        skip = inp.eligible & (inp.layer in self.layers)
        return Decision(skip=skip, threshold=torch.full(skip.shape, float("nan"), device=skip.device))


def block_influence(model: GatedModel, blocks: torch.Tensor) -> np.ndarray:
    """Per layer: 1 - mean cosine similarity of its input and output hidden states (ungated model)."""
    plan = SkipPlan(SkipBudget.make(0.0, model.spec.n_layers), None)
    out = model.view().forward(blocks, torch.ones_like(blocks), plan, capture=Capture(hidden_states=True))
    hs = out.hidden_states
    return np.array([1 - F.cosine_similarity(hs[i], hs[i + 1], dim=-1).mean().item() for i in range(len(hs) - 1)])


def _saving(model: GatedModel, skipped: np.ndarray, seq_len: int) -> float:
    acc = account_sequence(model.spec, skipped, (0, 0), seq_len, "physical")
    return 1 - acc.skipping_flops / acc.dense_flops


def shortgpt_layers(model: GatedModel, influence: np.ndarray, target: float, seq_len: int) -> list[int]:
    """Lowest-BI layers, removed one by one until the saving reaches `target`."""
    removed: list[int] = []
    skipped = np.zeros((seq_len, model.spec.n_layers, 2), bool)
    for layer in np.argsort(influence):
        if _saving(model, skipped, seq_len) >= target - 1e-9:
            break
        removed.append(int(layer))
        skipped[:, layer, :] = True
    return sorted(removed)


def branch_rate_for(model: GatedModel, branch: str, target: float, seq_len: int) -> float:
    """Skip rate on one branch type whose FLOP saving equals `target` (capped at 1)."""
    skipped = np.zeros((seq_len, model.spec.n_layers, 2), bool)
    skipped[1:, :, 0 if branch == "attn" else 1] = True  # every eligible token (BOS protected)
    full = _saving(model, skipped, seq_len)
    return float(min(1.0, target / full)) if full > 0 else 0.0


def sweep(
    model: GatedModel,
    budgets: Sequence[float],
    methods: Sequence[str] = METHODS,
    blocks: torch.Tensor | None = None,
    on_step: Callable[[int, int, str], None] | None = None,
) -> pd.DataFrame:
    """One row per (method, budget) for a model with gates attached; see the module docstring."""
    methods = check_method_names(methods, METHODS)
    pruned = {m: prune_count(m, model.spec.n_layers) for m in methods if prune_count(m) is not None}
    if blocks is None:
        blocks = evaluation_blocks(model)
    if model.gates is None:
        raise GateSkipError("a sweep needs gates; load gates first (e.g. --gates default)")
    ref = reference(model, blocks)
    influence = _influences(model, blocks, methods, bool(pruned))
    rows = []
    total = len(budgets) * len(methods)
    for budget in budgets:
        gs = evaluate(model, ref, model.make_plan(budget, "quantile"))
        for method in methods:
            if method == "gateskip":
                result, setting = gs, f"quantile b={budget:g}"
            else:
                target = gs["flops_saved_gross"]
                result, setting = _method_result(model, ref, method, budget, target, pruned, influence, blocks.shape[1])
            rows.append({"method": method, "skip_budget": budget, **result, "setting": setting})
            if on_step is not None:
                on_step(len(rows), total, method)
    return pd.DataFrame(rows)[SWEEP_COLUMNS]


def _influences(model: GatedModel, blocks: torch.Tensor, methods: Sequence[str], pruning: bool) -> dict:
    """ShortGPT's block influence on the evaluation blocks and on the calibration split (each only
    where a method needs it)."""
    calibration = "shortgpt-calibration" in methods or pruning
    return {
        "shortgpt": block_influence(model, blocks) if "shortgpt" in methods else None,
        "shortgpt-calibration": (
            block_influence(model, evaluation_blocks(model, pydoc_texts("calibration"), 8, blocks.shape[1]))
            if calibration
            else None
        ),
    }


def _method_result(model, ref, method: str, budget: float, target: float, pruned: dict, influence: dict, seq_len):
    """(metrics, setting) of one method other than `gateskip` at a budget; `target` is the gross FLOPs
    share `gateskip` saved there, which the baselines match."""
    if method == "gateskip-uniform":
        plan = model.make_plan(budget, "quantile", allocation="uniform")
        return evaluate(model, ref, plan), f"quantile uniform b={budget:g}"
    if method == "random":
        plan = model.make_plan(budget, "random", allocation="uniform")
        return evaluate(model, ref, plan), f"random b={budget:g}"
    if method in pruned:
        layers = lowest_influence(influence["shortgpt-calibration"], pruned[method])
        result = evaluate(model, ref, pruned_plan(model, layers, budget))
        return result, "removed layers " + (",".join(map(str, layers)) or "none") + f" + quantile b={budget:g}"
    if method in ("shortgpt", "shortgpt-calibration"):
        layers = shortgpt_layers(model, influence[method], target, seq_len)
        plan = SkipPlan(
            SkipBudget.make(1.0 if layers else 0.0, model.spec.n_layers),
            LayerDropPolicy(frozenset(layers)),
            protect_bos=False,
        )
        result = evaluate(model.view(), ref, plan)  # ShortGPT prunes the original, ungated model
        return result, "removed layers " + (",".join(map(str, layers)) or "none")
    branch = method.split("-")[0]
    rate = branch_rate_for(model, branch, target, seq_len)
    result = evaluate(model, ref, model.make_plan(rate, "quantile", branches=branch, allocation="uniform"))
    return result, f"{branch} rate {rate:.3f}"


def at_matched_savings(
    table: pd.DataFrame, targets: Sequence[float] = (0.1, 0.2, 0.3), metrics=("ppl", "kl_to_full", "top1_agreement")
) -> pd.DataFrame:
    """Each method's quality at the same net FLOPs saved: linear interpolation along its sweep curve.

    One row per (method, target); NaN where a method's sweep does not reach the target.
    """
    rows = []
    for method, part in table.groupby("method", sort=False):
        part = part.sort_values("flops_saved")
        saved = part["flops_saved"].to_numpy()
        for target in targets:
            row = {"method": method, "net_flops_saved": target}
            inside = saved.min() <= target <= saved.max()
            for metric in metrics:
                values = part[metric].to_numpy()
                if metric == "ppl":  # perplexity is interpolated in log space
                    row[metric] = float(np.exp(np.interp(target, saved, np.log(values)))) if inside else np.nan
                else:
                    row[metric] = float(np.interp(target, saved, values)) if inside else np.nan
            rows.append(row)
    return pd.DataFrame(rows)
