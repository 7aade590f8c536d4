"""Attention kernels of the walk: rotary embeddings, query/key/value projections, masks, attention.

Pure functions of their tensors (no per-call state): the walk (`execution.py`) calls them on every
token or on the packed rows that run a branch.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from gateskip_core.backbone.architecture import ArchSpec, LayerParts


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def _rope(x: torch.Tensor, cos: torch.Tensor | None, sin: torch.Tensor | None) -> torch.Tensor:
    """Rotary embedding of the first cos.shape[-1] dimensions (all, or a part: partial rotary);
    nothing for a model without rotary embeddings (cos None)."""
    if cos is None:
        return x
    rotary = cos.shape[-1]
    if rotary == x.shape[-1]:
        return x * cos + _rotate_half(x) * sin
    x_rot, x_pass = x[..., :rotary], x[..., rotary:]
    return torch.cat([x_rot * cos + _rotate_half(x_rot) * sin, x_pass], dim=-1)


def project_q(parts: LayerParts, spec: ArchSpec, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, adapter):
    """x [N, d], cos/sin [N, hd] -> rotated queries [N, H, hd]; `adapter`: `AdapterRows` of the N rows."""
    q = adapter.linear("q_proj", parts.q_proj, x)
    if parts.q_norm is not None and not parts.qk_norm_per_head:
        q = parts.q_norm(q)
    q = q.view(x.shape[0], spec.n_heads, spec.head_dim)
    if parts.q_norm is not None and parts.qk_norm_per_head:
        q = parts.q_norm(q)
    return _rope(q, _heads(cos), _heads(sin))


def project_kv(parts: LayerParts, spec: ArchSpec, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, adapter):
    """x [N, d] -> rotated keys and values [N, H_kv, hd]; `adapter`: `AdapterRows` of the N rows."""
    k = adapter.linear("k_proj", parts.k_proj, x)
    if parts.k_norm is not None and not parts.qk_norm_per_head:
        k = parts.k_norm(k)
    k = k.view(x.shape[0], spec.n_kv_heads, spec.head_dim)
    v = adapter.linear("v_proj", parts.v_proj, x).view(x.shape[0], spec.n_kv_heads, spec.head_dim)
    if parts.k_norm is not None and parts.qk_norm_per_head:
        k = parts.k_norm(k)
    return _rope(k, _heads(cos), _heads(sin)), v


def _heads(t: torch.Tensor | None) -> torch.Tensor | None:
    return None if t is None else t[:, None]


def flat_positions(t: torch.Tensor | None, n: int) -> torch.Tensor | None:
    """[B, T, hd] -> [B*T, hd] (None passes: no rotary)."""
    return None if t is None else t.reshape(n, -1)


def attention_mask(q_slots, q_valid, slot_real, sliding_window: int | None) -> torch.Tensor | None:
    """[B, 1, Q, S] bool: causal (optionally sliding-window) keys each query may see; None when
    every query sees every key (one decoding step over a full cache: the fast kernel path).

    q_slots [B, Q] slot of each query; q_valid [B, Q] real queries (padding rows are discarded
    later; None: every query is real); slot_real [B, S]."""
    k_slots = torch.arange(slot_real.shape[1], device=q_slots.device)
    allowed = (k_slots[None, None, :] <= q_slots[:, :, None]) & slot_real[:, None, :]
    if sliding_window is not None:
        allowed &= k_slots[None, None, :] > q_slots[:, :, None] - sliding_window
    if q_valid is not None:
        # A padding query would have no key at all (NaN softmax); let it see its own slot.
        own = k_slots[None, None, :] == q_slots[:, :, None]
        allowed = torch.where(q_valid[:, :, None], allowed, own)
    return None if bool(allowed.all()) else allowed[:, None]


def attend(spec: ArchSpec, q, keys, values, mask) -> torch.Tensor:
    """Attention of q [B, H, Q, hd] over keys/values [B, H_kv, S, hd] under `mask`: [B, Q, H*hd]."""
    if spec.attn_logit_softcap is not None:  # Gemma-2: soft-capped scores, written out
        group = spec.n_heads // spec.n_kv_heads
        keys, values = keys.repeat_interleave(group, dim=1), values.repeat_interleave(group, dim=1)
        scores = torch.matmul(q, keys.transpose(2, 3)) * spec.attn_scale
        scores = torch.tanh(scores / spec.attn_logit_softcap) * spec.attn_logit_softcap
        if mask is not None:
            scores = scores.masked_fill(~mask, float("-inf"))
        out = torch.matmul(torch.softmax(scores, dim=-1, dtype=torch.float32).to(q.dtype), values)
    else:
        out = F.scaled_dot_product_attention(q, keys, values, attn_mask=mask, scale=spec.attn_scale, enable_gqa=True)
    return out.transpose(1, 2).reshape(q.shape[0], q.shape[2], -1)
