"""Gate attribution: why is this gate low (or high)?

A gate reads the normalised residual stream, `x = norm(h)`, and the residual entering a branch is
a sum: the token's embedding plus what every earlier branch added (`g * branch(x)` for branches it
ran, nothing or the stand-in for branches it skipped; under adapter scope 'skipped', the unscaled
original output before the token's first skip):

    h = embedding + sum_c delta_c

With the norm's scale held at its value for that token (`norm(h) = s * h`, as direct logit
attribution holds the final norm's scale), `x = sum_c s * delta_c`, and for every linear gate
(vector, low-rank, scalar) the pre-activation `z = G(x) + b` splits exactly into one term per
component plus the bias:

    mean(z) = sum_c mean(G(s * delta_c)) + mean(b)

where mean is over the gate vector (importance is the mean of the gate vector). A term < 0 pushed
the gate down, > 0 up. `gate_attribution` returns the terms for one cell; `gate_attributions`
for every position of one (layer, branch). Both run the model once (masked path) with the skip
settings given, so skipped earlier branches contribute what they really added.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd
import torch

from gateskip_core import BRANCHES, Capture, GatedModel, GateSkipError
from gateskip_core.validation import texts as check_texts


@dataclass(frozen=True)
class GateAttributions:
    """Terms of the gate pre-activation of one (layer, branch) for every position of one text."""

    layer: int
    branch: str
    tokens: list[str]
    components: list[str]  # 'embedding', 'L0.attn', 'L0.mlp', ... (the residual's parts, in order)
    terms: np.ndarray  # [T, n_components]
    bias: float  # mean of the gate's bias: the pre-activation of a zero input
    preactivation: np.ndarray  # [T] mean pre-activation of the gate in the run (not from the terms)
    gate: np.ndarray  # [T] the gate's importance in the run: mean of sigmoid(z)
    skipped: np.ndarray  # [T] the token skipped this branch in the run

    @property
    def residual_error(self) -> float:
        """Largest |sum of terms + bias - pre-activation| over positions (exactness check)."""
        return float(np.abs(self.terms.sum(1) + self.bias - self.preactivation).max())

    def cell(self, position: int) -> pd.DataFrame:
        """One position's terms, largest |term| first (component, term, share of the sum of |terms|),
        with the bias, the pre-activation they sum to, the gate and the token in `attrs`."""
        values = self.terms[position]
        df = pd.DataFrame({"component": self.components, "term": values})
        df["share"] = np.abs(values) / max(float(np.abs(values).sum()), 1e-12)
        df = df.reindex(df["term"].abs().sort_values(ascending=False).index).reset_index(drop=True)
        df.attrs.update(
            bias=self.bias,
            preactivation=float(self.preactivation[position]),
            gate=float(self.gate[position]),
            token=self.tokens[position],
        )
        return df

    def to_dataframe(self) -> pd.DataFrame:
        """Long form: one row per (position, component), plus a 'bias' row per position."""
        T, C = self.terms.shape
        rows = pd.DataFrame(
            {
                "layer": self.layer,
                "branch": self.branch,
                "position": np.repeat(np.arange(T), C + 1),
                "token": np.repeat(self.tokens, C + 1),
                "component": np.tile(self.components + ["bias"], T),
                "term": np.concatenate([self.terms, np.full((T, 1), self.bias)], 1).ravel(),
            }
        )
        rows["preactivation"] = np.repeat(self.preactivation, C + 1)
        return rows


def component_names(layer: int, branch: str) -> list[str]:
    """The residual's parts entering (layer, branch), in the order the walk adds them."""
    names = ["embedding"]
    for earlier in range(layer):
        names += [f"L{earlier}.attn", f"L{earlier}.mlp"]
    if branch == "mlp":
        names.append(f"L{layer}.attn")
    return names


def gate_attributions(
    model: GatedModel, text: str, layer: int, branch: str, max_tokens: int = 512, chat: bool = False, **skip_args
) -> GateAttributions:
    """The terms of the (layer, branch) gate's mean pre-activation at every position of `text`."""
    _check_gate(model, layer, branch)
    batch, plan, out = _attributed_run(model, text, max_tokens, chat, skip_args)
    return _attributions_of(model, batch, out, int(layer), branch)[0]


def _check_gate(model: GatedModel, layer, branch: str) -> None:
    if model.gates is None:
        raise GateSkipError("gate attribution needs gates; load gates first")
    if branch not in BRANCHES:
        raise GateSkipError(f"branch must be 'attn' or 'mlp', got {branch!r}")
    if isinstance(layer, bool) or not isinstance(layer, (int, np.integer)) or not 0 <= layer < model.spec.n_layers:
        raise GateSkipError(f"layer must be a whole number in [0, {model.spec.n_layers - 1}], got {layer!r}")
    if not model.gates.gate(int(layer), branch).is_linear:
        raise GateSkipError("gate attribution needs a linear gate (vector, lowrank, scalar); mlp gates are not")


def _attributed_run(model: GatedModel, text: str, max_tokens: int, chat: bool, skip_args: dict, gate_vectors=False):
    """One masked run of `text` with the skip settings, recording the residual's parts: (batch, plan, out)."""
    (text,) = check_texts(text, "text")
    batch = model.encode([text], chat=chat, max_tokens=max_tokens)
    plan = model.make_plan(**{**skip_args, "path": "masked"})
    capture = Capture(hidden_states=True, branch_io=True, gate_vectors=gate_vectors)
    return batch, plan, model.forward(batch.input_ids, batch.attention_mask, plan, capture=capture)


def _attributions_of(model: GatedModel, batch, out, layer: int, branch: str):
    """(GateAttributions of (layer, branch) in the run `out`, the norm's held scale [T, d], the gate)."""
    gate = model.gates.gate(layer, branch)
    index = 2 * layer + BRANCHES.index(branch)
    parts = [out.hidden_states[0][0]] + [delta[0] for _, delta in out.branch_io[:index]]  # each [T, d]
    residual = torch.stack(parts).sum(0)
    parts_layer = model.spec.layers[layer]
    norm = parts_layer.attn_norm if branch == "attn" else parts_layer.mlp_norm
    scale = norm.scale(residual)  # [T, d]
    with torch.no_grad():
        bias_vector = gate.preactivation(torch.zeros(1, model.spec.d_model, dtype=model.dtype, device=model.device))
        bias = float(bias_vector.float().mean())
        terms = torch.stack(
            [(gate.preactivation((scale * part.float()).to(model.dtype)).float().mean(-1) - bias) for part in parts], 1
        )
        x_run = out.branch_io[index][0][0]  # what the gate read in the run
        preactivation = gate.preactivation(x_run).float().mean(-1)
    result = GateAttributions(
        layer=layer,
        branch=branch,
        tokens=model.token_strings(batch.input_ids[0].tolist()),
        components=component_names(layer, branch),
        terms=terms.cpu().numpy().astype(np.float64),
        bias=bias,
        preactivation=preactivation.cpu().numpy().astype(np.float64),
        gate=out.gate[0, :, layer, BRANCHES.index(branch)].cpu().numpy(),
        skipped=out.skipped[0, :, layer, BRANCHES.index(branch)].cpu().numpy(),
    )
    return result, scale, bias_vector


def gate_attribution(model: GatedModel, text: str, layer: int, branch: str, position: int, **skip_args) -> pd.DataFrame:
    """One cell: the terms of the gate at (position, layer, branch), largest |term| first, with the
    bias, the pre-activation they sum to, the gate and the token in the frame's `attrs`."""
    result = gate_attributions(model, text, layer, branch, **skip_args)
    if (
        isinstance(position, bool)
        or not isinstance(position, (int, np.integer))
        or not 0 <= position < len(result.tokens)
    ):
        raise GateSkipError(f"position must be a whole number in [0, {len(result.tokens) - 1}], got {position!r}")
    return result.cell(int(position))


def attention_sources(
    model: GatedModel,
    text: str,
    layer: int,
    branch: str,
    position: int,
    source_layer: int,
    max_tokens: int = 512,
    chat: bool = False,
    **skip_args,
) -> pd.DataFrame:
    """The term of component `L{source_layer}.attn` in the gate at (position, layer, branch), split by
    the source position whose value vector carried it.

    With the softmax weights of that attention layer, its post-norm's scale (Gemma-3) and the gate
    multiplying its output held at their values in the run, what the layer added at a token is a sum
    over source positions s <= token: weight x value of s, through o_proj, the post-norm and the
    gate. Each source's share of the gate's pre-activation follows as for whole components. One row
    per source (source_position, token, term; largest |term| first); the terms sum to the component's
    term (checked). A token that skipped that attention has one row, source 'stand-in' (the stand-in
    it added instead, or nothing)."""
    _check_gate(model, layer, branch)
    if isinstance(source_layer, bool) or not isinstance(source_layer, (int, np.integer)):
        raise GateSkipError(f"source_layer must be a whole number, got {source_layer!r}")
    earlier = int(layer) + (1 if branch == "mlp" else 0)
    if not 0 <= source_layer < earlier:
        raise GateSkipError(f"L{source_layer}.attn is not an earlier component of layer {layer}'s {branch} gate")
    batch, plan, out = _attributed_run(model, text, max_tokens, chat, skip_args, gate_vectors=True)
    whole, scale, bias_vector = _attributions_of(model, batch, out, int(layer), branch)
    if not 0 <= position < len(whole.tokens):
        raise GateSkipError(f"position must be a whole number in [0, {len(whole.tokens) - 1}], got {position!r}")
    component = whole.components.index(f"L{source_layer}.attn")
    src, t = int(source_layer), int(position)
    x_all, delta_all = out.branch_io[2 * src][0][0], out.branch_io[2 * src][1][0]  # [T, d] input and what was added
    skipped_before = out.skipped[0, :, :src, :].reshape(len(whole.tokens), -1).any(-1)
    if bool(out.skipped[0, t, src, 0]):
        contributions = delta_all[t][None].float()
        labels, tokens = ["stand-in"], [whole.tokens[t]]
    else:
        contributions = _attention_by_source(model, plan, out, src, t, x_all, skipped_before)
        if not torch.allclose(contributions.sum(0), delta_all[t].float(), atol=1e-4, rtol=1e-3):
            err = float((contributions.sum(0) - delta_all[t].float()).abs().max())
            raise GateSkipError(f"attention split does not add up at L{src} (max error {err:.2e}); please report this")
        labels, tokens = list(range(t + 1)), whole.tokens[: t + 1]
    gate = model.gates.gate(int(layer), branch)
    with torch.no_grad():
        terms = (gate.preactivation((scale[t] * contributions).to(model.dtype)) - bias_vector).float().mean(-1)
    table = pd.DataFrame({"source_position": labels, "token": tokens, "term": terms.cpu().numpy().astype(np.float64)})
    table = table.reindex(table["term"].abs().sort_values(ascending=False).index).reset_index(drop=True)
    table.attrs.update(component=f"L{src}.attn", component_term=float(whole.terms[t, component]), token=whole.tokens[t])
    return table


def _attention_by_source(model: GatedModel, plan, out, layer: int, t: int, x: torch.Tensor, adapted_before):
    """[t+1, d]: what attention layer `layer` added at token t, one row per source position."""
    from gateskip_core.forward.attention import project_kv, project_q
    from gateskip_core.forward.rows import AdapterRows

    spec = model.spec
    T = x.shape[0]
    scoped = plan.adapter_scope == "skipped"
    # Under scope 'skipped' a token uses the adapter (gate-scaled) once it has skipped a branch
    # (this attention included: it ran, so not at t; but sources may have); else the original.
    adapted = adapted_before | out.skipped[0, :, layer, 0] if scoped else torch.ones(T, dtype=torch.bool)
    parts = spec.layers[layer]
    positions = torch.arange(T, device=x.device)
    cos, sin = spec.rope_for(parts.rope_kind, x[None], positions[None])
    cos, sin = cos[0], sin[0]
    rows = AdapterRows(model.lora, layer, adapted)
    k, v = project_kv(parts, spec, x, cos, sin, rows)  # [T, H_kv, hd]
    q = project_q(parts, spec, x, cos, sin, rows)  # [T, H, hd]
    own = AdapterRows(model.lora if bool(adapted[t]) else None, layer, None)  # token t's o_proj
    group_size = spec.n_heads // spec.n_kv_heads
    k_t = k[: t + 1].repeat_interleave(group_size, dim=1)  # [t+1, H, hd]
    v_t = v[: t + 1].repeat_interleave(group_size, dim=1)
    scores = torch.einsum("hd,shd->hs", q[t].float(), k_t.float()) * spec.attn_scale  # [H, t+1]
    window = spec.layers[layer].sliding_window
    if window is not None:
        scores = scores.masked_fill(positions[: t + 1][None] <= t - window, float("-inf"))
    weights = torch.softmax(scores, -1)
    per_source = torch.einsum("hs,shd->shd", weights, v_t.float()).reshape(t + 1, -1)  # [t+1, H*hd]
    # o_proj (and its LoRA delta) is linear without bias: one row per source
    y = own.linear("o_proj", parts.o_proj, per_source.to(model.dtype)).float()
    post = parts.attn_post_norm
    if post is not None:  # held at its scale for the whole output
        y = post.scale(y.sum(0, keepdim=True).to(model.dtype)).float() * y
    if bool(adapted[t]) and out.gate_vectors is not None:
        y = out.gate_vectors[0, t, layer, 0].float() * y
    return y
