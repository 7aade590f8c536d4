"""Causal measures of every branch, per token: what it really adds, and what skipping it costs.

A gate is a *correlational* reading: a number the gate network computes from the branch's input.
What the branch does to the model is measured here, per (text, position, layer, branch) cell:

- `rel_norm`: what the branch adds to the residual, relative to the residual it reads
  (||added|| / ||h||), in the setting's run with nothing skipped (every branch runs);
- `harm_kl`: the exact cost of forcing that one token to skip that one branch: the KL divergence
  between the next-token distributions without and with the skip, summed over every position from
  the skipped token on (as `faithfulness`), and `harm_kl_mean`, the same per affected position
  (T - position of them): the fair comparison between positions, since a token can only change the
  predictions at and after itself and the first token (BOS) reaches every position;
  `delta_loss`: the change of the loss on the true next tokens, summed over the same positions.

Ablations are batched as in `faithfulness` (`RowEntryPolicy`: row b of a batch is the same text with
only its own skip). The harm is measured only on a sample of cells: per text, `per_branch` random
positions from every (layer, branch), plus BOS (position 0) where asked. BOS is protected from
skipping by default; measuring it needs `protect_bos=False`, and the functions say so otherwise.

What the setting is matters:
- the *original* model (`model.view()`, no gates): the plain causal effect of the branch;
- gates in adapter scope `all` (the paper's setting): the base is the gated model (every kept branch
  scaled by its gate, the adapter on every token); a forced skip removes one scaled branch output;
- gates in adapter scope `skipped` (the shipped default): the base is exactly the original model, and
  a forced skip *also* moves that token onto the adapter and soft gates for the rest of the model.
  The harm measured there is the skip's cost plus that switch (the adapter confound).

Gates, skip decisions and `gate_applied` (whether the gate scaled the branch) come from a second run
of the same text at the skip budget asked (the correlational statistic shown beside the causal ones).
`layer_effects` aggregates per (layer, branch) with 95% intervals by bootstrap over texts.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Sequence

import numpy as np
import pandas as pd
import torch

from analysis.experiments.faithfulness import RowEntryPolicy
from analysis.traces.flow import token_type
from gateskip_core import BRANCHES, Capture, Forced, GatedModel, GateSkipError, SkipBudget
from gateskip_core.reference import kl_to_reference, log_probs
from gateskip_core.traces.trace import applied_gates
from gateskip_core.validation import whole_number

HARM_COLUMNS = ("harm_kl", "harm_kl_mean", "delta_loss")
ProgressCallback = Callable[[int, int], None]


def sample_cells(n_tokens: int, n_layers: int, per_branch: int, include_bos: bool, seed: int = 0) -> np.ndarray:
    """[N, 3] (layer, branch, position): `per_branch` distinct random positions from 1 .. T-2 for every
    (layer, branch) (the last token has no next token to predict), plus position 0 where `include_bos`."""
    positions = np.arange(1, n_tokens - 1)
    if len(positions) < 1:
        raise GateSkipError("the text is too short to ablate (need at least 3 tokens)")
    rng = np.random.default_rng(seed)
    rows = []
    for layer in range(n_layers):
        for branch in range(2):
            chosen = rng.choice(positions, size=min(per_branch, len(positions)), replace=False)
            rows += [(layer, branch, int(p)) for p in ([0] if include_bos else []) + sorted(chosen)]
    return np.array(rows, dtype=np.int64).reshape(-1, 3)


def check_cells(cells: np.ndarray, n_layers: int, protect_bos: bool) -> None:
    """Each cell is a forced decision that must be allowed: a real layer, and position 0 (BOS) only
    with `protect_bos=False` (the same one-line errors as `Forced`)."""
    for layer, branch, position in cells.tolist():
        Forced(int(layer), BRANCHES[branch], int(position)).check(n_layers, protect_bos)


def skip_harm(
    model: GatedModel,
    ids: torch.Tensor,
    cells: np.ndarray,
    adapter_scope: str = "auto",
    protect_bos: bool = True,
    batch_size: int = 16,
    on_step: ProgressCallback | None = None,
) -> pd.DataFrame:
    """The exact harm of forcing each cell (layer, branch, position) of the one text `ids` [1, T] to
    skip, alone: one row per cell with the `HARM_COLUMNS` (see the module docstring)."""
    batch_size = whole_number("batch_size", batch_size)
    check_cells(cells, model.spec.n_layers, protect_bos)
    ids = ids.to(model.device)
    T = ids.shape[1]
    base = model.forward(ids, torch.ones_like(ids), model.make_plan(0.0, adapter_scope=adapter_scope))
    base_lp = log_probs(base.logits)[0]
    base_nll = -base_lp[:-1].gather(-1, ids[0, 1:, None])[:, 0]
    every = SkipBudget.make(1.0, model.spec.n_layers)
    harm, harm_mean, dloss = (np.zeros(len(cells)) for _ in range(3))
    starts = range(0, len(cells), batch_size)
    for done, start in enumerate(starts):
        chunk = cells[start : start + batch_size]
        rows = ids.expand(len(chunk), T)
        policy = RowEntryPolicy(tuple(map(tuple, chunk.tolist())))
        plan = model.make_plan(every, policy, path="masked", protect_bos=protect_bos, adapter_scope=adapter_scope)
        out = model.forward(rows, torch.ones_like(rows), plan)
        if int(out.skipped.sum()) != len(chunk):  # one skip per row, or the rows are not single ablations
            raise GateSkipError("a forced skip did not happen (is the position eligible?)")
        lp = log_probs(out.logits)
        kl = kl_to_reference(base_lp, lp)  # [b, T]
        nll = -lp[:, :-1].gather(-1, ids[0, 1:].expand(len(chunk), T - 1)[..., None])[..., 0]
        for j, position in enumerate(chunk[:, 2].tolist()):
            harm[start + j] = float(kl[j, position:].sum())
            harm_mean[start + j] = harm[start + j] / (T - position)
            dloss[start + j] = float((nll[j, position:] - base_nll[position:]).sum())
        if on_step is not None:
            on_step(done + 1, len(starts))
    layer, branch, position = cells[:, 0], cells[:, 1], cells[:, 2]
    return pd.DataFrame(
        {"layer": layer, "branch": [BRANCHES[b] for b in branch], "position": position}
        | {"harm_kl": harm, "harm_kl_mean": harm_mean, "delta_loss": dloss}
    )


def branch_norms(model: GatedModel, ids: torch.Tensor, adapter_scope: str = "auto") -> np.ndarray:
    """[T, L, 2] ||what the branch adds|| / ||the residual it reads||, in the setting's run with nothing
    skipped (scope `skipped`: the original model; scope `all`: gate-scaled outputs, adapter on)."""
    ids = ids.to(model.device)
    plan = model.make_plan(0.0, adapter_scope=adapter_scope)
    out = model.forward(ids, torch.ones_like(ids), plan, capture=Capture(branch_io=True, hidden_states=True))
    T, L = ids.shape[1], model.spec.n_layers
    norms = np.zeros((T, L, 2))
    for layer in range(L):
        h = out.hidden_states[layer][0].float()
        added_attn = out.branch_io[2 * layer][1][0].float()
        added_mlp = out.branch_io[2 * layer + 1][1][0].float()
        # The MLP reads the residual after attention, or (parallel residual) the one entering the layer.
        h_mlp = h if model.spec.layers[layer].parallel_residual else h + added_attn
        for b, (added, read) in enumerate(((added_attn, h), (added_mlp, h_mlp))):
            norms[:, layer, b] = (added.norm(dim=-1) / read.norm(dim=-1).clamp(min=1e-12)).cpu().numpy()
    return norms


def gate_cells(model: GatedModel, ids: torch.Tensor, skip: float, adapter_scope: str = "auto") -> dict[str, np.ndarray]:
    """[T, L, 2] gate (NaN without gates), skipped and gate_applied of the run at budget `skip` (the
    shipped allocation and the quantile policy): what a trace of the text records."""
    ids = ids.to(model.device)
    plan = model.make_plan(skip if model.gates is not None else 0.0, adapter_scope=adapter_scope)
    out = model.forward(ids, torch.ones_like(ids), plan, logits_for="last")
    skipped = out.skipped[0].cpu().numpy().astype(bool)
    gate = out.gate[0].cpu().numpy().astype(np.float64)
    if model.gates is None:
        gate = np.full(gate.shape, np.nan)
    applied = applied_gates(skipped, plan.adapter_scope, model.gates is not None)
    return {"gate": gate, "skipped": skipped, "gate_applied": applied}


def text_effects(
    model: GatedModel,
    ids: torch.Tensor,
    skip: float = 0.25,
    per_branch: int = 0,
    include_bos: bool = False,
    adapter_scope: str = "auto",
    seed: int = 0,
    batch_size: int = 16,
    on_step: ProgressCallback | None = None,
) -> pd.DataFrame:
    """One row per (position, layer, branch) cell of the text `ids` [1, T]: token, token type, gate,
    skipped, gate_applied, rel_norm, and the harm columns where the cell was sampled (`sampled`), NaN
    elsewhere. `include_bos` also forces BOS to skip at every branch (protection lifted for it alone)."""
    T, L = ids.shape[1], model.spec.n_layers
    arrays = gate_cells(model, ids, skip, adapter_scope) | {"rel_norm": branch_norms(model, ids, adapter_scope)}
    tokens = model.token_strings(ids[0].tolist())
    position, layer, branch = (a.reshape(-1) for a in np.meshgrid(np.arange(T), np.arange(L), [0, 1], indexing="ij"))
    table = pd.DataFrame(
        {
            "position": position,
            "token": [tokens[p] for p in position],
            "token_type": [token_type(tokens[p], p) for p in position],
            "layer": layer,
            "branch": [BRANCHES[b] for b in branch],
        }
        | {name: values.reshape(-1) for name, values in arrays.items()}
    )
    table["sampled"] = False
    for column in HARM_COLUMNS:
        table[column] = np.nan
    if per_branch or include_bos:
        cells = sample_cells(T, L, per_branch, include_bos, seed)
        harm = skip_harm(model, ids, cells, adapter_scope, not include_bos, batch_size, on_step)
        at = (cells[:, 2] * L + cells[:, 0]) * 2 + cells[:, 1]  # the cell's row in `table`
        table.loc[at, "sampled"] = True
        table.loc[at, list(HARM_COLUMNS)] = harm[list(HARM_COLUMNS)].to_numpy()
    return table


def corpus_effects(
    model: GatedModel,
    texts: Sequence[str],
    max_tokens: int = 64,
    skip: float = 0.25,
    per_branch: int = 1,
    harm_texts: int | None = None,
    include_bos: bool = False,
    adapter_scope: str = "auto",
    seed: int = 0,
    batch_size: int = 16,
    on_step: ProgressCallback | None = None,
) -> pd.DataFrame:
    """`text_effects` of each text (truncated to `max_tokens`), with a `text` column; the harm is
    sampled in the first `harm_texts` texts only (all by default): the gate and norm statistics are
    one forward each, the harm `per_branch` x 2L forwards. `on_step(done, total)` counts texts."""
    if not texts:
        raise GateSkipError("no texts to measure")
    max_tokens = whole_number("max_tokens", max_tokens, minimum=3)
    harm_texts = len(texts) if harm_texts is None else whole_number("harm_texts", harm_texts, minimum=0)
    tables = []
    for i, text in enumerate(texts):
        ids = model.encode([text], max_tokens=max_tokens).input_ids
        measured = i < harm_texts
        table = text_effects(
            model,
            ids,
            skip,
            per_branch if measured else 0,
            include_bos and measured,
            adapter_scope,
            seed + i,
            batch_size,
        )
        tables.append(table.assign(text=i))
        if on_step is not None:
            on_step(i + 1, len(texts))
    return pd.concat(tables, ignore_index=True)


# ---- aggregation with intervals: bootstrap over texts
def bootstrap_weights(n_texts: int, resamples: int = 1000, seed: int = 0) -> np.ndarray:
    """[resamples, n_texts]: how often each text is drawn in each resample (whole texts, with
    replacement). One matrix serves every statistic of a table, so contrasts pair their draws."""
    rng = np.random.default_rng(seed)
    return rng.multinomial(n_texts, np.full(n_texts, 1 / n_texts), size=resamples).astype(float)


def text_bootstrap(sums: np.ndarray, counts: np.ndarray, resamples: int = 1000, seed: int = 0) -> np.ndarray:
    """Means sum/count over texts, with 95% percentile intervals from resampling whole texts.

    `sums`, `counts`: [n_texts, K] (K statistics at once). Returns [3, K]: estimate, low, high (NaN
    where a statistic has no data; low/high NaN with fewer than 2 texts). Vectorised over the K
    statistics and the resamples, because a per-(layer, branch) table asks for hundreds of intervals."""
    sums, counts = np.atleast_2d(sums).astype(float), np.atleast_2d(counts).astype(float)
    with np.errstate(invalid="ignore", divide="ignore"):
        estimate = sums.sum(0) / counts.sum(0)
        if len(sums) < 2:
            return np.stack([estimate, np.full_like(estimate, np.nan), np.full_like(estimate, np.nan)])
        weights = bootstrap_weights(len(sums), resamples, seed)
        return np.vstack([estimate, _percentiles((weights @ sums) / (weights @ counts))])


def contrast_bootstrap(a: tuple, b: tuple, kind: str, resamples: int = 1000, seed: int = 0) -> np.ndarray:
    """mean(A) - mean(B) (`kind` 'difference') or mean(A) / mean(B) ('ratio'), each mean sum/count over
    texts; `a`, `b` = (sums, counts) [n_texts, K]. The same resamples of texts for both groups (the
    groups share their texts). Returns [3, K]: estimate, low, high."""
    (sa, ca), (sb, cb) = ((np.atleast_2d(s).astype(float), np.atleast_2d(c).astype(float)) for s, c in (a, b))
    combine = {"difference": np.subtract, "ratio": np.divide}[kind]
    with np.errstate(invalid="ignore", divide="ignore"):
        estimate = combine(sa.sum(0) / ca.sum(0), sb.sum(0) / cb.sum(0))
        if len(sa) < 2:
            return np.stack([estimate, np.full_like(estimate, np.nan), np.full_like(estimate, np.nan)])
        w = bootstrap_weights(len(sa), resamples, seed)
        return np.vstack([estimate, _percentiles(combine((w @ sa) / (w @ ca), (w @ sb) / (w @ cb)))])


def _percentiles(draws: np.ndarray) -> np.ndarray:
    """[2, K] the 2.5% and 97.5% percentiles of [resamples, K] draws (undefined draws left out)."""
    finite = np.where(np.isfinite(draws), draws, np.nan)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # an all-NaN column: no data, a NaN interval
        return np.nanpercentile(finite, [2.5, 97.5], axis=0)


def per_text(cells: pd.DataFrame, value: str, keys: Sequence[str]) -> tuple[np.ndarray, np.ndarray, pd.Index]:
    """[n_texts, K] sums and counts of `value` (NaN rows left out) per text and group `keys`, and the
    groups' index (K entries, every group seen in any text; zero where a text has none)."""
    part = cells.dropna(subset=[value])
    grouped = part.groupby(["text", *keys])[value].agg(["sum", "count"])
    sums = grouped["sum"].unstack(list(range(1, len(keys) + 1)), fill_value=0.0)
    counts = grouped["count"].unstack(list(range(1, len(keys) + 1)), fill_value=0)
    return sums.to_numpy(), counts.to_numpy(), sums.columns


LAYER_MEASURES = {
    "gate_mean": ("gate", lambda c: c["position"] > 0),
    "gate_mean_applied": ("gate", lambda c: c["gate_applied"].astype(bool)),
    "applied_share": ("gate_applied", lambda c: c["position"] > 0),
    "skip_rate": ("skipped", lambda c: c["position"] > 0),
    "rel_norm": ("rel_norm", lambda c: c["position"] > 0),
    "harm_kl_mean": ("harm_kl_mean", lambda c: c["position"] > 0),
    "bos_harm_kl_mean": ("harm_kl_mean", lambda c: c["position"] == 0),
}


def layer_effects(cells: pd.DataFrame, resamples: int = 1000, seed: int = 0) -> pd.DataFrame:
    """Per (layer, branch): each `LAYER_MEASURES` statistic (tokens after BOS unless named: the gate
    over all of them and over the cells where it scaled the branch, the share where it did, the skip
    rate, rel_norm, harm per affected position; BOS's harm apart) with `_low`/`_high` 95% intervals by
    bootstrap over texts, and how many texts and sampled harm cells it rests on."""
    cells = cells.assign(gate_applied=cells["gate_applied"].astype(float), skipped=cells["skipped"].astype(float))
    keys = ["layer", "branch"]
    table = cells[keys].drop_duplicates().sort_values(keys, key=_branch_order).reset_index(drop=True)
    index = pd.MultiIndex.from_frame(table)
    for name, (value, where) in LAYER_MEASURES.items():
        sums, counts, groups = per_text(cells[where(cells)], value, keys)
        stats = pd.DataFrame(text_bootstrap(sums, counts, resamples, seed).T, index=groups).reindex(index)
        table[name], table[f"{name}_low"], table[f"{name}_high"] = (stats[i].to_numpy() for i in range(3))
    sampled = cells[cells["sampled"].astype(bool) & (cells["position"] > 0)].groupby(keys).size()
    table["harm_cells"] = sampled.reindex(index, fill_value=0).to_numpy()
    table["texts"] = cells["text"].nunique()
    return table


def _branch_order(column: pd.Series) -> pd.Series:
    return column.map(BRANCHES.index) if column.name == "branch" else column
