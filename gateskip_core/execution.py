"""The gated forward pass: one explicit walk over the decoder layers.

    h = embed(input_ids)
    for each layer:
        record hidden state h                                  (capture.hidden_states)
        x = attn_norm(h)
        g, skip = decide_branch(call, layer, "attn", x)        # g = gate(x.detach()); policy.decide(mean(g))
        keys, values = layer_keys_values(call, parts, x, skip) # every position's K/V, appended to the cache
        h = apply_branch(call, h, x, g, skip, query_side)      # h + g * attention(x) for tokens that run it
        x = mlp_norm(h)
        g, skip = decide_branch(call, layer, "mlp", x)
        h = apply_branch(call, h, x, g, skip, mlp)             # h + g * mlp(x) for tokens that run it
    logits = lm_head(final_norm(h))

Two execution paths give the same result (`apply_branch`):
- `masked`: every token runs the branch; skipped outputs are replaced by exact zeros.
- `physical`: only tokens that run the branch are gathered and computed (the MLP,
  and the query side of attention: q projection, scores, weighted sum, o projection).
  Keys and values are still computed for every position, because tokens that run
  attention must be able to attend to tokens that skipped it.

Where the adapter applies (`SkipPlan.adapter_scope`, for gates that came with an adapter):
- `all`: every token runs the adapted backbone, and a branch that runs adds `g * branch(x)`;
- `skipped`: a token runs the *original* weights, and its kept branches add `branch(x)`
  unscaled, until its first skipped branch; from there on it runs the adapted weights and
  soft gates. With nothing skipped the model is exactly the original, and the adapter's
  compensation is paid only where skipping happened.

What a skipped branch adds: nothing (the paper), or a stand-in `fill(x)` (`fill.py`).

Keys/values of a token that skips attention: by default computed from its own
(unchanged) normalised residual, as in prefill. With `kv="copy"` they are copied
from the layer below (the paper's description; layer 0 computes them).

What a call records is chosen per call with a `Capture`; the records, the
decisions and the KV cache live in objects this module creates and returns.
Nothing is stored on modules, so concurrent calls on one model do not interfere.
Every tensor is created on the device of the input ids.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import torch
import torch.nn.functional as F

from .architecture import ArchSpec, LayerParts
from .errors import GateSkipError
from .fill import SkipFill
from .gates import BRANCHES, GateSet
from .policies import BranchInput, Forced, SkipBudget, SkipPolicy

ExecutionPath = Literal["masked", "physical"]
KVMode = Literal["compute", "copy"]
AdapterScope = Literal["all", "skipped"]
SkipGradient = Literal["none", "straight-through"]
EXECUTION_PATHS = ("masked", "physical")
KV_MODES = ("compute", "copy")
ADAPTER_SCOPES = ("all", "skipped")
SKIP_GRADIENTS = ("none", "straight-through")


@dataclass(frozen=True)
class SkipPlan:
    """Everything that steers skipping in one call."""

    budget: SkipBudget
    policy: SkipPolicy | None
    path: ExecutionPath = "masked"
    kv: KVMode = "compute"
    protect_bos: bool = True
    forced: tuple[Forced, ...] = ()  # decisions that override the policy's
    adapter_scope: AdapterScope = "all"
    # Training only (masked path): "straight-through" gives every gate the gradient it would get if it
    # scaled its branch's output in place of the hard decision, so a skipped token's gate learns
    # what its skip cost; the forward values are unchanged.
    skip_gradient: SkipGradient = "none"

    def __post_init__(self) -> None:
        if self.path not in EXECUTION_PATHS:
            raise GateSkipError(f"execution path must be one of {EXECUTION_PATHS}, got {self.path!r}")
        if self.adapter_scope not in ADAPTER_SCOPES:
            raise GateSkipError(f"adapter scope must be one of {ADAPTER_SCOPES}, got {self.adapter_scope!r}")
        if self.kv not in KV_MODES:
            raise GateSkipError(f"kv mode must be one of {KV_MODES}, got {self.kv!r}")
        if self.policy is None and not self.budget.is_zero():
            raise GateSkipError("a non-zero skip budget needs a skip policy")
        if self.skip_gradient not in SKIP_GRADIENTS:
            raise GateSkipError(f"skip gradient must be one of {SKIP_GRADIENTS}, got {self.skip_gradient!r}")
        if self.skip_gradient != "none" and self.path != "masked":
            raise GateSkipError("a straight-through skip gradient needs the masked path")


@dataclass(frozen=True)
class Capture:
    """What a call records besides its decisions (importance, thresholds, skips are always kept).

    - `gate_values`: each branch's gate tensor [B, T, d|1], attached to the graph (training);
    - `gate_vectors`: all gate vectors as one detached [B, T, L, 2, d] tensor (traces);
    - `hidden_states`: the residual stream before each layer and after the last;
    - `branch_deltas`: what each branch added to the residual, gradients retained (attribution;
      masked path only);
    - `branch_io`: each branch's input x and what it added, detached (fitting stand-ins; masked
      path only);
    - `skip_change`: per branch [B, T], log of how much the residual would change if the token
      skipped the branch (|branch output - stand-in| / |h|), detached: the ranking target of
      training (masked path only).
    """

    gate_values: bool = False
    gate_vectors: bool = False
    hidden_states: bool = False
    branch_deltas: bool = False
    branch_io: bool = False
    skip_change: bool = False


@dataclass
class KVCache:
    """Keys/values and per-token bookkeeping of earlier tokens, for one generation call.

    Keys/values live in buffers with room to spare (`reserve` sizes them for a whole
    generation; they double when full), so a decoding step writes its one slot instead of
    copying the whole cache with `torch.cat`.
    """

    keys: list[torch.Tensor] = field(default_factory=list)  # per layer [B, H_kv, capacity, hd]
    values: list[torch.Tensor] = field(default_factory=list)
    slot_real: torch.Tensor | None = None  # [B, S] bool: slot holds a real token
    n_real: torch.Tensor | None = None  # [B] real tokens so far
    gate: torch.Tensor | None = None  # [B, S, L, 2] (running-quantile history)
    eligible: torch.Tensor | None = None  # [B, S]
    capacity: int = 0  # slots to allocate on first use (0: what the first call needs)

    @property
    def n_slots(self) -> int:
        return 0 if self.slot_real is None else self.slot_real.shape[1]

    def reserve(self, slots: int) -> KVCache:
        """Allocate room for `slots` tokens in all (prompt + new tokens) when the buffers are made."""
        self.capacity = max(self.capacity, slots)
        return self

    def append_layer(self, layer: int, keys: torch.Tensor, values: torch.Tensor):
        """Add this call's keys/values [B, H_kv, T, hd] of `layer`; returns all of that layer's."""
        start, end = self.n_slots, self.n_slots + keys.shape[2]
        if len(self.keys) <= layer:
            shape = (*keys.shape[:2], max(end, self.capacity), keys.shape[3])
            self.keys.append(keys.new_empty(shape))
            self.values.append(values.new_empty(shape))
        elif self.keys[layer].shape[2] < end:  # full: double
            grown = max(end, 2 * self.keys[layer].shape[2])
            for buffers in (self.keys, self.values):
                old = buffers[layer]
                buffers[layer] = old.new_empty((*old.shape[:2], grown, old.shape[3]))
                buffers[layer][:, :, :start] = old[:, :, :start]
        self.keys[layer][:, :, start:end] = keys
        self.values[layer][:, :, start:end] = values
        return self.keys[layer][:, :, :end], self.values[layer][:, :, :end]

    def append_tokens(self, slot_real, n_real, gate, eligible) -> None:
        """Add this call's per-token bookkeeping (after every layer appended its keys/values)."""
        self.slot_real = slot_real
        self.n_real = n_real
        self.gate = gate if self.gate is None else torch.cat([self.gate, gate], 1)
        self.eligible = eligible if self.eligible is None else torch.cat([self.eligible, eligible], 1)


@dataclass
class ForwardResult:
    logits: torch.Tensor  # [B, T, V] (or [B, 1, V] with logits_for="last")
    gate: torch.Tensor  # [B, T, L, 2] mean gate value = token importance (1.0 where there are no gates)
    threshold: torch.Tensor  # [B, T, L, 2]
    skipped: torch.Tensor  # [B, T, L, 2] bool
    eligible: torch.Tensor  # [B, T] bool
    positions: torch.Tensor  # [B, T]
    gate_values: list[torch.Tensor] | None = None  # per (layer, branch) [B, T, d|1], grads kept
    gate_vectors: torch.Tensor | None = None  # [B, T, L, 2, d]
    hidden_states: list[torch.Tensor] | None = None  # before each layer and after the last
    branch_deltas: list[torch.Tensor] | None = None  # per (layer, branch), grads retained
    branch_io: list[tuple[torch.Tensor, torch.Tensor]] | None = None  # per (layer, branch): (x, added)
    skip_change: list[torch.Tensor] | None = None  # per (layer, branch) [B, T] log relative change


@dataclass
class _Call:
    """The per-call context every step of the walk reads (and the records it writes)."""

    spec: ArchSpec
    gates: GateSet | None
    fill: SkipFill | None
    original: ArchSpec | None  # adapter scope "skipped": the weights of tokens that have not skipped yet
    plan: SkipPlan
    capture: Capture
    cache: KVCache | None
    real: torch.Tensor  # [B, T] bool
    positions: torch.Tensor  # [B, T]
    eligible: torch.Tensor  # [B, T] bool
    slots: torch.Tensor  # [B, T] cache slot of each token
    slot_real: torch.Tensor  # [B, S] every slot so far, this call's included
    result: ForwardResult  # gate/threshold/skipped are filled from `records` when the walk ends
    no_gate: torch.Tensor  # [B, T] ones: the mean gate of a branch without gates
    records: list = field(default_factory=list)  # (gate, threshold, skip) [B, T] per branch, in walk order
    prev_kv: tuple[torch.Tensor, torch.Tensor] | None = None  # kv="copy": the layer below's
    masks: dict = field(default_factory=dict)  # attention masks by sliding window (every-token path)
    adapted: torch.Tensor | None = None  # [B, T] adapter scope "skipped": the token has skipped a branch

    def weight_groups(self, layer: int) -> list[tuple[LayerParts, torch.Tensor | None, bool]]:
        """(layer weights, the tokens that use them or None for all, whether the gate scales them)."""
        if self.original is None:
            return [(self.spec.layers[layer], None, True)]
        return [(self.spec.layers[layer], self.adapted, True), (self.original.layers[layer], ~self.adapted, False)]


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def _rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    return x * cos + _rotate_half(x) * sin


def project_q(parts: LayerParts, spec: ArchSpec, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor):
    """x [N, d], cos/sin [N, hd] -> rotated queries [N, H, hd]."""
    q = parts.q_proj(x).view(x.shape[0], spec.n_heads, spec.head_dim)
    if parts.q_norm is not None:
        q = parts.q_norm(q)
    return _rope(q, cos[:, None], sin[:, None])


def project_kv(parts: LayerParts, spec: ArchSpec, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor):
    """x [N, d] -> rotated keys and values [N, H_kv, hd]."""
    k = parts.k_proj(x).view(x.shape[0], spec.n_kv_heads, spec.head_dim)
    v = parts.v_proj(x).view(x.shape[0], spec.n_kv_heads, spec.head_dim)
    if parts.k_norm is not None:
        k = parts.k_norm(k)
    return _rope(k, cos[:, None], sin[:, None]), v


def attention_mask(q_slots, q_valid, slot_real, sliding_window: int | None) -> torch.Tensor | None:
    """[B, 1, Q, S] bool: causal (optionally sliding-window) keys each query may see; None when
    every query sees every key (one decoding step over a full cache: the fast kernel path).

    q_slots [B, Q] slot of each query; q_valid [B, Q] real queries (padding rows are discarded
    later); slot_real [B, S]."""
    k_slots = torch.arange(slot_real.shape[1], device=q_slots.device)
    allowed = (k_slots[None, None, :] <= q_slots[:, :, None]) & slot_real[:, None, :]
    if sliding_window is not None:
        allowed &= k_slots[None, None, :] > q_slots[:, :, None] - sliding_window
    # A padding query would have no key at all (NaN softmax); let it see its own slot.
    own = k_slots[None, None, :] == q_slots[:, :, None]
    allowed = torch.where(q_valid[:, :, None], allowed, own)
    return None if bool(allowed.all()) else allowed[:, None]


def attend(spec: ArchSpec, q, keys, values, mask) -> torch.Tensor:
    """Attention of q [B, H, Q, hd] over keys/values [B, H_kv, S, hd] under `mask`: [B, Q, H*hd]."""
    out = F.scaled_dot_product_attention(q, keys, values, attn_mask=mask, scale=spec.attn_scale, enable_gqa=True)
    return out.transpose(1, 2).reshape(q.shape[0], q.shape[2], -1)


def query_side(call: _Call, parts: LayerParts, cos, sin, keys, values, x_rows: torch.Tensor, rows) -> torch.Tensor:
    """Attention's query side: q projection, scores, weighted sum and o projection.

    `rows` None: every token (`x_rows` [B, T, d]); otherwise the packed rows from
    `pack_rows` that run attention (`x_rows` [N, d]), padded per sequence for the
    attention call. Keys and values cover every position either way.
    """
    spec, (B, T) = call.spec, call.real.shape
    if rows is None:
        flat = (x_rows.reshape(B * T, -1), cos.reshape(B * T, -1), sin.reshape(B * T, -1))
        q = project_q(parts, spec, *flat).view(B, T, spec.n_heads, -1).transpose(1, 2)
        window = parts.sliding_window
        if window not in call.masks:  # one mask per call and window size, shared by the layers
            call.masks[window] = attention_mask(call.slots, call.real, call.slot_real, window)
        return parts.o_proj(attend(spec, q, keys, values, call.masks[window]))
    b_idx, t_idx, rank, width = rows
    device = x_rows.device
    q_rows = project_q(parts, spec, x_rows, cos[b_idx, t_idx], sin[b_idx, t_idx])
    q = torch.zeros(B, width, spec.n_heads, spec.head_dim, dtype=q_rows.dtype, device=device)
    q = q.index_put((b_idx, rank), q_rows).transpose(1, 2)
    q_slots = torch.zeros(B, width, dtype=torch.long, device=device).index_put((b_idx, rank), call.slots[b_idx, t_idx])
    q_valid = torch.zeros(B, width, dtype=torch.bool, device=device)
    q_valid = q_valid.index_put((b_idx, rank), torch.tensor(True, device=device))
    mask = attention_mask(q_slots, q_valid, call.slot_real, parts.sliding_window)
    out = attend(spec, q, keys, values, mask)
    return parts.o_proj(out[b_idx, rank])


def attention_branch(call: _Call, cos, sin, keys, values):
    """One layer's attention branch for `apply_branch`: `run(parts, x_rows, rows)` -> its output."""

    def run(parts: LayerParts, x_rows: torch.Tensor, rows) -> torch.Tensor:
        y = query_side(call, parts, cos, sin, keys, values, x_rows, rows)
        return y if parts.attn_post_norm is None else parts.attn_post_norm(y)

    return run


def mlp_branch(parts: LayerParts, x_rows: torch.Tensor, rows) -> torch.Tensor:
    """One layer's MLP branch for `apply_branch` (per token: the same code for all tokens or packed rows)."""
    y = parts.mlp(x_rows)
    return y if parts.mlp_post_norm is None else parts.mlp_post_norm(y)


def pack_rows(run: torch.Tensor):
    """Indices of tokens that run a branch, and their rank within their own sequence."""
    b_idx, t_idx = run.nonzero(as_tuple=True)
    rank = (run.long().cumsum(1) - 1)[b_idx, t_idx]
    width = int(run.sum(1).max()) if b_idx.numel() else 0
    return b_idx, t_idx, rank, width


def decide_branch(call: _Call, layer: int, branch: str, x: torch.Tensor):
    """Gate values [B, T, d|1] (None without gates) and the skip mask [B, T] of one branch."""
    bi = BRANCHES.index(branch)
    res = call.result
    g = call.gates.gate(layer, branch)(x) if call.gates is not None else None
    if g is None:
        gate = call.no_gate
    else:
        gate = g.detach().mean(-1).float()
        if res.gate_values is not None:
            res.gate_values.append(g)
        if res.gate_vectors is not None:
            res.gate_vectors[:, :, layer, bi] = g.detach().float().expand(*call.real.shape, call.spec.d_model)
    history = call.cache is not None and call.cache.gate is not None
    skip, threshold = branch_decision(
        call.plan,
        layer,
        branch,
        gate,
        call.eligible,
        call.positions,
        history_gate=call.cache.gate[:, :, layer, bi] if history else None,
        history_eligible=call.cache.eligible if history else None,
    )
    call.records.append((gate, threshold, skip))
    return g, skip


def branch_decision(
    plan: SkipPlan,
    layer: int,
    branch: str,
    gate: torch.Tensor,
    eligible: torch.Tensor,
    positions: torch.Tensor,
    history_gate: torch.Tensor | None = None,
    history_eligible: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Skip mask [B, T] and thresholds [B, T] of one branch from its mean gates [B, T]: the
    policy's decisions under the plan's budget, then the plan's forced ones (NaN threshold)."""
    budget = plan.budget.at(layer, branch)
    if budget <= 0:
        skip = torch.zeros_like(eligible)
        threshold = torch.full(gate.shape, float("-inf"), device=gate.device)
    else:
        decision = plan.policy.decide(
            BranchInput(
                layer=layer,
                branch=branch,
                budget=budget,
                gate=gate,
                eligible=eligible,
                positions=positions,
                history_gate=history_gate,
                history_eligible=history_eligible,
            )
        )
        skip = decision.skip & eligible
        threshold = decision.threshold.to(torch.float32).expand(gate.shape)
    for forced in plan.forced:
        if forced.layer == layer and forced.branch == branch:
            # Forced skips respect eligibility (padding, a protected BOS); forced runs apply to any real token.
            at = positions == forced.position
            at = at & eligible if forced.skip else at
            skip = torch.where(at, torch.tensor(forced.skip, device=skip.device), skip)
            threshold = threshold.masked_fill(at, float("nan"))
    return skip, threshold


def layer_keys_values(call: _Call, layer: int, x: torch.Tensor, skip: torch.Tensor, cos, sin):
    """Keys/values of this call's tokens at `layer`, appended to the cache; returns all of them [B, H_kv, S, hd]."""
    spec, real = call.spec, call.real
    B, T = real.shape
    copy_kv = call.plan.kv == "copy" and layer > 0
    # Rows whose keys/values are projected here; under kv="copy" skipped rows take the layer below's.
    kv_rows = real & ~skip if copy_kv else None
    groups = call.weight_groups(layer)
    every_row = kv_rows is None or bool(kv_rows.all())
    if call.plan.path == "masked" or (every_row and len(groups) == 1):
        k = v = None
        for parts, members, _ in groups:  # every row through each group's weights, then chosen per token
            kg, vg = project_kv(parts, spec, x.reshape(B * T, -1), cos.reshape(B * T, -1), sin.reshape(B * T, -1))
            kg, vg = kg.view(B, T, spec.n_kv_heads, -1), vg.view(B, T, spec.n_kv_heads, -1)
            if k is None:
                k, v = kg, vg
            else:
                k = torch.where(members[:, :, None, None], kg, k)
                v = torch.where(members[:, :, None, None], vg, v)
    else:
        k = torch.zeros(B, T, spec.n_kv_heads, spec.head_dim, dtype=x.dtype, device=x.device)
        v = torch.zeros_like(k)
        for parts, members, _ in groups:
            rows = members if kv_rows is None else (kv_rows if members is None else kv_rows & members)
            b_idx, t_idx = rows.nonzero(as_tuple=True)
            if b_idx.numel():
                kr, vr = project_kv(parts, spec, x[b_idx, t_idx], cos[b_idx, t_idx], sin[b_idx, t_idx])
                k, v = k.index_put((b_idx, t_idx), kr), v.index_put((b_idx, t_idx), vr)
    if kv_rows is not None:
        take_below = (~kv_rows)[:, :, None, None]
        k = torch.where(take_below, call.prev_kv[0], k)
        v = torch.where(take_below, call.prev_kv[1], v)
    call.prev_kv = (k, v)
    k, v = k.transpose(1, 2), v.transpose(1, 2)  # [B, H_kv, T, hd]
    return call.cache.append_layer(layer, k, v) if call.cache is not None else (k, v)


def apply_branch(call: _Call, layer: int, branch: str, h, x, g, skip, run_branch) -> torch.Tensor:
    """h + what the branch adds for every token.

    A token that runs the branch adds `g * branch(x)` (or `branch(x)`, unscaled and with the
    original weights, where the adapter scope keeps it on the original model); a skipped token
    adds nothing, or the stand-in `fill(x)`. `run_branch(parts, x_rows, rows)` computes the
    branch with one layer's weights: on the masked path for every token (`x_rows` [B, T, d],
    `rows` None), on the physical path only for the packed rows that run it (`rows` from
    `pack_rows`, `x_rows` [N, d]).
    """
    run = call.real & ~skip
    fill = call.fill.fill(layer, branch) if call.fill is not None else None
    groups = call.weight_groups(layer)
    if call.plan.path == "masked":
        return h + _masked_delta(call, x, g, skip, run, fill, groups, run_branch, h)
    if fill is not None and bool(skip.any()):
        b_idx, t_idx = skip.nonzero(as_tuple=True)
        h = h.index_put((b_idx, t_idx), h[b_idx, t_idx] + fill(x[b_idx, t_idx]).to(h.dtype))
    for parts, members, scaled in groups:
        group_run = run if members is None else run & members
        n_run = int(group_run.sum())
        if n_run == 0:  # nobody runs it (a skipping decoding step): nothing to compute
            continue
        scale = g if scaled else None
        if n_run == group_run.numel():  # everybody runs it: no gather, no scatter
            y = run_branch(parts, x, None)
            h = h + (scale * y if scale is not None else y)
            continue
        rows = pack_rows(group_run)
        b_idx, t_idx = rows[0], rows[1]
        y = run_branch(parts, x[b_idx, t_idx], rows)
        if scale is not None:
            y = scale[b_idx, t_idx] * y
        h = h.index_put((b_idx, t_idx), h[b_idx, t_idx] + y)
    return h


def _masked_delta(call: _Call, x, g, skip, run, fill, groups, run_branch, h) -> torch.Tensor:
    """What the branch adds to every token on the masked path (every token through each weight group)."""
    y = raw = None  # what each token adds if it runs the branch, and the branch output itself
    for parts, members, scaled in groups:
        raw_g = run_branch(parts, x, None)
        yg = g * raw_g if scaled and g is not None else raw_g
        if raw is None:
            y, raw = yg, raw_g
        else:
            y, raw = torch.where(members[..., None], yg, y), torch.where(members[..., None], raw_g, raw)
    stand_in = torch.zeros_like(y) if fill is None else fill(x).to(y.dtype)
    delta = torch.where(run[..., None], y, torch.where(skip[..., None], stand_in, 0.0))
    if call.plan.skip_gradient == "straight-through" and g is not None:
        # Zero in the forward; in the backward the gate scales (branch - stand-in) wherever it does
        # not already scale the output: skipped tokens (whose `raw` is already the adapted weights'
        # under scope "skipped") and, under that scope, kept tokens still on the original weights.
        unscaled = skip if call.adapted is None else skip | ~call.adapted
        delta = delta + torch.where(unscaled[..., None], (g - g.detach()) * (raw - stand_in).detach(), 0.0)
    if call.result.skip_change is not None:
        size = (raw - stand_in).detach().float().norm(dim=-1) / h.detach().float().norm(dim=-1).clamp(min=1e-6)
        call.result.skip_change.append(size.clamp(min=1e-8).log())
    if call.result.branch_deltas is not None:
        delta.retain_grad()  # d loss / d delta = d loss / d residual after this branch
        call.result.branch_deltas.append(delta)
    if call.result.branch_io is not None:
        call.result.branch_io.append((x.detach(), delta.detach()))
    return delta


def _start_call(spec, gates, fill, original, input_ids, attention_mask, plan, cache, capture) -> _Call:
    """Positions, eligibility, cache slots and empty records of one call."""
    device = input_ids.device
    B, T = input_ids.shape
    L = spec.n_layers
    real = attention_mask.bool()
    past_slots = cache.n_slots if cache is not None else 0
    if cache is not None and cache.n_real is not None:
        past_real = cache.n_real
    else:
        past_real = torch.zeros(B, dtype=torch.long, device=device)
    positions = (past_real[:, None] + real.long().cumsum(1) - 1).clamp(min=0)
    slot_real = real if cache is None or cache.slot_real is None else torch.cat([cache.slot_real, real], 1)
    nothing = torch.empty(0, device=device)
    result = ForwardResult(
        logits=nothing,
        gate=nothing,
        threshold=nothing,
        skipped=nothing,
        eligible=real & ~((positions == 0) & plan.protect_bos),
        positions=positions,
        gate_values=[] if capture.gate_values else None,
        gate_vectors=torch.zeros(B, T, L, 2, spec.d_model, device=device) if capture.gate_vectors and gates else None,
        hidden_states=[] if capture.hidden_states else None,
        branch_deltas=[] if capture.branch_deltas else None,
        branch_io=[] if capture.branch_io else None,
        skip_change=[] if capture.skip_change else None,
    )
    scoped = plan.adapter_scope == "skipped"
    return _Call(
        spec=spec,
        gates=gates,
        fill=fill,
        original=(original or spec) if scoped else None,
        plan=plan,
        capture=capture,
        cache=cache,
        real=real,
        positions=positions,
        eligible=result.eligible,
        slots=torch.arange(past_slots, past_slots + T, device=device).expand(B, T),
        slot_real=slot_real,
        result=result,
        no_gate=torch.ones(B, T, device=device),
        adapted=torch.zeros(B, T, dtype=torch.bool, device=device) if scoped else None,
    )


def _check(spec: ArchSpec, gates: GateSet | None, plan: SkipPlan, capture: Capture) -> None:
    if plan.policy is not None and plan.policy.needs_gates and gates is None and not plan.budget.is_zero():
        raise GateSkipError(f"policy {plan.policy.name!r} ranks tokens by their gates; load gates or use 'random'")
    if (capture.branch_deltas or capture.branch_io or capture.skip_change) and plan.path != "masked":
        raise GateSkipError("branch contributions (attribution, stand-ins, ranking targets) need the masked path")
    if plan.budget.fractions.shape[0] != spec.n_layers:
        raise GateSkipError(f"skip budget is for {plan.budget.fractions.shape[0]} layers, model has {spec.n_layers}")


def gated_forward(
    spec: ArchSpec,
    gates: GateSet | None,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    plan: SkipPlan,
    cache: KVCache | None = None,
    logits_for: Literal["all", "last"] = "all",
    capture: Capture = Capture(),
    fill: SkipFill | None = None,
    original: ArchSpec | None = None,
) -> ForwardResult:
    """Run the gated model on `input_ids` [B, T] (left padded), appending to `cache` if given.

    `spec` is the backbone the gates run on (adapted when they came with an adapter); `fill` the
    stand-ins for skipped branches (None: nothing); `original` the unadapted weights that tokens
    use before their first skip under adapter scope "skipped" (None: `spec`'s own)."""
    _check(spec, gates, plan, capture)
    call = _start_call(spec, gates, fill, original, input_ids, attention_mask, plan, cache, capture)
    hidden = call.result.hidden_states
    h = spec.embed(input_ids)
    if capture.branch_deltas:  # make the residual stream differentiable although the backbone is frozen
        h = h.detach().requires_grad_(True)
    rope = {kind: spec.rope_for(kind, h, call.positions) for kind in {p.rope_kind for p in spec.layers}}
    for layer, parts in enumerate(spec.layers):
        if hidden is not None:
            hidden.append(h)
        cos, sin = rope[parts.rope_kind]  # [B, T, hd]
        x = parts.attn_norm(h)
        g, skip = decide_branch(call, layer, "attn", x)
        if call.adapted is not None:
            call.adapted = call.adapted | skip
        keys, values = layer_keys_values(call, layer, x, skip, cos, sin)
        h = apply_branch(call, layer, "attn", h, x, g, skip, attention_branch(call, cos, sin, keys, values))
        x = parts.mlp_norm(h)
        g, skip = decide_branch(call, layer, "mlp", x)
        if call.adapted is not None:
            call.adapted = call.adapted | skip
        h = apply_branch(call, layer, "mlp", h, x, g, skip, mlp_branch)
    if hidden is not None:
        hidden.append(h)
    res = call.result
    B, T = call.real.shape
    # One stack per record instead of one indexed write per branch: [B, T, 2L] -> [B, T, L, 2].
    res.gate, res.threshold, res.skipped = (
        torch.stack(column, -1).view(B, T, spec.n_layers, 2) for column in zip(*call.records)
    )
    if cache is not None:
        n_real = cache.n_real + call.real.long().sum(1) if cache.n_real is not None else call.real.long().sum(1)
        cache.append_tokens(call.slot_real, n_real, res.gate, res.eligible)
    res.logits = spec.logits(h[:, -1:] if logits_for == "last" else h)
    return res
