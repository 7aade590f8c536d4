"""Generation with a KV cache under skipping."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from gateskip_core import GatedModel, load_model

from .conftest import spread_gates

PROMPTS = ["Once upon a time there", "A much longer prompt that needs left padding in the batch"]


def uncached_greedy(model: GatedModel, prompts, n_new, **kw):
    """Re-run the whole sequence without a cache for every new token."""
    batch = model.encode(prompts)
    ids, mask = batch.input_ids, batch.attention_mask
    plan = model.make_plan(**kw)
    for _ in range(n_new):
        out = model.forward(ids, mask, plan)
        nxt = out.logits[:, -1].argmax(-1)
        ids = torch.cat([ids, nxt[:, None]], 1)
        mask = torch.cat([mask, torch.ones_like(nxt)[:, None]], 1)
    # decisions of every token that was fed to the model (the last one never is)
    out = model.forward(ids[:, :-1], mask[:, :-1], plan)
    return ids, mask, out


@pytest.mark.parametrize("kv", ["compute", "copy"])
@pytest.mark.parametrize("path", ["masked", "physical"])
def test_cached_generation_matches_uncached_rerun_under_calibrated_policy(tiny, kv, path):
    n_new = 12
    gen = tiny.generate(
        PROMPTS, max_new_tokens=n_new, skip=0.3, policy="calibrated", kv=kv, path=path, stop_at_eos=False
    )
    ids, mask, out = uncached_greedy(tiny, PROMPTS, n_new, skip=0.3, policy="calibrated", kv=kv, path=path)
    for b, seq in enumerate(gen.trace.sequences):
        real = mask[b, :-1].bool()
        assert gen.trace.extra["generated_token_ids"][b] == ids[b, -n_new:].tolist()
        assert np.array_equal(seq.token_ids, ids[b, :-1][real].numpy())
        assert np.array_equal(seq.skipped, out.skipped[b][real].numpy())
        assert seq.skipped[seq.prompt_length :].any()  # generated tokens really skip
        np.testing.assert_allclose(seq.gate, out.gate[b][real].numpy(), atol=1e-5)


def test_greedy_generation_without_skipping_matches_hugging_face():
    model = load_model("tiny-llama")
    gen = model.generate(PROMPTS[0], max_new_tokens=10, skip=0.0, stop_at_eos=False)
    batch = model.encode([PROMPTS[0]])
    ref = model.backbone.generate(
        batch.input_ids,
        attention_mask=batch.attention_mask,
        max_new_tokens=10,
        do_sample=False,
        min_new_tokens=10,
        pad_token_id=model.tokenizer.pad_token_id,
    )
    assert gen.trace.extra["generated_token_ids"][0] == ref[0, batch.input_ids.shape[1] :].tolist()


def test_sampling_is_seeded(tiny):
    a = tiny.generate(PROMPTS[0], max_new_tokens=8, skip=0.2, policy="random", do_sample=True, seed=5, top_k=20)
    b = tiny.generate(PROMPTS[0], max_new_tokens=8, skip=0.2, policy="random", do_sample=True, seed=5, top_k=20)
    c = tiny.generate(PROMPTS[0], max_new_tokens=8, skip=0.2, policy="random", do_sample=True, seed=6, top_k=20)
    assert a.trace.extra["generated_token_ids"] == b.trace.extra["generated_token_ids"]
    assert a.trace.extra["generated_token_ids"] != c.trace.extra["generated_token_ids"]
    assert isinstance(a.text, str)


def _running_quantile_reference(seq, budget: float) -> np.ndarray:
    """The decisions the quantile rule must make from a sequence's captured gates: over the prompt,
    the floor(b * n) lowest eligible tokens (ties by position); each generated token against its
    own sequence's earlier eligible tokens and itself (a running quantile)."""
    gate, eligible, n_prompt = seq.gate, seq.eligible, seq.prompt_length
    skipped = np.zeros_like(seq.skipped)
    for layer in range(gate.shape[1]):
        for b in range(2):
            values = gate[:, layer, b]
            prompt = np.flatnonzero(eligible[:n_prompt])
            k = int(np.floor(budget * len(prompt) + 1e-9))
            order = prompt[np.argsort(values[prompt], kind="stable")]
            skipped[order[:k], layer, b] = True
            for t in range(n_prompt, len(values)):
                seen = np.flatnonzero(eligible[: t + 1])
                k = int(np.floor(budget * len(seen) + 1e-9))
                if k > 0 and eligible[t]:
                    skipped[t, layer, b] = values[t] <= np.sort(values[seen])[k - 1]
    return skipped


def test_quantile_generation_uses_a_running_quantile_that_skips_new_tokens(tiny):
    """Each generated token is ranked against its own sequence's earlier tokens, also in a left-padded batch."""
    prompts = [PROMPTS[1], PROMPTS[0]]  # different lengths: the second is left padded
    gen = tiny.generate(prompts, max_new_tokens=10, skip=0.5, policy="quantile", stop_at_eos=False)
    for seq in gen.trace.sequences:
        assert seq.skipped[seq.prompt_length :].any()
        np.testing.assert_array_equal(seq.skipped, _running_quantile_reference(seq, 0.5))
    alone = tiny.generate(prompts[1], max_new_tokens=10, skip=0.5, policy="quantile", stop_at_eos=False)
    np.testing.assert_array_equal(alone.trace.sequences[0].skipped, gen.trace.sequences[1].skipped)


def test_chat_prompt_uses_the_template():
    model = spread_gates(load_model("tiny-llama"))
    gen = model.generate("hi", max_new_tokens=3, chat=True, skip=0.0)
    assert "".join(gen.trace.sequences[0].tokens).startswith("<|user|>hi<eos><|assistant|>")
