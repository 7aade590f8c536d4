"""Self-speculative decoding (`forward/speculative.py`, `generate(draft_skip=...)`, `gateskip generate`):
the output is the original's greedy output token for token, and the record says what was drafted."""

from __future__ import annotations

import pytest
import torch

from gateskip import cli as gateskip_cli
from gateskip_core import GateSkipError, load_model, read_trace
from gateskip_core.training.loop import TrainConfig, train

from .conftest import PROMPTS, TINY, run_cli, spread_gates

N_NEW = 12


def _original_tokens(model, prompt, n_new=N_NEW) -> list[list[int]]:
    """The ungated original's greedy tokens: the reference every speculative run must equal."""
    gen = model.view().generate(prompt, max_new_tokens=n_new, skip=0.0, stop_at_eos=False)
    return gen.trace.extra["generated_token_ids"]


def _check_record(gen, n_new=N_NEW) -> None:
    """The record's counts agree with its per-token sources, and every token has one."""
    record, tokens = gen.speculative, gen.trace.extra["generated_token_ids"]
    for row, sources, rejected in zip(tokens, record.sources, record.rejected_drafts):
        assert len(sources) == len(row) == len(rejected) == n_new and sources[0] == "verifier"
        for token, source, draft in zip(row, sources, rejected):
            assert (draft is not None) == (source == "corrected")
            assert draft is None or draft != token  # a rejected draft is not what the original chose
    assert record.accepted == sum(s.count("accepted") for s in record.sources)
    assert record.acceptance_rate == pytest.approx(record.accepted / record.drafted)


@pytest.mark.parametrize("name", TINY)
@pytest.mark.parametrize("draft_skip", [0.3, 0.8])
@pytest.mark.parametrize("draft_tokens", [1, 3, 6])
def test_greedy_tokens_are_the_originals_in_scope_all(name, draft_skip, draft_tokens):
    model = spread_gates(load_model(name))
    gen = model.generate(
        PROMPTS[0],
        max_new_tokens=N_NEW,
        draft_skip=draft_skip,
        draft_tokens=draft_tokens,
        policy="random",
        stop_at_eos=False,
    )
    assert gen.trace.extra["generated_token_ids"] == _original_tokens(model, PROMPTS[0])
    _check_record(gen)
    # each round adds its accepted drafts and one token of the original's, after the prefill's first
    record = gen.speculative
    assert record.accepted + record.rounds == N_NEW - 1
    assert 0 < record.draft_skip_rate and abs(record.draft_skip_rate - draft_skip) < 0.15


def test_a_draft_the_original_rejects_often_still_gives_the_originals_tokens():
    # tiny-gemma3 with spread gates in scope all: the draft disagrees on most positions
    model = spread_gates(load_model("tiny-gemma3"))
    gen = model.generate(
        PROMPTS[1], max_new_tokens=20, draft_skip=0.7, draft_tokens=4, policy="random", stop_at_eos=False
    )
    sources = gen.speculative.sources[0]
    assert sources.count("corrected") >= 8 and gen.speculative.acceptance_rate < 0.3
    assert gen.trace.extra["generated_token_ids"] == _original_tokens(model, PROMPTS[1], 20)
    _check_record(gen, 20)


@pytest.fixture(scope="module")
def lora_gemma(tmp_path_factory):
    """tiny-gemma3 with gates and a LoRA adapter trained for a few steps (adapter scope 'skipped')."""
    out = tmp_path_factory.mktemp("lora") / "tiny-gemma3-lora.safetensors"
    config = dict(model="tiny-gemma3", seq_len=32, batch=4, steps=3, gate="lowrank:4", adapter="lora:2")
    config.update(adapter_lr=5e-2, calibrate=False, val_every=100, checkpoint_every=100, skip_end=0.3, out=str(out))
    train(TrainConfig(**config, adapter_scope="skipped"), progress=lambda m: None, show_bar=False)
    return load_model("tiny-gemma3", gates=str(out))


@pytest.mark.parametrize("scope", ["skipped", "all"])
def test_greedy_tokens_are_the_originals_with_an_adapter_in_either_scope(lora_gemma, scope):
    reference = _original_tokens(lora_gemma, PROMPTS[0])
    for draft_skip, draft_tokens in [(0.0, 3), (0.5, 2), (0.9, 5)]:
        gen = lora_gemma.generate(
            PROMPTS[0],
            max_new_tokens=N_NEW,
            draft_skip=draft_skip,
            draft_tokens=draft_tokens,
            policy="random",
            adapter_scope=scope,
            stop_at_eos=False,
        )
        assert gen.trace.extra["generated_token_ids"] == reference, (scope, draft_skip)
        _check_record(gen)
        if draft_skip == 0.0 and scope == "skipped":  # the draft *is* the original: nothing is rejected
            assert gen.speculative.acceptance_rate == 1.0


def test_the_trace_is_the_originals_passes_over_prompt_and_fed_tokens():
    model = spread_gates(load_model("tiny-gemma3"))
    gen = model.generate(
        PROMPTS[0], max_new_tokens=N_NEW, draft_skip=0.5, draft_tokens=3, policy="random", stop_at_eos=False
    )
    plain = model.view().generate(PROMPTS[0], max_new_tokens=N_NEW, skip=0.0, stop_at_eos=False)
    seq, ref = gen.trace.sequences[0], plain.trace.sequences[0]
    assert list(seq.token_ids) == list(ref.token_ids) and seq.prompt_length == ref.prompt_length
    assert not seq.skipped.any() and gen.trace.gates == "none"
    assert seq.compute.dense_flops == ref.compute.dense_flops


def test_a_left_padded_batch_gives_each_rows_original_tokens():
    model = spread_gates(load_model("tiny-gemma3"))
    gen = model.generate(
        PROMPTS, max_new_tokens=N_NEW, draft_skip=0.5, draft_tokens=3, policy="random", stop_at_eos=False
    )
    reference = _original_tokens(model, PROMPTS)
    assert gen.trace.extra["generated_token_ids"] == reference
    assert [_original_tokens(model, p)[0] for p in PROMPTS] == reference  # and each alone
    _check_record(gen)


def test_a_row_that_stops_early_keeps_only_its_tokens():
    model = spread_gates(load_model("tiny-gemma3"))
    reference = _original_tokens(model, PROMPTS[:2])
    stop_after = reference[0][4]  # row 0 stops at its 5th token (as if it were EOS)
    model.tokenizer.eos_token_id, eos = stop_after, model.tokenizer.eos_token_id
    try:
        gen = model.generate(PROMPTS[:2], max_new_tokens=N_NEW, draft_skip=0.5, draft_tokens=4, policy="random")
        plain = model.view().generate(PROMPTS[:2], max_new_tokens=N_NEW, skip=0.0)
    finally:
        model.tokenizer.eos_token_id = eos
    tokens = gen.trace.extra["generated_token_ids"]
    assert tokens == plain.trace.extra["generated_token_ids"] and len(tokens[0]) <= 5
    assert [list(s.token_ids) for s in gen.trace.sequences] == [list(s.token_ids) for s in plain.trace.sequences]


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(draft_skip=0.5, do_sample=True), "greedy only"),
        (dict(draft_skip=0.5, skip=0.3), "not skip"),
        (dict(draft_tokens=3), "draft_tokens needs draft_skip"),
        (dict(draft_skip=0.5, draft_tokens=0), "draft_tokens must be at least 1"),
        (dict(draft_skip=0.5, policy="quantile"), "calibrated or random"),
        (dict(draft_skip=1.5), "skip"),
    ],
)
def test_bad_combinations_are_one_line(tiny_llama, kwargs, message):
    with pytest.raises(GateSkipError, match=message) as err:
        tiny_llama.generate("hi", max_new_tokens=3, **{"policy": "random", **kwargs})
    assert "\n" not in str(err.value)


def test_cli_generates_the_originals_text_and_writes_the_trace(tmp_path, capsys):
    out = tmp_path / "gen.csv"
    args = ["generate", PROMPTS[1], "--model", "tiny-gemma3", "--gates", "untrained", "--policy", "random"]
    status = gateskip_cli.main(
        [*args, "--draft-skip", "0.6", "--draft-tokens", "3", "--max-new-tokens", "6"]
        + [
            "--out",
            str(out),
        ]
    )
    printed = capsys.readouterr().out.splitlines()
    assert status == 0
    original = load_model("tiny-gemma3").generate(PROMPTS[1], max_new_tokens=6, skip=0.0)
    assert printed[0] == original.text
    assert printed[1].startswith("6 new tokens | skipped: prompt 0.0%, generated 0.0%") and "drafted (" in printed[1]
    trace = read_trace(out)
    assert list(trace.sequences[0].token_ids) == list(original.trace.sequences[0].token_ids)


@pytest.mark.parametrize(
    "args, message",
    [
        (["--draft-tokens", "3"], "needs --draft-skip"),
        (["--draft-skip", "0.5", "--skip", "0.2"], "as --draft-skip"),
        (["--draft-skip", "0.5", "--policy", "quantile"], "calibrated or random"),
        (["--out", "gen.txt"], "--out must end in .csv or .parquet"),
    ],
)
def test_cli_bad_input_is_one_line_before_any_model_loads(capsys, args, message):
    # a model name that does not exist: the error must come from the inputs, before loading
    assert gateskip_cli.main(["generate", "hi", "--model", "no-such-model", *args]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("gateskip: error: ") and message in err and "\n" not in err


def test_cli_without_a_prompt_is_one_line_in_a_subprocess():
    result = run_cli("generate", "--model", "tiny-llama")
    assert result.returncode == 2 and result.stderr.strip() == "gateskip: error: give a prompt or --file"


@pytest.mark.real
def test_smollm2_default_gates_draft_the_originals_tokens():
    model = load_model("smollm2-135m-instruct", gates="default")
    prompt = "Explain in two sentences why the sky is blue."
    torch.manual_seed(0)
    gen = model.generate(prompt, chat=True, max_new_tokens=24, draft_skip=0.5, draft_tokens=4, stop_at_eos=False)
    plain = model.view().generate(prompt, chat=True, max_new_tokens=24, skip=0.0, stop_at_eos=False)
    assert gen.trace.extra["generated_token_ids"] == plain.trace.extra["generated_token_ids"]
    assert gen.text == plain.text
    _check_record(gen, 24)
    assert 0.2 < gen.speculative.acceptance_rate < 1.0  # the draft skips for real and is mostly right


def test_dashboard_marks_the_drafted_tokens_the_original_rejected(monkeypatch):
    import re

    from streamlit.testing.v1 import AppTest

    from .conftest import APP

    monkeypatch.setenv("GATESKIP_DASHBOARD_MODEL", "tiny-gemma3")
    app = AppTest.from_file(APP, default_timeout=120)
    app.run()
    app.checkbox(key="drafting").check().run()
    app.button(key="generate").click().run()
    assert not app.exception, app.exception
    ungated, drafted = app.code[-2].value, app.code[-1].value
    assert re.sub(r"⟪.*?→(.*?)⟫", r"\1", drafted, flags=re.S) == ungated  # the original's text, marks aside
    caption = next(c.value for c in app.caption if c.value.startswith("the original accepted"))
    n_rejected = int(re.search(r"marks the (\d+) it rejected", caption).group(1))
    assert n_rejected > 0 and drafted.count("⟪") == n_rejected  # one mark per rejected draft
