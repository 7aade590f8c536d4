"""Self-speculative decoding against our dense walk: tokens/s, acceptance, and what one round costs.

Every setting (draft budget B, draft tokens K) generates the same greedy continuation as the dense
walk (checked per row: `identical_to_dense`), so the only question is speed. Methods are timed in
turns (`interleaved`), and the table keeps ratios to the dense walk of the same turns: on a shared
machine absolute tokens/s drift, ratios much less.

One round costs K draft steps plus one verifier pass over K+1 tokens, and yields the accepted drafts
plus one token. The cost columns measure those two parts in units of one dense decoding step, on a
cache holding the prompt, so `predicted_speedup` = tokens per round / (K x draft step + verify pass)
says which part stands in the way.
"""

from __future__ import annotations

from functools import partial

import torch

from gateskip_core.forward.cache import KVCache
from gateskip_core.model import GatedModel


def bench_speculative(base: GatedModel, cfg, log, interleaved, text_of_tokens) -> list[dict]:
    """One row per (draft budget, draft tokens) and one for the dense walk, at batch 1.
    `interleaved`, `text_of_tokens`: the suite's timing in turns and its held-out prose."""
    view = base.view()
    view.load_gates(cfg.gates)
    dense = base.view()  # our walk over the original's weights, without gates: what the verifier runs
    prompt = text_of_tokens(base, cfg.speculative_prompt)
    n_new = cfg.speculative_new_tokens

    def run(model, n=n_new, **args):
        return model.generate(prompt, max_new_tokens=n, stop_at_eos=False, policy="calibrated", **args)

    fns, short = {"dense-walk": partial(run, dense, skip=0.0)}, {"dense-walk": partial(run, dense, 4, skip=0.0)}
    settings = [(b, k) for b in cfg.speculative_skips for k in cfg.speculative_tokens]
    for b, k in settings:
        fns[b, k] = partial(run, view, draft_skip=b, draft_tokens=k)
        short[b, k] = partial(run, view, 4, draft_skip=b, draft_tokens=k)
    times, outputs = interleaved(fns, cfg.repeats, warmups=short)
    costs = _step_costs(base, view, dense, prompt, cfg, interleaved)
    reference = outputs["dense-walk"].trace.extra["generated_token_ids"]
    dense_s = times["dense-walk"]["median_s"]
    rows = [{"method": "dense-walk", "tokens_per_s": n_new / dense_s, **times["dense-walk"]}]
    for b, k in settings:
        record, timing = outputs[b, k].speculative, times[b, k]
        per_round = (n_new - 1) / record.rounds  # tokens after the prefill's first, per verifier pass
        round_cost = k * costs["draft", b] + costs["verify", k]
        rows.append(
            {
                "method": "speculative",
                "draft_skip": b,
                "draft_tokens": k,
                "tokens_per_s": n_new / timing["median_s"],
                **timing,
                "speedup_vs_dense_walk": dense_s / timing["median_s"],
                "acceptance_rate": record.acceptance_rate,
                "draft_skip_rate": record.draft_skip_rate,
                "tokens_per_round": per_round,
                "draft_step_cost": costs["draft", b],
                "verify_cost": costs["verify", k],
                "predicted_speedup": per_round / round_cost,
                "identical_to_dense": outputs[b, k].trace.extra["generated_token_ids"] == reference,
            }
        )
        log(
            f"speculative B={b} K={k}: {rows[-1]['speedup_vs_dense_walk']:.2f}x dense walk, "
            f"acceptance {record.acceptance_rate:.0%}, {per_round:.2f} tokens/round"
        )
    return rows


def _step_costs(base: GatedModel, view: GatedModel, dense: GatedModel, prompt: str, cfg, interleaved) -> dict:
    """Seconds of a draft step (per budget) and of a verify pass (per K), over a dense step's."""
    batch = base.encode([prompt])
    prompt_ids = batch.input_ids.to(base.device)  # moved once: no timed step copies it
    cache = KVCache().reserve(prompt_ids.shape[1] + max(cfg.speculative_tokens) + 1)
    zero = dense.make_plan(0.0)
    dense.forward(prompt_ids, batch.attention_mask, zero, cache=cache, logits_for="last")
    start = cache.n_slots

    def step(model, plan, n_tokens, logits_for):
        ids = prompt_ids[:, -n_tokens:]
        model.forward(ids, torch.ones_like(ids), plan, cache=cache, logits_for=logits_for)
        cache.crop(start)

    fns = {"dense": partial(step, dense, zero, 1, "last")}
    for b in cfg.speculative_skips:
        plan = view.make_plan(b, policy="calibrated", path="physical")
        fns["draft", b] = partial(step, view, plan, 1, "last")
    for k in cfg.speculative_tokens:
        fns["verify", k] = partial(step, dense, zero, k + 1, "all")
    seconds = {name: t["median_s"] for name, t in interleaved(fns, cfg.speculative_step_repeats)[0].items()}
    return {name: s / seconds["dense"] for name, s in seconds.items() if name != "dense"}
