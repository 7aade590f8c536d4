"""Add decode-fitted thresholds to a gate checkpoint, for generated tokens.

For every stored budget (`calibration.budgets`), under the uniform allocation and, with a sensitivity
profile, the global one: thresholds fitted on decode steps of the model's own greedy answers (budget
0, `--new-tokens` each) to the training's calibration chat prompts (training/chat_data.py
chat_prompts()[5::11], the ones `calibration_texts` uses; none of analysis' held-out chat prompts),
see `calibration.fit_generated_thresholds` (the prompts' tokens decided with the checkpoint's stored
prompt set at each budget, as generation decides them: run it after that set is final, e.g. after
scripts/recalibrate.py). They are written as `calibration.generated_thresholds` /
`calibration.generated_global_thresholds` with the prompts in `training["decode_calibration"]` (so an
on-the-fly fit of another budget reads the same answers); every tensor already in the file stays bit
for bit. `generate` then decides generated tokens with them (prompt tokens keep the stored ones).

python scripts/fit_decode_thresholds.py gateskip_core/shipped_gates/smollm2-135m-instruct-default.safetensors
    [--prompts 24] [--new-tokens 48] [--allocations uniform,global]
"""

from __future__ import annotations

import argparse
import time

import torch

from gateskip_core import load_gates, load_model
from gateskip_core.gating.checkpoint import amend_checkpoint_file
from gateskip_core.skipping.calibration import (
    DECODE_CALIBRATION,
    GENERATED_FIT_TOKENS,
    fit_generated_table,
    own_answers,
)
from gateskip_core.training.chat_data import chat_prompts

TABLES = {"uniform": "calibration.generated_thresholds", "global": "calibration.generated_global_thresholds"}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("checkpoint")
    parser.add_argument("--prompts", type=int, default=24, help="calibration chat prompts answered (24 at most)")
    parser.add_argument("--new-tokens", type=int, default=GENERATED_FIT_TOKENS, help="greedy new tokens per answer")
    parser.add_argument(
        "--allocations", default="uniform,global", help="threshold grids fitted (global: with a profile)"
    )
    args = parser.parse_args()
    torch.set_num_threads(1)
    ckpt = load_gates(args.checkpoint)
    model = load_model(ckpt.model, gates=args.checkpoint)
    prompts = chat_prompts()[5::11][: args.prompts]
    start = time.perf_counter()
    answers = own_answers(model, prompts, args.new_tokens)
    print(
        f"{len(answers)} answers, {sum(len(t) - n for t, n in answers)} answer tokens in {time.perf_counter() - start:.0f} s"
    )
    tensors = {}
    for allocation in args.allocations.split(","):
        if allocation == "global" and ckpt.sensitivity is None:
            continue
        start = time.perf_counter()
        table = fit_generated_table(model, allocation, prompts, answers)
        tensors[TABLES[allocation]] = torch.as_tensor(table, dtype=torch.float64)
        print(f"{allocation}: {len(table)} budgets fitted in {time.perf_counter() - start:.0f} s", flush=True)
    record = {"prompts": list(prompts), "max_new_tokens": args.new_tokens}
    amend_checkpoint_file(args.checkpoint, training={DECODE_CALIBRATION: record}, tensors=tensors)
    print(f"wrote {', '.join(tensors)} to {args.checkpoint}")


if __name__ == "__main__":
    main()
