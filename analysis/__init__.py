"""GateSkip analysis, in two halves by what each needs.

- `analysis.traces`: functions over traces alone (a `Trace` in memory, a trace file, a dataset
  folder): the statistics engine (`tracedb.TraceDB`), token types and table summaries (`flow`),
  Plotly figures (`figures`), reading datasets back (`dataset`). No model, no torch.
- `analysis.experiments`: experiments that run a gated model: quality and chat fidelity
  (`quality`), budget sweeps against ShortGPT and random skipping (`sweep`), gate faithfulness
  (`faithfulness`), gate attribution (`attribution`), the logit lens (`logit_lens`), the
  TransformerLens bridge (`lens`) and tracing a corpus onto disk (`collect`).
- `analysis.cli`: the `gateskip` subcommands over both.
"""
