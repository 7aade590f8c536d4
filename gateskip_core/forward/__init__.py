"""The gated forward that skips compute for real.

- `execution`: one walk over the layers (`gated_forward`) taking a `SkipPlan` (`skipping.plan`):
  masked or physical skipping, the adapter's rows, and what a `Capture` records;
- `attention`: the kernels the walk calls (rotary embeddings, q/k/v projections, masks, attention);
- `rows`: the packed tokens that run a branch, and which rows add the adapter's delta;
- `cache`: the KV cache of one generation call;
- `generation`: decoding token by token with the cache.
- `speculative`: self-speculative decoding: the gated model drafts, the original checks (its greedy tokens).
"""
