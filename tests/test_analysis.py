"""Analysis: flow statistics (streaming), sweeps, faithfulness, figures and their CLI."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from analysis.experiments.collect import collect
from analysis.experiments.faithfulness import faithfulness
from analysis.experiments.quality import evaluation_blocks
from analysis.experiments.sweep import METHODS, at_matched_savings, block_influence, shortgpt_layers, sweep
from analysis.traces import figures
from analysis.traces.dataset import iter_traces
from analysis.traces.flow import TOKEN_TYPES, layer_skip_summary, token_layer_matrix, token_type
from analysis.traces.tracedb import TraceDB
from gateskip_core import GateSkipError, read_trace
from gateskip_core.data import paragraphs, pydoc_texts

from .conftest import run_cli as run


def test_layer_table_matches_direct_computation(tiny):
    trace = tiny.trace(pydoc_texts("validation")[:3], skip=0.3, max_tokens=64)
    table = TraceDB(trace, cells="all").layer_table()  # every token's gate (applied only: see below)
    gates = np.concatenate([s.gate for s in trace.sequences])  # [N, L, 2]
    row = table[(table["layer"] == 2) & (table["branch"] == "mlp")].iloc[0]
    assert row["gate_mean"] == pytest.approx(gates[:, 2, 1].mean(), rel=1e-6)
    assert row["gate_std"] == pytest.approx(gates[:, 2, 1].std(), rel=1e-3, abs=1e-6)
    assert row["gate_p50"] == pytest.approx(np.median(gates[:, 2, 1]), abs=1e-3)
    assert row["skip_rate"] == pytest.approx(trace.skipped_fraction(), abs=0.05)
    assert {"gate_p5", "gate_p95", "threshold", "skip_budget"} <= set(table.columns)


def test_stats_of_a_collected_file_equal_those_of_its_traces_in_memory(tiny, tmp_path):
    paras = [p for t in pydoc_texts("validation")[:6] for p in paragraphs(t)]
    assert len(paras) > 40
    out = tmp_path / "c.parquet"
    counts = collect(tiny, paras, out, batch_size=4, show_progress=False, skip=0.2, max_tokens=48)
    assert counts["sequences"] == len(paras)
    chunks = list(iter_traces(out, chunk_rows=1000))  # far smaller than the corpus: complete sequences each
    assert len(chunks) > 10 and sum(len(t.sequences) for t in chunks) == len(paras)
    from_file, in_memory = TraceDB(out), TraceDB(chunks)
    for table in ("layer_table", "bos_table", "token_type_table"):
        pd.testing.assert_frame_equal(getattr(from_file, table)(), getattr(in_memory, table)(), check_dtype=False)
    assert in_memory.counts() == from_file.counts() and from_file.counts()["sequences"] == len(paras)
    # Batched by length inside a window, written in corpus order: the same sequences as tracing in order.
    direct = tiny.trace(paras, batch_size=4, skip=0.2, max_tokens=48)
    read = read_trace(out)
    for ours, theirs in zip(read.sequences, direct.sequences, strict=True):
        np.testing.assert_array_equal(ours.token_ids, theirs.token_ids)
        np.testing.assert_allclose(ours.gate, theirs.gate, atol=1e-5)
        assert (ours.skipped != theirs.skipped).mean() < 0.01  # near-ties may flip under other padding


def test_bos_token_types_and_token_table(tiny):
    trace = tiny.trace(["Hello, world! 42 is the answer.", "The cat sat."], skip=0.0)
    stats = TraceDB(trace)
    bos = stats.bos_table()
    seq = trace.sequences[0]
    expected = seq.gate[0, 0, 0] / ((seq.gate[1:, 0, 0].mean() + trace.sequences[1].gate[1:, 0, 0].mean()) / 2)
    assert bos.iloc[0]["bos_gate"] == pytest.approx((seq.gate[0, 0, 0] + trace.sequences[1].gate[0, 0, 0]) / 2)
    assert bos.iloc[0]["ratio"] == pytest.approx(expected, rel=0.05)
    types = set(stats.token_type_table()["token_type"])
    assert {"bos", "punctuation", "digits", "stopword", "content", "whitespace"} <= types
    tokens = stats.token_table()
    assert tokens["count"].sum() == sum(s.n_tokens for s in trace.sequences)
    assert tokens["mean_gate"].is_monotonic_decreasing
    # the token-type table against pandas over the same rows
    rows = trace.to_dataframe()
    rows["token_type"] = [token_type(t, p) for t, p in zip(rows["token"], rows["position"])]
    rows["skip"] = rows["skipped"] * rows["eligible"]
    expected = rows.groupby(["token_type", "layer", "branch"]).agg(
        gate_mean=("gate", "mean"), skipped=("skip", "sum"), eligible=("eligible", "sum"), tokens=("gate", "size")
    )
    table = stats.token_type_table().set_index(["token_type", "layer", "branch"])
    assert list(dict.fromkeys(table.index.get_level_values(0))) == [t for t in TOKEN_TYPES if t in types]
    assert len(table) == len(expected)
    for key, row in expected.iterrows():
        assert table.loc[key, "tokens"] == row["tokens"]
        assert table.loc[key, "gate_mean"] == pytest.approx(row["gate_mean"], rel=1e-9)
        rate = row["skipped"] / row["eligible"] if row["eligible"] else float("nan")
        assert table.loc[key, "skip_rate"] == pytest.approx(rate, rel=1e-9, nan_ok=True)
    per_token = rows.groupby("token_id")["gate"].mean()
    for _, row in tokens.iterrows():
        assert row["mean_gate"] == pytest.approx(per_token[row["token_id"]], rel=1e-9)


@pytest.mark.parametrize(
    "tok, pos, kind",
    [
        ("<s>", 0, "bos"),
        ("<|im_start|>", 3, "special"),
        ("\n", 2, "whitespace"),
        (",", 1, "punctuation"),
        (" 42", 1, "digits"),
        (" the", 1, "stopword"),
        (" cat", 1, "content"),
    ],
)
def test_token_type(tok, pos, kind):
    assert token_type(tok, pos) == kind


def test_estimate_matches_model_at_first_layer_and_summary(tiny):
    trace = tiny.trace("The quick brown fox jumps over the lazy dog.", skip=0.0)
    est = tiny.estimate(trace, skip=0.4)
    exact = tiny.trace("The quick brown fox jumps over the lazy dog.", skip=0.4)
    # layer 0's attention gates see the same residual in both, so the decisions agree there
    np.testing.assert_array_equal(est.sequences[0].skipped[:, 0, 0], exact.sequences[0].skipped[:, 0, 0])
    assert (est.sequences[0].skipped.sum(0) == exact.sequences[0].skipped.sum(0)).all()  # same counts everywhere
    from gateskip_core import account_sequence

    expected = account_sequence(
        tiny.spec, est.sequences[0].skipped, tiny.gate_flops(), est.sequences[0].n_tokens, "masked"
    )
    assert est.sequences[0].compute == expected
    summary = layer_skip_summary(TraceDB(exact).layer_table())
    assert list(summary["branch"]) == ["attn", "mlp"]
    matrix = token_layer_matrix(exact, branch="mlp", value="skipped")
    assert matrix.shape == (exact.sequences[0].n_tokens, tiny.spec.n_layers)


def test_sweep_rows_and_baselines(tiny):
    blocks = evaluation_blocks(tiny, n_blocks=2, seq_len=48)
    df = sweep(tiny, [0.0, 0.3], METHODS, blocks)
    assert len(df) == 2 * len(METHODS) and set(df["method"]) == set(METHODS)
    for col in [
        "method",
        "skip_budget",
        "skipped_fraction",
        "flops_saved",
        "ppl",
        "kl_to_full",
        "top1_agreement",
        "tokens",
    ]:
        assert col in df.columns
    zero = df[df["skip_budget"] == 0.0]
    assert (zero["skipped_fraction"] == 0).all()
    assert zero.set_index("method").loc["shortgpt", "kl_to_full"] == pytest.approx(0, abs=1e-6)
    at = df[df["skip_budget"] == 0.3].set_index("method")
    target = at.loc["gateskip", "flops_saved_gross"]
    assert at.loc["shortgpt", "flops_saved"] >= target - 1e-9  # removes layers until it saves as much
    assert at.loc["mlp-only", "flops_saved_gross"] == pytest.approx(target, abs=0.05)
    fig = figures.sweep_figure(df)
    assert len(fig.data) == len(METHODS)
    matched = at_matched_savings(df, targets=(0.0, 0.05, 5.0)).set_index(["method", "net_flops_saved"])
    for method in METHODS:  # beyond the end of a method's curve: NaN, not an extrapolation
        assert np.isnan(matched.loc[(method, 5.0), "ppl"])
    lo, hi = df[df["method"] == "shortgpt"].sort_values("flops_saved").iloc[[0, -1]].itertuples()
    if lo.flops_saved < 0.05 < hi.flops_saved:
        w = (0.05 - lo.flops_saved) / (hi.flops_saved - lo.flops_saved)
        assert matched.loc[("shortgpt", 0.05), "top1_agreement"] == pytest.approx(
            lo.top1_agreement + w * (hi.top1_agreement - lo.top1_agreement)
        )


def test_shortgpt_removes_lowest_block_influence_first(tiny):
    blocks = evaluation_blocks(tiny, n_blocks=1, seq_len=32)
    bi = block_influence(tiny, blocks)
    assert bi.shape == (tiny.spec.n_layers,)
    layers = shortgpt_layers(tiny, bi, 0.2, 32)
    assert layers and int(np.argmin(bi)) in layers


def test_exact_harm_is_stratified_batched_and_equals_single_ablations(tiny):
    import torch
    import torch.nn.functional as F

    from analysis.experiments.faithfulness import SIGNALS
    from gateskip_core import Forced

    text = "The quick brown fox jumps over the lazy dog. " * 2
    entries, signals = faithfulness(tiny, text, n_exact=16, batch_size=5, show_progress=False)
    counts = entries.groupby(["layer", "branch"]).size()
    assert counts.nunique() == 1 and len(entries) == counts.iloc[0] * 2 * tiny.spec.n_layers >= 16
    ids = tiny.encode([text], max_tokens=128).input_ids
    ones = torch.ones_like(ids)
    base = F.log_softmax(tiny.forward(ids, ones, tiny.make_plan(0.0)).logits.float(), -1)[0]
    for row in entries.sample(4, random_state=0).itertuples():  # batched rows == one ablation alone
        plan = tiny.make_plan(0.0, forced=[Forced(int(row.layer), row.branch, int(row.position))])
        lp = F.log_softmax(tiny.forward(ids, ones, plan).logits.float(), -1)[0]
        kl = (base.exp() * (base - lp)).sum(-1)[row.position :].sum()
        assert row.harm_kl == pytest.approx(float(kl), rel=1e-4, abs=1e-7)
        assert row.harm_kl > 0
    trace = tiny.trace(text, max_tokens=128).sequences[0]
    gates = trace.gate[entries["position"], entries["layer"], entries["branch"].map({"attn": 0, "mlp": 1})]
    np.testing.assert_allclose(entries["gate"], gates, atol=1e-6)
    assert list(signals["signal"]) == [*SIGNALS, "random", "oracle"]
    by = signals.set_index("signal")["harm_of_skipped"]
    assert by["random"] == pytest.approx(0.25 * entries["harm_kl"].sum())
    assert all(by[s] >= by["oracle"] - 1e-12 for s in SIGNALS)
    fig = figures.faithfulness_figure(entries, signals)
    assert fig.data


def test_figures_render(tiny):
    trace = tiny.trace(["Hello, world!", "Another one."], skip=0.3)
    stats = TraceDB(trace)
    heat = figures.gate_heatmap(trace)
    # per branch: the heatmap, its grey veil over gates that did not act, its clickable cell markers
    # (which carry the hover text) and the skip marks
    assert len(heat.data) == 8 and "threshold" in heat.data[2].hovertemplate
    for fig in [
        figures.layer_profile_figure(stats.layer_table()),
        figures.bos_figure(stats.bos_table()),
        figures.token_type_figure(stats.token_type_table()),
    ]:
        assert fig.data, "a figure without traces"
        for part in fig.data:
            values = [
                v
                for v in (getattr(part, "x", None), getattr(part, "y", None), getattr(part, "z", None))
                if v is not None
            ]
            assert values and all(len(v) > 0 for v in values)


def test_analysis_cli_round_trip(tmp_path):
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n\n".join(pydoc_texts("validation")[:2]))
    traces = tmp_path / "t.parquet"
    res = run(
        "collect",
        "--model",
        "tiny-llama",
        "--gates",
        "untrained",
        "--file",
        str(corpus),
        "--skip",
        "0.2",
        "--out",
        str(traces),
        "--max-tokens",
        "32",
    )
    assert res.returncode == 0, res.stderr
    res = run("stats", "--trace", str(traces), "--out", str(tmp_path / "ls.csv"))
    assert res.returncode == 0, res.stderr
    assert len(pd.read_csv(tmp_path / "ls.csv")) == 8
    res = run(
        "sweep",
        "--model",
        "tiny-llama",
        "--gates",
        "untrained",
        "--budgets",
        "0,0.2",
        "--blocks",
        "1",
        "--methods",
        "gateskip,random,shortgpt",
        "--out",
        str(tmp_path / "s.csv"),
    )
    assert res.returncode == 0, res.stderr
    assert len(pd.read_csv(tmp_path / "s.csv")) == 6
    res = run(
        "faithfulness",
        "--model",
        "tiny-llama",
        "--gates",
        "untrained",
        "--text",
        "Hello there, fine day.",
        "--exact",
        "4",
        "--out",
        str(tmp_path / "f.csv"),
    )
    assert res.returncode == 0, res.stderr
    bad = run("sweep", "--model", "tiny-llama", "--gates", "untrained", "--methods", "magic", "--out", "x.csv")
    assert bad.returncode == 2 and "unknown method" in bad.stderr and "Traceback" not in bad.stderr
    bad = run("stats", "--trace", str(corpus), "--out", str(tmp_path / "x.csv"))
    assert bad.returncode == 2 and len(bad.stderr.strip().splitlines()) == 1


def test_chat_fidelity_scores_the_originals_own_answers(tmp_path):
    """Budget 0 with the gates unscaled until a skip (adapter scope 'skipped') is the original: KL 0, top-1 1."""
    from analysis.experiments.quality import chat_fidelity
    from gateskip_core import load_model

    from .conftest import spread_gates

    model = spread_gates(load_model("tiny-llama"))
    prompts = ["hi there", "tell me a story", "what is two plus two"]
    table = chat_fidelity(model, [0.0, 0.5], ["quantile"], prompts, max_new_tokens=6, show_progress=False)
    assert list(table["skip_budget"]) == [0.0, 0.5] and (table["answers"] == 3).all()
    assert 0 < table["answer_tokens"].iloc[0] <= 3 * 6
    loose = table.set_index("skip_budget")
    assert loose.loc[0.5, "kl_to_full"] > loose.loc[0.0, "kl_to_full"] >= 0
    res = run(
        "chat-fidelity",
        "--model",
        "tiny-llama",
        "--gates",
        "untrained",
        "--adapter-scope",
        "skipped",
        "--budgets",
        "0",
        "--policies",
        "quantile",
        "--max-new-tokens",
        "4",
        "--out",
        str(tmp_path / "c.csv"),
    )
    assert res.returncode == 0, res.stderr
    row = pd.read_csv(tmp_path / "c.csv").iloc[0]
    assert row["kl_to_full"] == pytest.approx(0, abs=1e-9) and row["top1_agreement"] == 1.0


def test_token_strip_and_contexts_are_readable_text_with_every_token_once(tiny):
    """The token strip is the prompt's own text (each token one span, in order, HTML-escaped),
    coloured by the share of branches it skipped, with the counts on hover; contexts likewise."""
    import html
    import re

    trace = tiny.trace("word <b>&amp; " * 20, skip=0.3)
    seq = trace.sequences[0]
    strip = figures.token_strip_html(trace)
    spans = re.findall(
        r'<span class="gs-tok[^"]*" style="background:rgba\(220, 40, 30, ([0-9.]+)\)" title="([^"]*)">(.*?)</span>',
        strip,
    )
    assert [html.unescape(text) for _, _, text in spans] == [t.replace("\n", "↵\n") or "∅" for t in seq.tokens]
    counts = seq.skipped.sum(axis=(1, 2))
    total = trace.n_layers * 2
    for (alpha, title, _), count in zip(spans, counts):
        assert f"skipped {int(count)} of {total} branches" in html.unescape(title)
        assert float(alpha) == pytest.approx(0.08 + 0.62 * count / total, abs=1e-3)
    assert "<b>" not in strip.replace("<b>#", "")  # the text's own markup is escaped
    contexts = pd.DataFrame(
        {"example": [1, 1, 1], "offset": [-1, 0, 1], "token": [" the", " cat", " sat"], "gate": [0.9, 0.1, 0.5],
         "skipped": [False, True, False]}
    )  # fmt: skip
    rendered = figures.context_html(contexts)
    assert re.findall(r">([^<>]+)</span>", rendered) == [" the", " cat", " sat"]
    assert rendered.count("gs-mark") == 2 and "gs-tok gs-skip gs-mark" in rendered  # CSS rule + the example token


def test_harm_streamed_over_a_corpus_is_each_blocks_own_exact_harm(tiny_llama):
    """`corpus_harm`: the corpus's token stream in consecutive blocks, each ablated as a text of its own."""
    from analysis.experiments.faithfulness import _exact_harm_of_ids, corpus_harm
    from gateskip_core.data import token_blocks

    texts = [p for t in pydoc_texts("validation")[:3] for p in paragraphs(t)]
    entries = corpus_harm(tiny_llama, texts, n_texts=3, n_entries=8, seq_len=24, batch_size=8, show_progress=False)
    assert sorted(entries["text"].unique()) == [0, 1, 2]
    blocks = list(token_blocks(tiny_llama.tokenizer, texts, 24))[:3]
    for i, block in enumerate(blocks):
        alone = _exact_harm_of_ids(tiny_llama, block[None], 8, i, 8, False, None)
        part = entries[entries["text"] == i].drop(columns="text").reset_index(drop=True)
        pd.testing.assert_frame_equal(part, alone)
    assert entries.groupby("text").size().nunique() == 1
    with pytest.raises(GateSkipError, match="fewer than the 500 asked"):
        corpus_harm(tiny_llama, texts[:2], n_texts=500, n_entries=2, seq_len=24, show_progress=False)


def test_faithfulness_cli_streams_a_corpus_with_texts(tmp_path):
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n\n".join(pydoc_texts("validation")[:2]))
    entries = tmp_path / "e.csv"
    common = ["faithfulness", "--model", "tiny-llama", "--gates", "untrained", "--exact", "4", "--max-tokens", "16"]
    res = run(
        *common, "--file", str(corpus), "--texts", "3", "--out", str(tmp_path / "f.csv"), "--entries-out", str(entries)
    )
    assert res.returncode == 0, res.stderr
    assert "over 3 texts" in res.stdout and sorted(pd.read_csv(entries)["text"].unique()) == [0, 1, 2]
    bad = run(*common, "--text", "Hello there, a fine day.", "--texts", "2", "--out", str(tmp_path / "g.csv"))
    assert bad.returncode == 2 and "--texts streams blocks of a corpus" in bad.stderr


def test_gates_by_attention_kind_split_sliding_and_global_layers(tmp_path):
    from analysis.traces.flow import by_attention_kind
    from gateskip_core import load_model

    model = load_model("tiny-gemma3", gates="untrained")
    sliding = [parts.sliding_window is not None for parts in model.spec.layers]
    assert any(sliding) and not all(sliding)  # Gemma-3 alternates the two kinds
    table = TraceDB(model.trace("The quick brown fox jumps over the lazy dog.", skip=0.3)).layer_table()
    kinds = by_attention_kind(table, sliding)
    assert set(kinds["attention"]) == {"sliding", "global"} and kinds["layers"].sum() == 2 * len(sliding)
    glob = table[np.array([not sliding[i] for i in table["layer"]]) & (table["branch"] == "mlp").to_numpy()]
    row = kinds[(kinds["attention"] == "global") & (kinds["branch"] == "mlp")].iloc[0]
    assert row["gate_mean"] == pytest.approx(glob["gate_mean"].mean()) and row["skip_rate"] == pytest.approx(
        glob["skip_rate"].mean()
    )
    with pytest.raises(ValueError):
        by_attention_kind(table, sliding[:-1])


def test_faithfulness_intervals_resample_texts_contain_the_estimates_and_narrow_with_more_entries(tiny_llama):
    from analysis.experiments.faithfulness import BOOTSTRAPPED, corpus_harm, signal_table

    texts = [p for t in pydoc_texts("validation")[:3] for p in paragraphs(t)]
    per_cell = 8
    entries = corpus_harm(
        tiny_llama, texts, n_texts=8, n_entries=per_cell * 8, seq_len=32, batch_size=64, show_progress=False
    )
    full = signal_table(entries, resamples=300)
    assert set(full["clusters"]) == {"8 texts"} and set(full["entries_per_stratum"]) == {8 * per_cell}
    for column in BOOTSTRAPPED:
        finite = full[np.isfinite(full[column]) & np.isfinite(full[f"{column}_low"])]
        assert len(finite) >= 5
        assert (finite[f"{column}_low"] <= finite[column] + 1e-12).all()
        assert (finite[column] <= finite[f"{column}_high"] + 1e-12).all()
    # the same texts with 2 of the 8 entries per (text, layer, branch): wider intervals
    thin = [
        signal_table(entries.groupby(["text", "layer", "branch"]).sample(n=2, random_state=s), resamples=300)
        for s in range(3)
    ]

    def width(table, signal, column):
        row = table.set_index("signal").loc[signal]
        return row[f"{column}_high"] - row[f"{column}_low"]

    for signal in ("gate", "rel_norm", "attribution"):
        assert width(full, signal, "spearman_within") < np.mean([width(t, signal, "spearman_within") for t in thin])
    # the table does not depend on the entries' order: ties (the binary `unsettled`) carry their mean harm
    shuffled = signal_table(entries.sample(frac=1, random_state=1), resamples=300)
    pd.testing.assert_frame_equal(shuffled, full)
    from analysis.experiments.faithfulness import _lowest, _stratum_numbers

    tied, harm = np.array([0.0, 0, 0, 1]), np.array([1.0, 2, 3, 10])
    assert _lowest(tied, harm, 0.5) == pytest.approx(2 * (1 + 2 + 3) / 3)
    carried = _stratum_numbers(tied[None, :, None], harm[None], 0.5)[1]  # the bootstrap's vectorised path
    assert carried[0, 0] == pytest.approx(4.0)
    # one text: the layers are the clusters
    one = signal_table(entries[entries["text"] == 0], resamples=100)
    assert set(one["clusters"]) == {f"{tiny_llama.spec.n_layers} layers of one text"}


def _three_layer_trace(skip_rates=(0.1, 0.5, 0.3), n_sequences: int = 4, tokens: int = 12, seed: int = 0):
    """A synthetic 3-layer trace written through the real Trace class: random gates, each layer's
    branches skipping about `skip_rates[layer]` of the eligible tokens, adapter scope 'skipped'."""
    from gateskip_core import Trace
    from gateskip_core.traces.compute import ComputeAccount
    from gateskip_core.traces.trace import SequenceTrace, applied_gates

    rng = np.random.default_rng(seed)
    words = ["<s>", " the", " cat", ",", " 42", " sat", " on", " a", " mat", ".", "\n", " again"]
    sequences = []
    for _ in range(n_sequences):
        gate = rng.uniform(0.05, 0.95, (tokens, 3, 2)).astype(np.float32)
        eligible = np.arange(tokens) > 0
        skipped = (rng.uniform(size=(tokens, 3, 2)) < np.asarray(skip_rates)[None, :, None]) & eligible[:, None, None]
        sequences.append(
            SequenceTrace(
                token_ids=np.arange(tokens, dtype=np.int64),
                tokens=words[:tokens],
                gate=gate,
                threshold=np.full((tokens, 3, 2), 0.5),
                skipped=skipped,
                gate_applied=applied_gates(skipped, "skipped"),
                eligible=eligible,
                compute=ComputeAccount(1.0, 0.8, 0.8, 0.0, tokens),
                prompt_length=tokens,
            )
        )
    budget = np.repeat(np.asarray(skip_rates, dtype=float)[:, None], 2, axis=1)
    return Trace(
        sequences, "synthetic", "synthetic", "quantile", budget, ("attn", "mlp"), "masked", "compute", True, "skipped"
    )


def test_gate_statistics_name_their_cells_and_applied_only_equals_pandas_over_applied_rows(tiny_llama):
    from analysis.traces.intervals import cluster_mean_interval

    texts = ["The quick brown fox jumps over the lazy dog.", "Gates decide which tokens skip.", "Short one, 42."]
    trace = tiny_llama.trace(texts, skip=0.3, adapter_scope="skipped")
    rows = trace.to_dataframe()
    rows["token_type"] = [token_type(t, p) for t, p in zip(rows["token"], rows["position"])]
    assert 0 < rows["gate_applied"].sum() < (rows["skipped"] == 0).sum()  # some gates that ran never acted
    db = TraceDB(trace)  # the default pools the applied cells
    for cells in ("applied", "all"):
        pooled = rows[rows["gate_applied"] == 1] if cells == "applied" else rows
        layers = db.layer_table(cells=cells) if cells == "all" else db.layer_table()
        assert set(layers["gate_cells"]) == {cells}
        expected = pooled.groupby(["layer", "branch"])["gate"].agg(["mean", "std", "size"])
        for row in layers.itertuples():
            if (row.layer, row.branch) not in expected.index:
                assert row.gate_n == 0 and np.isnan(row.gate_mean)
                continue
            want = expected.loc[(row.layer, row.branch)]
            assert row.gate_n == want["size"] and row.gate_mean == pytest.approx(want["mean"], rel=1e-9)
            assert row.gate_std == pytest.approx(
                pooled[(pooled.layer == row.layer) & (pooled.branch == row.branch)]["gate"].std(ddof=0), abs=1e-6
            )
        types = db.token_type_table(cells=cells).set_index(["token_type", "layer", "branch"])
        by_type = pooled.groupby(["token_type", "layer", "branch"])["gate"].mean()
        assert set(types["gate_cells"]) == {cells}
        for key, mean in by_type.items():
            assert types.loc[key, "gate_mean"] == pytest.approx(mean, rel=1e-9)
        rates = db.skip_rates(cells=cells)
        assert np.allclose(
            rates["gate_mean"],
            [
                by
                for by in pooled.groupby(["layer", "branch"])["gate"]
                .mean()
                .reindex(list(zip(rates["layer"], rates["branch"])))
            ],
            equal_nan=True,
        )
    # BOS never skips, so in scope 'skipped' its gate never acts: the applied BOS table is empty
    assert db.bos_table()["sequences"].eq(0).all() and db.bos_table()["bos_gate"].isna().all()
    assert db.bos_table(cells="all")["sequences"].eq(3).all()
    # the interval clustered by sequence, from the per-sequence sums
    cell = rows[(rows["layer"] == 3) & (rows["branch"] == "mlp") & (rows["gate_applied"] == 1)]
    per_seq = cell.groupby("sequence_id")["gate"].agg(["sum", "size"])
    y, n = per_seq["sum"].to_numpy(), per_seq["size"].to_numpy()
    mean, k = y.sum() / n.sum(), len(y)
    half = 1.959963984540054 * np.sqrt(k / (k - 1) * ((y - mean * n) ** 2).sum()) / n.sum()
    row = db.layer_table().set_index(["layer", "branch"]).loc[(3, "mlp")]
    assert (row["gate_mean_low"], row["gate_mean_high"]) == pytest.approx((mean - half, mean + half), rel=1e-9)
    low, high = cluster_mean_interval([y.sum()], [n.sum()], [(y * y).sum()], [(y * n).sum()], [(n * n).sum()], [1])
    assert np.isnan(low[0]) and np.isnan(high[0])  # one sequence says nothing about another
    with pytest.raises(GateSkipError, match="cells must be one of"):
        TraceDB(trace, cells="some")


def test_stats_labels_follow_the_depth_of_a_three_layer_model(tmp_path):
    table = TraceDB(_three_layer_trace(), cells="all").layer_table()
    summary = layer_skip_summary(table).set_index("branch")
    assert list(summary["early_layers"]) == ["0", "0"] and list(summary["late_layers"]) == ["2", "2"]
    assert list(summary["most_skipped_layers"]) == ["1", "1"] and list(summary["least_skipped_layers"]) == ["0", "0"]
    assert summary.loc["mlp", "early_gate_mean"] == pytest.approx(
        table.query("layer == 0 and branch == 'mlp'")["gate_mean"].iloc[0]
    )
    even = layer_skip_summary(TraceDB(_three_layer_trace((0.0, 0.0, 0.0)), cells="all").layer_table())
    assert set(even["most_skipped_layers"]) == {"-"} == set(even["least_skipped_layers"])  # all layers alike
    path = _three_layer_trace().to_csv(tmp_path / "three.csv")
    res = run("stats", "--trace", str(path), "--out", str(tmp_path / "ls.csv"), "--bos-out", str(tmp_path / "bos.csv"))
    assert res.returncode == 0, res.stderr
    assert "4 sequences, 48 tokens, 3 layers" in res.stdout and "layers 0-4" not in res.stdout
    assert "BOS (attn), layers 0: its gate never acted (applied cells: none)" in res.stdout
    assert "gate statistics pool the applied cells only" in res.stdout
    every = run("stats", "--trace", str(path), "--out", str(tmp_path / "ls2.csv"), "--cells", "all")
    assert "BOS/others gate ratio (mlp), layers 0: " in every.stdout
    assert "one value in all" not in every.stdout  # random BOS gates: 4 different values
    assert set(pd.read_csv(tmp_path / "ls2.csv")["gate_cells"]) == {"all"}
    assert set(pd.read_csv(tmp_path / "ls.csv")["gate_cells"]) == {"applied"}


def test_early_late_means_weigh_each_layer_by_its_cells(tmp_path):
    """Layer 0's attention gate acts in 2 cells per sequence (gate 0.99), layer 1's in all 12 (gate 0.1):
    the early window's mean is the pooled mean over those cells, not the mean of the two layer means."""
    from gateskip_core import Trace
    from gateskip_core.traces.compute import ComputeAccount
    from gateskip_core.traces.trace import SequenceTrace, applied_gates

    tokens, n_layers = 12, 6
    gate = np.full((tokens, n_layers, 2), 0.5, dtype=np.float32)
    gate[:, 0, 0], gate[:, 1, 0] = 0.99, 0.1
    eligible = np.arange(tokens) > 0
    skipped = np.zeros((tokens, n_layers, 2), dtype=bool)
    skipped[2:, 0, 0] = True  # only BOS and token 1 run layer 0's attention
    seq = SequenceTrace(
        token_ids=np.arange(tokens, dtype=np.int64),
        tokens=[f" t{i}" for i in range(tokens)],
        gate=gate,
        threshold=np.full((tokens, n_layers, 2), 0.5),
        skipped=skipped,
        gate_applied=applied_gates(skipped, "all"),
        eligible=eligible,
        compute=ComputeAccount(1.0, 0.9, 0.9, 0.0, tokens),
        prompt_length=tokens,
    )
    budget = np.zeros((n_layers, 2))
    trace = Trace(
        [seq] * 3, "synthetic", "synthetic", "quantile", budget, ("attn", "mlp"), "masked", "compute", True, "all"
    )
    table = TraceDB(trace).layer_table()
    attn = layer_skip_summary(table).set_index("branch").loc["attn"]
    rows = trace.to_dataframe()
    early = rows[(rows.branch == "attn") & (rows.layer < 2) & (rows.gate_applied == 1)]
    assert attn["early_gate_n"] == len(early) == 3 * (2 + 12)
    assert attn["early_gate_mean"] == pytest.approx(early["gate"].mean(), rel=1e-6)  # (2 x 0.99 + 12 x 0.1) / 14
    assert attn["early_gate_mean"] < 0.25 < table.query("branch == 'attn' and layer < 2")["gate_mean"].mean()
    ran = rows[(rows.branch == "attn") & (rows.layer < 2) & (rows.eligible == 1)]
    assert attn["early_eligible"] == len(ran) and attn["early_skip_rate"] == pytest.approx(ran["skipped"].mean())
    path = trace.to_csv(tmp_path / "six.csv")
    res = run("stats", "--trace", str(path), "--out", str(tmp_path / "ls.csv"))
    assert res.returncode == 0, res.stderr
    assert "cell-weighted" in res.stdout and "early_gate_n" in res.stdout


def test_example_contexts_are_distinct_with_the_count_of_their_duplicates(tiny_llama):
    from analysis.traces.tracedb import context_strings

    texts = ["Note: the cat sat.", "Note: the cat sat.", "Note: the cat sat.", "A dog ran far away."]
    trace = tiny_llama.trace(texts, skip=0.3)
    db = TraceDB(trace, cells="all")
    shown = context_strings(db.example_contexts(1, "mlp", n=50, window=3))
    assert shown["context"].is_unique and set(shown["duplicates"]) > {1}
    # against pandas: every eligible occurrence's context, grouped
    rows = trace.to_dataframe()
    tokens = rows[(rows["layer"] == 0) & (rows["branch"] == "attn")].set_index(["sequence_id", "position"])["token"]
    cell = rows[(rows["layer"] == 1) & (rows["branch"] == "mlp") & (rows["eligible"] == 1)]

    def context(sid, pos):
        return "".join(
            f"[{tokens[(sid, p)]}]" if p == pos else tokens[(sid, p)]
            for p in range(pos - 3, pos + 4)
            if (sid, p) in tokens.index
        )

    cell = cell.assign(context=[context(s, p) for s, p in zip(cell["sequence_id"], cell["position"])])
    expected = cell.groupby("context").agg(gate=("gate", "min"), duplicates=("gate", "size")).sort_values("gate")
    assert len(shown) == len(expected)
    assert list(shown["context"]) == list(expected.index) and list(shown["duplicates"]) == list(expected["duplicates"])
