"""Shared fixtures: tiny random models (fast) and the real SmolLM2 (marked `real`)."""

from __future__ import annotations

import os

import pytest
import torch

from gateskip_core import GatedModel, GateSet, load_model

TINY = ["tiny-llama", "tiny-gemma3"]
PROMPTS = [
    "The quick brown fox jumps over the lazy dog, again and again.",
    "Gates decide which tokens skip which layers.",
    "Short one.",
]


def spread_gates(model: GatedModel, variant: str = "vector", seed: int = 0) -> GatedModel:
    """Attach gates with widely spread values, so rankings are not all ties."""
    torch.manual_seed(seed)
    gates = GateSet(model.spec.n_layers, model.spec.d_model, variant)
    with torch.no_grad():
        for p in gates.parameters():
            p.normal_(0, 0.3)
    for p in gates.parameters():
        p.requires_grad_(False)
    model.attach_gates(gates, "test")
    return model


@pytest.fixture(params=TINY)
def tiny(request) -> GatedModel:
    return spread_gates(load_model(request.param))


@pytest.fixture
def tiny_llama() -> GatedModel:
    return spread_gates(load_model("tiny-llama"))


@pytest.fixture(scope="session")
def smollm2() -> GatedModel:
    return load_model("smollm2-135m-instruct", gates="untrained")


@pytest.fixture(autouse=True)
def _single_thread_determinism():
    torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))
    yield
