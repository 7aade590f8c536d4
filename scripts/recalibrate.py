"""Refit a gate checkpoint's calibrated thresholds on prose + the model's own chat answers, in place.

python3 scripts/recalibrate.py gateskip_core/shipped_gates/smollm2-135m-instruct-default.safetensors
"""

from __future__ import annotations

import sys

from gateskip_core import load_gates, load_model, save_gates
from gateskip_core.training.calibration_texts import calibration_texts
from gateskip_core.training.loop import calibrate_checkpoint


def main(path: str) -> None:
    ckpt = load_gates(path)
    model = load_model(ckpt.model)
    model.attach_gates(ckpt.gates, "recalibrating", ckpt)
    calibrate_checkpoint(model, ckpt, calibration_texts(model, print))
    save_gates(ckpt, path, int8=ckpt.weights.startswith("int8"))
    print(f"recalibrated {path}")


if __name__ == "__main__":
    main(sys.argv[1])
