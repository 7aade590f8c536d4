"""The paper's interpretive findings (and the ones this project's docs made), each checked twice.

Each finding is a contrast between two groups of cells (A against B, A claimed higher):

- `bos_anchor`: BOS (position 0) against the other tokens, in the first third of the layers
  (the paper: BOS gets the highest gates in early layers and acts as an anchor);
- `late_over_early`: tokens in the last third of the layers against the first third (the docs said
  early layers have lower gates);
- `mlp_over_attn`: MLP branches against attention branches (the docs: attention gates are lower);
- `punctuation_high`: punctuation against the other tokens after BOS, every layer (the paper:
  punctuation keeps high gates across layers);
- `deep_content`: content words against stopwords in the last third of the layers (the paper: deep
  layers become selective for content words).

For each, over the cells of `causal.corpus_effects` runs:

- the *gate statistic*: mean gate of A minus mean gate of B, over every cell and over the cells where
  the gate scaled the branch (`gate_applied`), with 95% intervals by bootstrap over texts;
- the *causal check*: mean harm per affected position of a single forced skip of A against B, as a
  ratio (A/B), in the same gated setting and on the original model, and the ratio of what the branch
  adds (`rel_norm`);
- verdicts from the intervals: `yes` (the interval lies on the claimed side), `reversed` (on the
  other side), `inconclusive` (it spans no difference).

BOS's gate is one number per model and scope: BOS always sits at position 0, where causal
attention sees only itself, so its residual and gates are the same in every text. Its intervals
come from the other tokens, which differ between texts.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import pandas as pd

from analysis.experiments.causal import contrast_bootstrap, per_text

Mask = Callable[[pd.DataFrame, int], pd.Series]


def _early(c: pd.DataFrame, n_layers: int) -> pd.Series:
    return c["layer"] < max(1, n_layers // 3)


def _late(c: pd.DataFrame, n_layers: int) -> pd.Series:
    return c["layer"] >= n_layers - max(1, n_layers // 3)


def _after_bos(c: pd.DataFrame) -> pd.Series:
    return c["position"] > 0


@dataclass(frozen=True)
class Finding:
    name: str
    claim: str
    group_a: Mask
    group_b: Mask


FINDINGS = (
    Finding(
        "bos_anchor",
        "BOS gets higher gates than other tokens in early layers (paper)",
        lambda c, n: (c["position"] == 0) & _early(c, n),
        lambda c, n: _after_bos(c) & _early(c, n),
    ),
    Finding(
        "late_over_early",
        "early layers have lower gates than late ones (old docs)",
        lambda c, n: _after_bos(c) & _late(c, n),
        lambda c, n: _after_bos(c) & _early(c, n),
    ),
    Finding(
        "mlp_over_attn",
        "attention gates are lower than MLP gates (old docs)",
        lambda c, n: _after_bos(c) & (c["branch"] == "mlp"),
        lambda c, n: _after_bos(c) & (c["branch"] == "attn"),
    ),
    Finding(
        "punctuation_high",
        "punctuation keeps higher gates than other tokens across layers (paper)",
        lambda c, n: c["token_type"] == "punctuation",
        lambda c, n: _after_bos(c) & (c["token_type"] != "punctuation"),
    ),
    Finding(
        "deep_content",
        "deep layers keep content words over stopwords (paper)",
        lambda c, n: (c["token_type"] == "content") & _late(c, n),
        lambda c, n: (c["token_type"] == "stopword") & _late(c, n),
    ),
)


def _group_totals(cells: pd.DataFrame, mask: pd.Series, value: str, texts: np.ndarray):
    """[n_texts, 1] sums and counts of `value` over the masked cells of each text (zero where none)."""
    sums, counts, _ = per_text(cells[mask].assign(group=0), value, ["group"])
    seen = cells[mask].dropna(subset=[value])["text"].unique()
    full_sums, full_counts = np.zeros((len(texts), 1)), np.zeros((len(texts), 1))
    at = np.searchsorted(texts, np.sort(seen))
    if len(at):
        full_sums[at], full_counts[at] = sums, counts
    return full_sums, full_counts


def contrast(cells: pd.DataFrame, finding: Finding, value: str, kind: str, extra=None, **boot) -> np.ndarray:
    """[3] estimate, low, high of `finding`'s A against B for `value` (`extra`: a further mask)."""
    n_layers = int(cells["layer"].max()) + 1
    texts = np.sort(cells.dropna(subset=[value])["text"].unique())  # harm: only the texts it was measured on
    keep = pd.Series(True, index=cells.index) if extra is None else extra
    groups = (finding.group_a(cells, n_layers) & keep, finding.group_b(cells, n_layers) & keep)
    a, b = (_group_totals(cells, mask, value, texts) for mask in groups)
    return contrast_bootstrap(a, b, kind, **boot)[:, 0]


def verdict(low: float, high: float, null: float) -> str:
    """'yes' if the interval lies above the null (the claimed side), 'reversed' below, else inconclusive."""
    if not (np.isfinite(low) and np.isfinite(high)):
        return "no data"
    return "yes" if low > null else "reversed" if high < null else "inconclusive"


def findings_table(gated: dict[str, pd.DataFrame], original: pd.DataFrame, model: str, **boot) -> pd.DataFrame:
    """One row per (finding, scope): `gated` maps an adapter scope ('all', 'skipped') to its cells,
    `original` holds the original model's (its harm is the causal check without gates)."""
    rows = []
    for finding in FINDINGS:
        for scope, cells in gated.items():
            numbers = {
                "gate_diff": contrast(cells, finding, "gate", "difference", **boot),
                "gate_diff_applied": contrast(
                    cells, finding, "gate", "difference", cells["gate_applied"].astype(bool), **boot
                ),
                "harm_ratio": contrast(cells, finding, "harm_kl_mean", "ratio", **boot),
                "harm_ratio_original": contrast(original, finding, "harm_kl_mean", "ratio", **boot),
                "rel_norm_ratio": contrast(cells, finding, "rel_norm", "ratio", **boot),
            }
            row = {"model": model, "finding": finding.name, "claim": finding.claim, "scope": scope}
            for name, (estimate, low, high) in numbers.items():
                row |= {name: estimate, f"{name}_low": low, f"{name}_high": high}
            row["gate_verdict"] = verdict(row["gate_diff_low"], row["gate_diff_high"], 0.0)
            row["gate_applied_verdict"] = verdict(row["gate_diff_applied_low"], row["gate_diff_applied_high"], 0.0)
            row["harm_verdict"] = verdict(row["harm_ratio_low"], row["harm_ratio_high"], 1.0)
            row["harm_original_verdict"] = verdict(row["harm_ratio_original_low"], row["harm_ratio_original_high"], 1.0)
            row["texts"] = cells["text"].nunique()
            row["harm_texts"] = cells.loc[cells["sampled"].astype(bool), "text"].nunique()
            rows.append(row)
    return pd.DataFrame(rows)


def bos_table(settings: dict[str, pd.DataFrame], **boot) -> pd.DataFrame:
    """Per setting ('original', 'all', 'skipped') and (layer, branch): BOS's gate (one number: its
    spread over texts is recorded to show it), the other tokens' mean gate, the harm per affected
    position of skipping BOS and of skipping another token, their ratio with a 95% interval over
    texts, and the share of sampled other skips that harm less than BOS's (in the same text)."""
    rows = []
    for setting, cells in settings.items():
        bos = cells[cells["position"] == 0]
        others = cells[cells["position"] > 0]
        keys = ["layer", "branch"]
        a_sums, a_counts, groups = per_text(bos, "harm_kl_mean", keys)
        b_sums, b_counts, b_groups = per_text(others[others["sampled"].astype(bool)], "harm_kl_mean", keys)
        b_frame = pd.DataFrame(b_sums, columns=b_groups).reindex(columns=groups)
        b_count_frame = pd.DataFrame(b_counts, columns=b_groups).reindex(columns=groups)
        ratio = contrast_bootstrap((a_sums, a_counts), (b_frame.to_numpy(), b_count_frame.to_numpy()), "ratio", **boot)
        bos_gate = bos.groupby(keys)["gate"].agg(["mean", lambda g: g.max() - g.min()])
        other_gate = others.groupby(keys)["gate"].mean()
        bos_harm = bos.groupby(keys)["harm_kl_mean"].mean()
        other_harm = others.groupby(keys)["harm_kl_mean"].mean()
        below = _share_below_bos(bos, others)
        for j, (layer, branch) in enumerate(groups):
            key = (layer, branch)
            rows.append(
                {
                    "setting": setting,
                    "layer": layer,
                    "branch": branch,
                    "bos_gate": bos_gate.loc[key, "mean"],
                    "bos_gate_spread": bos_gate.loc[key].iloc[1],
                    "others_gate": other_gate.loc[key],
                    "bos_harm": bos_harm.loc[key],
                    "others_harm": other_harm.loc[key],
                    "harm_ratio": ratio[0, j],
                    "harm_ratio_low": ratio[1, j],
                    "harm_ratio_high": ratio[2, j],
                    "others_less_harmful": below.get(key, np.nan),
                    "texts": bos["text"].nunique(),
                }
            )
    return pd.DataFrame(rows)


def _share_below_bos(bos: pd.DataFrame, others: pd.DataFrame) -> dict:
    """Per (layer, branch): the share of sampled other skips less harmful than BOS's in their text."""
    keys = ["text", "layer", "branch"]
    sampled = others[others["sampled"].astype(bool)][keys + ["harm_kl_mean"]]
    joined = sampled.merge(bos[keys + ["harm_kl_mean"]].rename(columns={"harm_kl_mean": "bos"}), on=keys)
    joined["below"] = joined["harm_kl_mean"] < joined["bos"]
    return joined.groupby(["layer", "branch"])["below"].mean().to_dict()
