"""Token types and summaries of the statistics tables (the tables themselves: `analysis.traces.tracedb`).

- `token_type(token, position)`: bos, special, whitespace, punctuation, digits, stopword or content;
- `layer_skip_summary(layer_table)`: per branch, the most / least skipped layers and early vs late layers
  (`depth_windows`: the first and last third of the stack, whatever its depth);
- `token_layer_matrix(trace)`: one sequence's token x layer matrix of gates or skips;
- `by_attention_kind(layer_table, sliding)`: sliding-window layers against global ones.
"""

from __future__ import annotations

import re
import string
import unicodedata

import numpy as np
import pandas as pd

from gateskip_core import BRANCHES, Trace

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


def depth_windows(n_layers: int) -> tuple[list[int], list[int]]:
    """The early and late layers of a stack of `n_layers`: its first and last third (at least one layer
    each; none for a one-layer model, where early and late are the same layer)."""
    if n_layers < 2:
        return [], []
    third = max(1, n_layers // 3)
    return list(range(third)), list(range(n_layers - third, n_layers))


def layer_span(layers) -> str:
    """'3', '0-9' or '0,2,5': layers as a label."""
    layers = sorted(int(x) for x in layers)
    if not layers:
        return "-"
    if len(layers) > 1 and layers == list(range(layers[0], layers[-1] + 1)):
        return f"{layers[0]}-{layers[-1]}"
    return ",".join(map(str, layers))


def layer_skip_summary(layer_table: pd.DataFrame) -> pd.DataFrame:
    """Per branch: the most and least skipped layers (a third of the stack each, at most 3, and only
    where the skip rates differ: '-' otherwise), and the early vs late layers (`depth_windows`, named in
    `early_layers` / `late_layers`): their mean gate over the window's pooled cells (`gate_cells`;
    `early_gate_n` of them) and their skip rate over the window's eligible tokens (`early_eligible`).
    Both are cell-weighted: each layer counts by its cells, so a layer where the gate acted once weighs
    one cell, not a whole layer (an unweighted mean of per-layer means would let it)."""
    rows = []
    for branch, part in layer_table.groupby("branch", sort=False):
        part = part.sort_values("layer")
        early, late = depth_windows(len(part))
        k = min(3, len(part) // 3)
        rates = part["skip_rate"].dropna()
        ordered = part.sort_values(["skip_rate", "layer"], ascending=[False, True], na_position="last")
        differ = len(rates) > 1 and rates.max() > rates.min()
        row = {
            "branch": branch,
            "most_skipped_layers": layer_span(ordered["layer"].head(k)) if differ and k else "-",
            "least_skipped_layers": layer_span(ordered["layer"].iloc[len(rates) - k : len(rates)])
            if differ and k
            else "-",
            "early_layers": layer_span(early),
            "late_layers": layer_span(late),
        }
        for name, window in (("early", early), ("late", late)):
            chosen = part[part["layer"].isin(window)]
            row[f"{name}_gate_mean"], row[f"{name}_gate_n"] = _cell_weighted(chosen, "gate_mean", "gate_n")
            row[f"{name}_skip_rate"], row[f"{name}_eligible"] = _cell_weighted(chosen, "skip_rate", "eligible")
        if "gate_cells" in part.columns:
            row["gate_cells"] = part["gate_cells"].iloc[0]
        rows.append(row)
    return pd.DataFrame(rows)


def _cell_weighted(layers: pd.DataFrame, mean: str, count: str) -> tuple[float, int]:
    """(the mean over all the cells of `layers`, how many cells): per-layer means weighted by their cell
    counts, i.e. the pooled mean (NaN and 0 for no cell)."""
    if count not in layers.columns:
        raise ValueError(f"the layer table has no {count!r} column (the cell counts that weight {mean!r})")
    counts = layers[count].to_numpy(dtype=float)
    values = layers[mean].to_numpy(dtype=float)
    counted = counts > 0
    n = float(counts[counted].sum())
    return (float((values[counted] * counts[counted]).sum() / n) if n else float("nan")), int(n)


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
