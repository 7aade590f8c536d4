"""Gate checkpoints: safetensors only (never pickle), with metadata.

Tensors: the GateSet's parameters (optionally int8 with one float32 scale per
output row, dequantised at load), plus `calibration.budgets` [K] and
`calibration.thresholds` [K, n_layers, 2] for the `calibrated` policy (uniform
budgets), `calibration.global_thresholds` [K, n_layers, 2] for the same budgets
spent by the global allocation, optionally `calibration.generated_thresholds` and
`calibration.generated_global_thresholds` (the same grids fitted on decode steps of the model's own
answers, for generated tokens; format 2, with the prompts they were fitted on in
`training["decode_calibration"]`), `allocation.sensitivity` [n_layers, 2] (the
profile the global allocation uses; absent for gates trained without one), and
`adapter.*` (the backbone adaptation, see `adapter.py`) and `fill.*` (stand-ins for skipped
branches, see `fill.py`).
Metadata (strings): format, model name, architecture fingerprint, gate variant,
low-rank rank, sharing, weight encoding, adapter, skip fill, the adapter scope the gates were
trained for, training configuration and validation metrics (JSON).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from gateskip_core.errors import GateSkipError
from gateskip_core.files import atomic_write
from gateskip_core.gating.adapter import ADAPTER_PREFIX, AdapterSpec
from gateskip_core.gating.fill import FillSpec, SkipFill, fill_tensors, load_fill
from gateskip_core.gating.gates import GateSet
from gateskip_core.skipping.plan import ADAPTER_SCOPES

FORMAT = "gateskip-gates/2"  # 2 added the decode-fitted threshold grids
READABLE_FORMATS = ("gateskip-gates/1", FORMAT)  # a format-1 file loads as one without them
GENERATED_TABLES = {  # file key -> GateCheckpoint field
    "calibration.generated_thresholds": "generated_thresholds",
    "calibration.generated_global_thresholds": "generated_global_thresholds",
}


@dataclass
class GateCheckpoint:
    gates: GateSet
    model: str
    fingerprint: dict
    calibration_budgets: np.ndarray = field(default_factory=lambda: np.zeros(0))
    calibration_thresholds: np.ndarray = field(default_factory=lambda: np.zeros((0, 0, 2)))
    training: dict = field(default_factory=dict)
    metrics: dict = field(default_factory=dict)
    weights: str = "float32"
    adapter: AdapterSpec = AdapterSpec()
    adapter_tensors: dict[str, torch.Tensor] = field(default_factory=dict)
    sensitivity: np.ndarray | None = None  # [n_layers, 2] profile of the global allocation
    global_thresholds: np.ndarray = field(default_factory=lambda: np.zeros((0, 0, 2)))
    fill: SkipFill | None = None  # stand-ins for skipped branches (None: the paper's zero)
    adapter_scope: str = "all"  # where the adapter applies by default (execution.ADAPTER_SCOPES)
    # Decode-fitted thresholds [K, n_layers, 2] at `calibration_budgets` (uniform, global); empty: none.
    generated_thresholds: np.ndarray = field(default_factory=lambda: np.zeros((0, 0, 2)))
    generated_global_thresholds: np.ndarray = field(default_factory=lambda: np.zeros((0, 0, 2)))

    @property
    def fill_label(self) -> str:
        return self.fill.spec.label if self.fill is not None else "zero"

    def adapter_key(self) -> str:
        """A digest of the adapter tensors: views with equal adapters share one adapted backbone."""
        digest = hashlib.sha256(self.adapter.label.encode())
        for key in sorted(self.adapter_tensors):
            digest.update(key.encode())
            digest.update(self.adapter_tensors[key].numpy().tobytes())
        return digest.hexdigest()


def _quantise_rows(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    scale = w.abs().amax(dim=1).clamp(min=1e-12) / 127.0
    q = torch.round(w / scale[:, None]).clamp(-127, 127).to(torch.int8)
    return q, scale.float()


def save_gates(ckpt: GateCheckpoint, path: str | Path, int8: bool = False) -> Path:
    """Write `ckpt` to `path` atomically (temporary file, then rename)."""
    path = Path(path)
    tensors: dict[str, torch.Tensor] = {}
    for key, value in ckpt.gates.state_dict().items():
        value = value.detach().float().cpu().contiguous()  # written from the CPU, wherever the gates ran
        if int8 and value.ndim == 2:
            q, scale = _quantise_rows(value)
            tensors[f"{key}.int8"] = q
            tensors[f"{key}.scale"] = scale
        else:
            tensors[key] = value
    cpu64 = dict(dtype=torch.float64, device="cpu")  # a file is written from the CPU
    tensors["calibration.budgets"] = torch.as_tensor(ckpt.calibration_budgets, **cpu64)
    tensors["calibration.thresholds"] = torch.as_tensor(ckpt.calibration_thresholds, **cpu64)
    if len(ckpt.global_thresholds):
        tensors["calibration.global_thresholds"] = torch.as_tensor(ckpt.global_thresholds, **cpu64)
    for key, name in GENERATED_TABLES.items():
        if len(getattr(ckpt, name)):
            tensors[key] = torch.as_tensor(getattr(ckpt, name), **cpu64)
    if ckpt.sensitivity is not None:
        tensors["allocation.sensitivity"] = torch.as_tensor(ckpt.sensitivity, **cpu64)
    tensors.update({k: v.contiguous() for k, v in ckpt.adapter_tensors.items()})
    tensors.update(fill_tensors(ckpt.fill))
    metadata = {
        "format": FORMAT,
        "model": ckpt.model,
        "fingerprint": json.dumps(ckpt.fingerprint, sort_keys=True),
        "variant": ckpt.gates.variant,
        "rank": str(ckpt.gates.rank),
        "adapter": ckpt.adapter.label,
        "skip_fill": ckpt.fill_label,
        "adapter_scope": ckpt.adapter_scope,
        "shared": json.dumps(ckpt.gates.shared),
        "n_layers": str(ckpt.gates.n_layers),
        "d_model": str(ckpt.gates.d_model),
        "weights": "int8-rowwise" if int8 else "float32",
        "training": json.dumps(ckpt.training, sort_keys=True),
        "metrics": json.dumps(ckpt.metrics, sort_keys=True),
    }
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise GateSkipError(f"cannot write {path}: {err.strerror or err}") from None

    def write(tmp: Path) -> None:
        try:
            save_file(tensors, str(tmp), metadata=metadata)
        except SafetensorError as err:  # an I/O failure inside safetensors: report it like any other
            raise OSError(str(err).split(" at path")[0]) from None

    atomic_write(path, write)
    return path


def amend_checkpoint_file(
    path: str | Path, training: dict | None = None, tensors: dict[str, torch.Tensor] | None = None
) -> Path:
    """Add `training` keys and `tensors` to the checkpoint file at `path`, in place, leaving every
    tensor it holds bit for bit as it is (no load and re-save: int8 weights are not re-quantised)."""
    path = Path(path)
    metadata, stored = _read_checkpoint_file(path)
    metadata = {**metadata, "format": FORMAT}
    if training:
        metadata["training"] = json.dumps({**json.loads(metadata.get("training", "{}")), **training}, sort_keys=True)
    stored.update({k: v.detach().cpu().contiguous() for k, v in (tensors or {}).items()})
    atomic_write(path, lambda tmp: save_file(stored, str(tmp), metadata=metadata))
    return path


def load_gates(path: str | Path, expected_fingerprint: dict | None = None) -> GateCheckpoint:
    """Read a gate checkpoint; every problem is one clear `GateSkipError` line."""
    path = Path(path)
    metadata, tensors = _read_checkpoint_file(path)
    try:
        ckpt = _checkpoint_from(metadata, tensors)
    except (KeyError, ValueError, RuntimeError, GateSkipError) as err:
        raise GateSkipError(f"{path.name} is a damaged gate checkpoint ({str(err).splitlines()[0]})") from None
    if expected_fingerprint is not None and ckpt.fingerprint != expected_fingerprint:
        raise GateSkipError(
            f"{path.name} was trained for {ckpt.model} ({_describe(ckpt.fingerprint)}), "
            f"not this model ({_describe(expected_fingerprint)})"
        )
    for p in ckpt.gates.parameters():
        p.requires_grad_(False)
    return ckpt


def _read_checkpoint_file(path: Path) -> tuple[dict, dict[str, torch.Tensor]]:
    """The metadata and tensors of a GateSkip gate checkpoint file, or one line saying why it is not one."""
    if not path.is_file():
        raise GateSkipError(f"gate checkpoint not found: {path}")
    try:
        with safe_open(str(path), framework="pt") as f:
            metadata = f.metadata() or {}
            tensors = {key: f.get_tensor(key) for key in f.keys()}
    except Exception as err:  # safetensors raises several types for bad headers and truncated data
        reason = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise GateSkipError(f"{path.name} is not a valid safetensors gate checkpoint ({reason})") from None
    if metadata.get("format") not in READABLE_FORMATS:
        raise GateSkipError(f"{path.name} is a safetensors file but not a GateSkip gate checkpoint")
    return metadata, tensors


def _gates_from(metadata: dict, tensors: dict[str, torch.Tensor]) -> GateSet:
    """The gates, from float tensors or int8 ones with per-row scales."""
    gates = GateSet(
        n_layers=int(metadata["n_layers"]),
        d_model=int(metadata["d_model"]),
        variant=metadata["variant"],
        shared=json.loads(metadata["shared"]),
        rank=int(metadata.get("rank", "0")),
    )
    state = {}
    for key in gates.state_dict():
        if key in tensors:
            state[key] = tensors[key].float()
        else:
            state[key] = tensors[f"{key}.int8"].float() * tensors[f"{key}.scale"][:, None]
    gates.load_state_dict(state)
    return gates.eval()


def _checkpoint_from(metadata: dict, tensors: dict[str, torch.Tensor]) -> GateCheckpoint:
    """Everything the file stores; a missing or inconsistent part raises (KeyError, ValueError, ...)."""
    gates = _gates_from(metadata, tensors)
    ckpt = GateCheckpoint(
        gates=gates,
        model=metadata["model"],
        fingerprint=json.loads(metadata["fingerprint"]),
        calibration_budgets=tensors["calibration.budgets"].numpy(),
        calibration_thresholds=tensors["calibration.thresholds"].numpy(),
        training=json.loads(metadata.get("training", "{}")),
        metrics=json.loads(metadata.get("metrics", "{}")),
        weights=metadata.get("weights", "float32"),
        adapter=AdapterSpec.parse(metadata.get("adapter", "none")),
        adapter_tensors={k: v for k, v in tensors.items() if k.startswith(ADAPTER_PREFIX)},
        sensitivity=tensors["allocation.sensitivity"].numpy() if "allocation.sensitivity" in tensors else None,
        global_thresholds=(
            tensors["calibration.global_thresholds"].numpy()
            if "calibration.global_thresholds" in tensors
            else np.zeros((0, 0, 2))
        ),
    )
    for key, name in GENERATED_TABLES.items():
        if key in tensors:
            setattr(ckpt, name, tensors[key].numpy())
            if getattr(ckpt, name).shape[0] != len(ckpt.calibration_budgets):
                raise ValueError(
                    f"{key} has {getattr(ckpt, name).shape[0]} rows for {len(ckpt.calibration_budgets)} budgets"
                )
    ckpt.fill = load_fill(FillSpec.parse(metadata.get("skip_fill", "zero")), tensors, gates.n_layers, gates.d_model)
    ckpt.adapter_scope = metadata.get("adapter_scope", "all")
    if ckpt.adapter_scope not in ADAPTER_SCOPES:
        raise ValueError(f"unknown adapter scope {ckpt.adapter_scope!r}")
    if ckpt.adapter.kind != "none" and not ckpt.adapter_tensors:
        raise ValueError(f"metadata names adapter {ckpt.adapter.label} but the file has no adapter tensors")
    return ckpt


def _describe(fp: dict) -> str:
    return f"{fp.get('model_type')}, {fp.get('n_layers')} layers, d={fp.get('d_model')}, vocab {fp.get('vocab_size')}"
