"""Bridge to TransformerLens: the same backbone, with TransformerLens hook points.

`to_transformer_lens(model)` wraps a copy of the loaded Hugging Face backbone in a
TransformerLens 4 `TransformerBridge` (offline), for analyses GateSkip Lens does
not provide itself (activation patching, probes, ...). A copy, because the bridge
replaces the wrapped model's modules in place and the GateSkip model must stay as loaded.

Naming: a GateSkip gate on (layer l, branch attn|mlp) multiplies what TransformerLens
calls `blocks.{l}.hook_attn_out` / `blocks.{l}.hook_mlp_out` before it is added to the
residual stream; the residual before layer l is `blocks.{l}.hook_resid_pre`.
`residual_stream_gap` checks that GateSkip's own layer walk (ungated, nothing
skipped) reproduces TransformerLens's residual stream at every layer.
"""

from __future__ import annotations

import copy

import torch

from gateskip_core import Capture, GatedModel, SkipBudget, SkipPlan
from gateskip_core.registry import REGISTRY


def hook_name(layer: int, branch: str) -> str:
    """The TransformerLens hook point of the branch output a GateSkip gate scales."""
    return f"blocks.{layer}.hook_{branch}_out"


def to_transformer_lens(model: GatedModel):
    """A TransformerBridge over a copy of `model.backbone` (the gates are not part of it)."""
    from transformer_lens.model_bridge import TransformerBridge

    entry = REGISTRY.get(model.name)
    name = str(entry.cache_dir) if entry is not None and entry.build is None else model.name
    backbone = copy.deepcopy(model.backbone)
    return TransformerBridge.boot_transformers(name, hf_model=backbone, tokenizer=model.tokenizer)


def residual_stream_gap(model: GatedModel, text: str, bridge=None) -> float:
    """Max |GateSkip residual - TransformerLens hook_resid_pre| over layers and tokens (ungated)."""
    bridge = bridge if bridge is not None else to_transformer_lens(model)
    ids = model.encode([text]).input_ids
    plain = model.view()
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
