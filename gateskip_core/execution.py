"""The gated forward pass: one explicit walk over the decoder layers.

For each layer and each branch (attention, then MLP):

    x   = norm(h)                      # the branch input the decoder layer hands over
    g   = gate(x.detach())             # [B, T, d] (vector/mlp gates) or [B, T, 1] (scalar)
    imp = g.mean(-1)                   # token importance
    skip, threshold = policy.decide(imp, budget, eligible)
    h   = h + g * branch(x)   for tokens that run the branch; skipped tokens keep h

Two execution paths give the same result:
- `masked`: every token runs the branch; skipped outputs are replaced by exact zeros.
- `physical`: only tokens that run the branch are gathered and computed (the MLP,
  and the query side of attention: q projection, scores, weighted sum, o projection).
  Keys and values are still computed for every position, because tokens that run
  attention must be able to attend to tokens that skipped it.

Keys/values of a token that skips attention: by default computed from its own
(unchanged) normalised residual, as in prefill. With `kv="copy"` they are copied
from the layer below (the paper's description; layer 0 computes them).

All per-call state (decisions, gate values, KV cache) lives in the objects this
module creates and returns; nothing is stored on modules, so concurrent calls on
one model do not interfere.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import partial
from typing import Literal

import torch
import torch.nn.functional as F

from .architecture import ArchSpec, LayerParts
from .errors import GateSkipError
from .gates import BRANCHES, GateSet
from .policies import BranchInput, SkipBudget, SkipPolicy

ExecutionPath = Literal["masked", "physical"]
KVMode = Literal["compute", "copy"]
EXECUTION_PATHS = ("masked", "physical")
KV_MODES = ("compute", "copy")


@dataclass(frozen=True)
class SkipPlan:
    """Everything that steers skipping in one call."""

    budget: SkipBudget
    policy: SkipPolicy | None
    path: ExecutionPath = "masked"
    kv: KVMode = "compute"
    protect_bos: bool = True
    capture_gate_vectors: bool = False

    def __post_init__(self) -> None:
        if self.path not in EXECUTION_PATHS:
            raise GateSkipError(f"execution path must be one of {EXECUTION_PATHS}, got {self.path!r}")
        if self.kv not in KV_MODES:
            raise GateSkipError(f"kv mode must be one of {KV_MODES}, got {self.kv!r}")
        if self.policy is None and not self.budget.is_zero():
            raise GateSkipError("a non-zero skip budget needs a skip policy")


@dataclass
class KVCache:
    """Keys/values and per-token bookkeeping of earlier tokens, for one generation call."""

    keys: list[torch.Tensor] = field(default_factory=list)  # per layer [B, H_kv, S, hd]
    values: list[torch.Tensor] = field(default_factory=list)
    slot_real: torch.Tensor | None = None  # [B, S] bool: slot holds a real token
    n_real: torch.Tensor | None = None  # [B] real tokens so far
    importance: torch.Tensor | None = None  # [B, S, L, 2] (running-quantile history)
    eligible: torch.Tensor | None = None  # [B, S]

    @property
    def n_slots(self) -> int:
        return 0 if self.slot_real is None else self.slot_real.shape[1]


@dataclass
class ForwardResult:
    logits: torch.Tensor  # [B, T, V] (or [B, 1, V] with logits_for="last")
    importance: torch.Tensor  # [B, T, L, 2] mean gate (1.0 where there are no gates)
    threshold: torch.Tensor  # [B, T, L, 2]
    skipped: torch.Tensor  # [B, T, L, 2] bool
    eligible: torch.Tensor  # [B, T] bool
    positions: torch.Tensor  # [B, T]
    gate_values: list[torch.Tensor] | None  # per (layer, branch) [B, T, d|1], kept for training
    gate_vectors: torch.Tensor | None  # [B, T, L, 2, d] on request
    hidden_states: list[torch.Tensor] | None = None  # residual stream before each layer and after the last
    branch_deltas: list[torch.Tensor] | None = None  # per (layer, branch) what the branch added to h, grads kept


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def _rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    return x * cos + _rotate_half(x) * sin


def _project_q(parts: LayerParts, spec: ArchSpec, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor):
    """x [N, d], cos/sin [N, hd] -> rotated queries [N, H, hd]."""
    q = parts.q_proj(x).view(x.shape[0], spec.n_heads, spec.head_dim)
    if parts.q_norm is not None:
        q = parts.q_norm(q)
    return _rope(q, cos[:, None], sin[:, None])


def _project_kv(parts: LayerParts, spec: ArchSpec, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor):
    """x [N, d] -> rotated keys and values [N, H_kv, hd]."""
    k = parts.k_proj(x).view(x.shape[0], spec.n_kv_heads, spec.head_dim)
    v = parts.v_proj(x).view(x.shape[0], spec.n_kv_heads, spec.head_dim)
    if parts.k_norm is not None:
        k = parts.k_norm(k)
    return _rope(k, cos[:, None], sin[:, None]), v


def _attend(
    spec: ArchSpec,
    parts: LayerParts,
    q: torch.Tensor,  # [B, H, Q, hd]
    q_slots: torch.Tensor,  # [B, Q] slot index of each query
    q_valid: torch.Tensor,  # [B, Q] bool: a real query (padding rows are discarded)
    keys: torch.Tensor,  # [B, H_kv, S, hd]
    values: torch.Tensor,
    slot_real: torch.Tensor,  # [B, S]
) -> torch.Tensor:
    """Causal (optionally sliding-window) attention of queries over all key slots: [B, Q, H*hd]."""
    k_slots = torch.arange(keys.shape[2], device=q.device)
    allowed = (k_slots[None, None, :] <= q_slots[:, :, None]) & slot_real[:, None, :]
    if parts.sliding_window is not None:
        allowed &= k_slots[None, None, :] > q_slots[:, :, None] - parts.sliding_window
    # A padding query would have no key at all (NaN softmax); let it see its own slot.
    own = k_slots[None, None, :] == q_slots[:, :, None]
    allowed = torch.where(q_valid[:, :, None], allowed, own)
    out = F.scaled_dot_product_attention(
        q, keys, values, attn_mask=allowed[:, None], scale=spec.attn_scale, enable_gqa=True
    )
    return out.transpose(1, 2).reshape(q.shape[0], q.shape[2], -1)


def _query_side(spec: ArchSpec, parts: LayerParts, cos, sin, slots, real, keys, values, slot_real,
                x_rows: torch.Tensor, rows) -> torch.Tensor:  # fmt: skip
    """Attention's query side: q projection, scores, weighted sum and o projection.

    `rows` None: every token (`x_rows` [B, T, d]); otherwise the packed rows from
    `_pack_rows` that run attention (`x_rows` [N, d]), padded per sequence for the
    attention call. Keys and values cover every position either way.
    """
    B, T = real.shape
    if rows is None:
        flat = (x_rows.reshape(B * T, -1), cos.reshape(B * T, -1), sin.reshape(B * T, -1))
        q = _project_q(parts, spec, *flat).view(B, T, spec.n_heads, -1).transpose(1, 2)
        return parts.o_proj(_attend(spec, parts, q, slots, real, keys, values, slot_real))
    b_idx, t_idx, rank, width = rows
    q_rows = _project_q(parts, spec, x_rows, cos[b_idx, t_idx], sin[b_idx, t_idx])
    q = torch.zeros(B, width, spec.n_heads, spec.head_dim, dtype=q_rows.dtype)
    q = q.index_put((b_idx, rank), q_rows).transpose(1, 2)
    q_slots = torch.zeros(B, width, dtype=torch.long).index_put((b_idx, rank), slots[b_idx, t_idx])
    q_valid = torch.zeros(B, width, dtype=torch.bool).index_put((b_idx, rank), torch.tensor(True))
    return parts.o_proj(_attend(spec, parts, q, q_slots, q_valid, keys, values, slot_real)[b_idx, rank])


def _mlp(mlp, x_rows: torch.Tensor, rows) -> torch.Tensor:
    return mlp(x_rows)  # the MLP is per token: the same code for all tokens or packed rows


def _pack_rows(run: torch.Tensor):
    """Indices of tokens that run a branch, and their rank within their own sequence."""
    b_idx, t_idx = run.nonzero(as_tuple=True)
    rank = (run.long().cumsum(1) - 1)[b_idx, t_idx]
    width = int(run.sum(1).max()) if b_idx.numel() else 0
    return b_idx, t_idx, rank, width


def gated_forward(
    spec: ArchSpec,
    gates: GateSet | None,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    plan: SkipPlan,
    cache: KVCache | None = None,
    logits_for: Literal["all", "last"] = "all",
    keep_gate_values: bool = False,
    keep_hidden_states: bool = False,
    keep_branch_deltas: bool = False,
) -> ForwardResult:
    """Run the gated model on `input_ids` [B, T] (left padded), appending to `cache` if given."""
    if plan.policy is not None and plan.policy.needs_gates and gates is None and not plan.budget.is_zero():
        raise GateSkipError(f"policy {plan.policy.name!r} ranks tokens by their gates; load gates or use 'random'")
    device = input_ids.device
    B, T = input_ids.shape
    L = spec.n_layers
    real = attention_mask.bool()
    past_slots = cache.n_slots if cache is not None else 0
    past_real = cache.n_real if (cache is not None and cache.n_real is not None) else torch.zeros(B, dtype=torch.long)
    positions = (past_real[:, None] + real.long().cumsum(1) - 1).clamp(min=0)
    eligible = real & ~((positions == 0) & plan.protect_bos)
    slots = torch.arange(past_slots, past_slots + T, device=device).expand(B, T)
    slot_real = real if cache is None or cache.slot_real is None else torch.cat([cache.slot_real, real], 1)

    importance = torch.ones(B, T, L, 2)
    threshold = torch.full((B, T, L, 2), float("-inf"))
    skipped = torch.zeros(B, T, L, 2, dtype=torch.bool)
    gate_values: list[torch.Tensor] | None = [] if keep_gate_values else None
    gate_vectors = torch.zeros(B, T, L, 2, spec.d_model) if plan.capture_gate_vectors and gates else None
    hidden_states: list[torch.Tensor] | None = [] if keep_hidden_states else None
    branch_deltas: list[torch.Tensor] | None = [] if keep_branch_deltas else None
    if keep_branch_deltas and plan.path != "masked":
        raise GateSkipError("branch contributions (attribution) need the masked path")

    def add_delta(h: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
        if branch_deltas is not None:
            delta.retain_grad()  # d loss / d delta = d loss / d residual after this branch
            branch_deltas.append(delta)
        return h + delta

    def decide(layer: int, branch: str, x: torch.Tensor):
        """Gate values [B, T, d|1] (or None) and the skip mask [B, T] for one branch."""
        bi = BRANCHES.index(branch)
        g = gates.gate(layer, branch)(x) if gates is not None else None
        if g is not None:
            importance[:, :, layer, bi] = g.detach().mean(-1).float()
            if gate_values is not None:
                gate_values.append(g)
            if gate_vectors is not None:
                gate_vectors[:, :, layer, bi] = g.detach().float().expand(B, T, spec.d_model)
        budget = plan.budget.at(layer, branch)
        if budget > 0:
            hist_imp = hist_elig = None
            if cache is not None and cache.importance is not None:
                hist_imp, hist_elig = cache.importance[:, :, layer, bi], cache.eligible
            decision = plan.policy.decide(
                BranchInput(
                    layer=layer,
                    branch=branch,
                    budget=budget,
                    importance=importance[:, :, layer, bi],
                    eligible=eligible,
                    positions=positions,
                    history_importance=hist_imp,
                    history_eligible=hist_elig,
                )
            )
            skip = decision.skip & eligible
            skipped[:, :, layer, bi] = skip
            threshold[:, :, layer, bi] = decision.threshold
        else:
            skip = torch.zeros(B, T, dtype=torch.bool, device=device)
        return g, skip

    def apply_branch(h, x, g, skip, run_branch, post_norm):
        """h + g * branch(x) for tokens that run the branch.

        `run_branch(x_rows, rows)` computes the branch: on the masked path for every token
        (`x_rows` is [B, T, d], `rows` None), on the physical path only for the packed rows
        that run it (`rows` from `_pack_rows`, `x_rows` [N, d]).
        """
        run = real & ~skip
        if plan.path == "masked":
            y = run_branch(x, None)
            if post_norm is not None:
                y = post_norm(y)
            if g is not None:
                y = g * y
            return add_delta(h, torch.where(run[..., None], y, torch.zeros_like(y)))
        rows = _pack_rows(run)
        b_idx, t_idx = rows[0], rows[1]
        if b_idx.numel() == 0:
            return h
        y = run_branch(x[b_idx, t_idx], rows)
        if post_norm is not None:
            y = post_norm(y)
        if g is not None:
            y = g[b_idx, t_idx] * y
        return h.index_put((b_idx, t_idx), h[b_idx, t_idx] + y)

    h = spec.embed(input_ids)
    if keep_branch_deltas:  # make the residual stream differentiable although the backbone is frozen
        h = h.detach().requires_grad_(True)
    rope_cache: dict[str | None, tuple[torch.Tensor, torch.Tensor]] = {}
    prev_kv: tuple[torch.Tensor, torch.Tensor] | None = None
    for layer, parts in enumerate(spec.layers):
        if hidden_states is not None:
            hidden_states.append(h)
        if parts.rope_kind not in rope_cache:
            rope_cache[parts.rope_kind] = spec.rope(layer, h, positions)
        cos, sin = rope_cache[parts.rope_kind]  # [B, T, hd]

        # ---- attention branch
        x = parts.attn_norm(h)
        g, skip = decide(layer, "attn", x)
        copy_kv = plan.kv == "copy" and layer > 0
        # Rows whose keys/values are projected here; under kv="copy" skipped rows take the layer below's.
        kv_rows = real & ~skip if copy_kv else torch.ones_like(real)
        if plan.path == "masked" or bool(kv_rows.all()):
            k, v = _project_kv(parts, spec, x.reshape(B * T, -1), cos.reshape(B * T, -1), sin.reshape(B * T, -1))
            k, v = k.view(B, T, spec.n_kv_heads, -1), v.view(B, T, spec.n_kv_heads, -1)
        else:
            k = torch.zeros(B, T, spec.n_kv_heads, spec.head_dim, dtype=x.dtype)
            v = torch.zeros_like(k)
            b_idx, t_idx = kv_rows.nonzero(as_tuple=True)
            if b_idx.numel():
                kr, vr = _project_kv(parts, spec, x[b_idx, t_idx], cos[b_idx, t_idx], sin[b_idx, t_idx])
                k, v = k.index_put((b_idx, t_idx), kr), v.index_put((b_idx, t_idx), vr)
        if copy_kv:
            take_below = (~kv_rows)[:, :, None, None]
            k = torch.where(take_below, prev_kv[0], k)
            v = torch.where(take_below, prev_kv[1], v)
        prev_kv = (k, v)
        k_new, v_new = k.transpose(1, 2), v.transpose(1, 2)  # [B, H_kv, T, hd]
        if cache is not None:
            if len(cache.keys) > layer:
                cache.keys[layer] = torch.cat([cache.keys[layer], k_new], 2)
                cache.values[layer] = torch.cat([cache.values[layer], v_new], 2)
            else:
                cache.keys.append(k_new)
                cache.values.append(v_new)
            keys, values = cache.keys[layer], cache.values[layer]
        else:
            keys, values = k_new, v_new

        attention = partial(_query_side, spec, parts, cos, sin, slots, real, keys, values, slot_real)
        h = apply_branch(h, x, g, skip, attention, parts.attn_post_norm)

        # ---- MLP branch
        x = parts.mlp_norm(h)
        g, skip = decide(layer, "mlp", x)
        h = apply_branch(h, x, g, skip, partial(_mlp, parts.mlp), parts.mlp_post_norm)

    if hidden_states is not None:
        hidden_states.append(h)
    if cache is not None:
        cache.slot_real = slot_real
        cache.n_real = past_real + real.long().sum(1)
        cache.importance = importance if cache.importance is None else torch.cat([cache.importance, importance], 1)
        cache.eligible = eligible if cache.eligible is None else torch.cat([cache.eligible, eligible], 1)

    h_out = h[:, -1:] if logits_for == "last" else h
    logits = spec.lm_head(spec.final_norm(h_out))
    if spec.final_logit_softcap is not None:
        logits = torch.tanh(logits / spec.final_logit_softcap) * spec.final_logit_softcap
    return ForwardResult(
        logits=logits,
        importance=importance,
        threshold=threshold,
        skipped=skipped,
        eligible=eligible,
        positions=positions,
        gate_values=gate_values,
        gate_vectors=gate_vectors,
        hidden_states=hidden_states,
        branch_deltas=branch_deltas,
    )
