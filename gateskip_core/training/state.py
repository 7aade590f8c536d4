"""The training-state file beside the output (`NAME.state.safetensors`): the trainable parameters, the
optimiser's state, the step, the history and the sensitivity profile, so that `resume=True` continues a
killed run and ends with the same gates as an uninterrupted one."""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from gateskip_core.errors import GateSkipError
from gateskip_core.files import atomic_write


def state_file(out: Path) -> Path:
    """The state file beside the output `out` (NAME.safetensors -> NAME.state.safetensors)."""
    return out.with_name(out.name.removesuffix(".safetensors") + ".state.safetensors")


def save_state(
    path: Path, step: int, objective: nn.Module, optim: torch.optim.Optimizer, history, config, sensitivity=None
):
    tensors = {f"param.{k}": v.detach().cpu().contiguous() for k, v in objective.named_parameters() if v.requires_grad}
    if sensitivity is not None:  # kept, so that a resumed run does not measure it again
        tensors["sensitivity"] = torch.as_tensor(sensitivity, dtype=torch.float64, device="cpu")
    state = optim.state_dict()
    for pid, st in state["state"].items():
        for name, value in st.items():
            tensors[f"optim.{pid}.{name}"] = torch.as_tensor(value, device="cpu").contiguous()  # saved from the CPU
    meta = {
        "step": str(step),
        "history": json.dumps(history),
        "config": json.dumps(asdict(config)),
        "param_groups": json.dumps(state["param_groups"]),
    }
    atomic_write(path, lambda tmp: save_file(tensors, str(tmp), metadata=meta))


def read_state(path: Path, with_tensors: bool = True) -> tuple[dict, dict[str, torch.Tensor]]:
    """The state file's metadata and tensors, or one line naming the damaged file."""
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata()
            tensors = {k: f.get_tensor(k) for k in f.keys()} if with_tensors else {}
    except Exception as err:
        raise GateSkipError(f"cannot resume: {path.name} is damaged ({str(err).splitlines()[0]})") from None
    return meta, tensors


def check_state(path: Path) -> None:
    """Fail now, with one line, if the state file to resume from cannot be read."""
    read_state(path, with_tensors=False)


def load_state(path: Path, objective: nn.Module, optim: torch.optim.Optimizer):
    meta, tensors = read_state(path)
    params = dict(objective.named_parameters())
    with torch.no_grad():
        for key, value in tensors.items():
            if key.startswith("param."):
                params[key[6:]].copy_(value)
    opt_state: dict = {"state": {}, "param_groups": json.loads(meta["param_groups"])}
    for key, value in tensors.items():
        if key.startswith("optim."):
            _, pid, name = key.split(".", 2)
            opt_state["state"].setdefault(int(pid), {})[name] = value
    optim.load_state_dict(opt_state)
    return int(meta["step"]), json.loads(meta["history"])
