"""Functions over traces alone: a `Trace` in memory, a trace file (.csv / .parquet) or a dataset folder.

- `tracedb`: the statistics engine (DuckDB): layer, BOS, token-type and token tables, corpus queries;
- `flow`: token types and summaries of the tables;
- `figures`: Plotly figures of traces and tables;
- `display`: a figure shown in a notebook interactively and as a static PNG (`show`);
- `dataset`: dataset folders and trace files read back (`open_dataset`, `iter_traces`).

Nothing here runs a model or imports torch.
"""
