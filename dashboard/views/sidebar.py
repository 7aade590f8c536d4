"""The sidebar: model, gates (shipped, untrained, none, upload) and every skip setting."""

from __future__ import annotations

import hashlib

import streamlit as st

from dashboard import service
from dashboard.views.common import gated_view, hub, model_names, start_gates, start_model, start_weights
from gateskip_core import GateSkipError
from gateskip_core.backbone.quantisation import WEIGHTS


def sidebar() -> service.Settings:
    sb = st.sidebar
    sb.header("Model and gates")
    names = model_names()
    index = names.index(start_model()) if start_model() in names else 0
    model_name = sb.selectbox("Model", names, index=index, key="model")
    weights = sb.selectbox(
        "Weights",
        WEIGHTS,
        index=WEIGHTS.index(start_weights()),
        key="weights",
        help="the backbone's projections: fp32, or quantised to int8 / int4 by optimum-quanto (weight only; the "
        "gates, adapter and stand-ins stay float)",
    )
    with st.spinner(f"Loading {model_name} ({weights} weights; the first load converts it once)…"):
        base = hub().base(model_name, weights=weights)
    # The file given with `gateskip dashboard --gates` comes first (visitors cannot name other paths).
    given = [start_gates()] if start_gates() and model_name == start_model() else []
    choices = given + service.gate_choices(model_name)
    gates = sb.selectbox(
        "Gates", choices, key="gates", help="shipped trained gates, untrained gates, none, or upload a file"
    )
    upload = None
    if gates == "upload":
        file = sb.file_uploader("Gate checkpoint (.safetensors)", type=None, key="gate_upload")
        upload = file.getvalue() if file is not None else None
    view = load_view(model_name, gates, upload, weights)

    return service.Settings(model_name=model_name, view=view, **skip_settings(sb, base.spec.n_layers))


def skip_settings(sb, n_layers: int) -> dict:
    """The sidebar's skip settings (mode, budget or per-layer budgets, allocation, branches, policy, adapter
    scope, BOS, seed), as `service.Settings` fields."""
    sb.header("Skip budget")
    mode = sb.radio(
        "Mode",
        ["estimate", "exact"],
        horizontal=True,
        key="mode",
        help="estimate: re-threshold the captured gates (no model call). "
        "exact: re-run the model with the skips applied.",
    )
    budget = sb.slider("Global skip budget", 0.0, 0.9, 0.25, 0.05, key="global_budget")
    allocation = sb.radio(
        "Spread over layers",
        ["auto", "uniform", "global"],
        horizontal=True,
        key="allocation",
        help="uniform: the same fraction in every layer (the paper's rule); global: one compute budget spent "
        "where skipping costs least (needs gates trained with it); auto: global when the gates support it",
    )
    per_layer = None
    with sb.expander("Per-layer budgets"):
        if st.checkbox("Set per layer", key="per_layer_on"):
            per_layer = [
                st.slider(f"layer {i}", 0.0, 0.9, budget, 0.05, key=f"layer_budget_{i}") for i in range(n_layers)
            ]
    branches = sb.radio("Branches that may skip", ["both", "attn", "mlp"], horizontal=True, key="branches")
    policy = sb.selectbox("Policy", ["quantile", "calibrated", "random"], key="policy")
    adapter_scope = sb.radio(
        "Adapter applies to",
        ["auto", "all", "skipped"],
        horizontal=True,
        key="adapter_scope",
        help="all: every token runs the gates' adapter and soft gates; skipped: only tokens from their first "
        "skipped branch on (with nothing skipped the model is the original); auto: what the gates were trained for",
    )
    protect_bos = sb.checkbox("Protect the first token (BOS)", value=True, key="protect_bos")
    seed = int(sb.number_input("Seed (random policy)", value=0, step=1, key="seed"))
    return dict(
        mode=mode,
        budget=per_layer if per_layer is not None else budget,
        branches=branches,
        policy=policy,
        protect_bos=protect_bos,
        seed=seed,
        allocation=allocation,
        adapter_scope=adapter_scope,
    )


def load_view(model_name: str, gates: str, upload: bytes | None, weights: str = "fp32"):
    """The chosen gates, or the previous working ones with an error when they cannot be loaded."""
    digest = hashlib.sha256(upload).hexdigest() if upload is not None else None
    try:
        view = gated_view(model_name, gates, digest, upload, weights)
        st.session_state["last_good_gates"] = (model_name, gates, digest, upload, weights)
        return view
    except GateSkipError as err:
        st.sidebar.error(str(err))
        last = st.session_state.get("last_good_gates")
        if last is not None and last[0] == model_name and last[-1] == weights:
            st.sidebar.caption(f"still using the previous gates ({last[1]})")
            return gated_view(*last)
        fallback = service.gate_choices(model_name)[0]
        return gated_view(model_name, fallback, None, None, weights)
