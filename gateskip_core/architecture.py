"""Explicit per-architecture access to a Hugging Face decoder's pieces.

GateSkip never calls a Hugging Face decoder layer's `forward`: the gated
execution (`execution.py`) walks the layers itself, so that it can gate each
branch, skip tokens and manage its own KV cache. This module names, for each
supported architecture, the modules that walk needs:

    h -> attn_norm -> [q, k, v projections, (q/k norm), rope, attention, o_proj,
         (post-attention norm)] -> h + g_attn * branch
      -> mlp_norm  -> [mlp, (post-mlp norm)] -> h + g_mlp * branch

Supported: Llama (SmolLM2) and Gemma-3 text models.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .errors import GateSkipError

SUPPORTED_MODEL_TYPES = ("llama", "gemma3_text")


@dataclass(frozen=True)
class RMSNorm:
    """A decoder's RMSNorm module computed as one fused op (`F.rms_norm`), with the module's own weight.

    Llama scales by `w`, Gemma-3 by `1 + w`. Outside float32 the module itself runs, keeping
    Hugging Face's rounding order exactly; in float32 the two agree to float rounding. During
    decoding a norm is ~10 small ops in Hugging Face's code and one here.
    """

    module: nn.Module
    plus_one: bool  # Gemma-3's (1 + w) scaling
    eps: float

    def scale(self, x: torch.Tensor) -> torch.Tensor:
        """The per-element factor s with `norm(x) = s * x` ([..., d]): the weight over the root mean
        square of `x`. Held fixed, it makes the norm linear (gate attribution)."""
        weight = self.module.weight.float() + (1.0 if self.plus_one else 0.0)
        return weight * torch.rsqrt(x.float().pow(2).mean(-1, keepdim=True) + self.eps)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype != torch.float32:
            return self.module(x)
        weight = self.module.weight  # read per call: full-weight training updates it in place
        return F.rms_norm(x, weight.shape, weight + 1.0 if self.plus_one else weight, self.eps)


@dataclass(frozen=True)
class LayerParts:
    """The modules of one decoder layer, in execution order."""

    attn_norm: RMSNorm
    q_proj: nn.Linear
    k_proj: nn.Linear
    v_proj: nn.Linear
    o_proj: nn.Linear
    q_norm: RMSNorm | None
    k_norm: RMSNorm | None
    attn_post_norm: RMSNorm | None
    mlp_norm: RMSNorm
    mlp: nn.Module  # the whole MLP module; the walk calls its projections itself (LoRA deltas per row)
    gate_proj: nn.Linear
    up_proj: nn.Linear
    down_proj: nn.Linear
    mlp_act: nn.Module  # down(act(gate(x)) * up(x))
    mlp_post_norm: RMSNorm | None
    rope_kind: str | None  # Gemma-3: "sliding_attention" or "full_attention"
    sliding_window: int | None


@dataclass(frozen=True)
class ArchSpec:
    """Shapes and modules of a supported decoder-only model."""

    model_type: str
    n_layers: int
    d_model: int
    d_ff: int
    n_heads: int
    n_kv_heads: int
    head_dim: int
    vocab_size: int
    attn_scale: float
    final_logit_softcap: float | None
    layers: tuple[LayerParts, ...]
    embed: nn.Module
    final_norm: RMSNorm
    lm_head: nn.Linear
    rotary: nn.Module

    def fingerprint(self) -> dict[str, int | str]:
        """What a gate checkpoint must match to be loaded into this model."""
        return {
            "model_type": self.model_type,
            "n_layers": self.n_layers,
            "d_model": self.d_model,
            "vocab_size": self.vocab_size,
        }

    def rope_for(self, kind: str | None, x: torch.Tensor, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """cos, sin for `positions` [B, T] of the layers with rope `kind` (Gemma-3 uses two rope bases)."""
        if kind is None:
            return self.rotary(x, positions)
        return self.rotary(x, positions, kind)

    def logits(self, h: torch.Tensor) -> torch.Tensor:
        """Final norm, LM head and (Gemma-3) logit soft-capping of residual stream `h`."""
        logits = self.lm_head(self.final_norm(h))
        if self.final_logit_softcap is not None:
            logits = torch.tanh(logits / self.final_logit_softcap) * self.final_logit_softcap
        return logits


def arch_spec(hf_model: nn.Module) -> ArchSpec:
    """Describe `hf_model` (a *ForCausalLM) or fail with a clear message."""
    config = hf_model.config
    model_type = getattr(config, "model_type", "?")
    if model_type == "gemma3":  # multimodal wrapper config; we only run the text stack
        raise GateSkipError("Gemma-3 multimodal checkpoints are not supported; use a text-only (gemma3_text) model")
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise GateSkipError(f"unsupported architecture {model_type!r}; supported: {', '.join(SUPPORTED_MODEL_TYPES)}")
    base = hf_model.model
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    is_gemma = model_type == "gemma3_text"

    def norm(module: nn.Module) -> RMSNorm:  # Llama's module names its epsilon variance_epsilon
        return RMSNorm(module, plus_one=is_gemma, eps=module.eps if is_gemma else module.variance_epsilon)

    layers = []
    for i, layer in enumerate(base.layers):
        attn = layer.self_attn
        rope_kind = config.layer_types[i] if is_gemma else None
        window = config.sliding_window if (is_gemma and rope_kind == "sliding_attention") else None
        layers.append(
            LayerParts(
                attn_norm=norm(layer.input_layernorm),
                q_proj=attn.q_proj,
                k_proj=attn.k_proj,
                v_proj=attn.v_proj,
                o_proj=attn.o_proj,
                q_norm=norm(attn.q_norm) if is_gemma else None,
                k_norm=norm(attn.k_norm) if is_gemma else None,
                attn_post_norm=norm(layer.post_attention_layernorm) if is_gemma else None,
                # Llama's "post_attention_layernorm" is the MLP's input norm.
                mlp_norm=norm(layer.pre_feedforward_layernorm if is_gemma else layer.post_attention_layernorm),
                mlp=layer.mlp,
                gate_proj=layer.mlp.gate_proj,
                up_proj=layer.mlp.up_proj,
                down_proj=layer.mlp.down_proj,
                mlp_act=layer.mlp.act_fn,
                mlp_post_norm=norm(layer.post_feedforward_layernorm) if is_gemma else None,
                rope_kind=rope_kind,
                sliding_window=window,
            )
        )
    scale = config.query_pre_attn_scalar**-0.5 if is_gemma else head_dim**-0.5
    return ArchSpec(
        model_type=model_type,
        n_layers=len(layers),
        d_model=config.hidden_size,
        d_ff=config.intermediate_size,
        n_heads=config.num_attention_heads,
        n_kv_heads=config.num_key_value_heads,
        head_dim=head_dim,
        vocab_size=config.vocab_size,
        attn_scale=scale,
        final_logit_softcap=getattr(config, "final_logit_softcapping", None) if is_gemma else None,
        layers=tuple(layers),
        embed=base.embed_tokens,
        final_norm=norm(base.norm),
        lm_head=hf_model.lm_head,
        rotary=base.rotary_emb,
    )
