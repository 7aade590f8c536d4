"""Weight-only quantisation of a backbone's projections (`load_model(..., weights="int4")`).

Every linear projection of the attention and MLP branches is quantised by optimum-quanto, as
the GateSkip reference code does (`quantize(model, weights=qint4, exclude="lm_head")`, then
`freeze`): int8 per output channel, int4 in groups along the input. The embedding, norms and LM
head stay float, and so do the gates, the adapter and the stand-ins (they are attached later and
never pass through here; `quantise_linears` quantises them too, for measuring what that changes).

Two ways to run the quantised weights:
- 'int4' (and 'int8'): quanto quantises, then each projection gets back a plain `nn.Linear`
  whose weight is quanto's dequantised weight. On a CPU quanto's own int4 linear unpacks the
  weight and runs a float matmul, so the results are the same numbers (tests/test_quantisation.py
  checks logits are equal), at float32 speed instead of 5-14x slower.
- 'int4:quanto' (and 'int8:quanto'): quanto's `QLinear` modules stay in the model and run its
  kernels (on a GPU: fused int4 matmuls reading 4-bit weights, which is where the memory and
  bandwidth savings come from; none of that shows on this CPU).

Quantising SmolLM2 takes ~10 s, so the dequantised weights of a registry model are cached next
to its converted checkpoint (`$GATESKIP_CACHE/quantised/`), keyed by quanto's version.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from gateskip_core.errors import GateSkipError

WEIGHTS = ("fp32", "int8", "int4")
KERNEL_SUFFIX = ":quanto"
EXCLUDED = "lm_head"  # the reference's exclusion: the vocabulary projection stays float


@dataclass(frozen=True)
class WeightSpec:
    """What `--weights` asked for: the bits ('fp32', 'int8', 'int4') and whether quanto's own
    quantised modules run (`kernels`) or their dequantised weights do."""

    bits: str
    kernels: bool = False

    @property
    def label(self) -> str:
        return self.bits + (KERNEL_SUFFIX if self.kernels else "")

    @property
    def quantised(self) -> bool:
        return self.bits != "fp32"


def parse_weights(spec: str | WeightSpec) -> WeightSpec:
    """'fp32', 'int8', 'int4', 'int8:quanto' or 'int4:quanto' -> a `WeightSpec` (one-line error otherwise)."""
    if isinstance(spec, WeightSpec):
        return spec
    text = str(spec)
    bits, kernels = (text[: -len(KERNEL_SUFFIX)], True) if text.endswith(KERNEL_SUFFIX) else (text, False)
    if bits not in WEIGHTS or (kernels and bits == "fp32"):
        raise GateSkipError(
            f"weights must be one of fp32, int8, int4, int8{KERNEL_SUFFIX}, int4{KERNEL_SUFFIX}, got {text!r}"
        )
    return WeightSpec(bits, kernels)


def _quanto():
    try:
        import optimum.quanto as quanto
    except ImportError:
        raise GateSkipError(
            "quantised weights need optimum-quanto: pip install -e '.[quant]' (scripts/setup.sh installs it)"
        ) from None
    return quanto


def _qtype(bits: str):
    quanto = _quanto()
    return {"int8": quanto.qint8, "int4": quanto.qint4}[bits]


def quantise_linears(module: nn.Module, spec: str | WeightSpec, exclude: str | None = EXCLUDED) -> list[str]:
    """Quantise every `nn.Linear` of `module` in place (except names matching `exclude`) and return
    their names. Dequantised form: each stays an `nn.Linear` holding quanto's dequantised weight;
    kernel form: each becomes quanto's frozen `QLinear`."""
    spec = parse_weights(spec)
    if not spec.quantised:
        return []
    quanto = _quanto()
    quanto.quantize(module, weights=_qtype(spec.bits), exclude=exclude)
    quanto.freeze(module)
    qlinears = [(name, m) for name, m in module.named_modules() if isinstance(m, quanto.QLinear)]
    if not spec.kernels:
        for name, qlinear in qlinears:
            _set_module(module, name, _dequantised(qlinear))
    return [name for name, _ in qlinears]


def _dequantised(qlinear: nn.Module) -> nn.Linear:
    """A plain `nn.Linear` with the quantised weight's dequantised values (and the float bias)."""
    weight = qlinear.weight.dequantize()
    linear = nn.Linear(qlinear.in_features, qlinear.out_features, bias=qlinear.bias is not None, device="meta")
    linear.weight = nn.Parameter(weight.detach().clone(), requires_grad=False)
    if qlinear.bias is not None:
        linear.bias = nn.Parameter(qlinear.bias.detach().clone(), requires_grad=False)
    return linear


def _set_module(root: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(root.get_submodule(parent) if parent else root, child, module)


def quantise_backbone(backbone: nn.Module, spec: str | WeightSpec, cache_key: str | None = None) -> None:
    """Quantise a freshly loaded backbone's projections in place. `cache_key` (a registry model's
    name): keep the dequantised weights on disk and reuse them (dequantised form only)."""
    spec = parse_weights(spec)
    if not spec.quantised:
        return
    cache = None if spec.kernels or cache_key is None else _cache_path(cache_key, spec.bits)
    if cache is not None and cache.is_file():
        _load_cached(backbone, cache)
        return
    names = quantise_linears(backbone, spec)
    if not names:
        raise GateSkipError(f"weights {spec.label}: this model has no nn.Linear projections to quantise")
    if cache is not None:
        _save_cached(backbone, names, cache)


def _cache_path(cache_key: str, bits: str) -> Path:
    from gateskip_core.backbone.registry import cache_root

    return cache_root() / "quantised" / f"{cache_key}-{bits}-quanto{_quanto().__version__}.safetensors"


def _save_cached(backbone: nn.Module, names: list[str], path: Path) -> None:
    from safetensors.torch import save_file

    tensors = {f"{name}.weight": backbone.get_submodule(name).weight.detach().contiguous() for name in names}
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(f"{path.name}.{os.getpid()}.partial")
    save_file(tensors, str(partial))
    os.replace(partial, path)  # atomic: a reader never sees half a file


def _load_cached(backbone: nn.Module, path: Path) -> None:
    from safetensors.torch import load_file

    with torch.no_grad():
        for key, weight in load_file(str(path)).items():
            target = backbone.get_parameter(key)
            if target.shape != weight.shape:
                raise GateSkipError(f"the quantised weight cache {path} does not fit this model; delete it")
            target.copy_(weight)
