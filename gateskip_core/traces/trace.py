"""Traces: per-token, per-layer gate values and skip decisions of one call.

One `Trace` holds one `SequenceTrace` per input sequence plus the settings of
the call. It renders in a notebook (`_repr_html_`), converts to a long-format
DataFrame (one row per sequence, position, layer and branch), and round-trips
through CSV and Parquet (`to_csv` / `to_parquet` and `read_trace`) without loss.
Full gate vectors (on request) stay in memory and are not exported.

Column reference (stable names):
    sequence_id, position, token_id, token, layer, branch ('attn' | 'mlp'),
    gate (mean gate value = token importance, the score the policies rank), threshold (skip iff
    gate <= threshold; -inf: nothing skipped, NaN: policy without threshold), skipped (0/1),
    gate_applied (0/1: the gate's value multiplied the branch's output; see below),
    eligible (0/1: could be skipped; padding never appears, BOS is ineligible when protected),
    skip_budget, policy, model, weights (the backbone's projections: 'fp32' | 'int8' | 'int4' |
    'int8:quanto' | 'int4:quanto', as `load_model(weights=...)`; files written before the column read as
    'unrecorded'), gates, adapter_scope ('all' | 'skipped'), path, kv, protect_bos, branches,
    prompt_length (tokens of the prompt; later positions were generated),
    dense_flops, skipping_flops, executed_flops, gate_flops (per sequence).

Names, one per concept, in code and columns alike: a *branch* is the attention or
the MLP of one layer (files written before 0.2 called the column `module`, and
still read); a token's *gate* at a branch is the mean of the gate vector — the token's importance there,
which the policies rank (`BranchInput.gate`, `ForwardResult.gate`, the `gate` column).

What a gate *is* depends on the adapter scope (`gate_role`). In scope `all` every kept branch
adds `g * branch(x)`: the gate ranks the token and scales what it adds. In scope `skipped` a token
runs the original model, kept branches unscaled, until its first skipped branch: until then its
gates only rank it and scale nothing (layer 0's attention gate, for example, is never applied in
that scope). `gate_applied` marks the cells where the gate scaled the branch; a skipped cell's gate
decided the skip and scaled nothing. Files written before the column existed are read with it
derived from the decisions and the scope (`applied_gates`), which is exactly what the walk does.
"""

from __future__ import annotations

import html
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow.parquet as pq

from gateskip_core.branches import BRANCHES, branches_per_token, budget_label, skipped_fraction
from gateskip_core.errors import GateSkipError
from gateskip_core.files import atomic_write
from gateskip_core.traces.compute import ComputeAccount, adapted_rows

TRACE_COLUMNS = [
    "sequence_id",
    "position",
    "token_id",
    "token",
    "layer",
    "branch",
    "gate",
    "threshold",
    "skipped",
    "gate_applied",
    "eligible",
    "skip_budget",
    "policy",
    "model",
    "weights",
    "gates",
    "adapter_scope",
    "path",
    "kv",
    "protect_bos",
    "branches",
    "prompt_length",
    "dense_flops",
    "skipping_flops",
    "executed_flops",
    "gate_flops",
]
# Columns added after the first release: derived on reading a file that lacks them.
DERIVED_COLUMNS = ("gate_applied", "adapter_scope")
# The weights of a trace written before the `weights` column: not known, so not guessed.
UNRECORDED_WEIGHTS = "unrecorded"
ADAPTER_SCOPES = ("all", "skipped")
NO_GATES = "none"  # the `gates` label of a model without gates


def applied_gates(skipped: np.ndarray, adapter_scope: str, has_gates: bool = True) -> np.ndarray:
    """[..., L, 2] bool: where the gate scaled the branch's output. A skipped branch is never
    scaled; a kept one is in scope 'all', and in scope 'skipped' from the token's first skip on
    (walk order: attention, then MLP, layer by layer), as `forward.execution` runs it."""
    if not has_gates:
        return np.zeros(skipped.shape, dtype=bool)
    return ~skipped & adapted_rows(skipped, adapter_scope)


def gate_role(adapter_scope: str, has_gates: bool = True) -> str:
    """What a gate value is in this scope, in words for legends and captions."""
    if not has_gates:
        return "no gates: every branch runs unscaled (gate shown as 1)"
    if adapter_scope == "skipped":
        return (
            "gate = a ranking score for every token; a scale only from the token's first skipped branch on "
            "(before it the token runs the original model, kept branches unscaled)"
        )
    return "gate = ranking score and scale: every kept branch's output is multiplied by it"


def scope_from_label(gates_label: str) -> str:
    """The adapter scope a trace written before the `adapter_scope` column recorded in its gates label."""
    return "skipped" if "(adapter scope: skipped)" in gates_label else "all"


@dataclass
class SequenceTrace:
    token_ids: np.ndarray  # [T] int64
    tokens: list[str]
    gate: np.ndarray  # [T, L, 2] float32 mean gate (importance)
    threshold: np.ndarray  # [T, L, 2] float64
    skipped: np.ndarray  # [T, L, 2] bool
    gate_applied: np.ndarray  # [T, L, 2] bool: the gate scaled the branch (`applied_gates`)
    eligible: np.ndarray  # [T] bool
    compute: ComputeAccount
    prompt_length: int
    gate_vectors: np.ndarray | None = None  # [T, L, 2, d] on request

    @property
    def n_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def text(self) -> str:
        return "".join(self.tokens)

    def skipped_fraction(self) -> float:
        """Skipped branch evaluations over eligible ones (both branch types)."""
        return skipped_fraction(self.skipped.sum(), self.eligible.sum(), self.skipped.shape[1])


@dataclass
class Trace:
    sequences: list[SequenceTrace]
    model: str
    gates: str
    policy: str
    skip_budget: np.ndarray  # [L, 2]
    branches: tuple[str, ...]
    path: str
    kv: str
    protect_bos: bool
    adapter_scope: str = "all"  # 'skipped': gates scale a token's branches only from its first skip on
    weights: str = "fp32"  # the backbone's projections (GatedModel.weights): fp32, int8, int4, ...
    extra: dict = field(default_factory=dict)
    # Notices of the call that made this trace (a text truncated to the context, ...): returned with
    # the result, not raised as process-wide warnings, so that a server's threads never mix them.
    notices: tuple[str, ...] = ()
    truncated: tuple[int, ...] = ()  # which of the call's texts were cut to the context (counted, not parsed)

    @property
    def n_layers(self) -> int:
        return self.skip_budget.shape[0]

    @property
    def compute(self) -> ComputeAccount:
        total = self.sequences[0].compute
        for seq in self.sequences[1:]:
            total = total + seq.compute
        return total

    def skipped_fraction(self) -> float:
        eligible = sum(int(s.eligible.sum()) for s in self.sequences)
        return skipped_fraction(sum(int(s.skipped.sum()) for s in self.sequences), eligible, self.n_layers)

    def budget_label(self) -> str:
        return budget_label(self.skip_budget, self.branches)

    @property
    def has_gates(self) -> bool:
        return self.gates != NO_GATES

    def gate_role(self) -> str:
        return gate_role(self.adapter_scope, self.has_gates)

    def applied_fraction(self) -> float:
        """Of the cells a token ran (not skipped, real), the share whose gate scaled the branch."""
        ran = sum(int((~s.skipped).sum()) for s in self.sequences)
        applied = sum(int(s.gate_applied.sum()) for s in self.sequences)
        return applied / ran if ran else 0.0

    def budget_fraction(self) -> float:
        """The share of eligible branch evaluations the budget table asks to skip (its mean over
        layers and both branch types), in the units of `skipped_fraction`: the reached rate."""
        return float(np.mean(self.skip_budget))

    # ---- export
    def to_dataframe(self) -> pd.DataFrame:
        frames = []
        for sid, seq in enumerate(self.sequences):
            T, L = seq.n_tokens, self.n_layers
            pos, layer, mod = np.meshgrid(np.arange(T), np.arange(L), np.arange(2), indexing="ij")
            pos, layer, mod = pos.ravel(), layer.ravel(), mod.ravel()
            tokens = np.asarray(seq.tokens, dtype=object)
            frame = {
                "sequence_id": np.full(pos.shape, sid),
                "position": pos,
                "token_id": seq.token_ids[pos],
                "token": tokens[pos],
                "layer": layer,
                "branch": np.asarray(BRANCHES, dtype=object)[mod],
                "gate": seq.gate.reshape(-1).astype(np.float64),
                "threshold": seq.threshold.reshape(-1),
                "skipped": seq.skipped.reshape(-1).astype(np.int8),
                "gate_applied": seq.gate_applied.reshape(-1).astype(np.int8),
                "eligible": seq.eligible[pos].astype(np.int8),
                "skip_budget": self.skip_budget[layer, mod],
                "policy": self.policy,
                "model": self.model,
                "weights": self.weights,
                "gates": self.gates,
                "adapter_scope": self.adapter_scope,
                "path": self.path,
                "kv": self.kv,
                "protect_bos": int(self.protect_bos),
                "branches": ",".join(self.branches),
                "prompt_length": seq.prompt_length,
                "dense_flops": seq.compute.dense_flops,
                "skipping_flops": seq.compute.skipping_flops,
                "executed_flops": seq.compute.executed_flops,
                "gate_flops": seq.compute.gate_flops,
            }
            frames.append(pd.DataFrame(frame, columns=TRACE_COLUMNS))
        return pd.concat(frames, ignore_index=True)

    def to_csv(self, path: str | Path) -> Path:
        path = Path(path)
        atomic_write(path, lambda tmp: self.to_dataframe().to_csv(tmp, index=False))
        return path

    def to_parquet(self, path: str | Path) -> Path:
        path = Path(path)
        atomic_write(path, lambda tmp: self.to_dataframe().to_parquet(tmp, index=False))
        return path

    def save(self, path: str | Path) -> Path:
        """Write CSV or Parquet, chosen by the file extension."""
        suffix = Path(path).suffix.lower()
        if suffix == ".csv":
            return self.to_csv(path)
        if suffix in (".parquet", ".pq"):
            return self.to_parquet(path)
        raise GateSkipError(f"output must end in .csv or .parquet, got {str(path)!r}")

    @classmethod
    def from_dataframe(cls, df: pd.DataFrame) -> Trace:
        df = with_derived_columns(with_weights_column(df))
        missing = [c for c in TRACE_COLUMNS if c not in df.columns]
        if missing:
            raise GateSkipError(f"not a GateSkip trace: missing columns {', '.join(missing)}")
        if df.empty:
            raise GateSkipError("trace file holds no rows")
        df = df.sort_values(["sequence_id", "position", "layer", "branch"], kind="stable")
        first = df.iloc[0]
        L = int(df["layer"].max()) + 1
        budget = np.zeros((L, 2))
        head = df[df["sequence_id"] == first["sequence_id"]]
        head = head[head["position"] == head["position"].iloc[0]]
        for row in head.itertuples():
            budget[row.layer, BRANCHES.index(row.branch)] = row.skip_budget
        sequences = []
        for _, part in df.groupby("sequence_id", sort=True):
            T = int(part["position"].max()) + 1
            sid = part["sequence_id"].iloc[0]
            if len(part) != T * L * 2:
                raise GateSkipError(f"trace is incomplete: sequence {sid} has {len(part)} rows, not {T} x {L} x 2")
            per_token = part.iloc[:: L * 2]
            row0 = part.iloc[0]
            if int(row0["prompt_length"]) > T:
                raise GateSkipError(
                    f"trace is cut: sequence {sid} has {T} tokens but its prompt alone had {int(row0['prompt_length'])}"
                )
            sequences.append(
                SequenceTrace(
                    token_ids=per_token["token_id"].to_numpy(np.int64),
                    tokens=[str(t) for t in per_token["token"]],
                    gate=part["gate"].to_numpy(np.float64).astype(np.float32).reshape(T, L, 2),
                    threshold=part["threshold"].to_numpy(np.float64).reshape(T, L, 2),
                    skipped=part["skipped"].to_numpy().astype(bool).reshape(T, L, 2),
                    gate_applied=part["gate_applied"].to_numpy().astype(bool).reshape(T, L, 2),
                    eligible=per_token["eligible"].to_numpy().astype(bool),
                    compute=ComputeAccount(
                        dense_flops=float(row0["dense_flops"]),
                        skipping_flops=float(row0["skipping_flops"]),
                        executed_flops=float(row0["executed_flops"]),
                        gate_flops=float(row0["gate_flops"]),
                        tokens=T,
                    ),
                    prompt_length=int(row0["prompt_length"]),
                )
            )
        return cls(
            sequences=sequences,
            model=str(first["model"]),
            gates=str(first["gates"]),
            policy=str(first["policy"]),
            skip_budget=budget,
            branches=tuple(str(first["branches"]).split(",")),
            path=str(first["path"]),
            kv=str(first["kv"]),
            protect_bos=bool(int(first["protect_bos"])),
            adapter_scope=str(first["adapter_scope"]),
            weights=str(first["weights"]),
        )

    # ---- display
    def summary(self) -> str:
        c = self.compute
        n_tok = sum(s.n_tokens for s in self.sequences)
        lines = [
            f"model {self.model} | weights {self.weights} | gates {self.gates} | policy {self.policy} | budget {self.budget_label()} "
            f"({'+'.join(self.branches)}) | path {self.path}",
            f"{len(self.sequences)} sequence(s), {n_tok} tokens, {self.n_layers} layers",
            f"skipped {self.skipped_fraction():.1%} of eligible branch evaluations "
            f"(the budget asks {self.budget_fraction():.1%}); "
            f"net FLOPs saved {c.net_saved_fraction:+.1%} (gates included; "
            f"dense {c.dense_flops / 1e9:.2f} GFLOP, with skipping {c.skipping_flops / 1e9:.2f} GFLOP)",
        ]
        if self.has_gates:
            lines.append(
                f"adapter scope {self.adapter_scope}: {self.applied_fraction():.1%} of the branches that ran were "
                f"scaled by their gate ({self.gate_role()})"
            )
        lines += [f"notice: {notice}" for notice in self.notices]
        return "\n".join(lines)

    def __repr__(self) -> str:
        return f"<Trace {self.summary()}>"

    def _repr_html_(self) -> str:
        """The summary, then the first sequence's tokens shaded by how many branches each skipped; a
        dotted underline under a token none of whose gates acted (it ran every branch unscaled)."""
        seq = self.sequences[0]
        skipped_per_token = seq.skipped.sum(axis=(1, 2))
        ran_per_token = (~seq.skipped).sum(axis=(1, 2))
        applied_per_token = seq.gate_applied.sum(axis=(1, 2))
        idle = (ran_per_token > 0) & (applied_per_token == 0)
        max_skips = max(1, branches_per_token(self.n_layers))
        spans = []
        for i, tok in enumerate(seq.tokens):
            shade = int(255 - 155 * skipped_per_token[i] / max_skips)
            underline = "; border-bottom: 2px dotted #777" if idle[i] else ""
            spans.append(
                f'<span title="skipped {skipped_per_token[i]} of {max_skips} branches; gate applied at '
                f'{applied_per_token[i]} of the {ran_per_token[i]} it ran" '
                f'style="background: rgb(255,{shade},{shade}); white-space: pre{underline}">{html.escape(tok)}</span>'
            )
        body = html.escape(self.summary()).replace("\n", "<br>")
        legend = "<p><small>dotted underline: none of the token's gates acted</small></p>" if idle.any() else ""
        return f"<div><p style='font-family: monospace'>{body}</p><p>{''.join(spans)}</p>{legend}</div>"


NUMERIC_COLUMNS = (
    "sequence_id",
    "position",
    "token_id",
    "layer",
    "gate",
    "skipped",
    "gate_applied",
    "eligible",
    "prompt_length",
)


def with_weights_column(df: pd.DataFrame) -> pd.DataFrame:
    """`df` with a `weights` column: a file written before it gets `UNRECORDED_WEIGHTS` (row by row, so
    a chunk of a file is completed as the whole file would be)."""
    if "weights" in df.columns:
        return df
    return df.assign(weights=UNRECORDED_WEIGHTS)


def with_derived_columns(df: pd.DataFrame) -> pd.DataFrame:
    """`df` with the columns of `DERIVED_COLUMNS` a file written before them lacks, derived from its
    decisions and its gates label (`applied_gates`); a frame that has them is returned as it is."""
    if all(c in df.columns for c in DERIVED_COLUMNS) or "skipped" not in df.columns or "gates" not in df.columns:
        return df
    df = df.copy()
    if "adapter_scope" not in df.columns:
        df["adapter_scope"] = [scope_from_label(str(g)) for g in df["gates"]]
    if "gate_applied" not in df.columns:
        order = df.sort_values(["sequence_id", "position", "layer", "branch"], kind="stable")
        skipped = order["skipped"].astype(int).to_numpy()
        keys = order[["sequence_id", "position"]].to_numpy()
        walk = pd.Series(skipped, index=order.index).groupby([keys[:, 0], keys[:, 1]]).cummax().to_numpy()
        scoped = order["adapter_scope"].astype(str).eq("skipped").to_numpy()
        gated = order["gates"].astype(str).ne(NO_GATES).to_numpy()
        applied = (skipped == 0) & gated & (~scoped | (walk == 1))
        df.loc[order.index, "gate_applied"] = applied.astype(np.int8)
        df["gate_applied"] = df["gate_applied"].astype(np.int8)
    return df[[c for c in TRACE_COLUMNS if c in df.columns] + [c for c in df.columns if c not in TRACE_COLUMNS]]


def read_trace_frames(path: str | Path, chunk_rows: int | None = None) -> Iterator[pd.DataFrame]:
    """The rows of a trace file as DataFrames: one, or chunks of `chunk_rows` (bounded memory)."""
    path = Path(path)
    if not path.is_file():
        raise GateSkipError(f"trace file not found: {path}")
    suffix = path.suffix.lower()
    if suffix not in (".csv", ".parquet", ".pq"):
        raise GateSkipError(f"trace file must end in .csv or .parquet, got {path.name!r}")
    try:
        if suffix == ".csv":
            frames = pd.read_csv(
                path,
                keep_default_na=False,
                chunksize=chunk_rows,
                dtype={"token": str, "model": str, "weights": str, "gates": str},
            )
            frames = [frames] if chunk_rows is None else frames
        elif chunk_rows is None:
            frames = [pd.read_parquet(path)]
        else:
            frames = (b.to_pandas() for b in pq.ParquetFile(path).iter_batches(batch_size=chunk_rows))
        for df in frames:
            if "module" in df.columns and "branch" not in df.columns:  # files written before the rename
                df = df.rename(columns={"module": "branch"})
            df = with_weights_column(df)
            if chunk_rows is None:  # deriving needs whole sequences; a chunk may cut one
                df = with_derived_columns(df)
            missing = [c for c in TRACE_COLUMNS if c not in df.columns]
            if missing and set(missing) <= set(DERIVED_COLUMNS):
                raise GateSkipError(
                    f"trace {path.name} was written before the columns {', '.join(missing)}: read it whole "
                    "(read_trace) and save it again"
                )
            if missing:
                raise GateSkipError(f"not a GateSkip trace: missing columns {', '.join(missing)}")
            if not pd.api.types.is_numeric_dtype(df["threshold"]):  # CSV writes NaN thresholds as empty fields
                df["threshold"] = pd.to_numeric(df["threshold"].replace("", "nan"), errors="coerce")
            for column in NUMERIC_COLUMNS:
                if len(df) and not pd.api.types.is_numeric_dtype(df[column]):
                    bad = pd.to_numeric(df[column], errors="coerce").isna() & df[column].astype(str).ne("")
                    first = df.index[bad][0] if bad.any() else df.index[0]
                    raise GateSkipError(
                        f"damaged trace: column {column!r} holds a non-number ({df[column].loc[first]!r}, row {first})"
                    )
            yield df
    except GateSkipError:
        raise
    except Exception as err:  # pandas/pyarrow raise many types for unreadable files
        raise GateSkipError(f"cannot read trace {path}: {str(err).splitlines()[0]}") from None


def read_trace(path: str | Path) -> Trace:
    """Read a trace written by `Trace.to_csv` or `Trace.to_parquet`."""
    return Trace.from_dataframe(next(read_trace_frames(path)))
