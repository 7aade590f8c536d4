"""GateSkip Lens core: gated inference, skip policies, real compute skipping, traces."""

from .checkpoint import GateCheckpoint, load_gates, save_gates
from .compute import ComputeAccount, account_sequence
from .errors import GateSkipError
from .execution import Capture, KVCache, SkipPlan, gated_forward
from .gates import BRANCHES, GateSet
from .generation import Generation
from .model import GatedModel, SkipArgs, load_model
from .policies import CalibratedPolicy, QuantilePolicy, RandomPolicy, SkipBudget, SkipPolicy
from .registry import DEFAULT_MODEL, REGISTRY, cache_root
from .trace import SequenceTrace, Trace, read_trace

__all__ = [
    "BRANCHES",
    "Capture",
    "SkipArgs",
    "DEFAULT_MODEL",
    "REGISTRY",
    "CalibratedPolicy",
    "ComputeAccount",
    "GateCheckpoint",
    "GateSet",
    "GateSkipError",
    "GatedModel",
    "Generation",
    "KVCache",
    "QuantilePolicy",
    "RandomPolicy",
    "SequenceTrace",
    "SkipBudget",
    "SkipPlan",
    "SkipPolicy",
    "Trace",
    "account_sequence",
    "cache_root",
    "gated_forward",
    "load_gates",
    "load_model",
    "read_trace",
    "save_gates",
]
