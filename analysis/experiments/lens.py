"""The gated model under TransformerLens 4: gate values and skip decisions as hook points.

`GatedLens(model)` wraps a copy of the backbone the gated walk runs (the original, or the
adapted copy of a full fine-tune) in a TransformerLens `TransformerBridge` (offline; a copy,
because the bridge rewires the model it wraps) and adds, for every layer l, four hook points:

    blocks.{l}.attn.hook_gate   [batch, pos, d] (vector, low-rank gates) or [batch, pos, 1] (scalar)
    blocks.{l}.attn.hook_skip   [batch, pos] bool: the token skips attention at layer l
    blocks.{l}.mlp.hook_gate
    blocks.{l}.mlp.hook_skip

Every call (TransformerLens' `hooks()`, `run_with_cache`, `run_with_hooks`) takes the skip
settings of `GatedModel.trace` (`skip`, `policy`, `branches`, `allocation`, `protect_bos`,
`seed`, `forced`); the bridge runs gated only inside them and refuses calls outside. The gating
runs as permanent bridge hooks, in this order:

    blocks.{l}.ln1.hook_out      x = attn_norm(h): the gate's input
      -> attn.hook_gate          g = gate(x)          (a hook may read or replace it)
      -> attn.hook_skip          skip = policy(mean g) (a hook may override decisions)
    blocks.{l}.hook_attn_out     y -> g * y, exact zero where skip: what enters the residual
    (the same for ln2 / mlp)

so `blocks.{l}.hook_attn_out` / `hook_mlp_out` hold the gated branch output and the
residual stream hooks (`hook_resid_pre`, ...) the gated residual. A LoRA adapter runs as the
walk runs it, a per-row delta: hooks on each projection's `hook_in` / `hook_out`
(`attn.q`, `attn.k`, `attn.v`, `attn.o`, `mlp.gate`, `mlp.in`, `mlp.out`) add `s * B(A x)` to
the rows on the adapter — every token in adapter scope 'all'; in 'skipped', the tokens whose
mask says they have skipped a branch (updated at each decision), whose kept branches are also
the only ones the gate scales. Values equal a `gateskip_core` trace of the same call (masked
path; `kv="copy"` is not offered here). Nothing per call is stored on modules: the hooks read the
lens's state of the pass in progress.

Why the gated walk exists twice (here and `gateskip_core/forward/execution.py`): TransformerLens
runs the Hugging Face modules' own forward, where a hook can read or replace an activation but
cannot gather the rows that run a branch, keep the walk's KV cache or skip a projection; so the
gating is expressed again as hooks, and tests keep the two equal (tests/test_lens.py,
test_families.py, test_real_models.py).

`residual_stream_gap` checks that GateSkip's own walk (ungated) reproduces the bridge's
residual stream; `trace_to_cache` / `cache_to_arrays` convert between traces and
hook-name dictionaries.
"""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch

from gateskip_core import BRANCHES, Capture, GatedModel, GateSkipError, SkipArgs, SkipBudget, SkipPlan, Trace
from gateskip_core.skipping.plan import branch_decision

NORM_HOOKS = {"attn": "ln1.hook_out", "mlp": "ln2.hook_out"}
# The bridge's linear components and the projections a LoRA adapter changes.
LORA_HOOKS = {
    "attn.q": "q_proj",
    "attn.k": "k_proj",
    "attn.v": "v_proj",
    "attn.o": "o_proj",
    "mlp.gate": "gate_proj",
    "mlp.in": "up_proj",
    "mlp.out": "down_proj",
}


def gate_hook(layer: int, branch: str) -> str:
    """Hook point of the gate values of (layer, branch): [batch, pos, d] or [batch, pos, 1]."""
    return f"blocks.{layer}.{branch}.hook_gate"


def skip_hook(layer: int, branch: str) -> str:
    """Hook point of the skip decisions of (layer, branch): [batch, pos] bool."""
    return f"blocks.{layer}.{branch}.hook_skip"


def hook_name(layer: int, branch: str) -> str:
    """The hook point of the branch output a GateSkip gate scales (gated, under `GatedLens`)."""
    return f"blocks.{layer}.hook_{branch}_out"


def to_transformer_lens(model: GatedModel):
    """A plain TransformerBridge over a copy of the backbone the gated walk runs, offline (no
    gates; `GatedLens` adds them)."""
    from transformer_lens.model_bridge import TransformerBridge

    backbone = copy.deepcopy(model.backbone)
    backbone.config.architectures = [type(backbone).__name__]
    tokenizer = copy.deepcopy(model.tokenizer)
    # TransformerLens reloads a tokenizer from `name_or_path` unless it already adds BOS;
    # ours are passed token ids that `GatedModel.encode` made (BOS first), so no reload.
    tokenizer.init_kwargs["name_or_path"] = model.name
    tokenizer.init_kwargs["add_bos_token"] = True
    return TransformerBridge.boot_transformers(model.name, hf_model=backbone, tokenizer=tokenizer)


@dataclass
class _CallState:
    """One forward pass's gate values and decisions, keyed (layer, branch); the hooks read it."""

    plan: SkipPlan
    positions: torch.Tensor  # [B, T]
    eligible: torch.Tensor  # [B, T]
    gate: dict = field(default_factory=dict)
    skip: dict = field(default_factory=dict)
    inputs: dict = field(default_factory=dict)  # the branch inputs, for stand-ins of skipped branches
    adapted: torch.Tensor | None = None  # [B, T] scope 'skipped': the token has skipped a branch so far
    projection_inputs: dict = field(default_factory=dict)  # (layer, projection) -> its input, for the delta
    last_branch: int = -1  # 2 * layer + branch of the latest decision: a smaller one starts a new pass


SKIP_ARG_NAMES = frozenset(SkipArgs.__annotations__)
UNGATED = (
    "this TransformerBridge belongs to a GatedLens and runs gated only: call it inside `with lens.hooks(...)`, "
    "or use lens.run_with_cache / lens.run_with_hooks / lens(...)"
)


class GatedLens:
    """`model` (gates, adapter, skip settings per call) as a TransformerLens bridge, in its terms:
    `hooks()`, `run_with_hooks`, `run_with_cache`, `add_hook`, `reset_hooks`, `hook_dict`.

    The gating is installed on `bridge` as permanent hooks that run only while a lens call (or a
    `with lens.hooks(...)` block) has set the skip settings; a bridge call outside them is refused,
    so the bridge never runs ungated without a word. `reset_hooks` keeps the gating; the bridge's
    own `reset_hooks(including_permanent=True)` removes it, and the next lens call says so."""

    def __init__(self, model: GatedModel):
        self.model = model
        self.bridge = to_transformer_lens(model)
        self.n_layers = model.spec.n_layers
        self._plan: SkipPlan | None = None  # the settings of the lens call in progress
        self._pass: _CallState | None = None
        self._add_hook_points()
        for name, hook in self._gating_hooks():
            self.bridge.add_perma_hook(name, hook)

    def _add_hook_points(self) -> None:
        from transformer_lens.hook_points import HookPoint

        for layer in range(self.n_layers):
            block = self.bridge.blocks[layer]
            for branch in BRANCHES:
                component = getattr(block, branch)
                for name, attr in ((gate_hook(layer, branch), "hook_gate"), (skip_hook(layer, branch), "hook_skip")):
                    point = HookPoint()
                    setattr(component, attr, point)  # registers it with the component under `attr`
                    point.name = name
                    # TransformerBridge 4.3 fills its registry only when it scans its components (in
                    # __init__ and enable_compatibility_mode); there is no public way to add a point later.
                    self.bridge._hook_registry[name] = point

    def hook_names(self) -> list[str]:
        """The hook points this lens adds (gates and decisions), layer by layer."""
        return [
            f(layer, branch) for layer in range(self.n_layers) for branch in BRANCHES for f in (gate_hook, skip_hook)
        ]

    @property
    def hook_dict(self) -> dict:
        """Every hook point by name (TransformerLens' `hook_dict`), the gate and skip points included."""
        return self.bridge.hook_dict

    # ---- inputs
    def tokens(self, text_or_ids: str | Sequence[str] | torch.Tensor, chat: bool = False) -> torch.Tensor:
        """Token ids [B, T] (BOS first) of one text, equal-length texts, or ids as given."""
        if isinstance(text_or_ids, torch.Tensor):
            ids = text_or_ids if text_or_ids.ndim == 2 else text_or_ids[None]
            if ids.dtype != torch.long or ids.numel() == 0:
                raise GateSkipError("token ids must be a non-empty tensor of whole numbers [batch, pos]")
            return ids.to(self.model.device)
        batch = self.model.encode(text_or_ids, chat=chat)
        if not bool(batch.attention_mask.all()):
            raise GateSkipError("the lens runs texts of equal token length only (no padding); pass them one by one")
        return batch.input_ids.to(self.model.device)

    # ---- TransformerLens' calls, gated
    @contextlib.contextmanager
    def hooks(
        self, fwd_hooks=(), bwd_hooks=(), reset_hooks_end: bool = True, clear_contexts: bool = False, **skip_args
    ) -> Iterator[GatedLens]:
        """TransformerLens' `hooks()` context with the skip settings of `GatedModel.trace`
        (`skip`, `policy`, ...): inside it every bridge call is gated with them."""
        # A call inside a `hooks(...)` block without settings of its own runs with the block's.
        plan = self._plan_of(skip_args) if skip_args or self._plan is None else self._plan
        outer, self._plan, self._pass = self._plan, plan, None
        try:
            with self.bridge.hooks(list(fwd_hooks), list(bwd_hooks), reset_hooks_end, clear_contexts):
                yield self
        finally:
            self._plan, self._pass = outer, None

    def run_with_cache(self, text_or_ids, chat: bool = False, **kwargs):
        """(logits, ActivationCache) of the gated call, with the gate and skip hook points; other
        keyword arguments (`names_filter`, ...) go to the bridge's `run_with_cache`."""
        skip_args, bridge_args = self._split(kwargs)
        ids = self.tokens(text_or_ids, chat)
        with torch.no_grad(), self.hooks(**skip_args):
            return self._checked(self.bridge.run_with_cache(ids, **bridge_args))

    def run_with_hooks(self, text_or_ids, fwd_hooks=(), bwd_hooks=(), chat: bool = False, **kwargs):
        """The gated call with `fwd_hooks` [(name, fn)]: a hook on `hook_skip` returning a changed
        mask overrides those decisions, one on `hook_gate` the gate values; other keyword arguments
        (`return_type`, ...) go to the bridge's `run_with_hooks`. Without `bwd_hooks`, no gradients."""
        skip_args, bridge_args = self._split(kwargs)
        ids = self.tokens(text_or_ids, chat)
        with torch.set_grad_enabled(bool(bwd_hooks)), self.hooks(**skip_args):
            out = self.bridge.run_with_hooks(ids, fwd_hooks=list(fwd_hooks), bwd_hooks=list(bwd_hooks), **bridge_args)
            return self._checked(out)

    def __call__(self, text_or_ids, chat: bool = False, **kwargs):
        """The gated call's logits (or what `return_type` asks the bridge for)."""
        return self.run_with_hooks(text_or_ids, chat=chat, **kwargs)

    def add_hook(self, name, hook_fn, dir: str = "fwd", is_permanent: bool = False) -> None:
        """TransformerLens' `add_hook`: the hook stays on the bridge (until `reset_hooks`) and runs in
        every gated call."""
        self.bridge.add_hook(name, hook_fn, dir=dir, is_permanent=is_permanent)

    def reset_hooks(self, clear_contexts: bool = True, direction: str = "both", including_permanent: bool = False):
        """TransformerLens' `reset_hooks`, keeping the gating: `including_permanent` removes the
        user's permanent hooks and installs the gating again."""
        self.bridge.reset_hooks(clear_contexts, direction, including_permanent=including_permanent)
        if including_permanent:
            for name, hook in self._gating_hooks():
                self.bridge.add_perma_hook(name, hook)

    def _split(self, kwargs: dict) -> tuple[dict, dict]:
        """(skip settings, the bridge's own keyword arguments) of a call."""
        skip_args = {k: v for k, v in kwargs.items() if k in SKIP_ARG_NAMES}
        return skip_args, {k: v for k, v in kwargs.items() if k not in SKIP_ARG_NAMES}

    def _plan_of(self, skip_args: dict) -> SkipPlan:
        plan = self.model.make_plan(**skip_args)
        if plan.kv != "compute":
            raise GateSkipError("the lens computes every token's keys/values (kv='compute'); kv='copy' is not offered")
        return plan

    def _checked(self, out):
        """`out`, once the gating ran in this call (the bridge's permanent hooks may have been reset)."""
        if self._pass is None:
            raise GateSkipError(
                "the bridge ran without the lens's gating (its permanent hooks were removed: "
                "bridge.reset_hooks(including_permanent=True)); use lens.reset_hooks, or build a new GatedLens"
            )
        return out

    # ---- the gating, as permanent hooks over the call in progress
    def _gating_hooks(self) -> list[tuple[str, Callable]]:
        hooks = []
        for layer in range(self.n_layers):
            for branch in BRANCHES:
                hooks.append((self._input_hook(layer, branch), self._decide(layer, branch)))
                hooks.append((hook_name(layer, branch), self._scale(layer, branch)))
            if self.model.lora is not None:
                for hook, projection in LORA_HOOKS.items():
                    if projection not in self.model.lora.targets:  # e.g. no gate projection (GPT-2)
                        continue
                    if f"blocks.{layer}.{hook}.hook_in" not in self.bridge.hook_dict:
                        raise GateSkipError(
                            f"TransformerLens has no hook point for this family's {projection} "
                            f"(blocks.{layer}.{hook}), so the lens cannot add the gates' LoRA adapter to it"
                        )
                    hooks.append((f"blocks.{layer}.{hook}.hook_in", self._keep_input(layer, projection)))
                    hooks.append((f"blocks.{layer}.{hook}.hook_out", self._add_delta(layer, projection)))
        return hooks

    def _state_for(self, x: torch.Tensor, layer: int, branch: str) -> _CallState:
        """The pass in progress, or a new one when this decision comes no later than the last one."""
        if self._plan is None:
            raise GateSkipError(UNGATED)
        order = 2 * layer + BRANCHES.index(branch)
        state = self._pass
        if state is None or order <= state.last_branch or state.positions.shape != x.shape[:2]:
            B, T = x.shape[:2]
            positions = torch.arange(T, device=x.device).expand(B, T)
            state = _CallState(self._plan, positions, ~((positions == 0) & self._plan.protect_bos))
            if self._plan.adapter_scope == "skipped":
                state.adapted = torch.zeros(B, T, dtype=torch.bool, device=x.device)
            self._pass = state
        state.last_branch = order
        return state

    def _input_hook(self, layer: int, branch: str) -> str:
        """The hook point holding a branch's input (what its gate reads): the pre-branch norm's
        output, or the residual stream itself for families without one (OLMo-2)."""
        name = f"blocks.{layer}.{NORM_HOOKS[branch]}"
        if name in self.bridge.hook_dict:
            return name
        return f"blocks.{layer}.{'hook_resid_pre' if branch == 'attn' else 'hook_resid_mid'}"

    def _keep_input(self, layer: int, projection: str):
        def keep(x: torch.Tensor, hook) -> torch.Tensor:
            self._pass.projection_inputs[layer, projection] = x
            return x

        return keep

    def _add_delta(self, layer: int, projection: str):
        lora = self.model.lora

        def add(y: torch.Tensor, hook) -> torch.Tensor:
            state = self._pass
            x = state.projection_inputs.pop((layer, projection))
            # Inputs and outputs may carry heads split out ([B, T, H, hd]): one row per token.
            rows = x.reshape(y.shape[0] * y.shape[1], -1)
            delta = lora.delta(layer, projection, rows).view(*y.shape).to(y.dtype)
            if state.adapted is None:
                return y + delta
            return y + torch.where(state.adapted.view(*state.adapted.shape, *[1] * (y.ndim - 2)), delta, 0.0)

        return add

    def _decide(self, layer: int, branch: str):
        block = getattr(self.bridge.blocks[layer], branch)
        gates = self.model.gates

        def decide(x: torch.Tensor, hook) -> torch.Tensor:
            state = self._state_for(x, layer, branch)
            g = block.hook_gate(gates.gate(layer, branch)(x)) if gates is not None else None
            mean = g.mean(-1).float() if g is not None else torch.ones(x.shape[:2], device=x.device)
            skip, _ = branch_decision(state.plan, layer, branch, mean, state.eligible, state.positions)
            state.gate[layer, branch] = g
            state.skip[layer, branch] = block.hook_skip(skip)
            state.inputs[layer, branch] = x
            if state.adapted is not None:  # on the adapter from the first skip on (this one included)
                state.adapted = state.adapted | state.skip[layer, branch].to(state.adapted.device)
            return x

        return decide

    def _scale(self, layer: int, branch: str):
        fill = self.model.fill.fill(layer, branch) if self.model.fill is not None else None

        def scale(y: torch.Tensor, hook) -> torch.Tensor:
            state = self._pass
            g, skip = state.gate[layer, branch], state.skip[layer, branch]
            if g is not None:  # scope 'skipped': only tokens on the adapter are scaled
                scaled = g.to(y.dtype) * y
                y = scaled if state.adapted is None else torch.where(state.adapted[..., None], scaled, y)
            stand_in = torch.zeros_like(y) if fill is None else fill(state.inputs[layer, branch]).to(y.dtype)
            return torch.where(skip[..., None].to(y.device), stand_in, y)

        return scale


def residual_stream_gap(model: GatedModel, text: str, bridge=None) -> float:
    """Max |GateSkip residual - TransformerLens hook_resid_pre| over layers and tokens (ungated)."""
    bridge = bridge if bridge is not None else to_transformer_lens(model)
    ids = model.encode([text]).input_ids
    plain = GatedModel(model.backbone, model.tokenizer, model.name)
    out = plain.forward(
        ids,
        torch.ones_like(ids),
        SkipPlan(SkipBudget.make(0.0, model.spec.n_layers), None),
        capture=Capture(hidden_states=True),
    )
    with torch.no_grad():
        _, cache = bridge.run_with_cache(ids)
    gaps = [
        (out.hidden_states[layer] - cache[f"blocks.{layer}.hook_resid_pre"]).abs().max().item()
        for layer in range(model.spec.n_layers)
    ]
    return max(gaps)


# ---- traces <-> hook-name dictionaries
def trace_to_cache(trace: Trace, sequence: int = 0) -> dict[str, torch.Tensor]:
    """One sequence of `trace` as TransformerLens-style {hook name: tensor [1, pos, ...]}:
    `hook_gate` holds the gate vectors when the trace captured them (`gate_vectors=True`),
    else the mean gate as [1, pos, 1] (exact for scalar gates); `hook_skip` the decisions."""
    if not 0 <= sequence < len(trace.sequences):
        raise GateSkipError(f"trace has {len(trace.sequences)} sequences; no sequence {sequence}")
    seq = trace.sequences[sequence]
    cache = {}
    for layer in range(trace.n_layers):
        for b, branch in enumerate(BRANCHES):
            if seq.gate_vectors is not None:
                gate = seq.gate_vectors[:, layer, b, :]
            else:
                gate = seq.gate[:, layer, b, None]
            cache[gate_hook(layer, branch)] = torch.from_numpy(np.ascontiguousarray(gate, dtype=np.float32))[None]
            cache[skip_hook(layer, branch)] = torch.from_numpy(seq.skipped[:, layer, b].copy())[None]
    return cache


def cache_to_arrays(cache, n_layers: int, batch_index: int = 0) -> dict[str, np.ndarray]:
    """The trace fields a cache holds, for one batch row: `gate` [T, L, 2] (mean gate),
    `skipped` [T, L, 2] and, when the hooks carry vectors, `gate_vectors` [T, L, 2, d]."""
    missing = [gate_hook(layer, b) for layer in range(n_layers) for b in BRANCHES if gate_hook(layer, b) not in cache]
    if missing:
        raise GateSkipError(f"cache lacks the gate hook points (first missing: {missing[0]}); run it through GatedLens")
    gates = [[cache[gate_hook(layer, b)][batch_index].float() for b in BRANCHES] for layer in range(n_layers)]
    skips = [[cache[skip_hook(layer, b)][batch_index].bool() for b in BRANCHES] for layer in range(n_layers)]
    out = {
        "gate": torch.stack([torch.stack([g.mean(-1) for g in row], -1) for row in gates], 1).numpy(),
        "skipped": torch.stack([torch.stack(row, -1) for row in skips], 1).numpy(),
    }
    if gates[0][0].shape[-1] > 1:
        out["gate_vectors"] = torch.stack([torch.stack(row, 1) for row in gates], 1).numpy()
    return out
