"""`gateskip eval` and the `gateskip` lm-eval model (analysis/evaluation).

Tiny random models on the shipped offline tasks: at budget 0 (adapter scope `skipped`: the
original model) every per-item result equals lm-eval's own `hf` model; under skipping a request's
result does not depend on what it is batched with (padding is not ranked); the compute account
sums every request; bad input is one line and exit 2 before any model work. One `real` test:
SmolLM2 with its shipped gates against `hf` on a shipped task.
"""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

lm_eval = pytest.importorskip("lm_eval")

from analysis.evaluation.lm import GateSkipLM  # noqa: E402
from analysis.evaluation.task_loading import load_tasks  # noqa: E402
from gateskip.cli import main  # noqa: E402
from gateskip_core import load_model  # noqa: E402
from tests.conftest import spread_gates  # noqa: E402

# one task per request type: multiple choice, loglikelihood, rolling loglikelihood, generation
TASKS = ["gateskip_pydoc_nextsent", "gateskip_legal_lastword", "gateskip_legal_ppl", "gateskip_legal_lastword_gen"]


@pytest.fixture(scope="module")
def tasks():
    return load_tasks(TASKS)


@pytest.fixture(scope="module")
def tiny():
    return spread_gates(load_model("tiny-llama"))


def _samples(lm, tasks, names, limit):
    chosen = [tasks.tasks[n] for n in names]
    out = lm_eval.simple_evaluate(model=lm, tasks=chosen, task_manager=tasks.manager, limit=limit, log_samples=True)
    return {n: [s["resps"] for s in out["samples"][n]] for n in names}, out["results"]


def _hf(model):
    from lm_eval.models.huggingface import HFLM

    return HFLM(pretrained=model.original, tokenizer=model.tokenizer, batch_size=3, add_bos_token=True, device="cpu")


def test_budget_zero_equals_hf_item_by_item(tiny, tasks):
    """Every request type, batches of 3 (padding, several batches): the same numbers as `hf`."""
    gated = GateSkipLM(tiny, skip=0.0, adapter_scope="skipped", batch_size=3)
    ours, _ = _samples(gated, tasks, TASKS, limit=4)
    theirs, _ = _samples(_hf(tiny), tasks, TASKS, limit=4)
    for name in TASKS:
        assert len(ours[name]) == 4
        for a, b in zip(ours[name], theirs[name]):
            flat_a, flat_b = np.array(a, dtype=object).ravel(), np.array(b, dtype=object).ravel()
            for x, y in zip(flat_a, flat_b):
                if isinstance(y, str):
                    assert x == y, name
                else:
                    assert float(x) == pytest.approx(float(y), abs=1e-4), name
    assert gated.account.sequences > 0 and gated.account.skipped_cells == 0


class _AllPositions(GateSkipLM):
    """The head on every position, as before: what HFLM's `_model_call` returns for `hf`."""

    def _scored_logits(self, final_hidden, rows):
        return self.gated.spec.logits(final_hidden)


class _WidthRecording(GateSkipLM):
    """The shipped model, recording (returned positions, batch positions) of every model call."""

    widths: list[tuple[int, int]]

    def _scored_logits(self, final_hidden, rows):
        out = super()._scored_logits(final_hidden, rows)
        self.widths.append((out.shape[1], final_hidden.shape[1]))
        return out


def test_head_on_continuations_only_equals_the_head_on_every_position(tiny, tasks):
    """Under skipping, batches of 3 (right padding, rows of different lengths), every loglikelihood
    request type: the per-item numbers of the head on continuation positions only are those of the
    head on every position, and the returned window is narrower than the batch."""
    names = ["gateskip_pydoc_nextsent", "gateskip_legal_lastword", "gateskip_legal_ppl"]
    fast = _WidthRecording(tiny, skip=0.4, batch_size=3)
    fast.widths = []
    ours, _ = _samples(fast, tasks, names, limit=4)
    reference, _ = _samples(_AllPositions(tiny, skip=0.4, batch_size=3), tasks, names, limit=4)
    for name in names:
        a, b = (
            np.array([float(x) for r in res[name] for x in np.ravel(np.array(r, dtype=object))])
            for res in (ours, reference)
        )
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5, err_msg=name)
    assert any(width < positions for width, positions in fast.widths)


def test_skipping_ranks_no_padding(tiny, tasks):
    """Quantile skipping ranks each row's own tokens: a request scores the same alone (batch 1)
    as right-padded in a batch of 4 (with padding counted as tokens, the budget would skip more)."""
    names = ["gateskip_pydoc_nextsent", "gateskip_legal_ppl"]
    alone, _ = _samples(GateSkipLM(tiny, skip=0.4, batch_size=1), tasks, names, limit=3)
    batched, _ = _samples(GateSkipLM(tiny, skip=0.4, batch_size=4), tasks, names, limit=3)
    for name in names:
        a = np.array(
            [float(x) for r in alone[name] for x in np.array(r, dtype=object).ravel() if not isinstance(x, bool)]
        )
        b = np.array(
            [float(x) for r in batched[name] for x in np.array(r, dtype=object).ravel() if not isinstance(x, bool)]
        )
        np.testing.assert_allclose(a, b, atol=1e-3)


def test_compute_account_sums_every_request(tiny, tasks):
    """One run over two tasks accounts exactly what two runs over each task account; its tokens
    are every row HFLM builds (context + continuation, last token dropped) and it saves under skipping."""
    names = ["gateskip_pydoc_nextsent", "gateskip_legal_lastword_gen"]
    both = GateSkipLM(tiny, skip=0.3, batch_size=2)
    _samples(both, tasks, names, limit=3)
    parts = []
    for name in names:
        lm = GateSkipLM(tiny, skip=0.3, batch_size=2)
        _samples(lm, tasks, [name], limit=3)
        parts.append(lm.gathered_account())
    summed = both.gathered_account()
    assert summed.compute.dense_flops == pytest.approx(parts[0].compute.dense_flops + parts[1].compute.dense_flops)
    assert summed.compute.skipping_flops == pytest.approx(sum(p.compute.skipping_flops for p in parts))
    assert summed.skipped_cells == sum(p.skipped_cells for p in parts) > 0
    assert 0 < summed.net_flops_saved < summed.gross_flops_saved < 0.3
    # the multiple-choice task: 3 items x 4 choices, one row each
    docs = list(tasks.tasks["gateskip_pydoc_nextsent"].test_docs())[:3]
    rows = [both._encode_pair(d["context"], " " + c) for d in docs for c in d["choices"]]
    assert parts[0].sequences == 12
    assert parts[0].compute.tokens == sum(len(ctx) + len(cont) - 1 for ctx, cont in rows)


def test_eval_command_writes_rows_matched_rows_and_json(tmp_path):
    out = tmp_path / "results.csv"
    status = main(
        ["eval", "--model", "tiny-llama", "--gates", "untrained", "--tasks", "gateskip_legal_nextsent"]
        + ["--budgets", "0,0.4", "--methods", "gateskip,shortgpt", "--limit", "3", "--out", str(out)]
    )
    assert status == 0
    import pandas as pd

    table = pd.read_csv(out)
    measured = table[table["kind"] == "measured"]
    assert set(measured["metric"]) == {"acc", "acc_norm"}
    assert len(measured) == 2 * 2 * 2  # metrics x methods x budgets
    assert (measured["n"] == 3).all()
    gs = measured[(measured["method"] == "gateskip") & (measured["metric"] == "acc")].sort_values("skip_budget")
    assert gs["net_flops_saved"].is_monotonic_increasing and gs["net_flops_saved"].iloc[0] <= 0
    matched = table[table["kind"] == "matched"]
    assert set(matched["net_flops_saved"]) == {0.1, 0.2, 0.3}
    runs = json.loads(out.with_suffix(".json").read_text())["runs"]
    assert len(runs) == 4 and "gateskip_legal_nextsent" in runs[0]["results"]


LAUNCHED = """
import os
import torch
torch.set_num_threads(1)
import lm_eval
from analysis.evaluation.lm import GateSkipLM
from analysis.evaluation.task_loading import load_tasks
from gateskip_core import load_model
from tests.conftest import spread_gates
tasks = load_tasks(["gateskip_legal_nextsent"])
lm = GateSkipLM(spread_gates(load_model("tiny-llama")), skip=0.3, batch_size=2)
lm_eval.simple_evaluate(model=lm, tasks=list(tasks.tasks.values()), task_manager=tasks.manager, limit=4)
line = f"world {lm.world_size} own {lm.account.compute.tokens} all {lm.gathered_account().compute.tokens}\\n"
os.write(1, line.encode())  # one write per process: two print() calls can interleave their words on one line
"""


def test_two_processes_under_accelerate_launch_split_the_requests_and_sum_the_account(tmp_path):
    import os
    import subprocess
    from pathlib import Path

    script = tmp_path / "launched.py"
    script.write_text(LAUNCHED)
    root = str(Path(__file__).resolve().parent.parent)
    env = dict(os.environ, CUDA_VISIBLE_DEVICES="", OMP_NUM_THREADS="1", PYTHONPATH=root)
    launch = ["accelerate", "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1"]
    launch += ["--mixed_precision", "no", "--dynamo_backend", "no", str(script)]
    two = subprocess.run(launch, capture_output=True, text=True, env=env, cwd=root)
    assert two.returncode == 0, two.stderr[-2000:]
    one = GateSkipLM(spread_gates(load_model("tiny-llama")), skip=0.3, batch_size=2)  # the same, one process
    _samples(one, load_tasks(["gateskip_legal_nextsent"]), ["gateskip_legal_nextsent"], limit=4)
    whole = one.gathered_account().compute.tokens
    ranks = [line.split() for line in two.stdout.splitlines() if line.startswith("world")]
    assert len(ranks) == 2 and all(r[1] == "2" for r in ranks)
    own = [int(r[3]) for r in ranks]
    assert all(0 < n < whole for n in own)  # each process scored a share
    assert sum(own) == whole and all(int(r[5]) == whole for r in ranks)  # and every process sums the whole


BAD_YAML = "task: broken_task\ndataset_path: json\n  bad: [indent\n"
BAD_TYPE = "task: odd_task\ndataset_path: json\ndataset_kwargs:\n  data_files:\n    test: {data}\ntest_split: test\n"
BAD_TYPE += "output_type: nonsense\ndoc_to_text: x\n"


@pytest.fixture()
def watched_loader(monkeypatch):
    """Fails the test if a model is loaded."""
    import gateskip_core.model as model_module

    def refuse(*args, **kwargs):
        raise AssertionError("a model was loaded before the bad input was found")

    monkeypatch.setattr(model_module, "load_backbone", refuse)


def _one_line_exit_2(capsys, args, out):
    try:
        status = main(["eval", "--model", "tiny-llama", "--gates", "untrained", *args, "--out", str(out)])
    except SystemExit as stop:  # argparse's own checks
        status = stop.code
    err = capsys.readouterr().err.strip().splitlines()
    assert status == 2
    assert len(err) == 1 and err[0].startswith(("gateskip: error: ", "gateskip eval: error: ")), err
    assert not out.parent.exists() or list(out.parent.iterdir()) == [], "something was written"
    return err[0]


def test_bad_inputs_fast(tmp_path, capsys, watched_loader):
    folder = tmp_path / "tasks"
    folder.mkdir()
    (folder / "broken.yaml").write_text(BAD_YAML)
    other = tmp_path / "tasks2"
    other.mkdir()
    data = tmp_path / "data.jsonl"
    data.write_text('{"x": 1}\n')
    (other / "odd.yaml").write_text(BAD_TYPE.format(data=data))
    outdir = tmp_path / "out"
    outdir.mkdir()
    out = outdir / "r.csv"
    task = ["--tasks", "gateskip_legal_nextsent"]
    cases = {
        "broken.yaml is not a valid task YAML": ["--tasks", "broken_task", "--include-path", str(folder)],
        "odd_task: lm-eval cannot build it": ["--tasks", "odd_task", "--include-path", str(other)],
        "no such folder": [*task, "--include-path", str(tmp_path / "nowhere")],
        "budgets must lie in [0, 1]": [*task, "--budgets", "0,1.5"],
        "unknown method(s) magic": [*task, "--methods", "gateskip,magic"],
        "add gateskip to --methods": [*task, "--methods", "shortgpt"],
        "--limit must be at least 1": [*task, "--limit", "0"],
    }
    for expected, args in cases.items():
        assert expected in _one_line_exit_2(capsys, args, out)
    assert "--out" in _one_line_exit_2(capsys, task, tmp_path / "missing" / "r.csv")
    assert "--out must end in .csv" in _one_line_exit_2(capsys, task, outdir / "r.txt")


def test_bad_tasks_that_need_lm_evals_index(tmp_path, capsys, watched_loader):
    """An unknown name and a standard task whose data is not on this machine (lm-eval's own task
    index is built for these: the slow part, once for both)."""
    from analysis.evaluation.task_loading import hub_reachable

    out = tmp_path / "r.csv"
    assert "unknown task(s) no_such_task_xyz" in _one_line_exit_2(capsys, ["--tasks", "no_such_task_xyz"], out)
    if hub_reachable():
        pytest.skip("the Hub is reachable here: hellaswag's data would download")
    assert "cannot be downloaded here" in _one_line_exit_2(capsys, ["--tasks", "hellaswag"], out)


@pytest.mark.real
def test_smollm2_budget_zero_matches_hf_and_skipping_saves(tasks):
    """SmolLM2 with its shipped gates (adapter scope `skipped`): at budget 0 the accuracy on a shipped
    task equals `hf`'s within one item; at 0.3 the account shows net savings."""
    model = load_model("smollm2-135m-instruct", gates="default")
    torch.manual_seed(0)
    names = ["gateskip_pydoc_nextsent"]
    _, ours = _samples(GateSkipLM(model, skip=0.0, batch_size=8), tasks, names, limit=6)
    _, theirs = _samples(_hf(model), tasks, names, limit=6)
    assert abs(ours[names[0]]["acc,none"] - theirs[names[0]]["acc,none"]) <= 1 / 6 + 1e-9
    skipping = GateSkipLM(model, skip=0.3, batch_size=8)
    _samples(skipping, tasks, names, limit=2)
    account = skipping.gathered_account()
    assert 0.1 < account.net_flops_saved < 0.3 and not math.isnan(account.skipped_fraction)


def test_perplexity_stderr_is_bootstrapped_in_process(tiny, monkeypatch):
    """lm-eval's stderr bootstrap forks a multiprocessing pool unless DISABLE_MULTIPROC is set; forked from
    a process with torch threads it hung `gateskip eval`. Building our model must switch the fork off."""
    import multiprocessing

    from lm_eval.api.metrics import bootstrap_stderr, perplexity

    monkeypatch.delenv("DISABLE_MULTIPROC", raising=False)
    GateSkipLM(tiny, skip=0.0, batch_size=1)

    def no_pool(*args, **kwargs):
        raise AssertionError("lm-eval forked a bootstrap pool")

    monkeypatch.setattr(multiprocessing, "Pool", no_pool)
    assert bootstrap_stderr(perplexity, [-1.0, -2.0, -0.5, -3.0], 2000) > 0
