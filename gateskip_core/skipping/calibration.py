"""Calibrated thresholds: fixed per-(layer, branch) thresholds fitted ahead of time.

`fit_thresholds` runs the gated model once over calibration texts (each its own
sequence, as users send them); at each branch
the budget's quantile of the eligible tokens' importances becomes the threshold,
given the decisions already made in earlier layers. `Calibrator` serves a model's
calibrated policies: thresholds stored in its gate checkpoint when they exist for
the budget, otherwise fitted once per budget and memoised.

One set of calibration texts: training records the texts its stored thresholds were fitted on
in the checkpoint (`record_calibration_texts`, under `training["calibration_texts"]`), and an
on-the-fly fit for a budget the checkpoint does not store uses the same texts
(`calibration_set`), so stored and fitted thresholds describe the same text. Gates saved
before texts were recorded fall back to the pydoc calibration prose.

Two threshold sets: prompt tokens are read in one prefill pass, generated tokens one decode step
at a time, and their gates differ (thresholds fitted on prompt-like text skipped generated tokens
0.14 at budget 0.25 on SmolLM2's default gates). `fit_generated_thresholds` fits decode steps; a
checkpoint may store such thresholds beside the prompt ones (`calibration.generated_*`), with the
chat prompts whose answers they were fitted on (`training["decode_calibration"]`), and
`PhasedCalibratedPolicy` decides prompt tokens with the one set and generated tokens with the other.
"""

from __future__ import annotations

import math
import threading
from collections.abc import Sequence
from dataclasses import dataclass, replace

import numpy as np
import torch

from gateskip_core.branches import BRANCHES
from gateskip_core.data import paragraphs, pydoc_texts
from gateskip_core.errors import GateSkipError
from gateskip_core.skipping.plan import SkipPlan
from gateskip_core.skipping.policies import BranchInput, CalibratedPolicy, Decision, SkipBudget, SkipPolicy

CALIBRATION_BUDGETS = np.round(np.arange(0.05, 0.6001, 0.05), 2)
TIE_TOLERANCE = 1e-6
CALIBRATION_SEQUENCES = 96  # texts a fit runs, each its own sequence
CALIBRATION_MAX_TOKENS = 128
RECORDED_TEXTS = "calibration_texts"  # the key in a checkpoint's `training` record
DECODE_CALIBRATION = "decode_calibration"  # the key of the decode fit's prompts and answer length


def fitted_texts(texts: Sequence[str], n_sequences: int = CALIBRATION_SEQUENCES) -> list[str]:
    """The texts a fit actually runs: the first `n_sequences` non-empty ones."""
    return [t for t in texts if t.strip()][:n_sequences]


def record_calibration_texts(ckpt, texts: Sequence[str]) -> None:
    """Store in `ckpt` the texts its thresholds are fitted on, for on-the-fly fits to reuse."""
    ckpt.training = {**ckpt.training, RECORDED_TEXTS: fitted_texts(texts)}


def calibration_set(model) -> list[str]:
    """The texts every fit of `model`'s thresholds uses: those its checkpoint recorded, else the
    paragraphs of the pydoc calibration split (gates saved before texts were recorded)."""
    ckpt = getattr(model, "checkpoint", None)
    recorded = ckpt.training.get(RECORDED_TEXTS) if ckpt is not None else None
    if recorded:
        return list(recorded)
    return [p for t in pydoc_texts("calibration") for p in paragraphs(t)]


def threshold_between(sorted_values: torch.Tensor, k: int) -> float:
    """A threshold that skips the k smallest values, placed midway to the next distinct value.

    Placing it on an observed value would make decisions flip on rounding noise:
    at layer 0 a gate depends only on the token id, so calibration text contains
    exact copies of most tokens' importances.

    Values tied with the k-th (within `TIE_TOLERANCE`) are skipped together or not at all: the
    threshold goes above the tied block or below it, whichever skips a count nearer k (above on
    a draw). Always above, a branch whose gates are all tied (Gemma-3's layer 0: one value for
    every token) skipped every token at a budget of 1%.
    """
    if k <= 0:
        return -math.inf
    low = float(sorted_values[k - 1])
    above = sorted_values[sorted_values > low + TIE_TOLERANCE]
    high = float(above[0]) if above.numel() else low + 2 * TIE_TOLERANCE
    n_below = int((sorted_values < low - TIE_TOLERANCE).sum())  # values below the tied block
    n_through = sorted_values.numel() - above.numel()  # the block skipped too
    if n_through - k <= k - n_below:
        return (low + high) / 2
    if n_below == 0:
        return -math.inf
    return (float(sorted_values[n_below - 1]) + float(sorted_values[n_below])) / 2


class ThresholdFitter(SkipPolicy):
    """A policy that records, per branch, the threshold giving the budget's rate on this batch.
    `fitted_positions` [B, T]: the tokens whose rate is fitted (default: all). Every eligible
    fitted token is decided with the fitted threshold, as the calibrated policy will decide it; the
    others with `others` (a decode fit: the prompt set that decides a prompt's tokens in
    generation), or with the fitted threshold when it is None."""

    name = "calibrating"

    def __init__(self, n_layers: int, fitted_positions: torch.Tensor | None = None, others: SkipPolicy | None = None):
        if others is not None and fitted_positions is None:
            raise GateSkipError("a threshold fit with a policy for the other positions needs fitted_positions")
        self.thresholds = np.full((n_layers, 2), -math.inf)
        self.fitted_positions = fitted_positions
        self.others = others

    def decide(self, inp: BranchInput) -> Decision:
        fitted = inp.eligible if self.fitted_positions is None else inp.eligible & self.fitted_positions
        values = torch.sort(inp.gate[fitted].double()).values
        k = int(math.floor(inp.budget * values.numel() + 1e-9))
        thr = threshold_between(values, k)
        self.thresholds[inp.layer, BRANCHES.index(inp.branch)] = thr
        threshold = torch.full_like(inp.gate, thr)
        if self.others is not None:
            threshold = torch.where(self.fitted_positions, threshold, self.others.decide(inp).threshold)
        return Decision(skip=inp.eligible & (inp.gate <= threshold), threshold=threshold)


def calibration_sequences(model, texts: Sequence[str], n_sequences: int, max_tokens: int):
    """Each text its own sequence (BOS first, cut to `max_tokens`), left padded into one batch.

    Sequences, not concatenated blocks: users send short texts, and gates near the start of a
    sequence differ from those deep in a long one; thresholds fitted on long blocks skipped
    ~1.3x the budget on short prose and ~2x on chat prompts."""
    chosen = fitted_texts(texts, n_sequences)
    if not chosen:
        raise GateSkipError("calibration needs at least one non-empty text")
    batch = model.encode(chosen, max_tokens=max_tokens)
    return batch.input_ids.to(model.device), batch.attention_mask.to(model.device)


def fit_thresholds(
    model,
    budget: SkipBudget,
    protect_bos: bool = True,
    texts: Sequence[str] | None = None,
    n_sequences: int = CALIBRATION_SEQUENCES,
    max_tokens: int = CALIBRATION_MAX_TOKENS,
) -> CalibratedPolicy:
    """Thresholds whose skip rate over `texts` (default: the model's `calibration_set`), each run
    as its own sequence, is `budget` at every branch."""
    if texts is None:
        texts = calibration_set(model)
    input_ids, mask = calibration_sequences(model, list(texts), n_sequences, max_tokens)
    fitter = ThresholdFitter(model.spec.n_layers)
    # The physical path computes only what runs (the thresholds do not depend on the path: masked
    # and physical make the same decisions), and only the last position's logits are needed.
    plan = SkipPlan(budget, fitter, "physical", "compute", protect_bos, adapter_scope=model.adapter_scope)
    with torch.no_grad():
        model.walk(input_ids, mask, plan, logits_for="last")
    return CalibratedPolicy(thresholds=fitter.thresholds, budget=budget)


class Calibrator:
    """One model's calibrated policies: from the thresholds its checkpoint stores for a grid of
    budgets (`CALIBRATION_BUDGETS`, fitted on the training's calibration texts), interpolated
    between the grid's budgets; fitted once per budget and memoised where the checkpoint stores
    none (no thresholds, another allocation, a budget above the grid, other texts). The same for
    decode-fitted thresholds (`generated_policy`), where the checkpoint records their prompts."""

    def __init__(self) -> None:
        self._memo: dict[tuple, CalibratedPolicy] = {}
        self._answers: dict[tuple, list[tuple[list[int], int]]] = {}  # decode fits' answers, generated once
        self._lock = threading.Lock()

    def clear(self) -> None:
        with self._lock:
            self._memo.clear()
            self._answers.clear()

    def policy(self, model, budget: SkipBudget, protect_bos: bool = True, texts=None) -> CalibratedPolicy:
        """Thresholds fitted on prompt-like text (the checkpoint's calibration texts, or `texts`)."""
        if budget.is_zero():
            return never_skipping(model, budget)
        stored = self._stored(model.checkpoint, budget) if texts is None and protect_bos else None
        if stored is not None:
            return CalibratedPolicy(thresholds=stored, budget=budget)
        key = (
            "prompt",
            budget.fractions.tobytes(),
            budget.branches,
            protect_bos,
            None if texts is None else tuple(texts),
        )
        return self._memoised(key, lambda: fit_thresholds(model, budget, protect_bos, texts))

    def generated_policy(self, model, budget: SkipBudget, protect_bos: bool = True) -> CalibratedPolicy | None:
        """Thresholds fitted on decode steps of the model's own answers: the checkpoint's stored
        ones, else fitted on the answers to the prompts it records (`decode_calibration`); None
        when it records no decode calibration."""
        recorded = decode_calibration(model.checkpoint)
        if recorded is None:
            return None
        if budget.is_zero():
            return never_skipping(model, budget)
        stored = self._stored(model.checkpoint, budget, generated=True) if protect_bos else None
        if stored is not None:
            return CalibratedPolicy(thresholds=stored, budget=budget)
        prompts, new_tokens = tuple(recorded["prompts"]), int(recorded["max_new_tokens"])
        key = ("generated", budget.fractions.tobytes(), budget.branches, protect_bos)

        def fit() -> CalibratedPolicy:
            with self._lock:
                answers = self._answers.get((prompts, new_tokens))
            if answers is None:
                answers = own_answers(model, prompts, new_tokens)
                with self._lock:
                    self._answers[(prompts, new_tokens)] = answers
            return fit_generated_thresholds(model, budget, prompts, protect_bos, new_tokens, answers=answers)

        return self._memoised(key, fit)

    def _memoised(self, key: tuple, fit) -> CalibratedPolicy:
        with self._lock:
            memo = self._memo.get(key)
        if memo is None:
            memo = fit()
            with self._lock:
                self._memo[key] = memo
        return memo

    @staticmethod
    def _stored(ckpt, budget: SkipBudget, generated: bool = False) -> np.ndarray | None:
        """The checkpoint's thresholds for this budget (uniform or global, both branches; the
        decode-fitted ones with `generated`), at a grid budget or interpolated
        (`interpolate_thresholds`), if it stores a grid that reaches it."""
        if ckpt is None or budget.branches != BRANCHES or not len(ckpt.calibration_budgets):
            return None
        if budget.total is not None:
            table = ckpt.generated_global_thresholds if generated else ckpt.global_thresholds
            total = budget.total
        elif budget.is_uniform():
            table = ckpt.generated_thresholds if generated else ckpt.calibration_thresholds
            total = budget.fractions[0, 0]
        else:
            return None
        if not len(table):
            return None
        return interpolate_thresholds(np.asarray(ckpt.calibration_budgets, dtype=np.float64), table, float(total))


def never_skipping(model, budget: SkipBudget) -> CalibratedPolicy:
    """Budget 0's thresholds: -inf everywhere."""
    return CalibratedPolicy(thresholds=np.full((model.spec.n_layers, 2), -math.inf), budget=budget)


def interpolate_thresholds(grid: np.ndarray, table: np.ndarray, budget: float) -> np.ndarray | None:
    """Thresholds [L, 2] for `budget` from thresholds `table` [K, L, 2] fitted at the budgets `grid` [K].

    At a grid budget, its row. Between two, each branch's threshold is interpolated linearly, so a
    budget between the grid's moves every threshold part of the way from one fitted row to the next
    and the skip rate follows the budget (fitting such a budget on other texts, as before, let the
    rate fall as the budget rose: 0.27 skipped more than 0.30). Below the grid, the first two rows'
    line is extended towards budget 0. Above the grid: None (fit it). A branch that never skips at
    one end (-inf) takes the other end's threshold: it skips only where the allocation gives it a
    budget, which the walk checks before any threshold."""
    if budget > grid[-1] + 1e-9 or budget <= 0:
        return None
    hit = np.flatnonzero(np.isclose(grid, budget))
    if hit.size:
        return table[hit[0]]
    if budget < grid[0] and len(grid) > 1:
        lo, hi = 0, 1
    else:
        hi = int(np.searchsorted(grid, budget))
        lo = hi - 1
    w = (budget - grid[lo]) / (grid[hi] - grid[lo])
    a, b = table[lo], table[hi]
    finite = np.isfinite(a) & np.isfinite(b)
    with np.errstate(invalid="ignore"):
        line = a + w * (b - a)
        if w < 0:  # below the grid: never above the first row's threshold, never skipping where it does not
            return np.where(finite, np.minimum(line, a), a)
        return np.where(finite, line, np.fmax(a, b))


GENERATED_FIT_TOKENS = 48  # new tokens per answer a decode-step fit reads


def own_answers(
    model, prompts: Sequence[str], max_new_tokens: int = GENERATED_FIT_TOKENS
) -> list[tuple[list[int], int]]:
    """The model's own greedy answers to `prompts` (budget 0; chat template when it has one), as
    (token ids of prompt + answer, prompt length): the tokens decode steps feed, in order."""
    chat = bool(model.tokenizer.chat_template)
    answers = model.generate(list(prompts), max_new_tokens=max_new_tokens, chat=chat, skip=0.0)
    return [
        (list(map(int, s.token_ids)), s.prompt_length) for s in answers.trace.sequences if s.n_tokens > s.prompt_length
    ]


def answer_batch(model, answers: Sequence[tuple[list[int], int]]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Prompt + answer token ids left padded into one batch: ids, attention mask, and the answer positions."""
    longest = max(len(ids) for ids, _ in answers)
    pad = model.tokenizer.pad_token_id if model.tokenizer.pad_token_id is not None else 0
    ids = torch.full((len(answers), longest), pad, dtype=torch.long, device=model.device)
    mask = torch.zeros_like(ids)
    answer = torch.zeros_like(ids, dtype=torch.bool)
    for row, (tokens, prompt_length) in enumerate(answers):
        start = longest - len(tokens)
        ids[row, start:] = torch.as_tensor(tokens, device=model.device)
        mask[row, start:] = 1
        answer[row, start + prompt_length :] = True
    return ids, mask, answer


def fit_generated_thresholds(
    model,
    budget: SkipBudget,
    prompts: Sequence[str],
    protect_bos: bool = True,
    max_new_tokens: int = GENERATED_FIT_TOKENS,
    answers: Sequence[tuple[list[int], int]] | None = None,
    adapter_scope: str = "auto",
    prompt_policy: CalibratedPolicy | None = None,
) -> CalibratedPolicy:
    """Thresholds whose skip rate over the model's own answers to `prompts` (its decode steps) is
    `budget` at every branch: the target where users generate (`fit_thresholds` fits prompt-like text,
    and generated tokens then skipped 0.14 at budget 0.25 on SmolLM2's default gates).

    One teacher-forced pass over prompt + answer gives the decode steps' gates: a calibrated
    decision depends only on a token's gate and fixed thresholds, so a cached step decides as the
    uncached pass does (in scope `skipped` too: earlier skips enter through the same decisions).
    Layer by layer the fit decides the answers' tokens with the threshold it just fitted and the
    prompts' tokens with `prompt_policy` (default: the model's prompt set at `budget`, which decides
    them in generation), so the answers' gates are those of a phased generation (tested against a
    cached, token by token walk). `answers`: ready (ids, prompt length) pairs instead of generating
    them. `adapter_scope`: the scope the thresholds will run in ('auto': the gates' own)."""
    if answers is None:
        answers = own_answers(model, prompts, max_new_tokens)
    if not answers:
        raise GateSkipError("a decode-step fit needs at least one prompt the model answers")
    input_ids, mask, answer = answer_batch(model, answers)
    if prompt_policy is None:
        prompt_policy = model.calibrate(budget, protect_bos)
    fitter = ThresholdFitter(model.spec.n_layers, fitted_positions=answer, others=prompt_policy)
    scope = model.adapter_scope if adapter_scope == "auto" else adapter_scope
    plan = SkipPlan(budget, fitter, "physical", "compute", protect_bos, adapter_scope=scope)
    with torch.no_grad():
        model.walk(input_ids, mask, plan, logits_for="last")
    return CalibratedPolicy(thresholds=fitter.thresholds, budget=budget)


def decode_calibration(ckpt) -> dict | None:
    """The prompts (and new tokens per answer) `ckpt`'s decode-fitted thresholds were fitted on, or None."""
    recorded = ckpt.training.get(DECODE_CALIBRATION) if ckpt is not None else None
    return recorded if recorded and recorded.get("prompts") else None


def record_decode_calibration(ckpt, prompts: Sequence[str], max_new_tokens: int = GENERATED_FIT_TOKENS) -> None:
    """Store in `ckpt` the chat prompts whose answers its decode-fitted thresholds are fitted on."""
    record = {"prompts": list(prompts), "max_new_tokens": int(max_new_tokens)}
    ckpt.training = {**ckpt.training, DECODE_CALIBRATION: record}


@dataclass(frozen=True)
class PhasedCalibratedPolicy(SkipPolicy):
    """Calibrated thresholds per phase of a generation: a prompt's tokens (one prefill pass) decide
    with `prompt`'s thresholds, generated tokens (one decode step each) with `generated`'s.

    The token at position p (0 = first real token) of row b is a generated one when p >=
    `prompt_lengths[b]`, the real tokens of that row's prompt; without prompt lengths every token is
    a prompt token. Causal and per token like `CalibratedPolicy`, so a cached decode and one pass
    over prompt + answer decide alike (tested). Generation binds the lengths per call
    (`for_prompts`); nothing is stored on modules."""

    prompt: CalibratedPolicy
    generated: CalibratedPolicy
    prompt_lengths: tuple[int, ...] | None = None
    name: str = "calibrated"

    @property
    def budget(self) -> SkipBudget | None:
        return self.prompt.budget

    def for_prompts(self, prompt_lengths: Sequence[int]) -> PhasedCalibratedPolicy:
        return replace(self, prompt_lengths=tuple(int(n) for n in prompt_lengths))

    def decide(self, inp: BranchInput) -> Decision:
        prompt = self.prompt.decide(inp)
        if self.prompt_lengths is None:
            return prompt
        if len(self.prompt_lengths) != inp.positions.shape[0]:
            raise GateSkipError(
                f"phased thresholds: {len(self.prompt_lengths)} prompt lengths for a batch of {inp.positions.shape[0]}"
            )
        lengths = torch.as_tensor(self.prompt_lengths, device=inp.positions.device)
        generated = self.generated.decide(inp)
        threshold = torch.where(inp.positions >= lengths[:, None], generated.threshold, prompt.threshold)
        return Decision(skip=inp.eligible & (inp.gate <= threshold), threshold=threshold)


def phased_answer_skips(model, answers: Sequence[tuple[list[int], int]], budget: SkipBudget) -> list[tuple[int, int]]:
    """Per answer (ids of prompt + answer, prompt length): (skipped branch evaluations, branch
    evaluations) of its answer's tokens, prompt + answer read in one pass under the phased
    thresholds at `budget` (prompt set for the prompt, decode set for the answer): what a cached
    generation of that answer decides (tests/test_generated_calibration.py checks the two agree)."""
    generated = model.calibrate_generated(budget)
    if generated is None:
        raise GateSkipError("the gates store no decode-fitted thresholds (scripts/fit_decode_thresholds.py)")
    ids, mask, answer = answer_batch(model, answers)
    policy = PhasedCalibratedPolicy(model.calibrate(budget), generated).for_prompts([n for _, n in answers])
    with torch.no_grad():
        out = model.forward(ids, mask, model.make_plan(budget, policy, path="physical"))
    skipped = out.skipped.flatten(2).sum(-1)  # [B, T]
    cells = out.skipped.shape[2] * out.skipped.shape[3]
    return [(int(skipped[b][answer[b]].sum()), int(answer[b].sum()) * cells) for b in range(len(answers))]


def threshold_sets(policy: SkipPolicy | None) -> str:
    """Which calibrated thresholds decide which tokens, in words ('' for policies without thresholds)."""
    if isinstance(policy, PhasedCalibratedPolicy):
        return "prompt-fitted for prompt tokens, decode-fitted for generated tokens"
    if isinstance(policy, CalibratedPolicy):
        return "one set for prompt and generated tokens"
    return ""


def fit_generated_table(
    model, allocation: str, prompts: Sequence[str], answers: Sequence[tuple[list[int], int]]
) -> np.ndarray:
    """Decode-fitted thresholds [K, L, 2] for every budget of `CALIBRATION_BUDGETS` under `allocation`
    ('uniform' or 'global'), from the model's `answers` to `prompts` (see `own_answers`)."""
    rows = [
        fit_generated_thresholds(model, model.budget(float(b), allocation=allocation), prompts, answers=answers)
        for b in CALIBRATION_BUDGETS
    ]
    return np.stack([row.thresholds for row in rows])
