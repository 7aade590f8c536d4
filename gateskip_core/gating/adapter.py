"""Backbone adaptation trained together with the gates: a LoRA adapter or full weight deltas.

GateSkip's main results fine-tune the model with its gates. The user's model stays untouched
as the ungated reference:

- `lora:R` — a LoRA adapter of rank R on every attention and MLP projection, kept *unmerged*
  (`LoraAdapter`): the walk runs the original weights for every row and adds the delta
  `s * B(A x)` (s = alpha / R = 2) only to the rows that use the adapter — every token under
  adapter scope 'all', only tokens from their first skip on under scope 'skipped'. One set of
  base weights serves both, and the delta costs ~2R(in + out) FLOPs per adapted row and
  projection (charged by the compute account). A checkpoint stores A/B (float16) under
  peft's names. `merged_backbone` builds the other form, a copy with the adapter merged
  (faster per row, twice the memory; scope 'all' only), for comparison.
- `full` — every backbone weight trains; a checkpoint stores the difference to the original
  weights (float32), and loading builds an adapted copy (`build_adapted`).

`AdapterSpec` says which; `adapter_tensors` / `LoraAdapter.checkpoint_tensors` give what a
checkpoint stores.
"""

from __future__ import annotations

import copy
import math
import threading
from collections import OrderedDict
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from gateskip_core.errors import GateSkipError
from gateskip_core.validation import kind_and_rank

ADAPTER_KINDS = ("none", "full", "lora")
LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
LORA_MODULE = {"q_proj": "self_attn", "k_proj": "self_attn", "v_proj": "self_attn", "o_proj": "self_attn"}
ADAPTER_PREFIX = "adapter."


class LoraAdapter(nn.Module):
    """LoRA matrices for every (layer, projection), kept unmerged: `delta(layer, name, x)` is
    `s * B(A x)` for rows `x` [N, in], with s = alpha / R = 2 (peft's `lora_alpha = 2 R`).

    Initialised as peft does (A Kaiming-uniform, B zero: the adapter starts as no change) or
    from a checkpoint's tensors (`from_checkpoint`)."""

    def __init__(self, layers, rank: int):
        super().__init__()
        self.rank = rank
        self.scaling = 2.0
        self.n_layers = len(layers)
        self.A = nn.ParameterDict()
        self.B = nn.ParameterDict()
        self._scaled_bt: dict[str, tuple[tuple, torch.Tensor]] = {}  # key -> (B's identity and version, s * B^T)
        self.targets = tuple(name for name in LORA_TARGETS if getattr(layers[0], name) is not None)
        for i, parts in enumerate(layers):
            for name in self.targets:
                linear = getattr(parts, name)
                a = torch.empty(rank, linear.in_features, dtype=linear.weight.dtype, device=linear.weight.device)
                nn.init.kaiming_uniform_(a, a=math.sqrt(5))
                self.A[self._key(i, name)] = nn.Parameter(a)
                self.B[self._key(i, name)] = nn.Parameter(a.new_zeros(linear.out_features, rank))

    @staticmethod
    def _key(layer: int, name: str) -> str:
        return f"{layer}_{name}"

    @staticmethod
    def checkpoint_name(layer: int, name: str, matrix: str) -> str:
        """The tensor's name in a checkpoint (peft's, so that earlier checkpoints load)."""
        return (
            f"{ADAPTER_PREFIX}model.layers.{layer}.{LORA_MODULE.get(name, 'mlp')}.{name}.lora_{matrix}.default.weight"
        )

    def _inference_bt(self, key: str) -> torch.Tensor | None:
        """s * B^T, cached until B changes; None when gradients flow to A or B (training), where
        the delta must be the trained form. At batch-1 decoding the calls, not the rank-R FLOPs,
        are what an adapted row costs: this makes a delta two calls instead of four."""
        a, b = self.A[key], self.B[key]
        if torch.is_grad_enabled() and (a.requires_grad or b.requires_grad):
            return None
        stamp = (b.data_ptr(), b._version, b.dtype, b.device)  # any change to B makes a new one
        cached = self._scaled_bt.get(key)
        if cached is None or cached[0] != stamp:
            cached = (stamp, (b.detach() * self.scaling).t().contiguous())
            self._scaled_bt[key] = cached
        return cached[1]

    def delta(self, layer: int, name: str, x: torch.Tensor) -> torch.Tensor:
        key = self._key(layer, name)
        bt = self._inference_bt(key)
        if bt is None:
            return F.linear(F.linear(x, self.A[key]), self.B[key]) * self.scaling
        return torch.matmul(F.linear(x, self.A[key]), bt)

    def add_delta(self, layer: int, name: str, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """`y + delta(layer, name, x)` for rows x [N, in]: one `addmm` without gradients."""
        key = self._key(layer, name)
        bt = self._inference_bt(key)
        if bt is None:
            return y + self.delta(layer, name, x)
        return torch.addmm(y, F.linear(x, self.A[key]), bt)

    def flops_per_row(self, layers) -> tuple[int, int, int]:
        """FLOPs of the deltas per adapted row: (k + v projections, q + o, the MLP) of one layer."""

        def cost(name: str) -> int:
            linear = getattr(layers[0], name)
            return 0 if linear is None else 2 * self.rank * (linear.in_features + linear.out_features)

        return (
            cost("k_proj") + cost("v_proj"),
            cost("q_proj") + cost("o_proj"),
            cost("gate_proj") + cost("up_proj") + cost("down_proj"),
        )

    def checkpoint_tensors(self) -> dict[str, torch.Tensor]:
        out = {}
        for i in range(self.n_layers):
            for name in self.targets:
                for matrix, params in (("A", self.A), ("B", self.B)):
                    value = params[self._key(i, name)].detach().to(torch.float16).contiguous()
                    out[self.checkpoint_name(i, name, matrix)] = value
        return out

    @classmethod
    def from_checkpoint(cls, layers, spec: AdapterSpec, tensors: dict[str, torch.Tensor]) -> LoraAdapter:
        """The adapter a checkpoint stores, refused with one line if it does not fit these layers."""
        adapter = cls(layers, spec.rank)
        stored = {k: v for k, v in tensors.items() if k.startswith(ADAPTER_PREFIX)}
        expected = {cls.checkpoint_name(i, n, m) for i in range(len(layers)) for n in adapter.targets for m in "AB"}
        if set(stored) != expected:
            raise GateSkipError(
                f"the checkpoint's LoRA adapter does not fit this model ({len(stored)} tensors, expected "
                f"{len(expected)})"
            )
        with torch.no_grad():
            for i in range(len(layers)):
                for name in adapter.targets:
                    for matrix, params in (("A", adapter.A), ("B", adapter.B)):
                        target, value = params[cls._key(i, name)], stored[cls.checkpoint_name(i, name, matrix)]
                        if target.shape != value.shape:
                            raise GateSkipError(
                                f"the checkpoint's LoRA tensor {cls.checkpoint_name(i, name, matrix)} has shape "
                                f"{tuple(value.shape)}"
                            )
                        target.copy_(value.to(target.dtype))
        adapter.requires_grad_(False)
        return adapter


@dataclass(frozen=True)
class AdapterSpec:
    """`none`, `full` or `lora` with a rank (alpha = 2 * rank)."""

    kind: str = "none"
    rank: int = 0

    @classmethod
    def parse(cls, text: str | None) -> AdapterSpec:
        """'none' | 'full' | 'lora:R' (R >= 1)."""
        return cls(*kind_and_rank(text or "none", "adapter", ADAPTER_KINDS, "lora", "LoRA"))

    @property
    def label(self) -> str:
        return f"lora:{self.rank}" if self.kind == "lora" else self.kind

    def lora_config(self):
        from peft import LoraConfig

        return LoraConfig(
            r=self.rank, lora_alpha=2 * self.rank, lora_dropout=0.0, bias="none", target_modules=list(LORA_TARGETS)
        )


def make_trainable_copy(original: nn.Module, spec: AdapterSpec) -> nn.Module:
    """The backbone to train: a copy of `original` (which stays the frozen reference/teacher).

    LoRA: the copy wrapped by peft (only the adapter trains); full: every weight trains.
    Returns the Hugging Face *ForCausalLM whose modules the gated walk uses.
    """
    student = copy.deepcopy(original)
    for p in student.parameters():
        p.requires_grad_(spec.kind == "full")
    if spec.kind == "lora":
        from peft import get_peft_model

        wrapped = get_peft_model(student, spec.lora_config())
        return wrapped.base_model.model  # the HF model, its projections now LoRA layers
    return student


def adapter_tensors(spec: AdapterSpec, trained: nn.Module, original: nn.Module) -> dict[str, torch.Tensor]:
    """What a checkpoint stores to rebuild `trained` from `original` (keys prefixed `adapter.`)."""
    if spec.kind == "none":
        return {}
    if spec.kind == "lora":
        return {
            ADAPTER_PREFIX + name: p.detach().to(torch.float16).contiguous()
            for name, p in trained.named_parameters()
            if "lora_" in name
        }
    reference = dict(original.named_parameters())
    tied = _tied_names(original)
    return {
        ADAPTER_PREFIX + name: (p.detach().float() - reference[name].detach().float()).contiguous()
        for name, p in trained.named_parameters()
        if name not in tied
    }


def _tied_names(model: nn.Module) -> set[str]:
    """Parameter names that alias an earlier one (tied embeddings): stored once."""
    seen: dict[int, str] = {}
    tied = set()
    for name, p in model.named_parameters(remove_duplicate=False):
        if id(p) in seen:
            tied.add(name)
        else:
            seen[id(p)] = name
    return tied


def build_adapted(original: nn.Module, spec: AdapterSpec, tensors: dict[str, torch.Tensor]) -> nn.Module:
    """A copy of `original` with the stored adapter applied (LoRA merged); `original` is not touched."""
    if spec.kind == "none":
        return original
    adapted = copy.deepcopy(original)
    stored = {k.removeprefix(ADAPTER_PREFIX): v for k, v in tensors.items() if k.startswith(ADAPTER_PREFIX)}
    if spec.kind == "lora":
        from peft import get_peft_model

        wrapped = get_peft_model(adapted, spec.lora_config())
        params = dict(wrapped.base_model.model.named_parameters())
        expected = {name for name in params if "lora_" in name}
        if set(stored) != expected:
            raise GateSkipError(
                f"the checkpoint's LoRA adapter does not fit this model ({len(stored)} tensors, expected "
                f"{len(expected)})"
            )
        with torch.no_grad():
            for name, value in stored.items():
                if params[name].shape != value.shape:
                    raise GateSkipError(f"the checkpoint's LoRA tensor {name} has shape {tuple(value.shape)}")
                params[name].copy_(value.to(params[name].dtype))
        adapted = wrapped.merge_and_unload()
    else:
        params = dict(adapted.named_parameters())
        if not set(stored) <= set(params) or not stored:
            raise GateSkipError("the checkpoint's weight deltas do not fit this model")
        with torch.no_grad():
            for name, delta in stored.items():
                if params[name].shape != delta.shape:
                    raise GateSkipError(f"the checkpoint's weight delta {name} has shape {tuple(delta.shape)}")
                params[name].add_(delta.to(params[name].dtype))
    for p in adapted.parameters():
        p.requires_grad_(False)
    return adapted.eval()


class AdaptedBackbones:
    """Process-wide memo of adapted backbones, so that views with the same checkpoint share one copy."""

    def __init__(self, max_entries: int = 4):
        self._entries: OrderedDict[tuple, nn.Module] = OrderedDict()
        self._lock = threading.Lock()
        self._max = max_entries

    def get(self, original: nn.Module, spec: AdapterSpec, key: str, tensors: dict[str, torch.Tensor]) -> nn.Module:
        memo_key = (id(original), spec, key)
        with self._lock:
            if memo_key in self._entries:
                self._entries.move_to_end(memo_key)
                return self._entries[memo_key]
            adapted = build_adapted(original, spec, tensors)
            self._entries[memo_key] = adapted
            while len(self._entries) > self._max:
                self._entries.popitem(last=False)
            return adapted


ADAPTED = AdaptedBackbones()
