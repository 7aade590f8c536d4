"""Self-speculative decoding whose greedy output is the original model's, token for token.

    prefill the prompt with the verifier; t = its next token
    repeat:
        draft:  the gated model at the draft budget feeds t, then its own guesses: K tokens d1..dK
        verify: the original feeds [t, d1..dK] in one pass: its next token v0..vK after each
        keep d1..da while d_i == v_(i-1) (the longest agreeing prefix), then v_a: the original's own
        the cache keeps the verifier's keys/values of [t, d1..da]; the draft's are dropped

Draft and verifier share one `KVCache`: the draft reads the verifier's keys/values of every
committed token, writes its own for the tokens it feeds, and those slots are cut off again
(`KVCache.crop`) before the verifier writes the same positions. Only the verifier's tokens are
kept, so the output is the original's greedy output. The verifier's logits of a position come
from a (K+1)-token pass instead of a one-token step; they agree to float rounding (about 1e-6),
so only an exact tie between the top two tokens could decide differently.

The verifier is the *ungated original* (`GatedModel.view()`: no gates, no adapter, no stand-ins)
in both adapter scopes: in scope `skipped` that equals the gated model at budget 0 without paying
for its gates; in scope `all` budget 0 still runs the adapted weights and gate scaling, which is
not the original.

A batch (left padded) moves in lockstep: each round keeps the shortest agreeing prefix over the
rows still generating, then every row's own verifier token, so every row stays exact; a row's
drafts beyond that prefix are wasted.

The trace records the verifier's passes: the prompt's prefill and, for each generated token that
was fed back, the verifier's pass over it (budget 0: nothing skips). The draft's decisions are not
in the trace; `SpeculativeRecord` counts what the draft skipped and which tokens it got right.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Literal

import torch

from gateskip_core.branches import branch_evaluations
from gateskip_core.forward.cache import KVCache
from gateskip_core.forward.execution import ForwardResult
from gateskip_core.skipping.plan import SkipPlan
from gateskip_core.traces.trace import Trace

TokenSource = Literal["accepted", "corrected", "verifier"]
# accepted: a draft token the original agreed with; corrected: the original's token where it rejected
# the draft's (the rejected one is in `rejected_drafts`); verifier: the original's token where no draft
# was proposed (the first token, the one after K accepted drafts, a round too short to draft).


@dataclass
class SpeculativeRecord:
    """What the draft proposed and the original kept, over one `generate` call."""

    draft_skip: float
    draft_tokens: int
    drafted: int = 0  # draft tokens the verifier checked (every row still generating, every round)
    accepted: int = 0  # of those, the ones kept in the output
    rounds: int = 0  # verifier passes after the prefill
    draft_skipped: int = 0  # branch evaluations the draft passes skipped
    draft_eligible: int = 0  # branch evaluations the draft passes could have skipped
    sources: list[list[str]] = field(default_factory=list)  # per sequence, per generated token
    rejected_drafts: list[list[int | None]] = field(default_factory=list)  # the draft's token at 'corrected'

    @property
    def acceptance_rate(self) -> float:
        return self.accepted / self.drafted if self.drafted else 0.0

    @property
    def draft_skip_rate(self) -> float:
        """The fraction of eligible branch evaluations the draft passes skipped."""
        return float(self.draft_skipped / self.draft_eligible) if self.draft_eligible else 0.0


@dataclass
class _Decoding:
    """The state of one speculative generation: the rows' tokens, the cache, and the trace's pieces."""

    cache: KVCache
    pad: int
    eos: int | None
    max_new_tokens: int
    stop: Callable[[list[int]], bool] | None
    record: SpeculativeRecord
    new_tokens: list[list[int]]
    done: torch.Tensor  # [B] bool
    ids: list[torch.Tensor] = field(default_factory=list)  # fed tokens, per pass [B, T]
    masks: list[torch.Tensor] = field(default_factory=list)  # of those, the ones the trace keeps
    results: list[ForwardResult] = field(default_factory=list)

    @property
    def pending(self) -> torch.Tensor:
        """[B] each row's last token (not fed yet); padding for finished rows."""
        last = torch.tensor([row[-1] for row in self.new_tokens])
        return torch.where(self.done, torch.full_like(last, self.pad), last)

    def n_generated(self) -> int:
        return max(len(row) for row in self.new_tokens)

    def add(self, b: int, token: int, source: str, rejected: int | None = None) -> bool:
        """Append `token` to row b if it is still generating; returns whether it was."""
        if bool(self.done[b]):
            return False
        row = self.new_tokens[b]
        row.append(token)
        self.record.sources[b].append(source)
        self.record.rejected_drafts[b].append(rejected)
        finished = (self.eos is not None and token == self.eos) or (self.stop is not None and self.stop(row))
        self.done[b] = finished or len(row) >= self.max_new_tokens
        return True


def speculative_generate(
    draft,
    verifier,
    batch,
    draft_plan: SkipPlan,
    verifier_plan: SkipPlan,
    draft_tokens: int,
    max_new_tokens: int,
    stop_at_eos: bool = True,
    stop: Callable[[list[int]], bool] | None = None,
) -> tuple[list[list[int]], Trace, SpeculativeRecord]:
    """Greedy new token ids per prompt of `batch` (left padded), the trace of the verifier's passes,
    and the speculative record. `draft`/`verifier`: `GatedModel`s over the same original weights."""
    B = batch.input_ids.shape[0]
    drafted_budget = draft_plan.budget  # the number asked for (a global allocation's total), else the mean
    budget = float(drafted_budget.total if drafted_budget.total is not None else drafted_budget.fractions.mean())
    record = SpeculativeRecord(budget, draft_tokens, sources=[[] for _ in range(B)])
    record.rejected_drafts = [[] for _ in range(B)]
    tokenizer = verifier.tokenizer
    state = _Decoding(
        cache=KVCache().reserve(batch.input_ids.shape[1] + max_new_tokens + draft_tokens + 1),
        pad=tokenizer.pad_token_id,
        eos=tokenizer.eos_token_id if stop_at_eos else None,
        max_new_tokens=max_new_tokens,
        stop=stop,
        record=record,
        new_tokens=[[] for _ in range(B)],
        done=torch.zeros(B, dtype=torch.bool),
    )
    result = verifier.forward(
        batch.input_ids, batch.attention_mask, verifier_plan, cache=state.cache, logits_for="last"
    )
    state.ids.append(batch.input_ids)
    state.masks.append(batch.attention_mask)
    state.results.append(result)
    first = result.logits[:, -1].float().cpu().argmax(-1)
    for b in range(B):
        state.add(b, int(first[b]), "verifier")
    while not bool(state.done.all()):
        k = min(draft_tokens, max_new_tokens - state.n_generated() - 1)
        _round(draft, verifier, draft_plan, verifier_plan, state, k)
    return state.new_tokens, _trace(verifier, verifier_plan, batch, state), record


def _round(draft, verifier, draft_plan: SkipPlan, verifier_plan: SkipPlan, state: _Decoding, k: int) -> None:
    """One draft of k tokens and its verification; commits the agreeing prefix and the verifier's token."""
    start = state.cache.n_slots
    live = ~state.done
    pending = state.pending
    drafts = _draft(draft, draft_plan, state, pending, live, k)  # [B, k]
    state.cache.crop(start)
    feed = torch.cat([pending[:, None], drafts], 1)  # [B, k + 1]
    mask = live.long()[:, None].expand_as(feed)
    result = verifier.forward(feed, mask, verifier_plan, cache=state.cache, logits_for="all")
    verified = result.logits.float().cpu().argmax(-1)  # [B, k + 1]: the original's token after each fed one
    agree = (drafts == verified[:, :k]).long().cumprod(1)  # [B, k]: 1 while every draft so far agreed
    kept = int(agree[live].sum(1).min()) if k else 0  # the shortest agreeing prefix over live rows
    state.cache.crop(start + kept + 1)
    state.record.rounds += 1
    state.record.drafted += k * int(live.sum())
    fed = torch.zeros_like(feed)  # columns each row keeps in the trace: one per token it adds
    for b in range(feed.shape[0]):
        if not bool(live[b]):
            continue
        for i in range(kept):
            fed[b, i] = state.add(b, int(drafts[b, i]), "accepted")
            state.record.accepted += int(fed[b, i])
        own = int(verified[b, kept])
        if kept == k:
            fed[b, kept] = state.add(b, own, "verifier")
        elif own == int(drafts[b, kept]):  # this row agreed further than the batch's shortest prefix
            fed[b, kept] = state.add(b, own, "accepted")
            state.record.accepted += int(fed[b, kept])
        else:
            fed[b, kept] = state.add(b, own, "corrected", int(drafts[b, kept]))
    state.ids.append(feed[:, : kept + 1])
    state.masks.append(fed[:, : kept + 1])
    state.results.append(_columns(result, kept + 1))


def _draft(draft, plan: SkipPlan, state: _Decoding, pending: torch.Tensor, live: torch.Tensor, k: int) -> torch.Tensor:
    """k tokens [B, k] from the draft model, one step at a time on the shared cache."""
    tokens, current = [], pending
    mask = live.long()[:, None]
    for _ in range(k):
        result = draft.forward(current[:, None], mask, plan, cache=state.cache, logits_for="last")
        eligible = result.eligible.cpu() & live[:, None]
        state.record.draft_skipped += int((result.skipped.cpu() & eligible[..., None, None]).sum())
        state.record.draft_eligible += branch_evaluations(int(eligible.sum()), result.skipped.shape[2])
        guess = result.logits[:, -1].float().cpu().argmax(-1)
        current = torch.where(live, guess, torch.full_like(guess, state.pad))
        tokens.append(current)
    return torch.stack(tokens, 1) if tokens else torch.zeros(len(pending), 0, dtype=torch.long)


def _columns(result: ForwardResult, n: int) -> ForwardResult:
    """The first n token columns of a pass's decisions (logits dropped)."""
    return ForwardResult(
        logits=torch.empty(0),
        gate=result.gate[:, :n],
        threshold=result.threshold[:, :n],
        skipped=result.skipped[:, :n],
        eligible=result.eligible[:, :n],
        positions=result.positions[:, :n],
    )


def _trace(verifier, plan: SkipPlan, batch, state: _Decoding) -> Trace:
    """The trace of the verifier's passes over the prompt and every generated token it was fed."""
    results = state.results
    merged = ForwardResult(
        logits=torch.empty(0),
        gate=torch.cat([r.gate for r in results], 1),
        threshold=torch.cat([r.threshold for r in results], 1),
        skipped=torch.cat([r.skipped for r in results], 1),
        eligible=torch.cat([r.eligible for r in results], 1),
        positions=torch.cat([r.positions for r in results], 1),
    )
    ids, mask = torch.cat(state.ids, 1), torch.cat(state.masks, 1)
    prompt_lengths = batch.attention_mask.sum(1).tolist()
    heads = [1 + int(m) for m in torch.cat(state.masks[1:], 1).sum(1)] if len(state.masks) > 1 else [1] * len(ids)
    sequences = verifier.sequence_traces(ids, mask, merged, plan, prompt_lengths, heads)
    trace = verifier.make_trace(sequences, plan)
    trace.extra["generated_token_ids"] = state.new_tokens
    return trace
