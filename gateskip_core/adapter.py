"""Backbone adaptation trained together with the gates: a LoRA adapter or full weight deltas.

GateSkip's main results fine-tune the model with its gates. We keep the user's
model untouched as the ungated reference and build the adapted backbone as a
copy:

- `lora:R` — a LoRA adapter (the `peft` library) of rank R on every attention and
  MLP projection. Training runs the peft-wrapped copy; a checkpoint stores the
  adapter's A/B matrices (float16), and loading merges them into a copy of the
  original weights, so inference runs plain linear layers at no extra cost.
- `full` — every backbone weight trains; a checkpoint stores the difference to
  the original weights (float32), so nothing that was trained is lost.

`AdapterSpec` says which; `adapter_tensors` extracts what a checkpoint stores
and `build_adapted` rebuilds the adapted backbone from it.
"""

from __future__ import annotations

import copy
import threading
from collections import OrderedDict
from dataclasses import dataclass

import torch
from torch import nn

from .errors import GateSkipError
from .validation import rank_of

LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
ADAPTER_PREFIX = "adapter."


@dataclass(frozen=True)
class AdapterSpec:
    """`none`, `full` or `lora` with a rank (alpha = 2 * rank)."""

    kind: str = "none"
    rank: int = 0

    @classmethod
    def parse(cls, text: str | None) -> AdapterSpec:
        """'none' | 'full' | 'lora:R' (R >= 1)."""
        text = (text or "none").strip()
        if text in ("none", "full"):
            return cls(text)
        kind, _, rank_text = text.partition(":")
        if kind != "lora":
            raise GateSkipError(f"adapter must be 'none', 'full' or 'lora:R', got {text!r}")
        return cls("lora", rank_of("LoRA", rank_text))

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
