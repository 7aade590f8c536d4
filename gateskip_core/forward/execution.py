"""The gated forward pass: one explicit walk over the decoder layers.

    h = embed(input_ids)
    for each layer:
        record hidden state h                                  (capture.hidden_states)
        x = attn_norm(h)
        g, skip, n = decide_branch(call, layer, "attn", x)     # g = gate(x.detach()); policy.decide(mean(g))
        keys, values = layer_keys_values(call, parts, x, skip) # every position's K/V, appended to the cache
        h = apply_branch(call, h, x, g, skip, query_side)      # h + g * attention(x) for tokens that run it
        x = mlp_norm(h)
        g, skip, n = decide_branch(call, layer, "mlp", x)
        h = apply_branch(call, h, x, g, skip, mlp)             # h + g * mlp(x) for tokens that run it
    logits = lm_head(final_norm(h))

Two execution paths give the same result (`apply_branch`):
- `masked`: every token runs the branch; skipped outputs are replaced by exact zeros.
- `physical`: only tokens that run the branch are gathered and computed (the MLP,
  and the query side of attention: q projection, scores, weighted sum, o projection).
  Keys and values are still computed for every position, because tokens that run
  attention must be able to attend to tokens that skipped it.

Where the adapter applies (`SkipPlan.adapter_scope`, for gates that came with an adapter):
- `all`: every token runs the adapted weights, and a branch that runs adds `g * branch(x)`;
- `skipped`: a token runs the *original* weights, and its kept branches add `branch(x)`
  unscaled, until its first skipped branch; from there on it runs the adapted weights and
  soft gates. With nothing skipped the model is exactly the original, and the adapter's
  compensation is paid only where skipping happened.
One set of base weights serves every token: a LoRA adapter (`adapter.LoraAdapter`) is a
per-row delta added to each projection only for the rows that use it (`AdapterRows`), so a
projection is one dense call over every row that runs it, plus a rank-R call over the
adapted rows (none before any token skipped, all in scope `all`: no gather then).

What a skipped branch adds: nothing (the paper), or a stand-in `fill(x)` (`fill.py`).

Keys/values of a token that skips attention: by default computed from its own
(unchanged) normalised residual, as in prefill. With `kv="copy"` they are copied
from the layer below (the paper's description; layer 0 computes them).

What a call records is chosen per call with a `Capture`; the records, the
decisions and the KV cache live in objects this module creates and returns.
Nothing is stored on modules, so concurrent calls on one model do not interfere.
Every tensor is created on the device of the input ids.

The kernels live in `attention.py` (RoPE, projections, masks, attention), the packed rows and the
adapter's rows in `rows.py`, the KV cache in `cache.py`, the plan and its decisions in
`skipping/plan.py`; this module is the walk.

The same gating is written a second time as TransformerLens hooks (`analysis/experiments/lens.py`):
TransformerLens runs the Hugging Face modules' own forward, where a hook can replace an activation
but not gather rows, keep this walk's cache or skip a projection. Tests keep the two equal.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import torch

from gateskip_core.backbone.architecture import ArchSpec, LayerParts
from gateskip_core.branches import BRANCHES
from gateskip_core.errors import GateSkipError
from gateskip_core.forward.attention import attend, attention_mask, flat_positions, project_kv, project_q
from gateskip_core.forward.cache import KVCache
from gateskip_core.forward.one_token import OneTokenDecisions
from gateskip_core.forward.rows import AdapterRows, Rows, pack_rows
from gateskip_core.gating.adapter import LoraAdapter
from gateskip_core.gating.fill import SkipFill
from gateskip_core.gating.gates import GateSet
from gateskip_core.skipping.plan import SkipPlan, branch_decision


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
      training (masked path only);
    - `skip_direction`: per branch [B, T, d], the change itself (branch output - stand-in),
      detached: with the gradient at `branch_deltas` it gives each skip's first-order cost
      (the first-order ranking target of training; masked path only).
    """

    gate_values: bool = False
    gate_vectors: bool = False
    hidden_states: bool = False
    branch_deltas: bool = False
    branch_io: bool = False
    skip_change: bool = False
    skip_direction: bool = False


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
    skip_direction: list[torch.Tensor] | None = None  # per (layer, branch) [B, T, d] branch - stand-in


@dataclass
class _Call:
    """The per-call context every step of the walk reads (and the records it writes)."""

    spec: ArchSpec
    gates: GateSet | None
    fill: SkipFill | None
    lora: LoraAdapter | None  # the adapter's per-row deltas (None: no LoRA adapter)
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
    # Counts kept as Python ints, so that the common cases (nothing skipped, no token or every token
    # on the adapter: every decoding step at batch 1) need no mask arithmetic and no extra sync.
    n_adapted: int = 0
    all_real: bool = True  # no padding in this call
    no_skip: tuple[torch.Tensor, torch.Tensor] | None = None  # (skip, threshold) of a branch with budget 0
    # One token (a decoding step at batch 1) under a threshold policy and no forced cells: its decisions
    # are Python comparisons and its records Python numbers, made into tensors once when the walk ends
    # (`one_token`); None: per-branch tensors (`records`).
    one_token: OneTokenDecisions | None = None

    def mark_skipped(self, skip: torch.Tensor, n_skip: int) -> None:
        """Scope "skipped": tokens that skipped this branch run the adapted model from here on."""
        if self.adapted is not None and n_skip and self.n_adapted < self.adapted.numel():
            self.adapted = self.adapted | skip
            self.n_adapted = int(self.adapted.sum())

    def adapter_rows(self, layer: int, rows: Rows | None) -> AdapterRows:
        """Which of the rows a projection runs on (every token of the call, or the packed `rows`)
        get the LoRA delta: all of them in scope "all", the adapted ones in "skipped"."""
        if self.lora is None or (self.adapted is not None and self.n_adapted == 0):
            return AdapterRows(None, layer, None)
        if self.adapted is None or self.n_adapted == self.adapted.numel():
            return AdapterRows(self.lora, layer, None)
        mask = self.adapted.reshape(-1) if rows is None else rows.take(self.adapted)
        return AdapterRows(self.lora, layer, mask)

    def scaled(self, rows: Rows | None = None) -> torch.Tensor | bool:
        """Which rows the gate scales (True: all, False: none): tokens on the adapted model (scope
        "skipped": from their first skip on; a kept branch before it adds its output unscaled, as the
        original does)."""
        if self.adapted is None or self.n_adapted == self.adapted.numel():
            return True
        if self.n_adapted == 0:
            return False
        return self.adapted if rows is None else rows.take(self.adapted)


def query_side(call: _Call, layer: int, cos, sin, keys, values, x_rows: torch.Tensor, rows) -> torch.Tensor:
    """Attention's query side: q projection, scores, weighted sum and o projection.

    `rows` None: every token (`x_rows` [B, T, d]); otherwise the packed rows from
    `pack_rows` that run attention (`x_rows` [N, d]), padded per sequence for the
    attention call. Keys and values cover every position either way.
    """
    spec, (B, T) = call.spec, call.real.shape
    parts = spec.layers[layer]
    if rows is None:
        adapter = call.adapter_rows(layer, None)
        flat = (x_rows.reshape(B * T, -1), flat_positions(cos, B * T), flat_positions(sin, B * T))
        q = project_q(parts, spec, *flat, adapter).view(B, T, spec.n_heads, -1).transpose(1, 2)
        window = parts.sliding_window
        if window not in call.masks:  # one mask per call and window size, shared by the layers
            call.masks[window] = attention_mask(call.slots, call.real, call.slot_real, window)
        out = attend(spec, q, keys, values, call.masks[window]).reshape(B * T, -1)
        return adapter.linear("o_proj", parts.o_proj, out).view(B, T, -1)
    adapter = call.adapter_rows(layer, rows)
    device = x_rows.device
    q_rows = project_q(parts, spec, x_rows, rows.take(cos), rows.take(sin), adapter)
    if B == 1:  # one sequence: the packed rows are already its query rows, in order
        q = q_rows[None].transpose(1, 2)
        mask = attention_mask(rows.take(call.slots)[None], None, call.slot_real, parts.sliding_window)
        return adapter.linear("o_proj", parts.o_proj, attend(spec, q, keys, values, mask)[0])
    b_idx, rank, width = rows.per_sequence()
    q = torch.zeros(B, width, spec.n_heads, spec.head_dim, dtype=q_rows.dtype, device=device)
    q = q.index_put((b_idx, rank), q_rows).transpose(1, 2)
    q_slots = torch.zeros(B, width, dtype=torch.long, device=device).index_put((b_idx, rank), rows.take(call.slots))
    q_valid = torch.zeros(B, width, dtype=torch.bool, device=device)
    q_valid = q_valid.index_put((b_idx, rank), torch.tensor(True, device=device))
    mask = attention_mask(q_slots, q_valid, call.slot_real, parts.sliding_window)
    out = attend(spec, q, keys, values, mask)
    return adapter.linear("o_proj", parts.o_proj, out[b_idx, rank])


def attention_branch(call: _Call, cos, sin, keys, values):
    """One layer's attention branch for `apply_branch`: `run(layer, x_rows, rows)` -> its output."""

    def run(layer: int, x_rows: torch.Tensor, rows) -> torch.Tensor:
        y = query_side(call, layer, cos, sin, keys, values, x_rows, rows)
        post = call.spec.layers[layer].attn_post_norm
        return y if post is None else post(y)

    return run


def mlp_forward(parts: LayerParts, x: torch.Tensor, adapter: AdapterRows) -> torch.Tensor:
    """down(act(gate(x)) * up(x)) for rows x [N, d] (down(act(up(x))) without a gate projection),
    each projection with the adapter's delta."""
    up = adapter.linear("up_proj", parts.up_proj, x)
    if parts.gate_proj is None:
        return adapter.linear("down_proj", parts.down_proj, parts.mlp_act(up))
    gate = parts.mlp_act(adapter.linear("gate_proj", parts.gate_proj, x))
    return adapter.linear("down_proj", parts.down_proj, gate * up)


def mlp_branch(call: _Call):
    """One layer's MLP branch for `apply_branch` (per token: the same code for all tokens or packed rows)."""

    def run(layer: int, x_rows: torch.Tensor, rows) -> torch.Tensor:
        parts = call.spec.layers[layer]
        flat = x_rows.reshape(-1, x_rows.shape[-1])
        y = mlp_forward(parts, flat, call.adapter_rows(layer, rows))
        y = y.view(*x_rows.shape[:-1], -1)
        return y if parts.mlp_post_norm is None else parts.mlp_post_norm(y)

    return run


def decide_branch(call: _Call, layer: int, branch: str, x: torch.Tensor):
    """Gate values [B, T, d|1] (None without gates), the skip mask [B, T] of one branch and how
    many tokens skip it."""
    bi = BRANCHES.index(branch)
    res = call.result
    if call.one_token is not None:
        return _decide_one_token(call, layer, bi, x)
    g = call.gates.gate(layer, branch)(x) if call.gates is not None else None
    if g is None:
        gate = call.no_gate
    else:
        gate = g.detach().mean(-1).float()
        if res.gate_values is not None:
            res.gate_values.append(g)
        if res.gate_vectors is not None:
            res.gate_vectors[:, :, layer, bi] = g.detach().float().expand(*call.real.shape, call.spec.d_model)
    if call.plan.budget.at(layer, branch) <= 0 and not any(
        f.layer == layer and f.branch == branch for f in call.plan.forced
    ):  # nothing can skip: one shared no-skip record per call
        if call.no_skip is None:
            call.no_skip = (torch.zeros_like(call.eligible), torch.full(gate.shape, float("-inf"), device=gate.device))
        call.records.append((gate, call.no_skip[1], call.no_skip[0]))
        return g, call.no_skip[0], 0
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
    return g, skip, int(skip.sum())


def _decide_one_token(call: _Call, layer: int, bi: int, x: torch.Tensor):
    """`decide_branch` for a call of one token (`one_token.py`): a branch that cannot skip and whose
    gate scales nothing has its gate evaluated with the others' when the walk ends."""
    one, gates = call.one_token, call.gates
    if gates is not None and gates.batchable and one.can_defer(layer, bi) and call.scaled() is False:
        one.defer(layer, bi, x)
        return None, one.masks[False], 0
    g = gates.gate(layer, BRANCHES[bi])(x) if gates is not None else None
    skip = one.decide(layer, bi, g)
    return g, one.masks[skip], int(skip)


def layer_keys_values(call: _Call, layer: int, x: torch.Tensor, skip: torch.Tensor, cos, sin):
    """Keys/values of this call's tokens at `layer`, appended to the cache; returns all of them [B, H_kv, S, hd]."""
    spec, real = call.spec, call.real
    B, T = real.shape
    copy_kv = call.plan.kv == "copy" and layer > 0
    # Rows whose keys/values are projected here; under kv="copy" skipped rows take the layer below's.
    kv_rows = real & ~skip if copy_kv else None
    parts = spec.layers[layer]
    if call.plan.path == "masked" or kv_rows is None or bool(kv_rows.all()):
        flat = (x.reshape(B * T, -1), flat_positions(cos, B * T), flat_positions(sin, B * T))
        k, v = project_kv(parts, spec, *flat, call.adapter_rows(layer, None))
        k, v = k.view(B, T, spec.n_kv_heads, -1), v.view(B, T, spec.n_kv_heads, -1)
    else:
        k = torch.zeros(B, T, spec.n_kv_heads, spec.head_dim, dtype=x.dtype, device=x.device)
        v = torch.zeros_like(k)
        rows = pack_rows(kv_rows)
        if rows.flat.numel():
            adapter = call.adapter_rows(layer, rows)
            kr, vr = project_kv(parts, spec, rows.take(x), rows.take(cos), rows.take(sin), adapter)
            k, v = rows.add_to(k, kr), rows.add_to(v, vr)
    if kv_rows is not None:
        take_below = (~kv_rows)[:, :, None, None]
        k = torch.where(take_below, call.prev_kv[0], k)
        v = torch.where(take_below, call.prev_kv[1], v)
    call.prev_kv = (k, v)
    k, v = k.transpose(1, 2), v.transpose(1, 2)  # [B, H_kv, T, hd]
    return call.cache.append_layer(layer, k, v) if call.cache is not None else (k, v)


def apply_branch(call: _Call, layer: int, branch: str, h, x, g, skip, n_skip: int, run_branch) -> torch.Tensor:
    """h + what the branch adds for every token.

    A token that runs the branch adds `g * branch(x)` (or `branch(x)`, unscaled and without the
    adapter, where the adapter scope keeps it on the original model); a skipped token adds
    nothing, or the stand-in `fill(x)`. `run_branch(layer, x_rows, rows)` computes the branch
    (with the adapter's delta on the rows that use it): on the masked path for every token
    (`x_rows` [B, T, d], `rows` None), on the physical path only for the packed rows that run it
    (`rows` from `pack_rows`, `x_rows` [N, d]).
    """
    fill = call.fill.fill(layer, branch) if call.fill is not None else None
    masked = call.plan.path == "masked"
    if n_skip == 0 and call.all_real and not (masked and _records_branch_outputs(call)):
        # Every token runs it: nothing to mask, no gather, no scatter.
        return h + _scaled(call, g, run_branch(layer, x, None), None)
    if masked:
        return h + _masked_delta(call, layer, x, g, skip, call.real & ~skip, fill, run_branch, h)
    if n_skip == skip.numel():  # everybody skips it (a skipping decoding step): no gather, no scatter
        return h if fill is None else h + fill(x).to(h.dtype)
    if fill is not None and n_skip:
        skipped = pack_rows(skip)
        h = skipped.add_to(h, fill(skipped.take(x)))
    run = call.real & ~skip
    n_run = int(run.sum())
    if n_run == 0:  # nobody runs it (the others are padding): nothing to compute
        return h
    rows = pack_rows(run)
    y = run_branch(layer, rows.take(x), rows)
    return rows.add_to(h, _scaled(call, rows.take(g), y, rows))


def _scaled(call: _Call, g: torch.Tensor | None, y: torch.Tensor, rows) -> torch.Tensor:
    """`g * y` on the rows the gate scales (all, or the adapted ones under scope "skipped")."""
    scaled = call.scaled(rows)
    if g is None or scaled is False:
        return y
    return g * y if scaled is True else torch.where(scaled[..., None], g * y, y)


def _records_branch_outputs(call: _Call) -> bool:
    """Whether the masked path must build each branch's delta in full: a straight-through gradient,
    or records of what branches add (training targets, attribution, stand-in fitting)."""
    res = call.result
    return call.plan.skip_gradient != "none" or any(
        r is not None for r in (res.skip_change, res.skip_direction, res.branch_deltas, res.branch_io)
    )


def _masked_delta(call: _Call, layer: int, x, g, skip, run, fill, run_branch, h) -> torch.Tensor:
    """What the branch adds to every token on the masked path (every token runs the branch)."""
    raw = run_branch(layer, x, None)  # the branch output, with the adapter's delta where it applies
    y = _scaled(call, g, raw, None)  # what each token adds if it runs the branch
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
    if call.result.skip_direction is not None:
        call.result.skip_direction.append((raw - stand_in).detach())
    if call.result.branch_deltas is not None:
        delta.retain_grad()  # d loss / d delta = d loss / d residual after this branch
        call.result.branch_deltas.append(delta)
    if call.result.branch_io is not None:
        call.result.branch_io.append((x.detach(), delta.detach()))
    return delta


def _start_call(spec, gates, fill, lora, input_ids, attention_mask, plan, cache, capture) -> _Call:
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
        skip_direction=[] if capture.skip_direction else None,
    )
    scoped = plan.adapter_scope == "skipped"
    one_token = None
    if OneTokenDecisions.applies(plan, B * T, capture.gate_values or capture.gate_vectors):
        one_token = OneTokenDecisions(plan, L, bool(result.eligible.all()), device)
    return _Call(
        spec=spec,
        gates=gates,
        fill=fill,
        lora=lora,
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
        all_real=bool(real.all()),
        one_token=one_token,
    )


def _check(spec: ArchSpec, gates: GateSet | None, plan: SkipPlan, capture: Capture) -> None:
    if plan.policy is not None and plan.policy.needs_gates and gates is None and not plan.budget.is_zero():
        raise GateSkipError(f"policy {plan.policy.name!r} ranks tokens by their gates; load gates or use 'random'")
    if (capture.branch_deltas or capture.branch_io or capture.skip_change or capture.skip_direction) and (
        plan.path != "masked"
    ):
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
    lora: LoraAdapter | None = None,
) -> ForwardResult:
    """Run the gated model on `input_ids` [B, T] (left padded), appending to `cache` if given.

    `spec` is the backbone (the original, or an adapted copy for a full fine-tune or a merged
    adapter); `fill` the stand-ins for skipped branches (None: nothing); `lora` a LoRA adapter
    added per row (to every token in adapter scope "all", to tokens from their first skip on in
    "skipped")."""
    _check(spec, gates, plan, capture)
    call = _start_call(spec, gates, fill, lora, input_ids, attention_mask, plan, cache, capture)
    hidden = call.result.hidden_states
    h = spec.embed(input_ids)
    if spec.position_embed is not None:  # learned absolute positions (GPT-2): each token's real position
        h = h + spec.position_embed(call.positions)
    if capture.branch_deltas:  # make the residual stream differentiable although the backbone is frozen
        h = h.detach().requires_grad_(True)
    rope = {kind: spec.rope_for(kind, h, call.positions) for kind in {p.rope_kind for p in spec.layers}}
    for layer, parts in enumerate(spec.layers):
        if hidden is not None:
            hidden.append(h)
        cos, sin = rope[parts.rope_kind]  # [B, T, hd]
        h_in = h  # the parallel residual's MLP reads the residual entering the layer
        x = parts.attn_norm(h)
        g, skip, n_skip = decide_branch(call, layer, "attn", x)
        call.mark_skipped(skip, n_skip)
        keys, values = layer_keys_values(call, layer, x, skip, cos, sin)
        h = apply_branch(call, layer, "attn", h, x, g, skip, n_skip, attention_branch(call, cos, sin, keys, values))
        x = parts.mlp_norm(h_in if parts.parallel_residual else h)
        g, skip, n_skip = decide_branch(call, layer, "mlp", x)
        call.mark_skipped(skip, n_skip)
        h = apply_branch(call, layer, "mlp", h, x, g, skip, n_skip, mlp_branch(call))
    if hidden is not None:
        hidden.append(h)
    res = call.result
    B, T = call.real.shape
    if call.one_token is not None:
        res.gate, res.threshold, res.skipped = call.one_token.records(spec.n_layers, h.device, gates)
    else:  # one stack per record instead of one indexed write per branch: [B, T, 2L] -> [B, T, L, 2]
        res.gate, res.threshold, res.skipped = (
            torch.stack(column, -1).view(B, T, spec.n_layers, 2) for column in zip(*call.records)
        )
    if cache is not None:
        n_real = cache.n_real + call.real.long().sum(1) if cache.n_real is not None else call.real.long().sum(1)
        cache.append_tokens(call.slot_real, n_real, res.gate, res.eligible)
    res.logits = spec.logits(h[:, -1:] if logits_for == "last" else h)
    return res
