"""A `TorchFunctionMode` that records tensor factories called from project code without a device.

There is no GPU on the machines that run the tests, so a tensor made on the CPU where the model
lives on `cuda` cannot fail here. What can be checked on the CPU is the construction: every
factory call in project code (files under gateskip_core/, analysis/, dashboard/, gateskip/) names its device
(`device=`), and a device it names is the model's (or "cpu", said on purpose for host-side data:
token ids before they are moved, seeded index permutations, checkpoint tensors). Parameters made in
an `nn.Module.__init__` are exempt: the modules are moved with `.to(device)` as a whole.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
from torch import nn
from torch.overrides import TorchFunctionMode

ROOT = Path(__file__).resolve().parent.parent
PROJECT = tuple(str(ROOT / folder) + "/" for folder in ("gateskip_core", "analysis", "dashboard", "gateskip"))
TORCH = str(Path(torch.__file__).parent) + "/"
FACTORIES = {
    torch.zeros,
    torch.ones,
    torch.full,
    torch.empty,
    torch.arange,
    torch.tensor,
    torch.as_tensor,
    torch.rand,
    torch.randn,
    torch.randint,
    torch.randperm,
    torch.eye,
    torch.linspace,
}


def _caller() -> tuple[str, int, str, object]:
    """(file, line, function, frame) of the first frame outside torch and this module."""
    frame = sys._getframe(2)
    while frame is not None and (frame.f_code.co_filename.startswith(TORCH) or frame.f_code.co_filename == __file__):
        frame = frame.f_back
    if frame is None:
        return "", 0, "", None
    return frame.f_code.co_filename, frame.f_lineno, frame.f_code.co_name, frame


class DeviceWatch(TorchFunctionMode):
    """Records `file:line function` of every factory call in project code that names no device,
    or a device other than `model_device` and the CPU."""

    def __init__(self, model_device: str | torch.device = "cpu"):
        super().__init__()
        self.model_device = torch.device(model_device)
        self.problems: set[str] = set()

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in FACTORIES:
            self._check(func, kwargs.get("device"))
        return func(*args, **kwargs)

    def _check(self, func, device) -> None:
        path, line, name, frame = _caller()
        if not path.startswith(PROJECT):
            return
        if name == "__init__" and isinstance(frame.f_locals.get("self"), nn.Module):
            return
        where = f"{Path(path).relative_to(ROOT)}:{line} {name}: torch.{func.__name__}"
        if device is None:
            self.problems.add(f"{where} names no device")
        elif torch.device(device).type not in ("cpu", self.model_device.type):
            self.problems.add(f"{where} on {device}, not the model's {self.model_device}")
