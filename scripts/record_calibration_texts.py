"""Record in a gate checkpoint the texts its stored thresholds were fitted on, after checking it.

Gates saved before checkpoints recorded their calibration texts (the shipped ones) make on-the-fly
fits fall back to pydoc prose, while their stored thresholds were fitted on prose + chat
(`training/calibration_texts.py`, as the training run and scripts/recalibrate.py fit them). This
refits some stored budgets on those texts and compares them with the stored rows (uniform and, with a
sensitivity profile, global): only where every refitted threshold matches within `--tolerance` are the
texts recorded (`training["calibration_texts"]`, a metadata-only rewrite: every tensor stays bit for
bit, the thresholds unchanged). One row per (checkpoint, allocation, budget) goes to the CSV.

python scripts/record_calibration_texts.py CHECKPOINT... [--budgets 0.25] [--tolerance 1e-6] [--dry-run]
    [--out docs/results/calibration_texts_check.csv]
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from gateskip_core import load_model
from gateskip_core.gating.checkpoint import amend_checkpoint_file
from gateskip_core.skipping.calibration import RECORDED_TEXTS, fitted_texts
from gateskip_core.training.calibration_texts import calibration_texts


def compare(model, texts: list[str], allocation: str, budget: float) -> dict:
    """Refit one stored row and say how far it is from the stored one."""
    ckpt = model.checkpoint
    table = ckpt.global_thresholds if allocation == "global" else ckpt.calibration_thresholds
    stored = table[int(np.flatnonzero(np.isclose(ckpt.calibration_budgets, budget))[0])]
    start = time.perf_counter()
    refit = model.fit_thresholds(model.budget(budget, allocation=allocation), texts=texts).thresholds
    finite = np.isfinite(stored)
    same_branches = bool(np.array_equal(finite, np.isfinite(refit)))
    diff = np.abs(refit[finite] - stored[finite]) if same_branches else np.array([np.inf])
    return {
        "allocation": allocation,
        "skip_budget": budget,
        "texts": len(fitted_texts(texts)),
        "same_never_skipping_branches": same_branches,
        "max_abs_difference": float(diff.max()) if diff.size else 0.0,
        "median_abs_threshold": float(np.median(np.abs(stored[finite]))) if finite.any() else 0.0,
        "seconds": round(time.perf_counter() - start, 1),
    }


def check(path: str, budgets: list[float], tolerance: float, dry_run: bool) -> list[dict]:
    model = load_model(load_gates_model_name(path), gates=path)
    ckpt = model.checkpoint
    texts = calibration_texts(model, print)
    allocations = ["uniform"] + (["global"] if len(ckpt.global_thresholds) else [])
    rows = []
    for allocation in allocations:
        for budget in budgets:
            rows.append({"checkpoint": Path(path).name, **compare(model, texts, allocation, budget)})
            print(rows[-1], flush=True)
    reproduced = all(r["max_abs_difference"] <= tolerance for r in rows)
    recorded = reproduced and not dry_run and ckpt.training.get(RECORDED_TEXTS) != fitted_texts(texts)
    if recorded:
        amend_checkpoint_file(path, training={RECORDED_TEXTS: fitted_texts(texts)})
    verdict = (
        "reproduced: texts recorded" if recorded else "reproduced" if reproduced else "NOT reproduced: nothing recorded"
    )
    print(f"{path}: {verdict}")
    return [{**r, "tolerance": tolerance, "reproduced": reproduced} for r in rows]


def load_gates_model_name(path: str) -> str:
    from gateskip_core import load_gates

    return load_gates(path).model


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("checkpoints", nargs="+")
    parser.add_argument("--budgets", default="0.25", help="stored budgets refitted, comma separated")
    parser.add_argument("--tolerance", type=float, default=1e-6, help="largest threshold difference accepted")
    parser.add_argument("--dry-run", action="store_true", help="compare only; write nothing to the checkpoints")
    parser.add_argument("--out", default="docs/results/calibration_texts_check.csv")
    args = parser.parse_args()
    torch.set_num_threads(1)
    budgets = [float(b) for b in args.budgets.split(",")]
    rows = [row for path in args.checkpoints for row in check(path, budgets, args.tolerance, args.dry_run)]
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    pd.DataFrame(rows).to_csv(args.out, index=False)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
