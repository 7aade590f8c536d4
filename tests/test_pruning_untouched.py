"""scripts/pruning_gates_untouched.py: the (K, b) mix is chosen on the tuning blocks' sweep and reported on
blocks that chose nothing. What makes that true is tested here: the choice reads only the tuning file,
the report blocks are disjoint from the tuning blocks, and the paired comparison is what it says."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch

from analysis.experiments.quality import evaluation_blocks
from gateskip_core.data import pydoc_texts

from .conftest import load_script


@pytest.fixture(scope="module")
def script():
    return load_script("pruning_gates_untouched")


def test_the_choice_is_the_lowest_tuning_perplexity_mix_per_text_and_target(script):
    tuning = pd.read_csv(script.TUNING)
    picks = script.choices(tuning)
    assert sorted(zip(picks["chosen_on"], picks["target"])) == [
        ("legal", 0.2),
        ("legal", 0.3),
        ("pydoc", 0.2),
        ("pydoc", 0.3),
    ]
    for row in picks.itertuples():
        mixes = tuning[
            (tuning["text"] == row.chosen_on)
            & np.isclose(tuning["net_flops_saved"], row.target)
            & tuning["method"].str.startswith("shortgpt+gateskip:")
        ]
        best = mixes.loc[mixes["ppl"].idxmin()]
        assert best["method"] == f"shortgpt+gateskip:{row.k}" and best["skip_budget"] == row.b


def test_the_report_blocks_are_not_the_tuning_blocks(script, tiny_llama):
    """The sweep's tuning blocks are the first TUNING_BLOCKS of a text; the report takes the ones after."""
    texts = pydoc_texts("validation")
    tuning = evaluation_blocks(tiny_llama, texts, n_blocks=script.TUNING_BLOCKS, seq_len=32)
    longer = evaluation_blocks(tiny_llama, texts, n_blocks=script.TUNING_BLOCKS + 3, seq_len=32)
    assert torch.equal(longer[: script.TUNING_BLOCKS], tuning)  # the tuning blocks are a prefix...
    report = longer[script.TUNING_BLOCKS :]
    assert not any(torch.equal(r, t) for r in report for t in tuning)  # ...and the report shares none


def test_paired_differences_and_their_intervals(script):
    base = pd.DataFrame({"nll": [3.0, 3.5, 4.0], "kl_to_full": [0.5, 0.6, 0.7], "top1_agreement": [0.6, 0.5, 0.4]})
    better = base.assign(nll=base["nll"] - 0.1, kl_to_full=base["kl_to_full"] - 0.05)
    draws = np.random.default_rng(0).integers(0, 3, size=(200, 3))
    same = script.paired(base, base, draws, "gateskip")
    assert same["ppl_ratio_vs_gateskip"] == 1 and same["ppl_ratio_vs_gateskip_low"] == 1
    row = script.paired(better, base, draws, "gateskip")
    assert row["ppl_ratio_vs_gateskip"] == pytest.approx(np.exp(-0.1))
    assert row["ppl_ratio_vs_gateskip_low"] == pytest.approx(np.exp(-0.1))  # a constant shift: no spread
    assert row["kl_diff_vs_gateskip"] == pytest.approx(-0.05) and row["top1_diff_vs_gateskip"] == 0
