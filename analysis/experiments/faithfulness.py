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
(the f with the least harm).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from scipy.stats import spearmanr
from tqdm.auto import tqdm

from gateskip_core import BRANCHES, Capture, GatedModel, GateSkipError, SkipBudget
from gateskip_core.data import token_blocks
from gateskip_core.skipping.policies import BranchInput, Decision, SkipPolicy
from gateskip_core.validation import whole_number

SIGNALS = ("gate", "preactivation", "rel_norm", "block_influence", "attribution", "unsettled")


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
        return Decision(skip=skip & inp.eligible, threshold=torch.full(skip.shape, float("nan")))


def sample_entries(n_tokens: int, n_layers: int, n_entries: int, seed: int = 0) -> np.ndarray:
    """[N, 3] (layer, branch, position), the same number from each (layer, branch) stratum (positions
    1 .. T-2: BOS is protected, the last token's output has no next token to predict)."""
    positions = np.arange(1, n_tokens - 1)
    if len(positions) < 1:
        raise GateSkipError("the text is too short to ablate (need at least 3 tokens)")
    per_stratum = max(1, -(-n_entries // (2 * n_layers)))
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
        lp = F.log_softmax(out.logits.float(), -1)  # [b, T, V]
        kl = (base_lp.exp() * (base_lp - lp)).sum(-1)  # [b, T]
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
        lp = F.log_softmax(out.logits.float(), -1)
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


def signal_table(entries: pd.DataFrame, skip_fraction: float = 0.25, target: str = "harm_kl") -> pd.DataFrame:
    """One row per signal: Spearman with the harm (within (layer, branch) averaged, and pooled), and
    the harm of the entries it would skip at `skip_fraction` (lowest signal first, per stratum)
    against random choice and the oracle."""
    strata = list(entries.groupby(["layer", "branch"], sort=True))
    total = float(entries[target].sum())
    oracle = sum(_lowest(part[target].to_numpy(), part[target].to_numpy(), skip_fraction) for _, part in strata)
    rows = []
    for signal in SIGNALS + ("random", "oracle"):
        if signal in ("random", "oracle"):
            within, pooled = float("nan"), float("nan")
            carried = skip_fraction * total if signal == "random" else oracle
        else:
            within = float(np.nanmean([_spearman(p[signal].to_numpy(), p[target].to_numpy()) for _, p in strata]))
            pooled = _spearman(entries[signal].to_numpy(), entries[target].to_numpy())
            carried = sum(_lowest(p[signal].to_numpy(), p[target].to_numpy(), skip_fraction) for _, p in strata)
        rows.append(
            {
                "signal": signal,
                "spearman_within": within,
                "spearman_pooled": pooled,
                "skip_fraction": skip_fraction,
                "harm_of_skipped": carried,
                "vs_random": carried / (skip_fraction * total) if total else float("nan"),
                "vs_oracle": carried / oracle if oracle else float("nan"),
            }
        )
    return pd.DataFrame(rows)


def _lowest(signal: np.ndarray, harm: np.ndarray, fraction: float) -> float:
    """The harm of the `fraction` of entries with the lowest signal (ties broken by order)."""
    k = int(np.floor(fraction * len(signal) + 1e-9))
    return float(harm[np.argsort(signal, kind="stable")[:k]].sum())


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
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(entries, signals): the exact harm and signals of `n_exact` stratified entries of `text`, and
    how well each signal predicts the harm (`signal_table`). `on_step(done, total)` after each batch."""
    entries = exact_harm(model, text, n_exact, seed, max_tokens, batch_size, show_progress, on_step)
    return entries, signal_table(entries, skip_fraction)
