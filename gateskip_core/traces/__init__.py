"""What a gated run leaves behind: per-token, per-layer gate values and decisions.

- `trace`: `Trace` / `SequenceTrace`, their CSV and Parquet round trip, and their notebook view;
- `compute`: the FLOP account of what ran (`ComputeAccount`) and the bytes model of decoding.

Neither imports torch: a trace file reads on a machine without it.
"""
