"""Explicit per-architecture access to a Hugging Face decoder's pieces.

GateSkip never calls a Hugging Face decoder layer's `forward`: the gated
execution (`execution.py`) walks the layers itself, so that it can gate each
branch, skip tokens and manage its own KV cache. This module names, for each
supported architecture, the modules that walk needs:

    h -> attn_norm -> [q, k, v projections, (q/k norm), rope, attention, o_proj,
         (post-attention norm)] -> h + g_attn * branch
      -> mlp_norm  -> [mlp, (post-mlp norm)] -> h + g_mlp * branch

Supported (`FAMILIES`): Llama (SmolLM2), Mistral, Qwen2 / Qwen2.5, Qwen3, Phi-3, OLMo-2, Gemma-2,
Gemma-3 text models, GPT-2 and GPT-NeoX (Pythia).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from gateskip_core.errors import GateSkipError


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
class LayerNorm:
    """A LayerNorm module (GPT-2, GPT-NeoX): centred and scaled, with a bias. Not linear in its
    input, so gate attribution (which holds a norm's scale) does not apply to these families."""

    module: nn.Module

    def scale(self, x: torch.Tensor) -> torch.Tensor:
        raise GateSkipError("gate attribution needs RMSNorm models; this family uses LayerNorm (with a bias)")

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return self.module(x)


@dataclass(frozen=True)
class NoNorm:
    """A branch that reads the residual stream as it is (OLMo-2 normalises branch outputs instead)."""

    def scale(self, x: torch.Tensor) -> torch.Tensor:
        return torch.ones_like(x, dtype=torch.float32)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return x


@dataclass(frozen=True)
class WeightSlice:
    """Rows [start, end) of a fused projection (Phi-3's qkv_proj, gate_up_proj) as a linear layer of
    its own: `weight` and `bias` are views of the fused module's, no copy."""

    module: nn.Linear
    start: int
    end: int

    @property
    def weight(self) -> torch.Tensor:
        return self.module.weight[self.start : self.end]

    @property
    def bias(self) -> torch.Tensor | None:
        return None if self.module.bias is None else self.module.bias[self.start : self.end]

    @property
    def in_features(self) -> int:
        return self.module.in_features

    @property
    def out_features(self) -> int:
        return self.end - self.start


@dataclass(frozen=True)
class ConvSlice:
    """Columns [start, end) of a GPT-2 `Conv1D` (weight [in, out]: x @ W + b) as a linear layer:
    `weight` is a transposed view, no copy."""

    module: nn.Module
    start: int
    end: int

    @property
    def weight(self) -> torch.Tensor:
        return self.module.weight[:, self.start : self.end].t()

    @property
    def bias(self) -> torch.Tensor:
        return self.module.bias[self.start : self.end]

    @property
    def in_features(self) -> int:
        return self.module.weight.shape[0]

    @property
    def out_features(self) -> int:
        return self.end - self.start


@dataclass(frozen=True)
class HeadInterleavedSlice:
    """Part `part` (0 q, 1 k, 2 v) of GPT-NeoX's fused `query_key_value`, whose rows interleave
    per head ([H, 3, hd]): not a contiguous block of rows, so it is kept as a [H, hd, d] view and
    applied with one batched matmul (`project`), no copy of the weights."""

    module: nn.Linear
    part: int
    n_heads: int
    head_dim: int

    @property
    def weight(self) -> torch.Tensor:  # [H, hd, d]
        return self.module.weight.view(self.n_heads, 3, self.head_dim, -1)[:, self.part]

    @property
    def in_features(self) -> int:
        return self.module.in_features

    @property
    def out_features(self) -> int:
        return self.n_heads * self.head_dim

    def project(self, x: torch.Tensor) -> torch.Tensor:
        """x [N, d] -> [N, H * hd]."""
        y = torch.einsum("nd,hkd->nhk", x, self.weight).reshape(x.shape[0], -1)
        bias = self.module.bias
        return y if bias is None else y + bias.view(self.n_heads, 3, self.head_dim)[:, self.part].reshape(-1)


@dataclass(frozen=True)
class LayerParts:
    """The modules of one decoder layer, in execution order."""

    attn_norm: RMSNorm | LayerNorm | NoNorm
    q_proj: nn.Linear | WeightSlice | ConvSlice | HeadInterleavedSlice
    k_proj: nn.Linear | WeightSlice | ConvSlice | HeadInterleavedSlice
    v_proj: nn.Linear | WeightSlice | ConvSlice | HeadInterleavedSlice
    o_proj: nn.Linear | ConvSlice
    q_norm: RMSNorm | None
    k_norm: RMSNorm | None
    attn_post_norm: RMSNorm | None
    mlp_norm: RMSNorm | LayerNorm | NoNorm
    mlp: nn.Module  # the whole MLP module; the walk calls its projections itself (LoRA deltas per row)
    gate_proj: nn.Linear | WeightSlice | None  # None: not gated, down(act(up(x))) (GPT-2, GPT-NeoX)
    up_proj: nn.Linear | WeightSlice | ConvSlice
    down_proj: nn.Linear | ConvSlice
    mlp_act: nn.Module  # down(act(gate(x)) * up(x))
    mlp_post_norm: RMSNorm | None
    rope_kind: str | None  # Gemma-3: "sliding_attention" or "full_attention"
    sliding_window: int | None
    qk_norm_per_head: bool = True  # OLMo-2 normalises the whole q and k projection instead
    parallel_residual: bool = False  # GPT-NeoX: the MLP reads the residual from before the attention


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
    attn_logit_softcap: float | None  # Gemma-2: scores -> cap * tanh(scores / cap) before the softmax
    layers: tuple[LayerParts, ...]
    embed: nn.Module
    final_norm: RMSNorm
    lm_head: nn.Linear
    rotary: nn.Module | None  # None: learned absolute positions (`position_embed`)
    position_embed: nn.Module | None = None  # GPT-2: added to the token embedding
    mlp_projections: int = 3  # gated MLPs have three matrices, GPT-2 / GPT-NeoX two

    def fingerprint(self) -> dict[str, int | str]:
        """What a gate checkpoint must match to be loaded into this model."""
        return {
            "model_type": self.model_type,
            "n_layers": self.n_layers,
            "d_model": self.d_model,
            "vocab_size": self.vocab_size,
        }

    def rope_for(self, kind: str | None, x: torch.Tensor, positions: torch.Tensor):
        """cos, sin for `positions` [B, T] of the layers with rope `kind` (Gemma-3 uses two rope
        bases); (None, None) for a model without rotary embeddings."""
        if self.rotary is None:
            return None, None
        if kind is None:
            return self.rotary(x, positions)
        return self.rotary(x, positions, kind)

    def logits(self, h: torch.Tensor) -> torch.Tensor:
        """Final norm, LM head and (Gemma-2/3) logit soft-capping of residual stream `h`."""
        logits = self.lm_head(self.final_norm(h))
        if self.final_logit_softcap is not None:
            logits = torch.tanh(logits / self.final_logit_softcap) * self.final_logit_softcap
        return logits


def _norm(module: nn.Module, plus_one: bool = False) -> RMSNorm:
    """A family's RMSNorm module (its epsilon is `variance_epsilon` or `eps`)."""
    eps = getattr(module, "variance_epsilon", None)
    return RMSNorm(module, plus_one=plus_one, eps=module.eps if eps is None else eps)


def _llama_family_layer(config, layer: nn.Module, i: int, model_type: str) -> LayerParts:
    """Llama and its close relatives: pre-norms, q/k/v/o and gate/up/down projections, rotary.

    - `mistral`: sliding-window attention in every layer (`config.sliding_window`, or none);
    - `qwen2`: biases on q/k/v (`nn.Linear` carries them); sliding windows per `layer_types`;
    - `qwen3`: as qwen2, plus an RMSNorm on q and k per head before rotary.
    """
    attn = layer.self_attn
    if model_type == "mistral":
        window = getattr(config, "sliding_window", None)
    else:  # llama: none; qwen2/qwen3: the layer's own (None on full-attention layers)
        window = getattr(attn, "sliding_window", None)
    qk_norm = model_type == "qwen3"
    return LayerParts(
        attn_norm=_norm(layer.input_layernorm),
        q_proj=attn.q_proj,
        k_proj=attn.k_proj,
        v_proj=attn.v_proj,
        o_proj=attn.o_proj,
        q_norm=_norm(attn.q_norm) if qk_norm else None,
        k_norm=_norm(attn.k_norm) if qk_norm else None,
        attn_post_norm=None,
        mlp_norm=_norm(layer.post_attention_layernorm),  # Llama's name for the MLP's input norm
        mlp=layer.mlp,
        gate_proj=layer.mlp.gate_proj,
        up_proj=layer.mlp.up_proj,
        down_proj=layer.mlp.down_proj,
        mlp_act=layer.mlp.act_fn,
        mlp_post_norm=None,
        rope_kind=None,
        sliding_window=window,
    )


def _gemma3_layer(config, layer: nn.Module, i: int, model_type: str) -> LayerParts:
    """Gemma-3 text: (1 + w) RMSNorms, q/k norms per head, norms before *and* after each branch,
    sliding and global layers with their own rotary bases. Gemma-2 (`_gemma2_layer`) is the same
    without q/k norms and with one rotary base (and soft-capped attention scores, in `ArchSpec`)."""
    attn = layer.self_attn
    rope_kind = config.layer_types[i]
    gemma2 = model_type == "gemma2"
    return LayerParts(
        attn_norm=_norm(layer.input_layernorm, plus_one=True),
        q_proj=attn.q_proj,
        k_proj=attn.k_proj,
        v_proj=attn.v_proj,
        o_proj=attn.o_proj,
        q_norm=None if gemma2 else _norm(attn.q_norm, plus_one=True),
        k_norm=None if gemma2 else _norm(attn.k_norm, plus_one=True),
        attn_post_norm=_norm(layer.post_attention_layernorm, plus_one=True),
        mlp_norm=_norm(layer.pre_feedforward_layernorm, plus_one=True),
        mlp=layer.mlp,
        gate_proj=layer.mlp.gate_proj,
        up_proj=layer.mlp.up_proj,
        down_proj=layer.mlp.down_proj,
        mlp_act=layer.mlp.act_fn,
        mlp_post_norm=_norm(layer.post_feedforward_layernorm, plus_one=True),
        rope_kind=None if gemma2 else rope_kind,
        sliding_window=config.sliding_window if rope_kind == "sliding_attention" else None,
    )


def _phi3_layer(config, layer: nn.Module, i: int, model_type: str) -> LayerParts:
    """Phi-3: Llama's layout with fused `qkv_proj` and `gate_up_proj` (split here into views of the
    fused weights, no copy) and, in some configs, partial rotary and sliding windows."""
    attn, mlp = layer.self_attn, layer.mlp
    q_out = config.num_attention_heads * attn.head_dim
    kv_out = config.num_key_value_heads * attn.head_dim
    return LayerParts(
        attn_norm=_norm(layer.input_layernorm),
        q_proj=WeightSlice(attn.qkv_proj, 0, q_out),
        k_proj=WeightSlice(attn.qkv_proj, q_out, q_out + kv_out),
        v_proj=WeightSlice(attn.qkv_proj, q_out + kv_out, q_out + 2 * kv_out),
        o_proj=attn.o_proj,
        q_norm=None,
        k_norm=None,
        attn_post_norm=None,
        mlp_norm=_norm(layer.post_attention_layernorm),
        mlp=mlp,
        gate_proj=WeightSlice(mlp.gate_up_proj, 0, config.intermediate_size),  # gate first, then up
        up_proj=WeightSlice(mlp.gate_up_proj, config.intermediate_size, 2 * config.intermediate_size),
        down_proj=mlp.down_proj,
        mlp_act=mlp.activation_fn,
        mlp_post_norm=None,
        rope_kind=None,
        sliding_window=getattr(config, "sliding_window", None),
    )


def _olmo2_layer(config, layer: nn.Module, i: int, model_type: str) -> LayerParts:
    """OLMo-2: no norm before a branch (the gate and the branch read the residual as it is); an
    RMSNorm after each branch output; q and k normalised over the whole projection."""
    attn = layer.self_attn
    return LayerParts(
        attn_norm=NoNorm(),
        q_proj=attn.q_proj,
        k_proj=attn.k_proj,
        v_proj=attn.v_proj,
        o_proj=attn.o_proj,
        q_norm=_norm(attn.q_norm),
        k_norm=_norm(attn.k_norm),
        attn_post_norm=_norm(layer.post_attention_layernorm),
        mlp_norm=NoNorm(),
        mlp=layer.mlp,
        gate_proj=layer.mlp.gate_proj,
        up_proj=layer.mlp.up_proj,
        down_proj=layer.mlp.down_proj,
        mlp_act=layer.mlp.act_fn,
        mlp_post_norm=_norm(layer.post_feedforward_layernorm),
        rope_kind=None,
        sliding_window=None,
        qk_norm_per_head=False,
    )


def _gpt2_layer(config, layer: nn.Module, i: int, model_type: str) -> LayerParts:
    """GPT-2: LayerNorms with biases, fused `c_attn` and `Conv1D` projections (split into transposed
    views), a GELU MLP without gate; positions are learned embeddings (no rotary)."""
    attn, mlp, d = layer.attn, layer.mlp, config.hidden_size
    return LayerParts(
        attn_norm=LayerNorm(layer.ln_1),
        q_proj=ConvSlice(attn.c_attn, 0, d),
        k_proj=ConvSlice(attn.c_attn, d, 2 * d),
        v_proj=ConvSlice(attn.c_attn, 2 * d, 3 * d),
        o_proj=ConvSlice(attn.c_proj, 0, d),
        q_norm=None,
        k_norm=None,
        attn_post_norm=None,
        mlp_norm=LayerNorm(layer.ln_2),
        mlp=mlp,
        gate_proj=None,
        up_proj=ConvSlice(mlp.c_fc, 0, mlp.c_fc.weight.shape[1]),
        down_proj=ConvSlice(mlp.c_proj, 0, d),
        mlp_act=mlp.act,
        mlp_post_norm=None,
        rope_kind=None,
        sliding_window=None,
    )


def _gpt_neox_layer(config, layer: nn.Module, i: int, model_type: str) -> LayerParts:
    """GPT-NeoX (Pythia): LayerNorms, fused per-head-interleaved `query_key_value`, partial rotary,
    a GELU MLP without gate, and (usually) the parallel residual: attention and MLP both read the
    residual entering the layer, and both gates read it too."""
    attn, mlp = layer.attention, layer.mlp
    heads, head_dim = config.num_attention_heads, config.hidden_size // config.num_attention_heads
    return LayerParts(
        attn_norm=LayerNorm(layer.input_layernorm),
        q_proj=HeadInterleavedSlice(attn.query_key_value, 0, heads, head_dim),
        k_proj=HeadInterleavedSlice(attn.query_key_value, 1, heads, head_dim),
        v_proj=HeadInterleavedSlice(attn.query_key_value, 2, heads, head_dim),
        o_proj=attn.dense,
        q_norm=None,
        k_norm=None,
        attn_post_norm=None,
        mlp_norm=LayerNorm(layer.post_attention_layernorm),
        mlp=mlp,
        gate_proj=None,
        up_proj=mlp.dense_h_to_4h,
        down_proj=mlp.dense_4h_to_h,
        mlp_act=mlp.act,
        mlp_post_norm=None,
        rope_kind=None,
        sliding_window=None,
        parallel_residual=bool(config.use_parallel_residual),
    )


# One entry per supported family (Hugging Face `model_type`): how to describe one decoder layer.
# To add a family, write its layer function (the modules the walk needs, in execution order).
FAMILIES = {
    "llama": _llama_family_layer,
    "mistral": _llama_family_layer,
    "qwen2": _llama_family_layer,
    "qwen3": _llama_family_layer,
    "gemma3_text": _gemma3_layer,
    "gemma2": _gemma3_layer,
    "phi3": _phi3_layer,
    "olmo2": _olmo2_layer,
    "gpt2": _gpt2_layer,
    "gpt_neox": _gpt_neox_layer,
}
SUPPORTED_MODEL_TYPES = tuple(FAMILIES)


def check_model_type(model_type: str) -> str:
    """`model_type` if the walk supports it, else one line naming the supported families (the one
    check both a checkpoint's config.json, before loading, and a loaded model go through)."""
    if model_type == "gemma3":  # multimodal wrapper config; we only run the text stack
        raise GateSkipError(
            "Gemma-3 multimodal checkpoints are not supported; use a text-only (gemma3_text) model "
            f"(supported: {', '.join(SUPPORTED_MODEL_TYPES)})"
        )
    if model_type not in FAMILIES:
        raise GateSkipError(f"unsupported architecture {model_type!r}; supported: {', '.join(SUPPORTED_MODEL_TYPES)}")
    return model_type


def arch_spec(hf_model: nn.Module) -> ArchSpec:
    """Describe `hf_model` (a *ForCausalLM) or fail with a clear message."""
    config = hf_model.config
    model_type = check_model_type(getattr(config, "model_type", "?"))
    if model_type == "gpt2":
        return _gpt2_spec(hf_model)
    if model_type == "gpt_neox":
        return _gpt_neox_spec(hf_model)
    base = hf_model.model
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    is_gemma = model_type in ("gemma2", "gemma3_text")
    layers = tuple(FAMILIES[model_type](config, layer, i, model_type) for i, layer in enumerate(base.layers))
    return ArchSpec(
        model_type=model_type,
        n_layers=len(layers),
        d_model=config.hidden_size,
        d_ff=config.intermediate_size,
        n_heads=config.num_attention_heads,
        n_kv_heads=config.num_key_value_heads,
        head_dim=head_dim,
        vocab_size=config.vocab_size,
        attn_scale=config.query_pre_attn_scalar**-0.5 if is_gemma else head_dim**-0.5,
        final_logit_softcap=getattr(config, "final_logit_softcapping", None) if is_gemma else None,
        attn_logit_softcap=getattr(config, "attn_logit_softcapping", None) if model_type == "gemma2" else None,
        layers=layers,
        embed=base.embed_tokens,
        final_norm=_norm(base.norm, plus_one=is_gemma),
        lm_head=hf_model.lm_head,
        rotary=base.rotary_emb,
    )


def _gpt2_spec(hf_model: nn.Module) -> ArchSpec:
    """GPT-2's model-level pieces: `transformer.wte` + `transformer.wpe`, `ln_f`, the tied head."""
    config, base = hf_model.config, hf_model.transformer
    layers = tuple(_gpt2_layer(config, layer, i, "gpt2") for i, layer in enumerate(base.h))
    d, heads = config.hidden_size, config.num_attention_heads
    return ArchSpec(
        model_type="gpt2",
        n_layers=len(layers),
        d_model=d,
        d_ff=config.n_inner or 4 * d,
        n_heads=heads,
        n_kv_heads=heads,
        head_dim=d // heads,
        vocab_size=config.vocab_size,
        attn_scale=(d // heads) ** -0.5 if config.scale_attn_weights else 1.0,
        final_logit_softcap=None,
        attn_logit_softcap=None,
        layers=layers,
        embed=base.wte,
        final_norm=LayerNorm(base.ln_f),
        lm_head=hf_model.lm_head,
        rotary=None,
        position_embed=base.wpe,
        mlp_projections=2,
    )


def _gpt_neox_spec(hf_model: nn.Module) -> ArchSpec:
    """GPT-NeoX's model-level pieces: `gpt_neox.embed_in`, `final_layer_norm`, the head."""
    config, base = hf_model.config, hf_model.gpt_neox
    layers = tuple(_gpt_neox_layer(config, layer, i, "gpt_neox") for i, layer in enumerate(base.layers))
    d, heads = config.hidden_size, config.num_attention_heads
    return ArchSpec(
        model_type="gpt_neox",
        n_layers=len(layers),
        d_model=d,
        d_ff=config.intermediate_size,
        n_heads=heads,
        n_kv_heads=heads,
        head_dim=d // heads,
        vocab_size=config.vocab_size,
        attn_scale=(d // heads) ** -0.5,
        final_logit_softcap=None,
        attn_logit_softcap=None,
        layers=layers,
        embed=base.embed_in,
        final_norm=LayerNorm(base.final_layer_norm),
        lm_head=hf_model.lm_head,
        rotary=base.rotary_emb,
        mlp_projections=2,
    )
