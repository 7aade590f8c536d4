"""The gated forward that skips compute for real.

- `execution`: one walk over the layers (`gated_forward`) taking a `SkipPlan`: masked or physical
  skipping, the adapter's rows, the KV cache, and what a `Capture` records;
- `generation`: decoding token by token with the cache.
"""
