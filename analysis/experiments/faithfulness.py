"""Gate faithfulness: the exact harm of single skips, and which signal predicts it.

For one text (or each block of a corpus, streamed: `corpus_harm`), a stratified sample of (token, layer, branch) entries — the same number from every
(layer, branch) — is ablated one at a time: the model re-runs with only that entry skipped, and
its *harm* is the KL divergence between the unablated and the ablated next-token distributions,
summed over every position from the skipped token on (also: the change of the loss on the true
next tokens, summed, and its absolute value). Ablations are batched: each row of a batch is the
same text with its own single skip (rows cannot interact).

Every sampled entry also gets the cheap signals a researcher would rank by:

- `gate`: the gate's importance (mean of the gate vector), `preactivation`: its mean pre-activation;
- `rel_norm`: what the branch adds, relative to the residual it reads (||delta|| / ||h||);
- `block_influence`: 1 - cos(h before, h after the branch), ShortGPT's Block Influence per token;
- `attribution`: |first-order estimate| of the loss change (grad . -delta, attribution patching),
  and `estimate` its signed value;
- `unsettled`: 1 if the token's top-1 prediction decoded from the residual entering the branch
  (logit lens) is not yet its final top-1, else 0.

`signal_table` compares them as predictors of the harm: Spearman within each (layer, branch),
averaged, and pooled; and, at a budget's skip fraction f, the harm carried by the f of each
stratum's entries a signal ranks lowest, against random choice (f of the total) and the oracle
(the f with the least harm). The within-stratum Spearman and both harm ratios carry 95% bootstrap
intervals over texts (a corpus) or over the layers of one text: whole clusters, so that entries of
one text are never treated as independent draws of many.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from scipy.stats import spearmanr
from tqdm.auto import tqdm

from analysis.traces.intervals import DEFAULT_RESAMPLES
from gateskip_core import BRANCHES, Capture, GatedModel, GateSkipError, SkipBudget
from gateskip_core.branches import branches_per_token
from gateskip_core.data import token_blocks
from gateskip_core.reference import kl_to_reference, log_probs
from gateskip_core.skipping.policies import BranchInput, Decision, SkipPolicy
from gateskip_core.validation import whole_number

SIGNALS = ("gate", "preactivation", "rel_norm", "block_influence", "attribution", "unsettled")
BOOTSTRAPPED = ("spearman_within", "vs_random", "vs_oracle")  # the columns with intervals
DEFAULT_PER_CELL = 16  # entries per (layer, branch): with 4 the intervals are about twice as wide (docs/analysis.md)


@dataclass(frozen=True)
class RowEntryPolicy(SkipPolicy):
    """Row b of the batch skips exactly its own entry `entries[b] = (layer, branch, position)`."""

    entries: tuple[tuple[int, int, int], ...] = ()
    name: str = "row-entry"
    needs_gates: bool = False

    def decide(self, inp: BranchInput) -> Decision:
        b = BRANCHES.index(inp.branch)
        skip = torch.zeros_like(inp.eligible)
        for row, (layer, branch, position) in enumerate(self.entries):
            if layer == inp.layer and branch == b:
                skip[row] = inp.positions[row] == position
        return Decision(skip=skip & inp.eligible, threshold=torch.full(skip.shape, float("nan"), device=skip.device))


def sample_entries(n_tokens: int, n_layers: int, n_entries: int, seed: int = 0) -> np.ndarray:
    """[N, 3] (layer, branch, position), the same number from each (layer, branch) stratum (positions
    1 .. T-2: BOS is protected, the last token's output has no next token to predict)."""
    positions = np.arange(1, n_tokens - 1)
    if len(positions) < 1:
        raise GateSkipError("the text is too short to ablate (need at least 3 tokens)")
    per_stratum = max(1, -(-n_entries // branches_per_token(n_layers)))
    rng = np.random.default_rng(seed)
    rows = []
    for layer in range(n_layers):
        for branch in range(2):
            chosen = rng.choice(positions, size=min(per_stratum, len(positions)), replace=False)
            rows += [(layer, branch, int(p)) for p in sorted(chosen)]
    return np.array(rows, dtype=np.int64)


def exact_harm(
    model: GatedModel,
    text: str,
    n_entries: int = 600,
    seed: int = 0,
    max_tokens: int = 128,
    batch_size: int = 16,
    show_progress: bool = True,
    on_step: Callable[[int, int], None] | None = None,
) -> pd.DataFrame:
    """One row per sampled entry: its signals and its exact harm (see the module docstring)."""
    batch = model.encode([text], max_tokens=max_tokens)
    return _exact_harm_of_ids(model, batch.input_ids, n_entries, seed, batch_size, show_progress, on_step)


def corpus_harm(
    model: GatedModel,
    texts: Iterable[str],
    n_texts: int,
    n_entries: int = 600,
    seed: int = 0,
    seq_len: int = 128,
    batch_size: int = 16,
    show_progress: bool = True,
    on_step: Callable[[int, int], None] | None = None,
) -> pd.DataFrame:
    """`exact_harm` streamed over a corpus: its token stream cut into `n_texts` consecutive blocks of
    `seq_len` tokens (BOS first), `n_entries` entries sampled from each (seed + block index); one
    row per entry with a `text` column (the block). Memory holds one block's ablations at a time."""
    n_texts = whole_number("n_texts", n_texts)
    seq_len = whole_number("seq_len", seq_len, minimum=3)
    rows = []
    bar = tqdm(total=n_texts, disable=not show_progress, desc="texts")
    for i, block in enumerate(token_blocks(model.tokenizer, texts, seq_len)):
        if i == n_texts:
            break
        table = _exact_harm_of_ids(model, block[None], n_entries, seed + i, batch_size, False, None)
        rows.append(table.assign(text=i))
        bar.update(1)
        if on_step is not None:
            on_step(i + 1, n_texts)
    bar.close()
    if len(rows) < n_texts:
        raise GateSkipError(f"the corpus holds {len(rows)} blocks of {seq_len} tokens, fewer than the {n_texts} asked")
    return pd.concat(rows, ignore_index=True)


def _exact_harm_of_ids(
    model: GatedModel,
    ids: torch.Tensor,
    n_entries: int,
    seed: int,
    batch_size: int,
    show_progress: bool,
    on_step: Callable[[int, int], None] | None,
) -> pd.DataFrame:
    n_entries = whole_number("n_entries", n_entries)
    batch_size = whole_number("batch_size", batch_size)
    if model.gates is None:
        raise GateSkipError("harm analysis needs gates; load gates first")
    ids = ids.to(model.device)
    T, L = ids.shape[1], model.spec.n_layers
    entries = sample_entries(T, L, n_entries, seed)
    signals = _signals(model, ids)
    base_lp, base_nll = signals.pop("_log_probs"), signals.pop("_nll")
    harm = np.zeros(len(entries))
    dloss = np.zeros(len(entries))
    ones = SkipBudget.make(1.0, L)
    starts = range(0, len(entries), batch_size)
    for done, start in enumerate(tqdm(starts, disable=not show_progress, desc="ablations")):
        chunk = entries[start : start + batch_size]
        rows = ids.expand(len(chunk), T)
        plan = model.make_plan(ones, RowEntryPolicy(tuple(map(tuple, chunk.tolist()))), path="masked")
        out = model.forward(rows, torch.ones_like(rows), plan)
        assert int(out.skipped.sum()) == len(chunk)  # exactly one skip per row
        lp = log_probs(out.logits)  # [b, T, V]
        kl = kl_to_reference(base_lp, lp)  # [b, T]
        nll = -lp[:, :-1].gather(-1, ids[0, 1:].expand(len(chunk), T - 1)[..., None])[..., 0]  # [b, T-1]
        for j, (_, _, position) in enumerate(chunk):
            harm[start + j] = float(kl[j, position:].sum())
            dloss[start + j] = float((nll[j, position:] - base_nll[position:]).sum())
        if on_step is not None:
            on_step(done + 1, len(starts))
    tokens = model.token_strings(ids[0].tolist())
    layer, branch, position = entries[:, 0], entries[:, 1], entries[:, 2]
    table = pd.DataFrame(
        {
            "position": position,
            "token": [tokens[p] for p in position],
            "layer": layer,
            "branch": [BRANCHES[b] for b in branch],
            "harm_kl": harm,
            "delta_loss": dloss,
            "abs_delta_loss": np.abs(dloss),
        }
    )
    for name, values in signals.items():
        table[name] = values[position, layer, branch]
    return table


def _signals(model: GatedModel, ids: torch.Tensor) -> dict[str, np.ndarray]:
    """Every signal for every (position, layer, branch) of the unablated run ([T, L, 2] arrays), and
    the run's log-probs and per-position loss (keys starting with '_')."""
    spec = model.spec
    plan = model.make_plan(0.0)
    capture = Capture(branch_deltas=True, branch_io=True, hidden_states=True)
    with torch.enable_grad():
        out = model.walk(ids, torch.ones_like(ids), plan, capture=capture)
        lp = log_probs(out.logits)
        nll = -lp[0, :-1].gather(-1, ids[0, 1:, None])[:, 0]
        nll.sum().backward()
    T, L = ids.shape[1], spec.n_layers
    shape = (T, L, 2)
    estimate, preact, rel_norm, influence, unsettled = (np.zeros(shape) for _ in range(5))
    final_top = lp[0].argmax(-1)
    h = out.hidden_states[0][0].detach()
    with torch.no_grad():
        for i, (delta, (x, _)) in enumerate(zip(out.branch_deltas, out.branch_io)):
            layer, b = divmod(i, 2)
            d = delta.detach()[0]
            estimate[:, layer, b] = -(delta.grad[0] * d).sum(-1).cpu().numpy()
            preact[:, layer, b] = model.gates.gate(layer, BRANCHES[b]).preactivation(x[0]).float().mean(-1).cpu()
            rel_norm[:, layer, b] = (d.norm(dim=-1) / h.norm(dim=-1).clamp(min=1e-12)).cpu().numpy()
            after = h + d
            influence[:, layer, b] = (1 - F.cosine_similarity(h, after, dim=-1)).cpu().numpy()
            unsettled[:, layer, b] = (spec.logits(h[None])[0].argmax(-1) != final_top).float().cpu().numpy()
            h = after
    return {
        "gate": out.gate[0].cpu().numpy().astype(np.float64),
        "preactivation": preact,
        "rel_norm": rel_norm,
        "block_influence": influence,
        "attribution": np.abs(estimate),
        "estimate": estimate,
        "unsettled": unsettled,
        "_log_probs": lp[0].detach(),
        "_nll": nll.detach(),
    }


def _spearman(a: np.ndarray, b: np.ndarray) -> float:
    if len(a) < 3 or np.all(a == a[0]) or np.all(b == b[0]):
        return float("nan")
    return float(spearmanr(a, b).statistic)


def signal_table(
    entries: pd.DataFrame,
    skip_fraction: float = 0.25,
    target: str = "harm_kl",
    resamples: int = DEFAULT_RESAMPLES,
    seed: int = 0,
) -> pd.DataFrame:
    """One row per signal: Spearman with the harm (within (layer, branch) averaged, and pooled), and
    the harm of the entries it would skip at `skip_fraction` (lowest signal first, per stratum)
    against random choice and the oracle. `spearman_within`, `vs_random` and `vs_oracle` carry 95%
    bootstrap intervals (`_low`, `_high`; `resamples` draws) over clusters named in `clusters`:
    texts when the entries come from several (a `text` column), else the layers of the one text
    (both branches of a layer together) — whole clusters, never single entries of one text twice."""
    strata = list(entries.groupby(["layer", "branch"], sort=True))
    total = float(entries[target].sum())
    oracle = sum(_lowest(part[target].to_numpy(), part[target].to_numpy(), skip_fraction) for _, part in strata)
    intervals, clusters = _bootstrap_intervals(entries, skip_fraction, target, resamples, seed)
    rows = []
    for signal in SIGNALS + ("random", "oracle"):
        if signal in ("random", "oracle"):
            within, pooled = float("nan"), float("nan")
            carried = skip_fraction * total if signal == "random" else oracle
        else:
            rhos = [_spearman(p[signal].to_numpy(), p[target].to_numpy()) for _, p in strata]
            within = float(np.nanmean(rhos)) if np.isfinite(rhos).any() else float("nan")
            pooled = _spearman(entries[signal].to_numpy(), entries[target].to_numpy())
            carried = sum(_lowest(p[signal].to_numpy(), p[target].to_numpy(), skip_fraction) for _, p in strata)
        rows.append(
            {
                "signal": signal,
                "spearman_within": within,
                **intervals[signal]["spearman_within"],
                "spearman_pooled": pooled,
                "skip_fraction": skip_fraction,
                "harm_of_skipped": carried,
                "vs_random": carried / (skip_fraction * total) if total else float("nan"),
                **intervals[signal]["vs_random"],
                "vs_oracle": carried / oracle if oracle else float("nan"),
                **intervals[signal]["vs_oracle"],
                "entries_per_stratum": int(entries.groupby(["layer", "branch"]).size().min()),
                "clusters": clusters,
            }
        )
    return pd.DataFrame(rows)


def signal_summary(signals: pd.DataFrame) -> pd.DataFrame:
    """The signal table to read: each bootstrapped number with its interval, `0.086 [-0.011, 0.187]`."""

    def cell(row, column: str) -> str:
        value, low, high = row[column], row[f"{column}_low"], row[f"{column}_high"]
        return "-" if np.isnan(value) else f"{value:.3f} [{low:.3f}, {high:.3f}]"

    return pd.DataFrame(
        {
            "signal": signals["signal"],
            **{column: [cell(row, column) for _, row in signals.iterrows()] for column in BOOTSTRAPPED},
            "spearman_pooled": [f"{v:.3f}" if np.isfinite(v) else "-" for v in signals["spearman_pooled"]],
        }
    )


def _lowest(signal: np.ndarray, harm: np.ndarray, fraction: float) -> float:
    """The harm of the `fraction` of entries with the lowest signal. Entries tied with the last one
    chosen carry their mean harm (the expectation over random tie-breaking): a binary signal such as
    `unsettled` ties most entries, and breaking ties by row order made its figure depend on the order."""
    k = int(np.floor(fraction * len(signal) + 1e-9))
    return float(_tie_averaged_lowest(signal[None, :, None], harm[None], k)[0, 0])


def _tie_averaged_lowest(values: np.ndarray, harm: np.ndarray, k: int) -> np.ndarray:
    """[S, signals]: per stratum and signal (`values` [S, n, signals], `harm` [S, n]), the harm of the k
    entries with the lowest value, the entries tied at the cut contributing their mean harm."""
    if k == 0:
        return np.zeros((values.shape[0], values.shape[2]))
    cut = np.sort(values, axis=1)[:, k - 1 : k, :]  # [S, 1, signals]: the k-th lowest value
    below, tied = values < cut, values == cut
    harm = harm[..., None]
    tied_harm = (harm * tied).sum(1) / tied.sum(1)
    return (harm * below).sum(1) + (k - below.sum(1)) * tied_harm


# ---- bootstrap intervals of the signal table


def _stratum_numbers(values: np.ndarray, harm: np.ndarray, fraction: float):
    """Strata of equal size, stacked: `values` [S, n, signals], `harm` [S, n]. Per stratum and signal,
    Spearman with the harm and the harm of the signal's lowest `fraction` ([S, signals] each); and
    per stratum the oracle's harm [S]. Vectorised: the bootstrap runs it for every draw."""
    n, k = harm.shape[1], int(np.floor(fraction * harm.shape[1] + 1e-9))
    ranks = _average_ranks(np.concatenate([values, harm[..., None]], axis=-1))
    centred = ranks - ranks.mean(1, keepdims=True)
    norms = np.sqrt((centred**2).sum(1))  # [S, signals + 1]; 0 where a column is constant
    with np.errstate(invalid="ignore", divide="ignore"):
        rho = (centred[..., :-1] * centred[..., -1:]).sum(1) / (norms[:, :-1] * norms[:, -1:])
    rho[(norms[:, :-1] == 0) | (norms[:, -1:] == 0) | (n < 3)] = np.nan
    carried = _tie_averaged_lowest(values, harm, k)
    return rho, carried, _tie_averaged_lowest(harm[..., None], harm, k)[:, 0]


def _average_ranks(x: np.ndarray) -> np.ndarray:
    """Ranks along axis 1 of `x` [S, n, m], ties given their average rank (as `scipy.stats.rankdata`)."""
    n = x.shape[1]
    order = np.argsort(x, axis=1, kind="stable")
    ordered = np.take_along_axis(x, order, axis=1)
    index = np.broadcast_to(np.arange(n)[None, :, None], x.shape)
    change = ordered[:, 1:] != ordered[:, :-1]
    edge = np.ones((x.shape[0], 1, x.shape[2]), bool)
    starts, ends = np.concatenate([edge, change], axis=1), np.concatenate([change, edge], axis=1)
    first = np.maximum.accumulate(np.where(starts, index, 0), axis=1)
    last = np.flip(np.minimum.accumulate(np.flip(np.where(ends, index, n - 1), 1), axis=1), 1)
    ranks = np.empty(x.shape)
    np.put_along_axis(ranks, order, (first + last) / 2 + 1, axis=1)
    return ranks


def _table_numbers(strata: list[tuple[np.ndarray, np.ndarray]], fraction: float) -> dict[str, np.ndarray]:
    """Per bootstrapped column: one value per signal, then random and oracle (NaN where undefined)."""
    rhos, carried, oracle, total = [], [], 0.0, 0.0
    for size in sorted({len(harm) for _, harm in strata}):  # equal-size strata in one stacked call
        group = [(v, h) for v, h in strata if len(h) == size]
        harm = np.stack([h for _, h in group])
        rho, c, o = _stratum_numbers(np.stack([v for v, _ in group]), harm, fraction)
        rhos.append(rho)
        carried.append(c.sum(0))
        oracle += float(o.sum())
        total += float(harm.sum())
    with np.errstate(invalid="ignore", divide="ignore"), warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # a draw where every stratum's Spearman is NaN
        within = np.nanmean(np.concatenate(rhos), axis=0)
        harm_of = np.append(np.sum(carried, axis=0), [fraction * total, oracle])
        return {
            "spearman_within": np.append(within, [np.nan, np.nan]),
            "vs_random": harm_of / (fraction * total),
            "vs_oracle": harm_of / oracle,
        }


def _bootstrap_intervals(
    entries: pd.DataFrame, fraction: float, target: str, resamples: int, seed: int
) -> tuple[dict[str, dict[str, float]], str]:
    """{signal: {column: {column_low: .., column_high: ..}}} over cluster resamples, and the clusters in words."""
    texts = entries["text"].to_numpy() if "text" in entries.columns else np.zeros(len(entries), dtype=int)
    by_text = len(np.unique(texts)) > 1
    unit = texts if by_text else entries["layer"].to_numpy()
    clusters = np.unique(unit)
    values = entries[list(SIGNALS)].to_numpy(dtype=float)
    harm = entries[target].to_numpy(dtype=float)
    stratum = entries["layer"].to_numpy() * 2 + entries["branch"].map(BRANCHES.index).to_numpy()
    # per cluster, per stratum: the row indices (a resample concatenates the drawn clusters' rows)
    rows_of = {
        c: {s: np.flatnonzero((unit == c) & (stratum == s)) for s in np.unique(stratum[unit == c])} for c in clusters
    }
    rng = np.random.default_rng(seed)
    draws = {column: [] for column in BOOTSTRAPPED}
    for _ in range(resamples if len(clusters) > 1 else 0):
        drawn = rng.choice(clusters, size=len(clusters), replace=True)
        if by_text:  # a stratum pools its entries from every drawn text
            merged: dict[int, list[np.ndarray]] = {}
            for c in drawn:
                for s, idx in rows_of[c].items():
                    merged.setdefault(s, []).append(idx)
            parts = [np.concatenate(v) for v in merged.values()]
        else:  # a layer drawn twice counts as two strata of its own
            parts = [idx for c in drawn for idx in rows_of[c].values()]
        numbers = _table_numbers([(values[i], harm[i]) for i in parts], fraction)
        for column in BOOTSTRAPPED:
            draws[column].append(numbers[column])
    out: dict = {signal: {} for signal in SIGNALS + ("random", "oracle")}
    for column in BOOTSTRAPPED:
        table = np.array(draws[column]) if draws[column] else np.full((1, len(out)), np.nan)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            low, high = np.nanpercentile(table, [2.5, 97.5], axis=0)
        for j, signal in enumerate(out):
            out[signal][column] = {f"{column}_low": float(low[j]), f"{column}_high": float(high[j])}
    words = f"{len(clusters)} texts" if by_text else f"{len(clusters)} layers of one text"
    return out, words


def faithfulness(
    model: GatedModel,
    text: str,
    n_exact: int = 600,
    seed: int = 0,
    max_tokens: int = 128,
    batch_size: int = 16,
    skip_fraction: float = 0.25,
    show_progress: bool = True,
    on_step: Callable[[int, int], None] | None = None,
    resamples: int = DEFAULT_RESAMPLES,
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(entries, signals): the exact harm and signals of `n_exact` stratified entries of `text`, and
    how well each signal predicts the harm, with intervals (`signal_table`). `on_step(done, total)`
    after each batch."""
    entries = exact_harm(model, text, n_exact, seed, max_tokens, batch_size, show_progress, on_step)
    return entries, signal_table(entries, skip_fraction, resamples=resamples, seed=seed)
