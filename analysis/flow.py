"""Information-flow statistics over one trace or a stream of many.

`FlowStats` ingests traces one at a time and keeps only fixed-size running
sums and histograms, so memory stays bounded however large the corpus is.
Its tables are tidy DataFrames:

- `layer_table()`: per (layer, branch) gate mean, std, percentiles 5/25/50/75/95,
  skip rate (over eligible tokens), mean threshold and budget;
- `bos_table()`: per (layer, branch) the first position's gate against the
  others' mean: ratio and its rank among positions (1 = highest);
- `token_type_table()`: per (token type, layer, branch) mean gate and skip rate;
- `token_table()`: per token id its occurrences and mean importance.

`token_layer_matrix` gives one sequence's token x layer matrix of gates or skips.
"""

from __future__ import annotations

import re
import string
import unicodedata

import numpy as np
import pandas as pd

from gateskip_core import BRANCHES, Trace

N_BINS = 2000  # histogram bins over [0, 1]: percentiles exact to 5e-4
PERCENTILES = (5, 25, 50, 75, 95)
TOKEN_TYPES = ("bos", "special", "whitespace", "punctuation", "digits", "stopword", "content")
STOPWORDS = frozenset(
    """a about above after again against all am an and any are as at be because been before being below between
    both but by can could did do does doing down during each few for from further had has have having he her here
    hers herself him himself his how i if in into is it its itself just me more most my myself no nor not now of
    off on once only or other our ours ourselves out over own same she should so some such than that the their
    theirs them themselves then there these they this those through to too under until up very was we were what
    when where which while who whom why will with would you your yours yourself yourselves""".split()
)
_SPECIAL = re.compile(r"^\s*<\|?[^<>\s]+\|?>\s*$")


def token_type(token: str, position: int) -> str:
    """One of TOKEN_TYPES. Special tokens are recognised by their <...> / <|...|> form."""
    if position == 0:
        return "bos"
    if _SPECIAL.match(token):
        return "special"
    stripped = token.strip()
    if not stripped:
        return "whitespace"
    if all(unicodedata.category(c)[0] in "PS" or c in string.punctuation for c in stripped):
        return "punctuation"
    if stripped.isdigit():
        return "digits"
    if stripped.lower() in STOPWORDS:
        return "stopword"
    return "content"


class FlowStats:
    """Streaming accumulator of gate statistics (bounded memory)."""

    def __init__(self) -> None:
        self.n_layers: int | None = None
        self.n_sequences = 0
        self.n_tokens = 0
        self.budget: np.ndarray | None = None
        self.token_counts: dict[int, list] = {}  # id -> [count, gate sum, token string]

    def _init(self, n_layers: int) -> None:
        self.n_layers = n_layers
        shape = (n_layers, 2)
        self.count = np.zeros(shape)
        self.sum = np.zeros(shape)
        self.sumsq = np.zeros(shape)
        self.hist = np.zeros((*shape, N_BINS))
        self.skipped = np.zeros(shape)
        self.eligible = np.zeros(shape)
        self.thr_sum = np.zeros(shape)
        self.thr_count = np.zeros(shape)
        self.bos_gate = np.zeros(shape)
        self.bos_others = np.zeros(shape)
        self.bos_rank = np.zeros(shape)
        self.bos_n = 0
        n_types = len(TOKEN_TYPES)
        self.type_count = np.zeros((n_types, *shape))
        self.type_gate = np.zeros((n_types, *shape))
        self.type_skipped = np.zeros((n_types, *shape))
        self.type_eligible = np.zeros((n_types, *shape))

    def add(self, trace: Trace) -> FlowStats:
        if self.n_layers is None:
            self._init(trace.n_layers)
            self.budget = trace.skip_budget.copy()
        elif trace.n_layers != self.n_layers:
            raise ValueError(f"trace has {trace.n_layers} layers, earlier traces had {self.n_layers}")
        for seq in trace.sequences:
            self._add_sequence(seq)
        return self

    def _add_sequence(self, seq) -> None:
        gate = seq.gate.astype(np.float64)  # [T, L, 2]
        T = gate.shape[0]
        self.n_sequences += 1
        self.n_tokens += T
        self.count += T
        self.sum += gate.sum(0)
        self.sumsq += (gate**2).sum(0)
        bins = np.clip((gate * N_BINS).astype(np.int64), 0, N_BINS - 1)
        for layer in range(self.n_layers):
            for b in range(2):
                self.hist[layer, b] += np.bincount(bins[:, layer, b], minlength=N_BINS)
        elig = seq.eligible[:, None, None]
        self.skipped += (seq.skipped & elig).sum(0)
        self.eligible += np.broadcast_to(elig, seq.skipped.shape).sum(0)
        finite = np.isfinite(seq.threshold)
        self.thr_sum += np.where(finite, seq.threshold, 0).sum(0)
        self.thr_count += finite.sum(0)
        if T > 1:
            self.bos_n += 1
            self.bos_gate += gate[0]
            self.bos_others += gate[1:].mean(0)
            self.bos_rank += 1 + (gate[1:] > gate[0]).sum(0)
        types = np.array([TOKEN_TYPES.index(token_type(t, i)) for i, t in enumerate(seq.tokens)])
        for k in np.unique(types):
            rows = types == k
            self.type_count[k] += rows.sum()
            self.type_gate[k] += gate[rows].sum(0)
            self.type_skipped[k] += (seq.skipped[rows] & elig[rows]).sum(0)
            self.type_eligible[k] += np.broadcast_to(elig[rows], seq.skipped[rows].shape).sum(0)
        per_token = gate.mean(axis=(1, 2))
        for tid, tok, g in zip(seq.token_ids.tolist(), seq.tokens, per_token):
            entry = self.token_counts.setdefault(tid, [0, 0.0, tok])
            entry[0] += 1
            entry[1] += float(g)

    # ---- tables
    def _percentile(self, layer: int, b: int, p: float) -> float:
        cdf = np.cumsum(self.hist[layer, b])
        idx = int(np.searchsorted(cdf, p / 100 * cdf[-1]))
        return (min(idx, N_BINS - 1) + 0.5) / N_BINS

    def layer_table(self) -> pd.DataFrame:
        rows = []
        for layer in range(self.n_layers):
            for b, branch in enumerate(BRANCHES):
                n = self.count[layer, b]
                mean = self.sum[layer, b] / n
                row = {
                    "layer": layer,
                    "branch": branch,
                    "gate_mean": mean,
                    "gate_std": float(np.sqrt(max(0.0, self.sumsq[layer, b] / n - mean**2))),
                }
                for p in PERCENTILES:
                    row[f"gate_p{p}"] = self._percentile(layer, b, p)
                row["skip_rate"] = self.skipped[layer, b] / max(1, self.eligible[layer, b])
                tc = self.thr_count[layer, b]
                row["threshold"] = self.thr_sum[layer, b] / tc if tc else float("nan")
                row["skip_budget"] = float(self.budget[layer, b])
                row["tokens"] = int(n)
                rows.append(row)
        return pd.DataFrame(rows)

    def bos_table(self) -> pd.DataFrame:
        rows = []
        for layer in range(self.n_layers):
            for b, branch in enumerate(BRANCHES):
                first = self.bos_gate[layer, b] / max(1, self.bos_n)
                others = self.bos_others[layer, b] / max(1, self.bos_n)
                rows.append(
                    {
                        "layer": layer,
                        "branch": branch,
                        "bos_gate": first,
                        "others_gate": others,
                        "ratio": first / others if others else float("nan"),
                        "mean_rank": self.bos_rank[layer, b] / max(1, self.bos_n),
                        "sequences": self.bos_n,
                    }
                )
        return pd.DataFrame(rows)

    def token_type_table(self) -> pd.DataFrame:
        rows = []
        for k, name in enumerate(TOKEN_TYPES):
            if not self.type_count[k, 0, 0]:
                continue
            for layer in range(self.n_layers):
                for b, branch in enumerate(BRANCHES):
                    n = self.type_count[k, layer, b]
                    e = self.type_eligible[k, layer, b]
                    rows.append(
                        {
                            "token_type": name,
                            "layer": layer,
                            "branch": branch,
                            "gate_mean": self.type_gate[k, layer, b] / n,
                            "skip_rate": self.type_skipped[k, layer, b] / e if e else float("nan"),
                            "tokens": int(n),
                        }
                    )
        return pd.DataFrame(rows)

    def token_table(self, min_count: int = 1) -> pd.DataFrame:
        """Per token id: occurrences and mean importance (mean gate over layers and branches)."""
        rows = [
            {"token_id": tid, "token": tok, "count": c, "mean_gate": s / c}
            for tid, (c, s, tok) in self.token_counts.items()
            if c >= min_count
        ]
        return pd.DataFrame(rows, columns=["token_id", "token", "count", "mean_gate"]).sort_values(
            "mean_gate", ascending=False, ignore_index=True
        )


def layer_profile(trace: Trace) -> pd.DataFrame:
    return FlowStats().add(trace).layer_table()


def layer_skip_summary(layer_table: pd.DataFrame) -> pd.DataFrame:
    """Per branch: which layers skip most, and early (first third) vs late (last third) layers."""
    rows = []
    for branch, part in layer_table.groupby("branch", sort=False):
        n = len(part)
        third = max(1, n // 3)
        ordered = part.sort_values("skip_rate", ascending=False)
        rows.append(
            {
                "branch": branch,
                "most_skipped_layers": ",".join(str(x) for x in ordered["layer"].head(3)),
                "least_skipped_layers": ",".join(str(x) for x in ordered["layer"].tail(3)),
                "early_gate_mean": part["gate_mean"].head(third).mean(),
                "late_gate_mean": part["gate_mean"].tail(third).mean(),
                "early_skip_rate": part["skip_rate"].head(third).mean(),
                "late_skip_rate": part["skip_rate"].tail(third).mean(),
            }
        )
    return pd.DataFrame(rows)


def token_layer_matrix(trace: Trace, sequence: int = 0, branch: str = "attn", value: str = "gate") -> pd.DataFrame:
    """Rows: positions (labelled 'pos:token'); columns: layers; values: gate or skipped (0/1)."""
    seq = trace.sequences[sequence]
    b = BRANCHES.index(branch)
    data = seq.gate[:, :, b] if value == "gate" else seq.skipped[:, :, b].astype(np.int8)
    index = [f"{i}:{tok!r}" for i, tok in enumerate(seq.tokens)]
    return pd.DataFrame(data, index=index, columns=list(range(trace.n_layers)))


def by_attention_kind(layer_table: pd.DataFrame, sliding: list[bool]) -> pd.DataFrame:
    """Gate mean and skip rate of the layers with sliding-window attention against those with global
    attention (Gemma-3 alternates them), per branch: do gates treat the two kinds differently?
    `sliding[i]`: layer i's attention is sliding-window."""
    if len(sliding) != layer_table["layer"].nunique():
        raise ValueError(f"{len(sliding)} attention kinds for {layer_table['layer'].nunique()} layers")
    table = layer_table.assign(attention=[("sliding" if sliding[i] else "global") for i in layer_table["layer"]])
    return (
        table.groupby(["attention", "branch"], sort=True)
        .agg(layers=("layer", "nunique"), gate_mean=("gate_mean", "mean"), skip_rate=("skip_rate", "mean"))
        .reset_index()
    )
