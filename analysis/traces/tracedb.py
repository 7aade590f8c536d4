"""The statistics engine: DuckDB views over traces in memory, a trace file or a dataset folder.

    db = TraceDB("traces/")            # a dataset folder, a .parquet or a .csv trace file
    db = TraceDB(trace)                # a Trace (or a list of Traces) in memory
    db.sql("SELECT layer, avg(skipped) FROM traces WHERE branch = 'mlp' GROUP BY layer").df()

Views (stable names):
    traces   one row per token, layer and branch: the trace columns (`gateskip_core.traces.trace`)
    tokens   one row per token: sequence_id, position, token_id, token, token_type, eligible,
             prompt_length (token_type as `analysis.traces.flow.token_type`: bos, special, whitespace,
             punctuation, digits, stopword, content)

One engine computes every table, wherever the rows live: the statistics tables of `gateskip stats`
and the dashboard (`layer_table`, `bos_table`, `token_type_table`, `token_table`), and the ready-made queries
(`skip_rates`, `token_leaderboard`, `position_profile`, `type_profile`, `example_contexts`) give
rates with Wilson 95% intervals (tokens counted as independent trials). DuckDB reads the Parquet
shards directly and spills to disk past `memory_limit`: nothing is loaded into pandas but results
(traces in memory are handed to DuckDB as one DataFrame).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd

from gateskip_core import BRANCHES, GateSkipError, Trace
from gateskip_core.branches import branches_per_token
from gateskip_core.traces.trace import NO_GATES, UNRECORDED_WEIGHTS

from .dataset import is_dataset_path, open_dataset
from .flow import TOKEN_TYPES, token_type
from .intervals import cluster_mean_interval

N_BINS = 2000  # histogram bins over [0, 1] for the percentiles: exact to 5e-4
PERCENTILES = (5, 25, 50, 75, 95)

Z95 = 1.959963984540054
_MEMORY_ROWS = "memory_rows"  # the DataFrame of Traces given in memory, registered under this name
POSITION_BUCKETS = (0, 1, 4, 16, 64, 256, 1024)  # bucket starts: [0], [1,4), [4,16), ...
_CSV_TYPES = {
    "sequence_id": "BIGINT",
    "position": "BIGINT",
    "token_id": "BIGINT",
    "token": "VARCHAR",
    "layer": "BIGINT",
    "branch": "VARCHAR",
    "gate": "DOUBLE",
    "threshold": "DOUBLE",
    "skipped": "BIGINT",
    "gate_applied": "BIGINT",
    "eligible": "BIGINT",
    "skip_budget": "DOUBLE",
    "policy": "VARCHAR",
    "model": "VARCHAR",
    "weights": "VARCHAR",
    "gates": "VARCHAR",
    "adapter_scope": "VARCHAR",
    "path": "VARCHAR",
    "kv": "VARCHAR",
    "protect_bos": "BIGINT",
    "branches": "VARCHAR",
    "prompt_length": "BIGINT",
    "dense_flops": "DOUBLE",
    "skipping_flops": "DOUBLE",
    "executed_flops": "DOUBLE",
    "gate_flops": "DOUBLE",
}


def _csv_header(path: Path) -> list[str]:
    """The column names of a CSV trace file (files written before a column was added lack it)."""
    try:
        columns = list(pd.read_csv(path, nrows=0).columns)
    except Exception as err:  # pandas raises many types for unreadable files
        raise GateSkipError(f"cannot read traces {path}: {str(err).splitlines()[0]}") from None
    return ["branch" if c == "module" else c for c in columns]


def _traces_columns(columns: list[str]) -> str:
    """The select list of the `traces` view over the raw columns: tokens never NULL, and files written
    before a rename or a new column read as current ones (`module` -> `branch`; `adapter_scope` from
    the gates label, `gate_applied` from the decisions in walk order, as `applied_gates` derives them)."""
    select = ["* REPLACE (coalesce(token, '') AS token)"]
    if "module" in columns and "branch" not in columns:
        select = ["* RENAME (module AS branch)"]
    if "weights" not in columns:  # written before traces recorded the backbone's weights
        select.append(f"'{UNRECORDED_WEIGHTS}' AS weights")
    scope = "adapter_scope"
    if "adapter_scope" not in columns:
        scope = "CASE WHEN gates LIKE '%(adapter scope: skipped)%' THEN 'skipped' ELSE 'all' END"
        select.append(f"{scope} AS adapter_scope")
    if "gate_applied" not in columns:
        branch = "branch" if "branch" in columns else "module"
        walk = (
            f"max(skipped) OVER (PARTITION BY sequence_id, position ORDER BY layer, {branch} ROWS UNBOUNDED PRECEDING)"
        )
        select.append(
            f"CAST(skipped = 0 AND gates != '{NO_GATES}' AND ({scope} = 'all' OR {walk} = 1) AS BIGINT) AS gate_applied"
        )
    return ", ".join(select)


def wilson(k, n, z: float = Z95) -> tuple[np.ndarray, np.ndarray]:
    """Wilson score interval of k successes in n trials (NaN where n = 0)."""
    k, n = np.asarray(k, dtype=float), np.asarray(n, dtype=float)
    with np.errstate(invalid="ignore", divide="ignore"):
        p = k / n
        denom = 1 + z**2 / n
        centre = (p + z**2 / (2 * n)) / denom
        half = z * np.sqrt(p * (1 - p) / n + z**2 / (4 * n**2)) / denom
    return centre - half, centre + half


def _quote(path: Path) -> str:
    return "'" + str(path).replace("'", "''") + "'"


def _frame(traces: Sequence[Trace]) -> pd.DataFrame:
    """The traces' rows as one table, sequence ids running on from one trace to the next."""
    frames, first = [], 0
    for trace in traces:
        df = trace.to_dataframe()
        df["sequence_id"] += first
        first += len(trace.sequences)
        frames.append(df)
    if not frames:
        raise GateSkipError("no traces given")
    return pd.concat(frames, ignore_index=True)


class TraceDB:
    """An in-memory DuckDB connection with the `traces` and `tokens` views over `source`: a Trace or a
    list of Traces in memory, a trace file (.csv / .parquet) or a dataset folder.

    `cells`: which cells the gate statistics pool by default (each table method takes `cells=` too,
    and names its choice in a `gate_cells` column): 'applied' (the default), the cells whose gate
    scaled the branch's output (`gate_applied`), the reading of a gate as what the model did with the
    branch; 'all', every token's gate, the ranking score the skip policy read (in adapter scope
    'skipped' most of those scaled nothing). Skip rates always pool the eligible tokens."""

    def __init__(
        self,
        source: Trace | Sequence[Trace] | str | Path,
        memory_limit: str = "1GB",
        threads: int | None = None,
        cells: str = "applied",
    ):
        import duckdb

        self.cells = cells
        self._cells(cells)  # a bad name fails before any file is read
        config = {"memory_limit": memory_limit}
        if threads:
            config["threads"] = int(threads)
        self.con = duckdb.connect(":memory:", config=config)
        self.dataset = None
        scan = self._scan(source)
        try:
            self.con.execute(f"CREATE VIEW raw_traces AS SELECT * FROM {scan}")
            columns = [row[0] for row in self.con.execute("DESCRIBE raw_traces").fetchall()]
            self.con.execute(f"CREATE VIEW traces AS SELECT {_traces_columns(columns)} FROM raw_traces")
            present = set(self._columns("traces"))  # one DESCRIBE, not one per expected column
            missing = [c for c in _CSV_TYPES if c not in present]
            if missing:
                raise GateSkipError(f"not a GateSkip trace: missing columns {', '.join(missing)}")
            # A dataset's shards are checked by their stamps and row counts; Traces in memory are whole.
            if self.dataset is None and scan != _MEMORY_ROWS:
                self._check_complete()
            self._make_tokens_view()
        except duckdb.Error as err:
            raise GateSkipError(f"cannot read traces {self.source}: {str(err).splitlines()[0]}") from None

    def _scan(self, source: Trace | Sequence[Trace] | str | Path) -> str:
        """What the `raw_traces` view reads; sets `source` (for messages) and `dataset`."""
        if isinstance(source, Trace):
            source = [source]
        if isinstance(source, Sequence) and not isinstance(source, str):
            if not all(isinstance(t, Trace) for t in source):
                raise GateSkipError("TraceDB reads a Trace, a list of Traces, a trace file or a dataset folder")
            self.source = "the traces in memory"
            self.con.register(_MEMORY_ROWS, _frame(source))
            return _MEMORY_ROWS
        source = self.source = Path(source)
        if is_dataset_path(source):
            self.dataset = open_dataset(source)
            return "read_parquet([" + ", ".join(_quote(p) for p in self.dataset.shard_paths) + "])"
        if not source.is_file():
            raise GateSkipError(f"trace file not found: {source}")
        if source.suffix.lower() == ".csv":
            header = _csv_header(source)
            types = "{" + ", ".join(f"'{c}': '{t}'" for c, t in _CSV_TYPES.items() if c in header) + "}"
            return f"read_csv({_quote(source)}, header = true, columns = {types}, quote = '\"', escape = '\"')"
        return f"read_parquet({_quote(source)})"

    def _check_complete(self) -> None:
        """Every sequence of a trace file has 2 x layers rows per token and at least its prompt."""
        n_layers = self.con.execute("SELECT max(layer) + 1 FROM traces").fetchone()[0]
        if n_layers is None:
            raise GateSkipError(f"trace file {self.source} holds no rows")
        bad = self.con.execute(
            """SELECT sequence_id, count(*) AS n, max(position) + 1 AS t, max(prompt_length) AS prompt
               FROM traces GROUP BY sequence_id HAVING count(*) != (max(position) + 1) * ?
                   OR max(prompt_length) > max(position) + 1
               ORDER BY sequence_id LIMIT 1""",
            [branches_per_token(int(n_layers))],
        ).fetchone()
        if bad is not None:
            sid, n, t, prompt = bad
            if prompt > t:
                raise GateSkipError(f"trace is cut: sequence {sid} has {t} tokens but its prompt alone had {prompt}")
            raise GateSkipError(f"trace is incomplete: sequence {sid} has {n} rows, not {t} x {n_layers} x 2")

    def _columns(self, view: str) -> list[str]:
        return [row[0] for row in self.con.execute(f"DESCRIBE {view}").fetchall()]

    def _make_tokens_view(self) -> None:
        # Token types depend on the string (and position 0 = bos); classify each distinct string once.
        distinct = [
            r[0]
            for r in self.con.execute(
                "SELECT DISTINCT token FROM traces WHERE layer = 0 AND branch = 'attn'"
            ).fetchall()
        ]
        kinds = pd.DataFrame({"token": distinct, "token_type": [token_type(t, 1) for t in distinct]})
        self.con.register("token_kinds_df", kinds)
        self.con.execute("CREATE TABLE token_kinds AS SELECT * FROM token_kinds_df")
        self.con.unregister("token_kinds_df")
        self.con.execute(
            """CREATE VIEW tokens AS
            SELECT t.sequence_id, t.position, t.token_id, t.token,
                   CASE WHEN t.position = 0 THEN 'bos' ELSE k.token_type END AS token_type,
                   t.eligible, t.prompt_length
            FROM traces t JOIN token_kinds k USING (token)
            WHERE t.layer = 0 AND t.branch = 'attn'"""
        )

    def sql(self, query: str):
        """A DuckDB relation of `query` (`.df()`, `.write_csv(path)`, `.write_parquet(path)`)."""
        import duckdb

        try:
            return self.con.sql(query)
        except duckdb.Error as err:
            raise GateSkipError(f"query failed: {str(err).splitlines()[0]}") from None

    def df(self, query: str, params: list | None = None) -> pd.DataFrame:
        import duckdb

        try:
            return self.con.execute(query, params or []).df()
        except duckdb.Error as err:
            raise GateSkipError(f"query failed: {str(err).splitlines()[0]}") from None

    def close(self) -> None:
        self.con.close()

    # ---- counts
    def counts(self) -> dict[str, int]:
        row = self.con.execute(
            "SELECT count(DISTINCT sequence_id), count(*) FROM traces WHERE layer = 0 AND branch = 'attn'"
        ).fetchone()
        n_layers = self.con.execute("SELECT max(layer) + 1 FROM traces").fetchone()[0]
        return {"sequences": int(row[0]), "tokens": int(row[1]), "layers": int(n_layers or 0)}

    # ---- which cells the gate statistics pool
    def _cells(self, cells: str | None) -> str:
        cells = self.cells if cells is None else cells
        if cells not in GATE_CELLS:
            raise GateSkipError(f"cells must be one of {', '.join(GATE_CELLS)}, got {cells!r}")
        return cells

    def _clustered(self, keys: str, source: str, measures: dict[str, tuple[str, str]]) -> pd.DataFrame:
        """Per `keys`: for each measure (value, count) the sums over sequences that a clustered interval
        needs (`intervals.cluster_mean_interval`): {name}_y, _n, _yy, _yn, _nn and _k (sequences)."""
        inner = ", ".join(
            f"sum({value}) AS {name}_y, sum({count}) AS {name}_n" for name, (value, count) in measures.items()
        )
        outer = ", ".join(
            f"sum({m}_y) AS {m}_y, sum({m}_n) AS {m}_n, sum({m}_y * {m}_y) AS {m}_yy, sum({m}_y * {m}_n) AS {m}_yn, "
            f"sum({m}_n * {m}_n) AS {m}_nn, count(*) FILTER (WHERE {m}_n > 0) AS {m}_k"
            for m in measures
        )
        return self.df(
            f"""WITH per_sequence AS (SELECT {keys}, sequence_id, {inner} FROM {source} GROUP BY ALL)
                SELECT {keys}, {outer} FROM per_sequence GROUP BY ALL"""
        )

    # ---- the tables of `gateskip stats`
    def layer_table(self, cells: str | None = None) -> pd.DataFrame:
        """Per (layer, branch): the gate's mean (95% interval clustered by sequence), spread and
        percentiles over the cells named in `gate_cells` (`gate_n` of them: 'applied' = the gate scaled
        the branch, 'all' = every token); the skip rate over eligible tokens (interval clustered by
        sequence); and `applied_share`, the share of the tokens that ran the branch whose gate acted."""
        cells = self._cells(cells)
        pooled = GATE_CELLS[cells]
        sums = self.df(
            f"""SELECT layer, branch, count(*) AS tokens,
                   sum(gate * gate) FILTER (WHERE {pooled}) AS ss,
                   count(*) FILTER (WHERE skipped = 0) AS ran, sum(gate_applied) AS applied,
                   sum(CASE WHEN isfinite(threshold) THEN threshold ELSE 0 END) AS thr_sum,
                   count(*) FILTER (WHERE isfinite(threshold)) AS thr_n,
                   arg_min(skip_budget, sequence_id) AS skip_budget
            FROM traces GROUP BY layer, branch"""
        )
        if sums.empty:
            raise GateSkipError(f"{self.source} holds no trace rows")
        clustered = self._clustered("layer, branch", "traces", _flow_measures(pooled))
        sums = sums.merge(clustered, on=["layer", "branch"]).set_index(["layer", "branch"])
        percentiles = self._gate_percentiles(pooled, int(sums.index.get_level_values(0).max()) + 1)
        rows = []
        for layer, branch in [(layer, branch) for layer in range(len(percentiles) // 2) for branch in BRANCHES]:
            r = sums.loc[(layer, branch)]
            gate, gate_low, gate_high = _mean_interval(r, "gate")
            rate, rate_low, rate_high = _mean_interval(r, "skip")
            n = float(r["gate_n"])
            row = {"layer": layer, "branch": branch, "gate_cells": cells, "gate_n": int(n), "gate_mean": gate}
            row["gate_mean_low"], row["gate_mean_high"] = gate_low, gate_high
            row["gate_std"] = float(np.sqrt(max(0.0, r["ss"] / n - gate**2))) if n else float("nan")
            row.update(percentiles[(layer, branch)])
            row.update({"skip_rate": rate, "skip_rate_low": rate_low, "skip_rate_high": rate_high})
            row["eligible"] = int(r["skip_n"])  # the tokens the skip rate pools
            row["threshold"] = r["thr_sum"] / r["thr_n"] if r["thr_n"] else float("nan")
            row["skip_budget"] = float(r["skip_budget"])
            row["tokens"] = int(r["tokens"])
            row["applied_share"] = r["applied"] / r["ran"] if r["ran"] else float("nan")
            rows.append(row)
        return pd.DataFrame(rows)

    def _gate_percentiles(self, pooled: str, n_layers: int) -> dict[tuple[int, str], dict[str, float]]:
        """PERCENTILES of the gate over the pooled cells, from a histogram of N_BINS bins (NaN: no cell)."""
        hist = self.df(
            f"""SELECT layer, branch, least(greatest(floor(gate * {N_BINS}), 0), {N_BINS - 1})::BIGINT AS bin,
                   count(*) AS n
            FROM traces WHERE {pooled} GROUP BY ALL"""
        )
        counts = np.zeros((n_layers, 2, N_BINS))
        b_index = hist["branch"].map(BRANCHES.index).to_numpy(np.int64)  # typed: no pooled cell gives no rows
        cells = (hist["layer"].to_numpy(np.int64), b_index, hist["bin"].to_numpy(np.int64))
        np.add.at(counts, cells, hist["n"].to_numpy(np.float64))
        out = {}
        for layer in range(n_layers):
            for b, branch in enumerate(BRANCHES):
                cdf = np.cumsum(counts[layer, b])
                out[(layer, branch)] = {
                    f"gate_p{p}": (min(int(np.searchsorted(cdf, p / 100 * cdf[-1])), N_BINS - 1) + 0.5) / N_BINS
                    if cdf[-1]
                    else float("nan")
                    for p in PERCENTILES
                }
        return out

    def bos_table(self, cells: str | None = None) -> pd.DataFrame:
        """Per (layer, branch), over sequences of 2+ tokens: the first token's (BOS) gate, the mean gate of
        the other tokens, their ratio and BOS's mean rank among them, over the cells named in `gate_cells`
        (with 'applied', a sequence counts only where BOS's gate acted; NaN where it never did).
        `bos_distinct`: how many different BOS gate values there are: BOS opens every text the same way,
        so 1 means the `sequences` repeat one measurement."""
        cells = self._cells(cells)
        pooled = GATE_CELLS[cells]
        per_layer = self.df(
            f"""WITH lengths AS (
                   SELECT sequence_id FROM traces WHERE layer = 0 AND branch = 'attn'
                   GROUP BY sequence_id HAVING count(*) > 1),
               first AS (
                   SELECT t.sequence_id, t.layer, t.branch, t.gate AS g0
                   FROM traces t SEMI JOIN lengths l ON t.sequence_id = l.sequence_id
                   WHERE t.position = 0 AND {pooled}),
               per_seq AS (
                   SELECT t.sequence_id, t.layer, t.branch, any_value(f.g0) AS g0, avg(t.gate) AS others,
                          1 + count(*) FILTER (WHERE t.gate > f.g0) AS rank
                   FROM traces t JOIN first f USING (sequence_id, layer, branch)
                   WHERE t.position > 0 AND {pooled} GROUP BY ALL)
            SELECT layer, branch, sum(g0) AS g0, sum(others) AS others, sum(rank) AS rank, count(*) AS n,
                   count(DISTINCT round(g0, 6)) AS distinct_g0
            FROM per_seq GROUP BY ALL"""
        ).set_index(["layer", "branch"])
        rows = []
        for layer in range(self.counts()["layers"]):
            for branch in BRANCHES:
                r = per_layer.loc[(layer, branch)] if (layer, branch) in per_layer.index else None
                n = int(r["n"]) if r is not None else 0
                first = float(r["g0"]) / n if n else float("nan")
                others = float(r["others"]) / n if n else float("nan")
                rows.append(
                    {
                        "layer": layer,
                        "branch": branch,
                        "gate_cells": cells,
                        "bos_gate": first,
                        "others_gate": others,
                        "ratio": first / others if n and others else float("nan"),
                        "mean_rank": float(r["rank"]) / n if n else float("nan"),
                        "sequences": n,
                        "bos_distinct": int(r["distinct_g0"]) if n else 0,
                    }
                )
        return pd.DataFrame(rows)

    def token_type_table(self, cells: str | None = None) -> pd.DataFrame:
        """Per (token type, layer, branch): the mean gate over the cells named in `gate_cells` (`gate_n`)
        and the skip rate over eligible tokens, each with a 95% interval clustered by sequence."""
        cells = self._cells(cells)
        source = """(SELECT t.*, k.token_type FROM traces t
                     JOIN (SELECT sequence_id, position, token_type FROM tokens) k USING (sequence_id, position))"""
        table = self._clustered("token_type, layer, branch", source, _flow_measures(GATE_CELLS[cells]))
        counts = self.df(
            """SELECT k.token_type, t.layer, t.branch, count(*) AS tokens
                FROM traces t JOIN (SELECT sequence_id, position, token_type FROM tokens) k USING (sequence_id, position)
                GROUP BY ALL"""
        )
        table = table.merge(counts, on=["token_type", "layer", "branch"])
        table["gate_cells"], table["gate_n"] = cells, table["gate_n"].astype(int)
        table["gate_mean"], table["gate_mean_low"], table["gate_mean_high"] = _mean_interval(table, "gate")
        table["skip_rate"], table["skip_rate_low"], table["skip_rate_high"] = _mean_interval(table, "skip")
        table["order"] = table["token_type"].map(TOKEN_TYPES.index) * 10**6 + table["layer"] * 2
        table["order"] += table["branch"].map(BRANCHES.index)
        table = table.sort_values("order", ignore_index=True)
        table["tokens"] = table["tokens"].astype(int)
        columns = ["gate_cells", "gate_n", "gate_mean", "gate_mean_low", "gate_mean_high"]
        return table[
            ["token_type", "layer", "branch", *columns, "skip_rate", "skip_rate_low", "skip_rate_high", "tokens"]
        ]

    def token_table(self, min_count: int = 1, cells: str | None = None) -> pd.DataFrame:
        """Per token id: occurrences and mean importance (mean gate over layers and branches, over the
        cells named in `gate_cells`, `gate_n` of them; NaN where none, ranked last)."""
        cells = self._cells(cells)
        table = self.df(
            f"""SELECT token_id, arg_min(token, sequence_id * 1000000 + position) AS token,
                      count(*) FILTER (WHERE layer = 0 AND branch = 'attn') AS count,
                      avg(gate) FILTER (WHERE {GATE_CELLS[cells]}) AS mean_gate,
                      count(*) FILTER (WHERE {GATE_CELLS[cells]}) AS gate_n
               FROM traces GROUP BY token_id HAVING count(*) FILTER (WHERE layer = 0 AND branch = 'attn') >= ?""",
            [int(min_count)],
        )
        table["count"], table["gate_n"] = table["count"].astype(int), table["gate_n"].astype(int)
        table.insert(3, "gate_cells", cells)
        return table.sort_values(
            ["mean_gate", "token_id"], ascending=[False, True], ignore_index=True, na_position="last"
        )

    # ---- ready-made queries
    def skip_rates(self, cells: str | None = None) -> pd.DataFrame:
        """Per (layer, branch): eligible tokens, skipped, the skip rate with its 95% interval, mean gate
        (over the cells named in `gate_cells`)."""
        cells = self._cells(cells)
        table = self.df(
            f"""SELECT layer, branch, sum(eligible) AS eligible,
                      sum(CASE WHEN skipped = 1 AND eligible = 1 THEN 1 ELSE 0 END) AS skipped, {_gate_mean(cells)}
               FROM traces GROUP BY ALL ORDER BY layer, branch"""
        )
        return _with_rate(table)

    def token_leaderboard(
        self,
        layer: int,
        branch: str,
        min_count: int = 20,
        token_types: list[str] | None = None,
        limit: int = 20,
        most_skipped: bool = True,
        cells: str | None = None,
    ) -> pd.DataFrame:
        """The token strings that skip (layer, branch) most (or least) often, among those seen at
        least `min_count` times as eligible tokens; optionally only some token types. Mean gate over the
        cells named in `gate_cells`."""
        _check_cell(layer, branch)
        cells = self._cells(cells)
        types = list(token_types or TOKEN_TYPES)
        bad = [t for t in types if t not in TOKEN_TYPES]
        if bad:
            raise GateSkipError(f"unknown token type {bad[0]!r}; one of {', '.join(TOKEN_TYPES)}")
        table = self.df(
            f"""SELECT t.token, any_value(k.token_type) AS token_type, sum(t.eligible) AS eligible,
                      sum(CASE WHEN t.skipped = 1 AND t.eligible = 1 THEN 1 ELSE 0 END) AS skipped,
                      {_gate_mean(cells)}
               FROM traces t JOIN (SELECT sequence_id, position, token_type FROM tokens) k USING (sequence_id, position)
               WHERE t.layer = ? AND t.branch = ? AND k.token_type IN ({", ".join("?" for _ in types)})
               GROUP BY t.token HAVING sum(t.eligible) >= ?""",
            [int(layer), branch, *types, int(min_count)],
        )
        table = _with_rate(table)
        table = table.sort_values(["skip_rate", "eligible", "token"], ascending=[not most_skipped, False, True])
        return table.head(int(limit)).reset_index(drop=True)

    def position_profile(self, buckets: tuple[int, ...] = POSITION_BUCKETS, cells: str | None = None) -> pd.DataFrame:
        """Skip rate by position bucket and branch (over all layers); mean gate over the cells named in
        `gate_cells`."""
        cells = self._cells(cells)
        edges = sorted(set(int(b) for b in buckets) | {0})
        case = " ".join(f"WHEN position >= {e} THEN {i}" for i, e in reversed(list(enumerate(edges))))
        table = self.df(
            f"""SELECT CASE {case} END AS bucket, branch, sum(eligible) AS eligible,
                      sum(CASE WHEN skipped = 1 AND eligible = 1 THEN 1 ELSE 0 END) AS skipped, {_gate_mean(cells)}
               FROM traces GROUP BY ALL ORDER BY bucket, branch"""
        )
        labels = [
            (f"{e}" if i + 1 < len(edges) and edges[i + 1] == e + 1 else f"{e}-{edges[i + 1] - 1}")
            if i + 1 < len(edges)
            else f"{e}+"
            for i, e in enumerate(edges)
        ]
        table.insert(0, "positions", [labels[int(b)] for b in table["bucket"]])
        return _with_rate(table.drop(columns="bucket"))

    def type_profile(self, cells: str | None = None) -> pd.DataFrame:
        """Skip rate by token type and branch (over all layers); mean gate over the cells named in
        `gate_cells`."""
        cells = self._cells(cells)
        table = self.df(
            f"""SELECT k.token_type, t.branch, sum(t.eligible) AS eligible,
                      sum(CASE WHEN t.skipped = 1 AND t.eligible = 1 THEN 1 ELSE 0 END) AS skipped,
                      {_gate_mean(cells)}
               FROM traces t JOIN (SELECT sequence_id, position, token_type FROM tokens) k USING (sequence_id, position)
               GROUP BY ALL"""
        )
        table["order"] = table["token_type"].map(TOKEN_TYPES.index) * 2 + table["branch"].map(BRANCHES.index)
        return _with_rate(table.sort_values("order", ignore_index=True).drop(columns="order"))

    def example_contexts(
        self,
        layer: int,
        branch: str,
        n: int = 10,
        lowest: bool = True,
        window: int = 10,
        cells: str | None = None,
    ) -> pd.DataFrame:
        """The `n` distinct contexts with the lowest (or highest) gate at (layer, branch) among eligible
        tokens (and of those, the cells named in `cells`): a context is the centre token with `window`
        tokens either side, as text; an occurrence whose context repeats an earlier one (a chat template's
        `<|im_start|>` line in every text) is counted in `duplicates`, not shown again. One row per
        (example, context token), with that token's gate, skip decision and whether its gate acted
        (`gate_applied`) at (layer, branch), and how many of its branches were skipped in all."""
        _check_cell(layer, branch)
        cells = self._cells(cells)
        order = "ASC" if lowest else "DESC"
        frame = "PARTITION BY sequence_id ORDER BY position ROWS BETWEEN"
        return self.df(
            f"""WITH texts AS (
                   SELECT sequence_id, position,
                          coalesce(string_agg(token, '' ORDER BY position) OVER ({frame} ? PRECEDING AND 1 PRECEDING), '')
                          || '[' || token || ']' ||
                          coalesce(string_agg(token, '' ORDER BY position) OVER ({frame} 1 FOLLOWING AND ? FOLLOWING), '')
                          AS context
                   FROM traces WHERE layer = 0 AND branch = 'attn'),
               occurrences AS (
                   SELECT t.sequence_id, t.position, t.gate, x.context,
                          count(*) OVER (PARTITION BY x.context) AS duplicates,
                          row_number() OVER (PARTITION BY x.context ORDER BY t.gate {order}, t.sequence_id, t.position) AS k
                   FROM traces t JOIN texts x USING (sequence_id, position)
                   WHERE t.layer = ? AND t.branch = ? AND t.eligible = 1 AND {GATE_CELLS[cells]}),
               picked AS (
                   SELECT sequence_id, position, gate, duplicates,
                          row_number() OVER (ORDER BY gate {order}, sequence_id, position) AS example
                   FROM occurrences WHERE k = 1
                   ORDER BY gate {order}, sequence_id, position LIMIT ?),
               cells AS (
                   SELECT t.sequence_id, t.position, any_value(t.token) AS token,
                          sum(t.skipped) AS skipped_cells,
                          any_value(t.gate) FILTER (WHERE t.layer = ? AND t.branch = ?) AS gate,
                          any_value(t.skipped) FILTER (WHERE t.layer = ? AND t.branch = ?) AS skipped,
                          any_value(t.gate_applied) FILTER (WHERE t.layer = ? AND t.branch = ?) AS gate_applied
                   FROM traces t SEMI JOIN picked p ON t.sequence_id = p.sequence_id
                        AND t.position BETWEEN p.position - ? AND p.position + ?
                   GROUP BY ALL)
            SELECT p.example, p.sequence_id, p.position AS centre, c.position, c.position - p.position AS offset,
                   c.token, c.gate, c.skipped, c.gate_applied, c.skipped_cells, p.duplicates, '{cells}' AS gate_cells
            FROM picked p JOIN cells c ON c.sequence_id = p.sequence_id
                 AND c.position BETWEEN p.position - ? AND p.position + ?
            ORDER BY p.example, c.position""",
            [window, window, int(layer), branch, int(n), *[int(layer), branch] * 3, window, window, window, window],
        )


GATE_CELLS = {  # which cells a gate statistic pools: the SQL condition on a `traces` row
    "applied": "gate_applied = 1",  # the gate scaled the branch's output (`gate_applied`)
    "all": "TRUE",  # every token, the gate as the ranking score the policy read
}


def _gate_mean(cells: str) -> str:
    """SQL: the mean gate over the pooled cells, and which cells those are (`gate_cells`)."""
    return f"avg(gate) FILTER (WHERE {GATE_CELLS[cells]}) AS gate_mean, '{cells}' AS gate_cells"


def _flow_measures(pooled: str) -> dict[str, tuple[str, str]]:
    """The two means of the flow tables, as (value, count) per row: the gate over the pooled cells, and
    the skip decision over eligible tokens."""
    return {
        "gate": (f"CASE WHEN {pooled} THEN gate ELSE 0 END", f"CASE WHEN {pooled} THEN 1 ELSE 0 END"),
        "skip": ("CASE WHEN skipped = 1 AND eligible = 1 THEN 1 ELSE 0 END", "eligible"),
    }


def _mean_interval(table, name: str):
    """(mean, low, high) of measure `name` from the sums `TraceDB._clustered` returns."""
    sums = [table[f"{name}_{part}"] for part in ("y", "n", "yy", "yn", "nn", "k")]
    with np.errstate(invalid="ignore", divide="ignore"):
        mean = np.asarray(sums[0], dtype=float) / np.asarray(sums[1], dtype=float)
    low, high = cluster_mean_interval(*sums)
    if np.ndim(mean) == 0:
        return float(mean), float(low), float(high)
    return mean, low, high


def _check_cell(layer: int, branch: str) -> None:
    if branch not in BRANCHES:
        raise GateSkipError(f"branch must be one of {', '.join(BRANCHES)}, got {branch!r}")
    if int(layer) < 0:
        raise GateSkipError(f"layer must be >= 0, got {layer}")


def _with_rate(table: pd.DataFrame) -> pd.DataFrame:
    table = table.copy()
    table["eligible"] = table["eligible"].astype(int)
    table["skipped"] = table["skipped"].astype(int)
    with np.errstate(invalid="ignore", divide="ignore"):
        table["skip_rate"] = table["skipped"] / table["eligible"].where(table["eligible"] > 0)
    table["ci_low"], table["ci_high"] = wilson(table["skipped"], table["eligible"])
    return table


def context_strings(contexts: pd.DataFrame) -> pd.DataFrame:
    """One row per example: the context as text with the centre token in [brackets], and how many
    occurrences share that context (`duplicates`, from `TraceDB.example_contexts`)."""
    rows = []
    for example, part in contexts.groupby("example", sort=True):
        centre = part[part["offset"] == 0].iloc[0]
        text = "".join(f"[{t}]" if o == 0 else t for t, o in zip(part["token"], part["offset"]))
        rows.append(
            {
                "example": int(example),
                "sequence_id": int(centre["sequence_id"]),
                "position": int(centre["position"]),
                "token": centre["token"],
                "gate": float(centre["gate"]),
                "context": text,
                **({"duplicates": int(centre["duplicates"])} if "duplicates" in part.columns else {}),
            }
        )
    return pd.DataFrame(rows)
