"""Refit a gate checkpoint's stored calibrated thresholds on the calibration texts, in place.

Every stored budget (`calibration.budgets`) is refitted under the uniform allocation and, with a
sensitivity profile, the global one, on `training/calibration_texts.py`'s texts (pydoc prose
interleaved with the model's own chat answers), on the gates exactly as the file stores them (int8
gates as int8). The texts are recorded in the checkpoint (`training["calibration_texts"]`), so an
on-the-fly fit of a budget off the grid uses the same texts. Only the threshold tables and that
record change: every other tensor stays bit for bit (no load and re-save), decode-fitted thresholds
included (they are fitted on the model's own answers, not on these texts).

python scripts/recalibrate.py gateskip_core/shipped_gates/smollm2-135m-instruct-default.safetensors [--threads 1]
"""

from __future__ import annotations

import argparse
import time

import torch

from gateskip_core import load_gates, load_model
from gateskip_core.gating.checkpoint import amend_checkpoint_file
from gateskip_core.skipping.calibration import RECORDED_TEXTS
from gateskip_core.training.calibration_texts import calibration_texts
from gateskip_core.training.loop import calibrate_checkpoint


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("checkpoint")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1 leaves the other core free)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    start = time.perf_counter()
    ckpt = load_gates(args.checkpoint)
    model = load_model(ckpt.model, gates=args.checkpoint)
    texts = calibration_texts(model, lambda line: print(line, flush=True))
    calibrate_checkpoint(model, ckpt, texts, lambda line: print(line, flush=True))
    tensors = {"calibration.thresholds": torch.as_tensor(ckpt.calibration_thresholds, dtype=torch.float64)}
    if len(ckpt.global_thresholds):
        tensors["calibration.global_thresholds"] = torch.as_tensor(ckpt.global_thresholds, dtype=torch.float64)
    amend_checkpoint_file(args.checkpoint, training={RECORDED_TEXTS: ckpt.training[RECORDED_TEXTS]}, tensors=tensors)
    print(
        f"recalibrated {args.checkpoint} ({', '.join(tensors)}; texts recorded) in {time.perf_counter() - start:.0f} s"
    )


if __name__ == "__main__":
    main()
