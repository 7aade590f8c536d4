"""Logit lens on gated runs: had a token's prediction settled when it skipped a layer?

For every token and depth l (the residual stream entering layer l; depth L is the
model's output), the residual is decoded with the final norm and unembedding
(`ArchSpec.logits`): its top next-token prediction, that prediction's probability,
and the rank at that depth of the run's *final* top-1 token (0 = already on top).
A token has *settled* at depth l when its final top-1 is already top-1 there.

The finding this supports: when a token skips a branch of layer l, had its
prediction already settled before layer l more often than tokens that ran it?
`settled_table` counts, per (layer, branch), eligible tokens that skipped vs ran,
and how many of each had settled at that depth; `settled_summary` compares the two within
each late layer (the second half of the stack by default) and combines the layers
(Mantel-Haenszel), with a 95% interval.

`logit_lens` is one text (token x depth grid, `to_dataframe` for CSV); `settled_corpus`
streams a corpus in token blocks (memory bounded by one batch, like `collect`).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np
import pandas as pd
import torch
from tqdm.auto import tqdm

from analysis.traces.intervals import mantel_haenszel_risk_ratio, pooled_risk_ratio
from gateskip_core import BRANCHES, Capture, GatedModel, GateSkipError
from gateskip_core.data import pydoc_texts, token_blocks
from gateskip_core.validation import whole_number


@dataclass
class LensGrid:
    """The logit lens of one gated run of one text; depths 0..L (L = output)."""

    tokens: list[str]  # input tokens
    top_token: np.ndarray  # [T, L+1] id of the top next-token prediction at each depth
    top_text: list[list[str]]  # [T][L+1] that token as text
    top_prob: np.ndarray  # [T, L+1] its probability
    final_rank: np.ndarray  # [T, L+1] rank of the final top-1 at each depth (0 = on top)
    skipped: np.ndarray  # [T, L, 2] the run's skip decisions
    eligible: np.ndarray  # [T]

    @property
    def n_layers(self) -> int:
        return self.skipped.shape[1]

    def settled(self) -> np.ndarray:
        """[T, L+1] bool: the final top-1 is already top-1 at that depth."""
        return self.final_rank == 0

    def to_dataframe(self) -> pd.DataFrame:
        """One row per (position, layer): the lens entering that layer and what the token did there."""
        T, L = len(self.tokens), self.n_layers
        pos, layer = np.meshgrid(np.arange(T), np.arange(L), indexing="ij")
        pos, layer = pos.ravel(), layer.ravel()
        return pd.DataFrame(
            {
                "position": pos,
                "token": np.asarray(self.tokens, dtype=object)[pos],
                "layer": layer,
                "top_token_id": self.top_token[pos, layer],
                "top_token": [self.top_text[p][la] for p, la in zip(pos, layer, strict=True)],
                "top_prob": self.top_prob[pos, layer],
                "final_rank": self.final_rank[pos, layer],
                "settled": self.settled()[pos, layer],
                "final_top_token": [self.top_text[p][L] for p in pos],
                "skipped_attn": self.skipped[pos, layer, 0],
                "skipped_mlp": self.skipped[pos, layer, 1],
                "eligible": self.eligible[pos],
            }
        )


def _lens_of(model: GatedModel, ids: torch.Tensor, mask: torch.Tensor, skip_args: dict):
    """Per depth: top id, its probability, rank of the final top-1 ([B, T, L+1] each); and the run."""
    plan = model.make_plan(**skip_args)
    result = model.forward(ids, mask, plan, capture=Capture(hidden_states=True))
    final_top = result.logits.argmax(-1)  # [B, T]
    tops, probs, ranks = [], [], []
    with torch.no_grad():
        for h in result.hidden_states:  # one depth at a time: [B, T, V] logits never pile up
            logits = model.spec.logits(h).float()
            p = logits.softmax(-1)
            top_p, top = p.max(-1)
            final_logit = logits.gather(-1, final_top[..., None])
            ranks.append((logits > final_logit).sum(-1))
            tops.append(top)
            probs.append(top_p)
    return torch.stack(tops, -1), torch.stack(probs, -1), torch.stack(ranks, -1), result


def logit_lens(
    model: GatedModel, text: str, chat: bool = False, max_tokens: int | None = None, **skip_args
) -> LensGrid:
    """The logit lens of one gated run of `text` (skip settings as for `GatedModel.trace`)."""
    batch = model.encode([text], chat=chat, max_tokens=max_tokens)
    top, prob, rank, result = _lens_of(model, batch.input_ids, batch.attention_mask, skip_args)
    ids = batch.input_ids[0].tolist()
    top_ids = top[0].cpu().numpy()
    vocab = {int(i): model.tokenizer.decode([int(i)]) for i in np.unique(top_ids)}
    return LensGrid(
        tokens=model.token_strings(ids),
        top_token=top_ids,
        top_text=[[vocab[int(i)] for i in row] for row in top_ids],
        top_prob=prob[0].cpu().numpy(),
        final_rank=rank[0].cpu().numpy(),
        skipped=result.skipped[0].cpu().numpy(),
        eligible=result.eligible[0].cpu().numpy(),
    )


# ---- the statistic
COUNT_COLUMNS = ["skipped_n", "skipped_settled", "ran_n", "ran_settled"]


def _empty_counts(n_layers: int) -> np.ndarray:
    return np.zeros((n_layers, 2, 4), dtype=np.int64)  # [L, branch, COUNT_COLUMNS]


def _add_counts(counts: np.ndarray, settled: np.ndarray, skipped: np.ndarray, eligible: np.ndarray) -> None:
    """settled [N, L+1], skipped [N, L, 2], eligible [N] (N tokens) added into counts [L, 2, 4]."""
    settled_before = settled[eligible, :-1, None]  # at the depth entering each layer
    skipped = skipped[eligible]
    ran = ~skipped
    counts[..., 0] += skipped.sum(0)
    counts[..., 1] += (skipped & settled_before).sum(0)
    counts[..., 2] += ran.sum(0)
    counts[..., 3] += (ran & settled_before).sum(0)


def settled_table(counts: np.ndarray) -> pd.DataFrame:
    """Per (layer, branch): counts and the settled rate of tokens that skipped vs ran the branch."""
    L = counts.shape[0]
    rows = []
    for layer in range(L):
        for b, branch in enumerate(BRANCHES):
            n_skip, s_skip, n_ran, s_ran = (int(v) for v in counts[layer, b])
            rows.append(
                {
                    "layer": layer,
                    "branch": branch,
                    "skipped_n": n_skip,
                    "skipped_settled": s_skip,
                    "ran_n": n_ran,
                    "ran_settled": s_ran,
                    "settled_rate_skipped": s_skip / n_skip if n_skip else float("nan"),
                    "settled_rate_ran": s_ran / n_ran if n_ran else float("nan"),
                }
            )
    return pd.DataFrame(rows)


def settled_summary(table: pd.DataFrame, from_layer: int | None = None) -> pd.DataFrame:
    """Layers >= `from_layer` (default: the second half), per branch and both: the settled rates of
    tokens that skipped vs ran (pooled), and `ratio`, skipped against ran compared *within* each
    (layer, branch) and combined (Mantel-Haenszel), with its 95% interval (`ratio_low`, `ratio_high`).
    `pooled_ratio` divides the pooled rates: it mixes layers whose settled rates and skip shares
    differ, so it can point the other way (docs/lens.md); the reported comparison is `ratio`."""
    n_layers = int(table["layer"].max()) + 1
    start = n_layers // 2 if from_layer is None else from_layer
    if not 0 <= start < n_layers:
        raise GateSkipError(f"from_layer must lie in 0..{n_layers - 1}, got {from_layer}")
    late = table[table["layer"] >= start]
    rows = []
    for scope, part in [*((b, late[late["branch"] == b]) for b in BRANCHES), ("both", late)]:
        counts = [part[c].to_numpy() for c in ("skipped_settled", "skipped_n", "ran_settled", "ran_n")]
        within = mantel_haenszel_risk_ratio(*counts)
        sums = part[COUNT_COLUMNS].sum()
        rows.append(
            {
                "layers": f"{start}-{n_layers - 1}",
                "branch": scope,
                "skipped_n": int(sums["skipped_n"]),
                "ran_n": int(sums["ran_n"]),
                "settled_rate_skipped": sums["skipped_settled"] / sums["skipped_n"] if sums["skipped_n"] else np.nan,
                "settled_rate_ran": sums["ran_settled"] / sums["ran_n"] if sums["ran_n"] else np.nan,
                "ratio": within.estimate,
                "ratio_low": within.low,
                "ratio_high": within.high,
                "pooled_ratio": pooled_risk_ratio(*counts),
                "strata": "(layer, branch)" if scope == "both" else "layer",
            }
        )
    return pd.DataFrame(rows)


def grid_counts(grid: LensGrid) -> np.ndarray:
    counts = _empty_counts(grid.n_layers)
    _add_counts(counts, grid.settled(), grid.skipped.astype(bool), grid.eligible.astype(bool))
    return counts


def settled_corpus(
    model: GatedModel,
    texts: Iterable[str] | None = None,
    n_blocks: int = 16,
    seq_len: int = 128,
    batch_size: int = 4,
    show_progress: bool = True,
    **skip_args,
) -> pd.DataFrame:
    """`settled_table` over a corpus (default: the pydoc validation split), streamed in
    `n_blocks` blocks of `seq_len` tokens, `batch_size` blocks per forward pass."""
    n_blocks = whole_number("n_blocks", n_blocks)
    seq_len = whole_number("seq_len", seq_len, minimum=2)
    batch_size = whole_number("batch_size", batch_size)
    texts = pydoc_texts("validation") if texts is None else texts
    model.make_plan(**skip_args)  # bad settings fail before the first block
    counts = _empty_counts(model.spec.n_layers)
    batch: list[torch.Tensor] = []
    done = 0
    with tqdm(total=n_blocks, disable=not show_progress, desc="logit lens", unit="block") as bar:
        blocks = token_blocks(model.tokenizer, texts, seq_len)
        while done < n_blocks:
            batch = [b for _, b in zip(range(min(batch_size, n_blocks - done)), blocks, strict=False)]
            if not batch:
                break
            ids = torch.stack(batch)
            _, _, rank, result = _lens_of(model, ids, torch.ones_like(ids), skip_args)
            settled = (rank == 0).cpu().numpy().reshape(-1, rank.shape[-1])
            skipped = result.skipped.cpu().numpy().reshape(-1, *result.skipped.shape[2:])
            _add_counts(counts, settled, skipped, result.eligible.cpu().numpy().reshape(-1))
            done += len(batch)
            bar.update(len(batch))
    if done == 0:
        raise GateSkipError(f"the text is shorter than one block of {seq_len} tokens")
    return settled_table(counts)
