"""Cached decoding under skipping: prefill once, then one token per step with a `KVCache`.

The same skip plan steers prefill and every step; with the `calibrated` policy
a token gets the same decisions as in an uncached run over the whole text
(tested). Finished sequences feed padding so the batch stays aligned. With phased thresholds
(`calibration.PhasedCalibratedPolicy`, the default where the gates store decode-fitted ones: see
`with_generated_thresholds`) the prefill decides with the prompt's thresholds and every step with
the decode-fitted ones.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, NamedTuple

import torch

from gateskip_core.branches import skipped_fraction
from gateskip_core.errors import GateSkipError
from gateskip_core.forward.cache import KVCache
from gateskip_core.forward.execution import ForwardResult
from gateskip_core.skipping.calibration import PhasedCalibratedPolicy, threshold_sets
from gateskip_core.skipping.plan import SkipPlan
from gateskip_core.skipping.policies import CalibratedPolicy
from gateskip_core.traces.trace import Trace

if TYPE_CHECKING:
    from gateskip_core.forward.speculative import SpeculativeRecord


class _TextAndTrace(NamedTuple):
    text: str | list[str]  # the generated continuation(s), prompt excluded
    trace: Trace  # prompt and generated tokens


class Generation(_TextAndTrace):
    """The continuation(s) and the trace; unpacks as `text, trace`. `speculative`: what the draft
    proposed and the original kept, when the call drafted (`speculative.py`), else None."""

    speculative: SpeculativeRecord | None

    def __new__(cls, text, trace, speculative: SpeculativeRecord | None = None):
        self = super().__new__(cls, text, trace)
        self.speculative = speculative
        return self

    def skip_rates(self) -> SkipRates:
        """The budget asked and the share of eligible branch evaluations skipped on prompt tokens and
        on generated tokens, over all sequences: the two can differ (thresholds fitted on prompt-like
        text skip generated tokens less; `calibration.fit_generated_thresholds` fits decode steps)."""
        counts = {"prompt": [0, 0], "generated": [0, 0]}  # skipped, eligible tokens
        for seq in self.trace.sequences:
            for part, span in (("prompt", slice(0, seq.prompt_length)), ("generated", slice(seq.prompt_length, None))):
                counts[part][0] += int(seq.skipped[span].sum())
                counts[part][1] += int(seq.eligible[span].sum())
        n_layers = self.trace.n_layers
        return SkipRates(
            budget=self.trace.budget_fraction(),
            prompt=skipped_fraction(*counts["prompt"], n_layers),
            generated=skipped_fraction(*counts["generated"], n_layers),
            thresholds=self.trace.extra.get("thresholds", ""),
        )


class SkipRates(NamedTuple):
    budget: float  # the share of eligible branch evaluations the budget asks to skip
    prompt: float  # skipped on prompt tokens
    generated: float  # skipped on generated tokens (those decode steps fed)
    thresholds: str = ""  # which calibrated thresholds decided which tokens ('' without thresholds)


GENERATED_THRESHOLDS = ("auto", "prompt")


def with_generated_thresholds(
    model, plan: SkipPlan, generated_thresholds: str, skip_args: dict, prompt_lengths: Sequence[int] = ()
) -> SkipPlan:
    """The plan of a generation: where its policy is the calibrated one by name (`skip_args`' policy,
    'calibrated' by default) and `generated_thresholds` is 'auto', generated tokens decide with the
    gates' decode-fitted thresholds when they have them (`PhasedCalibratedPolicy`, bound to each row's
    prompt length); 'prompt' (or no decode calibration, or a policy object): every token with the
    prompt's thresholds, as before."""
    if generated_thresholds not in GENERATED_THRESHOLDS:
        raise GateSkipError(f"generated_thresholds must be 'auto' or 'prompt', got {generated_thresholds!r}")
    named = skip_args.get("policy", "calibrated") == "calibrated"
    if generated_thresholds == "prompt" or not named or type(plan.policy) is not CalibratedPolicy:
        return plan
    if plan.budget.is_zero():
        return plan
    generated = model.calibrate_generated(plan.budget, plan.protect_bos)
    if generated is None:
        return plan
    lengths = [int(n) for n in prompt_lengths]
    phased = PhasedCalibratedPolicy(prompt=plan.policy, generated=generated).for_prompts(lengths)
    return dataclasses.replace(plan, policy=phased)


def phase_plans(plan: SkipPlan) -> tuple[SkipPlan, SkipPlan]:
    """(prefill plan, decode-step plan): a phased policy's two threshold sets, each its own plain
    calibrated policy (every prefill token is a prompt token, every fed token a generated one)."""
    if not isinstance(plan.policy, PhasedCalibratedPolicy):
        return plan, plan
    prompt, generated = plan.policy.prompt, plan.policy.generated
    return dataclasses.replace(plan, policy=prompt), dataclasses.replace(plan, policy=generated)


def next_tokens(logits: torch.Tensor, do_sample: bool, temperature: float, top_k: int | None, rng) -> torch.Tensor:
    """Greedy or sampled next token ids [B] from last-position logits [B, V] (sampling on the CPU generator)."""
    logits = logits.float().cpu()
    if not do_sample:
        return logits.argmax(-1)
    logits = logits / temperature
    if top_k is not None:
        kth = torch.topk(logits, min(top_k, logits.shape[-1])).values[:, -1:]
        logits = logits.masked_fill(logits < kth, -math.inf)
    return torch.multinomial(torch.softmax(logits, -1), 1, generator=rng).squeeze(1)


def generate(
    model,
    batch,
    plan: SkipPlan,
    max_new_tokens: int,
    do_sample: bool = False,
    temperature: float = 1.0,
    top_k: int | None = None,
    seed: int = 0,
    stop_at_eos: bool = True,
    stop: Callable[[list[int]], bool] | None = None,
) -> tuple[list[list[int]], Trace]:
    """New token ids per prompt of `batch` (an encoded, left-padded `Batch`), and the trace of all tokens.
    `stop(new_tokens)`: a sequence also ends once it returns True (e.g. a stop string was generated)."""
    rng = torch.Generator().manual_seed(seed)
    cache = KVCache().reserve(batch.input_ids.shape[1] + max_new_tokens)
    B = batch.input_ids.shape[0]
    eos, pad = model.tokenizer.eos_token_id, model.tokenizer.pad_token_id
    all_ids, all_mask = [batch.input_ids], [batch.attention_mask]
    prefill_plan, step_plan = phase_plans(plan)
    result = model.forward(batch.input_ids, batch.attention_mask, prefill_plan, cache=cache, logits_for="last")
    results = [result]
    done = torch.zeros(B, dtype=torch.bool, device="cpu")  # host-side bookkeeping, read per token
    new_tokens: list[list[int]] = [[] for _ in range(B)]
    heads = [1] * B  # positions whose logits were computed, per sequence
    for step in range(max_new_tokens):
        nxt = next_tokens(result.logits[:, -1], do_sample, temperature, top_k, rng)
        for b in range(B):
            if not done[b]:
                new_tokens[b].append(int(nxt[b]))
                done[b] = (stop_at_eos and int(nxt[b]) == eos) or (stop is not None and stop(new_tokens[b]))
        if bool(done.all()) or step == max_new_tokens - 1:
            break
        feed = torch.where(done, torch.full_like(nxt, pad), nxt)[:, None]
        mask = (~done).long()[:, None]
        heads = [n + int(m) for n, m in zip(heads, mask[:, 0])]
        all_ids.append(feed)
        all_mask.append(mask)
        result = model.forward(feed, mask, step_plan, cache=cache, logits_for="last")
        results.append(result)
    merged = ForwardResult(
        logits=torch.empty(0, device=model.device),  # not kept: each step's logits were used as they came
        gate=torch.cat([r.gate for r in results], 1),
        threshold=torch.cat([r.threshold for r in results], 1),
        skipped=torch.cat([r.skipped for r in results], 1),
        eligible=torch.cat([r.eligible for r in results], 1),
        positions=torch.cat([r.positions for r in results], 1),
    )
    ids, mask = torch.cat(all_ids, 1), torch.cat(all_mask, 1)
    prompt_lengths = batch.attention_mask.sum(1).tolist()
    trace = model.make_trace(model.sequence_traces(ids, mask, merged, plan, prompt_lengths, heads), plan)
    trace.extra["generated_token_ids"] = new_tokens
    if threshold_sets(plan.policy):
        trace.extra["thresholds"] = threshold_sets(plan.policy)
    return new_tokens, trace
