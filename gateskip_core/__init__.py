"""GateSkip Lens core: gated inference, skip policies, real compute skipping, traces.

Names are imported on first use (PEP 562), so that `import gateskip_core` (and the
`gateskip` command starting up) does not load torch before it is needed.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

_WHERE = {
    "GateCheckpoint": "checkpoint",
    "load_gates": "checkpoint",
    "save_gates": "checkpoint",
    "ComputeAccount": "compute",
    "account_sequence": "compute",
    "GateSkipError": "errors",
    "Capture": "execution",
    "KVCache": "execution",
    "SkipPlan": "execution",
    "gated_forward": "execution",
    "BRANCHES": "gates",
    "GateSet": "gates",
    "Generation": "generation",
    "GatedModel": "model",
    "SkipArgs": "model",
    "load_model": "model",
    "CalibratedPolicy": "policies",
    "Forced": "policies",
    "QuantilePolicy": "policies",
    "RandomPolicy": "policies",
    "SkipBudget": "policies",
    "SkipPolicy": "policies",
    "DEFAULT_MODEL": "registry",
    "REGISTRY": "registry",
    "cache_root": "registry",
    "SequenceTrace": "trace",
    "Trace": "trace",
    "read_trace": "trace",
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
    from .checkpoint import GateCheckpoint, load_gates, save_gates  # noqa: F401
    from .compute import ComputeAccount, account_sequence  # noqa: F401
    from .errors import GateSkipError  # noqa: F401
    from .execution import Capture, KVCache, SkipPlan, gated_forward  # noqa: F401
    from .gates import BRANCHES, GateSet  # noqa: F401
    from .generation import Generation  # noqa: F401
    from .model import GatedModel, SkipArgs, load_model  # noqa: F401
    from .policies import (  # noqa: F401
        CalibratedPolicy,
        Forced,
        QuantilePolicy,
        RandomPolicy,
        SkipBudget,
        SkipPolicy,
    )
    from .registry import DEFAULT_MODEL, REGISTRY, cache_root  # noqa: F401
    from .trace import SequenceTrace, Trace, read_trace  # noqa: F401
