"""GateSkip Lens core: gated inference, skip policies, real compute skipping, traces.

The folders follow the data: text -> plan -> forward -> trace.

    data.py      real text (pydoc topics, the model's own chat answers)
    backbone/    where a model is loaded (registry, per-family architecture specs, tiny test models)
    gating/      the learned parts: gates, adapter, stand-ins, their checkpoint files
    skipping/    where a skip is decided: budgets, policies, allocation, calibrated thresholds
    forward/     the gated walk over the layers that skips compute for real; cached decoding
    traces/      what a run leaves: per-token gate values and decisions, the compute account
    training/    training gates, stand-ins and the adapter
    model.py     `GatedModel` / `load_model`: one object that holds them all
    cli.py       the core `gateskip` subcommands

Names are imported on first use (PEP 562), so that `import gateskip_core` (and the
`gateskip` command starting up) does not load torch before it is needed.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

_WHERE = {
    "GateCheckpoint": "gating.checkpoint",
    "load_gates": "gating.checkpoint",
    "save_gates": "gating.checkpoint",
    "ComputeAccount": "traces.compute",
    "account_sequence": "traces.compute",
    "GateSkipError": "errors",
    "Capture": "forward.execution",
    "KVCache": "forward.cache",
    "SkipPlan": "skipping.plan",
    "gated_forward": "forward.execution",
    "BRANCHES": "branches",
    "GateSet": "gating.gates",
    "Generation": "forward.generation",
    "GatedModel": "model",
    "SkipArgs": "model",
    "load_model": "model",
    "CalibratedPolicy": "skipping.policies",
    "Forced": "skipping.policies",
    "QuantilePolicy": "skipping.policies",
    "RandomPolicy": "skipping.policies",
    "SkipBudget": "skipping.policies",
    "SkipPolicy": "skipping.policies",
    "DEFAULT_MODEL": "backbone.registry",
    "REGISTRY": "backbone.registry",
    "cache_root": "backbone.registry",
    "SequenceTrace": "traces.trace",
    "Trace": "traces.trace",
    "read_trace": "traces.trace",
}
__all__ = sorted(_WHERE)


def __getattr__(name: str):
    if name not in _WHERE:
        raise AttributeError(f"module 'gateskip_core' has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{_WHERE[name]}", __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))


if TYPE_CHECKING:  # for type checkers and IDEs
    from gateskip_core.backbone.registry import DEFAULT_MODEL, REGISTRY, cache_root  # noqa: F401
    from gateskip_core.branches import BRANCHES  # noqa: F401
    from gateskip_core.errors import GateSkipError  # noqa: F401
    from gateskip_core.forward.cache import KVCache  # noqa: F401
    from gateskip_core.forward.execution import Capture, gated_forward  # noqa: F401
    from gateskip_core.forward.generation import Generation  # noqa: F401
    from gateskip_core.gating.checkpoint import GateCheckpoint, load_gates, save_gates  # noqa: F401
    from gateskip_core.gating.gates import GateSet  # noqa: F401
    from gateskip_core.model import GatedModel, SkipArgs, load_model  # noqa: F401
    from gateskip_core.skipping.policies import (  # noqa: F401
        CalibratedPolicy,
        Forced,
        QuantilePolicy,
        RandomPolicy,
        SkipBudget,
        SkipPolicy,
    )
    from gateskip_core.traces.compute import ComputeAccount, account_sequence  # noqa: F401
    from gateskip_core.traces.trace import SequenceTrace, Trace, read_trace  # noqa: F401
