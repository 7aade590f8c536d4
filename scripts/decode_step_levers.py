"""One decoding step at batch 1 with each decode lever of issue 37 turned off in turn: where a step's
time goes beyond the dense walk's.

SmolLM2-135M-Instruct with the shipped default gates, calibrated policy (the thresholds a decode step
uses), physical path, one torch thread. The model answers a chat prompt (48 new tokens at
budget 0.25); the prompt and the first 40 generated tokens fill a KV cache, and each of the last 8
generated tokens is fed as one decode step at the end of it (the cache cropped back after each). Per
round every setting runs its 8 steps, settings in turns; a step's time is its best over the rounds, as
CPU time of this thread (the machine this ran on is shared: CPU time leaves out the time other
processes hold the core, not the cache they evict). Settings: the dense walk (no gates), and the gated
model at budgets 0 / 0.25 / 0.5 with every lever on (`all`), without the one-token decisions
(`forward/one_token.py`: per-branch tensors instead) and without the batched recording gates (each
gate evaluated when its branch is reached).

    python scripts/decode_step_levers.py [--rounds 8] [--out docs/results/decode_step_levers.csv]

docs/results/decode_step_levers_first_run.csv is the same command (`--rounds 8`) run minutes before the
stored one, written with `--out docs/results/decode_step_levers_first_run.csv`: a repeat, kept to show
how far two runs on an idle core differ.
"""

from __future__ import annotations

import argparse
import dataclasses
import time
from pathlib import Path

import pandas as pd
import torch

from gateskip_core import load_model
from gateskip_core.forward.cache import KVCache
from gateskip_core.forward.one_token import OneTokenDecisions
from gateskip_core.gating.gates import GateSet
from gateskip_core.training.chat_data import chat_prompts

BUDGETS = (0.0, 0.25, 0.5)
FED = 8  # decode steps timed per setting and round
LEVERS_OFF = ("none", "one-token decisions", "batched recording gates")


def _levers(off: str) -> None:
    """Turn every lever on, then `off` off (class attributes: the walk reads them per call)."""
    OneTokenDecisions.applies = staticmethod(_APPLIES if off != "one-token decisions" else (lambda *a: False))
    GateSet.batchable = _BATCHABLE if off != "batched recording gates" else property(lambda self: False)


_APPLIES, _BATCHABLE = OneTokenDecisions.applies, GateSet.batchable


def _step_plan(model, skip: float):
    """The plan a generation's decode steps use at budget `skip` (decode-fitted thresholds where stored)."""
    plan = model.make_plan(skip, policy="calibrated", path="physical")
    generated = model.calibrate_generated(plan.budget, plan.protect_bos) if skip else None
    return plan if generated is None else dataclasses.replace(plan, policy=generated)


def _filled_cache(model, context: torch.Tensor) -> KVCache:
    cache = KVCache().reserve(context.shape[1] + 1)
    model.forward(context, torch.ones_like(context), model.make_plan(0.0), cache=cache, logits_for="last")
    return cache


def measure(rounds: int) -> pd.DataFrame:
    torch.set_num_threads(1)
    gated = load_model("smollm2-135m-instruct", gates="default")
    dense = gated.view()
    dense.remove_gates()
    prompt = chat_prompts()[5]  # the bench's chat prompt: never trained on, a calibration prompt
    answer = gated.generate(prompt, max_new_tokens=48, chat=True, stop_at_eos=False, skip=0.25)
    seq = answer.trace.sequences[0]
    ids = torch.as_tensor(seq.token_ids)[None]
    context, fed = ids[:, :-FED], ids[0, -FED:].tolist()
    caches = {id(m): _filled_cache(m, context) for m in (gated, dense)}
    settings = [("dense walk", "none", dense, 0.0)]
    settings += [("gated", off, gated, skip) for off in LEVERS_OFF for skip in BUDGETS]
    plans = {i: _step_plan(m, skip) for i, (_, _, m, skip) in enumerate(settings)}
    best, skipped = {}, {}
    for round_ in range(rounds + 1):  # round 0 warms up
        for i, (_, off, model, _) in enumerate(settings):
            _levers(off)
            cache = caches[id(model)]
            for j, token in enumerate(fed):
                start = time.thread_time()
                out = model.forward(torch.tensor([[token]]), torch.ones(1, 1, dtype=torch.long), plans[i], cache=cache)
                seconds = time.thread_time() - start
                cache.crop(context.shape[1])
                if round_:
                    best[i, j] = min(best.get((i, j), seconds), seconds)
                skipped[i, j] = float(out.skipped.float().mean())
    _levers("none")
    step = {i: sum(best[i, j] for j in range(FED)) / FED for i in range(len(settings))}
    rows = [
        {"model": name, "lever_off": off, "budget": skip, "step_ms_cpu": step[i] * 1e3,
         "speed_vs_dense_walk": step[0] / step[i], "skipped": sum(skipped[i, j] for j in range(FED)) / FED,
         "rounds": rounds}
        for i, (name, off, _, skip) in enumerate(settings)
    ]  # fmt: skip
    return pd.DataFrame(rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=8)
    parser.add_argument("--out", default="docs/results/decode_step_levers.csv")
    args = parser.parse_args()
    frame = measure(args.rounds)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    frame.to_csv(args.out, index=False, float_format="%.4g")
    print(frame.to_string(index=False))


if __name__ == "__main__":
    main()
